"""What every job shares: storage options, Ray start-up, and failing with a clear reason."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a default worth showing and do not state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class JobError(Exception):
    """A problem with the job's input or environment, reported to the user without a traceback."""


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec storage options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}' "
        "(default: none; S3 credentials and endpoint come from the standard AWS_* variables)",
    )


def parse_storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JobError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def add_wait_for_gpus(parser) -> None:
    parser.add_argument(
        "--wait-for-gpus",
        type=float,
        default=0,
        metavar="SECONDS",
        help="when the Ray cluster has fewer GPUs than the job needs, ask its autoscaler for them and wait up to SECONDS "
        "(for clusters that start GPU nodes from zero), then fail; 0: fail at once when it has none",
    )


def wait_for_gpus(ray, needed: float, bundles: list[dict], seconds: float, what: str) -> dict:
    """The cluster's resources, once they hold ``needed`` GPUs.

    With ``seconds`` > 0 and too few GPUs, asks the autoscaler for ``bundles`` (the job's actors or
    workers; ``ray.autoscaler.sdk.request_resources``), waits up to ``seconds`` for them, and
    withdraws the request either way (the job's own use keeps the nodes up). Raises JobError naming
    ``what`` and --wait-for-gpus when they do not come. With ``seconds`` = 0: the resources as
    they are.
    """
    resources = ray.cluster_resources()
    if seconds <= 0 or resources.get("GPU", 0) >= needed:
        return resources
    from ray.autoscaler.sdk import request_resources

    print(
        f"{what} needs {needed:g} GPUs, the Ray cluster has {resources.get('GPU', 0):g}: "
        f"asked its autoscaler for them, waiting up to {seconds:g} s (--wait-for-gpus)",
        flush=True,
    )
    started = time.monotonic()
    last_report = started
    request_resources(bundles=bundles)
    try:
        while time.monotonic() - started < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - started))))
            resources = ray.cluster_resources()
            if resources.get("GPU", 0) >= needed:
                print(f"the Ray cluster has {resources['GPU']:g} GPUs after {time.monotonic() - started:.0f} s", flush=True)
                return resources
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(f"waiting for GPUs: {resources.get('GPU', 0):g} of {needed:g} after {last_report - started:.0f} s", flush=True)
    finally:
        request_resources(bundles=[])
    raise JobError(
        f"{what} needs {needed:g} GPUs, but the Ray cluster has {resources.get('GPU', 0):g} after --wait-for-gpus {seconds:g} s; "
        "check that it can add GPU nodes (its autoscaler, node types, quotas), or wait longer with a larger --wait-for-gpus"
    )


def init_ray(**kwargs):
    """Joins the Ray cluster this job was submitted to (``ray job submit`` sets RAY_ADDRESS) or
    one started with ``ray start`` on this machine; with none, starts a local Ray (the embedded
    default)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        try:
            ray.init(address="auto", **kwargs)
        except (ConnectionError, RuntimeError):
            ray.init(**kwargs)
    return ray


def run_main(main, argv=None) -> None:
    """Runs ``main(argv)``; a JobError (or a ValueError raised on bad input) exits 2 with its
    message on stderr, so schedulers and ``ray job logs`` show the reason."""
    try:
        code = main(argv)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
