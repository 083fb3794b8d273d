"""Asking a Ray cluster's autoscaler for the GPUs (or CPUs) a job needs, and waiting for them:
``--wait-for-gpus`` of jobs.train and jobs.label."""

from __future__ import annotations

import time

from jobs.common import JobError
from jobs.options import wait_seconds


def add_wait_for_gpus(parser) -> None:
    parser.add_argument(
        "--wait-for-gpus",
        type=wait_seconds,
        default=0,
        metavar="SECONDS",
        help="when the Ray cluster has fewer GPUs than the job needs, ask its autoscaler for them and wait up to SECONDS "
        "(for clusters that start GPU nodes from zero), then fail; 0: fail at once when it has none",
    )


def wait_for_gpus(ray, needed: float, bundles: list[dict], seconds: float, what: str) -> dict:
    """The cluster's resources, once they hold ``needed`` GPUs.

    With ``seconds`` > 0 and too few GPUs, asks the autoscaler for ``bundles`` (the job's actors or
    workers) and waits up to ``seconds`` for them (``ask_autoscaler``). Raises JobError naming
    ``what`` and --wait-for-gpus when they do not come. With ``seconds`` = 0: the resources as
    they are.
    """
    resources = ray.cluster_resources()
    if seconds <= 0 or resources.get("GPU", 0) >= needed:
        return resources
    resources = ask_autoscaler(
        ray, "GPU", needed, bundles, seconds,
        f"{what} needs {needed:g} GPUs, the Ray cluster has {resources.get('GPU', 0):g}: "
        f"asked its autoscaler for them, waiting up to {seconds:g} s (--wait-for-gpus)",
    )
    if resources.get("GPU", 0) >= needed - 1e-9:
        return resources
    raise JobError(
        f"{what} needs {needed:g} GPUs, but the Ray cluster has {resources.get('GPU', 0):g} after --wait-for-gpus {seconds:g} s; "
        "check that it can add GPU nodes (its autoscaler, node types, quotas), or wait longer with a larger --wait-for-gpus"
    )


def ask_autoscaler(ray, resource: str, needed: float, bundles: list[dict], seconds: float, note: str) -> dict:
    """The cluster's resources once they hold ``needed`` of ``resource`` ("GPU", "CPU"), else
    after ``seconds``: says ``note``, asks the autoscaler for ``bundles`` (what the job needs in
    all; ``ray.autoscaler.sdk.request_resources``), polls each second, and withdraws the request
    either way (the job's own use keeps the nodes up). The caller checks what came.

    The request is sent again at each poll: the autoscaler holds one request for the whole
    cluster, and whoever asks last replaces it. Ray Data's AutoscalingCoordinator (a detached
    actor that any Ray Data job leaves on the cluster) sends its own merged requests every 20 s,
    often none, which would otherwise withdraw ours for the rest of the wait."""
    from ray.autoscaler.sdk import request_resources

    print(note, flush=True)
    started = time.monotonic()
    last_report = started
    resources = ray.cluster_resources()
    request_resources(bundles=bundles)
    try:
        while time.monotonic() - started < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - started))))
            resources = ray.cluster_resources()
            if resources.get(resource, 0) >= needed - 1e-9:
                print(f"the Ray cluster has {resources[resource]:g} {resource}s after {time.monotonic() - started:.0f} s", flush=True)
                return resources
            request_resources(bundles=bundles)
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(
                    f"waiting for {resource}s: {resources.get(resource, 0):g} of {needed:g} after {last_report - started:.0f} s",
                    flush=True,
                )
    finally:
        request_resources(bundles=[])
    return resources
