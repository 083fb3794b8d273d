"""The job commands the cluster files run, checked against the jobs and the clusters' resources.

A command is ``python -m jobs.<name> args...``: ``jobs/<name>.py`` must exist and the job's own
argparse parser (``build_parser()``) accept the options; a job module without one is checked
against its ``--help``, which must name each option. Its GPU use must match the cluster: GPUs
only on a cluster whose worker groups have them, a GPU cluster only for a job that uses them,
``--num-workers`` / ``--num-actors`` within max replicas x GPUs (and CPUs) per pod, and
``--wait-for-gpus`` > 0 where the GPU nodes start from zero.

Each check returns the problems it found, one line each (empty: fine). Part of
``python -m cluster.validate``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The options each job's resource check reads, with the jobs' defaults, for jobs without build_parser().
RESOURCE_DEFAULTS = {
    "train": {"use_gpu": False, "num_workers": 1, "cpus_per_worker": 1.0, "wait_for_gpus": 0},
    "label": {"gpus_per_actor": None, "num_actors": None, "cpus_per_actor": 1.0, "wait_for_gpus": 0},
}


def parse_entrypoint(entrypoint: str) -> tuple[str | None, list[str]]:
    """``python -m jobs.<name> args...`` -> (name, args); (None, tokens) for anything else."""
    tokens = shlex.split(entrypoint, comments=True)
    if len(tokens) >= 3 and Path(tokens[0]).name in ("python", "python3") and tokens[1] == "-m" and tokens[2].startswith("jobs."):
        return tokens[2].removeprefix("jobs."), tokens[3:]
    return None, tokens


@functools.lru_cache(maxsize=None)
def help_text(job: str) -> subprocess.CompletedProcess:
    """What ``python -m jobs.<job> --help`` prints (run once per job)."""
    return subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)


def option_values(job: str, argv: list[str]) -> dict:
    """The resource options of ``argv`` by hand, for a job without build_parser()."""
    values = dict(RESOURCE_DEFAULTS.get(job, {}))
    i = 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        key = name.lstrip("-").replace("-", "_")
        if key in values:
            if isinstance(values[key], bool):
                values[key] = True
            else:
                raw = inline or (argv[i + 1] if i + 1 < len(argv) else "")
                values[key] = float(raw) if "." in raw else int(raw)
                i += 0 if inline else 1
        i += 1
    return values


def parse_job_options(
    job: str, argv: list[str], where: str, use_parser: bool = True
) -> tuple[list[str], argparse.Namespace | dict | None]:
    """Runs the job's own parser over ``argv``: (problems, the parsed options). A job module
    without ``build_parser()`` (or ``use_parser=False``) is checked against its ``--help`` instead."""
    if not (REPO / "jobs" / f"{job}.py").is_file():
        return [f"{where}: jobs/{job}.py does not exist (entrypoint python -m jobs.{job})"], None
    module = importlib.import_module(f"jobs.{job}")
    if use_parser and hasattr(module, "build_parser"):
        parser = module.build_parser()
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                options = parser.parse_args(argv)
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()
            return [f"{where}: python -m jobs.{job} rejects its options: {message[-1] if message else '?'}"], None
        # argparse also takes a prefix (--gpus for --gpus-per-actor), which a new option can make ambiguous.
        known = {name for action in parser._actions for name in action.option_strings}
        shortened = [token.partition("=")[0] for token in argv if token.startswith("--") and token.partition("=")[0] not in known]
        if shortened:
            return [f"{where}: spell out {', '.join(shortened)}: python -m jobs.{job} has no option of that exact name"], None
        return [], options
    result = help_text(job)
    if result.returncode != 0:
        return [f"{where}: python -m jobs.{job} --help failed: {result.stderr[-2000:]}"], None
    names = [token.partition("=")[0] for token in argv if token.startswith("--")]
    unknown = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.stdout)]
    if unknown:
        return [f"{where}: python -m jobs.{job} --help does not list {', '.join(unknown)}"], None
    return [], option_values(job, argv)


def quantity(value) -> float:
    """A Kubernetes quantity as a number: '8' -> 8, '500m' -> 0.5."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass
class NodeGroup:
    """What Ray sees on the pods (nodes) of one group, and how many of them there can be."""

    name: str
    max_nodes: int
    cpus: float
    gpus: float


def kuberay_groups(cluster_spec: dict) -> tuple[NodeGroup, list[NodeGroup]]:
    """The head and the worker groups of a RayCluster spec, with what Ray sees on each pod."""

    def describe(name, group, max_nodes):
        container = group["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams") or {}
        cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
        gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get("nvidia.com/gpu", 0))
        return NodeGroup(name, max_nodes, cpus, gpus)

    head = describe("head", cluster_spec["headGroupSpec"], 1)
    workers = [
        describe(group["groupName"], group, int(group.get("maxReplicas", group.get("replicas", 0))))
        for group in cluster_spec.get("workerGroupSpecs", [])
    ]
    return head, workers


def _getter(options):
    return options.get if isinstance(options, dict) else lambda key, default=None: getattr(options, key, default)


def check_job_resources(job: str, options, head: NodeGroup, workers: list[NodeGroup], where: str) -> list[str]:
    """Does the job's GPU use match the cluster, and does it fit at the cluster's largest size?"""
    get = _getter(options)
    gpu_groups = [group for group in workers if group.gpus > 0]
    total_gpus = sum(group.max_nodes * group.gpus for group in gpu_groups)
    problems = []
    if job == "train":
        uses_gpu = bool(get("use_gpu"))
        per_worker_cpus = float(get("cpus_per_worker", 1.0))
        num_workers = int(get("num_workers", 1))
        if uses_gpu:
            # One GPU per training worker, and its CPUs on the same pod.
            slots = sum(g.max_nodes * min(math.floor(g.gpus), math.floor(g.cpus / per_worker_cpus)) for g in gpu_groups)
        else:
            slots = sum(g.max_nodes * math.floor(g.cpus / per_worker_cpus) for g in [head, *workers])
        what = f"--num-workers {num_workers}" + (" --use-gpu" if uses_gpu else "") + f" --cpus-per-worker {per_worker_cpus:g}"
    elif job == "label":
        gpus_per_actor = get("gpus_per_actor")
        uses_gpu = (gpus_per_actor is None and total_gpus > 0) or (gpus_per_actor is not None and gpus_per_actor > 0)
        per_actor_gpus = (1.0 if gpus_per_actor is None else gpus_per_actor) if uses_gpu else 0.0
        per_actor_cpus = float(get("cpus_per_actor", 1.0) or 1.0)  # unset: 1 with GPUs, a node's CPUs less 1 without
        num_actors = get("num_actors")
        pools = gpu_groups if uses_gpu else [head, *workers]
        slots = sum(
            g.max_nodes * min(math.floor(g.gpus / per_actor_gpus + 1e-9) if uses_gpu else math.inf, math.floor(g.cpus / per_actor_cpus))
            for g in pools
        )
        num_workers = 1 if num_actors is None else int(num_actors)  # with no --num-actors the job sizes itself
        what = f"--num-actors {num_actors} --gpus-per-actor {per_actor_gpus:g} --cpus-per-actor {per_actor_cpus:g}"
    else:
        return []
    if uses_gpu and not gpu_groups:
        problems.append(f"{where}: {what} uses GPUs, but no worker group has nvidia.com/gpu limits")
    if not uses_gpu and gpu_groups:
        problems.append(f"{where}: the worker groups {[g.name for g in gpu_groups]} have GPUs that {what} leaves idle")
    if head.gpus > 0:
        problems.append(f"{where}: the head has GPUs; keep them on the worker groups")
    if not problems and num_workers > slots:
        problems.append(
            f"{where}: {what} needs {num_workers} slots, the cluster has {slots} at its largest "
            f"({', '.join(f'{g.name}: {g.max_nodes} x ({g.cpus:g} CPU, {g.gpus:g} GPU)' for g in [head, *workers])})"
        )
    return problems


def check_waits_for_gpus(command: str, where: str) -> list[str]:
    """A GPU job sent to a cluster whose GPU nodes start from zero needs --wait-for-gpus > 0: without
    it the job finds no GPU and stops before the autoscaler could add one. (jobs.label without
    --gpus-per-actor would even label on the CPU.) A command that elides options with "..." is
    read by hand; a whole one by the job's own parser."""
    job, argv = parse_entrypoint(command.rstrip("`").strip())
    if job is None:
        return [f"{where}: cannot read {command!r}"]
    if "..." in argv:
        options = option_values(job, argv)
    else:
        problems, options = parse_job_options(job, argv, where)
        if problems:
            return problems
    get = _getter(options)
    if job == "train":
        uses_gpu = bool(get("use_gpu"))
    else:
        uses_gpu = job == "label" and get("gpus_per_actor") != 0
    if uses_gpu and not get("wait_for_gpus", 0) > 0:
        return [
            f"{where}: python -m jobs.{job} uses GPUs on a cluster whose GPU nodes start from zero; "
            "pass --wait-for-gpus SECONDS (e.g. 600)"
        ]
    return []
