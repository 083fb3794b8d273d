"""cluster/: every YAML parses, and each manifest fits what the jobs need.

For every job a manifest runs (a KubeRay RayJob, the RayJob template of a RayCronJob, the RayJob a
CronJob's ConfigMap holds, the commands of cluster/README.md):

- the entrypoint is ``python -m jobs.<name>``, ``jobs/<name>.py`` exists, and the job's own argparse
  parser accepts the options (``build_parser()``; without one, ``python -m jobs.<name> --help``
  must name each option);
- its GPU use matches the cluster it runs on: ``--use-gpu`` / ``--gpus-per-actor`` only on a cluster
  whose worker group has ``nvidia.com/gpu`` limits, a GPU cluster only for a job that uses GPUs,
  and ``--num-workers`` / ``--num-actors`` within max replicas x GPUs (and CPUs) per pod;
- images are ``rayproject/ray:<ray of constraints.txt>-py3XX[-gpu]`` (GPU ones where the pod has
  GPUs), ``rayVersion`` is that ray, and the pip packages are pinned to constraints.txt's versions,
  the same list as cluster/runtime_env.yaml.

A GPU job sent to a cluster whose GPU nodes start from zero (the RayCluster, cluster/aws/cluster.yaml:
the commands in their comments and in cluster/README.md) passes ``--wait-for-gpus`` > 0.

Beside those: the RayCluster and cluster/aws/cluster.yaml grow GPU workers from zero (spot on AWS),
the CronJob fallback may create RayJobs and forbids overlapping runs, runtime_env.yaml's excludes
drop .venv/data/runs but no source file, and Ray's own validators accept the runtime envs
(``ray.runtime_env.RuntimeEnv``) and the launcher config (its ray-schema.json).

Each check is a function returning the problems it found (empty: fine), run on the real files and,
to show that it can fail, on copies with one thing broken. No Ray cluster and no Kubernetes here:
the files are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.util
import io
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONSTRAINTS = REPO / "constraints.txt"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
AWS_CONFIG = CLUSTER / "aws" / "cluster.yaml"

# What the jobs import at run time beyond the Ray of the image (pyproject's dependencies).
JOB_PACKAGES = ("torch", "torchvision", "pyarrow", "pycocotools", "fsspec", "s3fs", "pillow", "numpy")
IMAGE_PATTERN = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<python>py3\d+)(?P<platform>-cpu|-gpu|-cu\d+)?$")
# The options each job's resource check reads, with the jobs' defaults, for jobs without build_parser().
RESOURCE_DEFAULTS = {
    "train": {"use_gpu": False, "num_workers": 1, "cpus_per_worker": 1.0, "wait_for_gpus": 0},
    "label": {"gpus_per_actor": None, "num_actors": None, "cpus_per_actor": 1.0, "wait_for_gpus": 0},
}
# The clusters whose GPU nodes start from zero: a GPU job sent to them must wait for its GPUs.
FROM_ZERO = (KUBERAY / "raycluster.yaml", AWS_CONFIG)


# --------------------------------------------------------------------------------------------
# Reading


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503): Pillow == pillow, typing_extensions == typing-extensions."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path}: {line!r} is not a name==version pin"
            pins[canonical(name)] = version.strip()
    return pins


def load_documents(path: Path) -> list:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def cluster_yamls() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def kuberay_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_documents(path)]


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec in cluster/kuberay/: RayJobs, RayCronJob templates, RayJobs held in ConfigMaps."""
    specs = []
    for name, doc in kuberay_documents():
        if doc["kind"] == "RayJob":
            specs.append((f"{name} RayJob {doc['metadata'].get('name')}", doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((f"{name} RayCronJob {doc['metadata']['name']} jobTemplate", doc["spec"]["jobTemplate"]))
        elif doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                for held in yaml.safe_load_all(text):
                    if isinstance(held, dict) and held.get("kind") == "RayJob":
                        specs.append((f"{name} ConfigMap {doc['metadata']['name']}/{key}", held["spec"]))
    return specs


def pip_pins(requirements: list[str]) -> dict[str, str | None]:
    """{canonical name: version} of 'name==version' lines; other forms map to None (unpinned)."""
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(==\s*([^\s;,]+))?\s*", requirement)
        if match is None:
            pins[requirement] = None
        else:
            pins[canonical(match.group(1))] = match.group(3)
    return pins


# --------------------------------------------------------------------------------------------
# Checks: each returns a list of problems, empty when the thing is fine


def ray_runtime_env_problems(env: dict, where: str) -> list[str]:
    """What Ray itself says of the runtime env (field types, working_dir URI forms), without a cluster."""
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return [f"{where}: Ray rejects it: {exc}"]
    return []


def check_pins(requirements: list[str], constraints: dict[str, str], where: str) -> list[str]:
    problems = []
    pins = pip_pins(requirements)
    for name, version in pins.items():
        if version is None:
            problems.append(f"{where}: {name!r} is not pinned with ==; pin it to constraints.txt's version")
        elif name not in constraints:
            problems.append(f"{where}: {name}=={version} is not in constraints.txt (the tested set)")
        elif constraints[name] != version:
            problems.append(f"{where}: {name}=={version}, but constraints.txt has {name}=={constraints[name]}")
    missing = sorted(set(map(canonical, JOB_PACKAGES)) - set(pins))
    if missing:
        problems.append(f"{where}: the jobs need {', '.join(missing)}, which the pip list does not install")
    return problems


def check_image(image: str, ray_version: str, gpu: bool, where: str) -> list[str]:
    match = IMAGE_PATTERN.match(image or "")
    if match is None:
        return [f"{where}: image {image!r} is not rayproject/ray:<version>-py3XX[-gpu]"]
    problems = []
    if match["ray"] != ray_version:
        problems.append(f"{where}: image {image} has Ray {match['ray']}, constraints.txt has ray=={ray_version}")
    is_gpu_image = match["platform"] in ("-gpu",) or (match["platform"] or "").startswith("-cu")
    if gpu and not is_gpu_image:
        problems.append(f"{where}: the pod has GPUs but its image {image} is a CPU image (use the -gpu tag)")
    if not gpu and is_gpu_image:
        problems.append(f"{where}: the pod has no GPU but its image {image} is a GPU image (drop -gpu)")
    return problems


def parse_entrypoint(entrypoint: str) -> tuple[str | None, list[str]]:
    """``python -m jobs.<name> args...`` -> (name, args); (None, tokens) for anything else."""
    tokens = shlex.split(entrypoint, comments=True)
    if len(tokens) >= 3 and Path(tokens[0]).name in ("python", "python3") and tokens[1] == "-m" and tokens[2].startswith("jobs."):
        return tokens[2].removeprefix("jobs."), tokens[3:]
    return None, tokens


@functools.lru_cache(maxsize=None)
def help_text(job: str) -> str:
    result = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"python -m jobs.{job} --help failed: {result.stderr[-2000:]}"
    return result.stdout


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


def parse_job_options(job: str, argv: list[str], where: str, use_parser: bool = True) -> tuple[list[str], argparse.Namespace | dict | None]:
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
    text = help_text(job)
    names = [token.partition("=")[0] for token in argv if token.startswith("--")]
    unknown = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    if unknown:
        return [f"{where}: python -m jobs.{job} --help does not list {', '.join(unknown)}"], None
    return [], option_values(job, argv)


def quantity(value) -> float:
    """A Kubernetes quantity as a number: '8' -> 8, '500m' -> 0.5."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass
class NodeGroup:
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


def check_job_resources(job: str, options, head: NodeGroup, workers: list[NodeGroup], where: str) -> list[str]:
    """Does the job's GPU use match the cluster, and does it fit at the cluster's largest size?"""
    get = options.get if isinstance(options, dict) else lambda key, default=None: getattr(options, key, default)
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
    get = options.get if isinstance(options, dict) else lambda key, default=None: getattr(options, key, default)
    if job == "train":
        uses_gpu = bool(get("use_gpu"))
    else:
        uses_gpu = job == "label" and get("gpus_per_actor") != 0
    if uses_gpu and not get("wait_for_gpus", 0) > 0:
        return [f"{where}: python -m jobs.{job} uses GPUs on a cluster whose GPU nodes start from zero; pass --wait-for-gpus SECONDS (e.g. 600)"]
    return []


def check_kuberay_cluster(cluster_spec: dict, constraints: dict[str, str], where: str) -> list[str]:
    ray_version = constraints["ray"]
    problems = []
    if str(cluster_spec.get("rayVersion")) != ray_version:
        problems.append(f"{where}: rayVersion {cluster_spec.get('rayVersion')!r}, constraints.txt has ray=={ray_version}")
    head, workers = kuberay_groups(cluster_spec)
    for group, spec in [(head, cluster_spec["headGroupSpec"]), *zip(workers, cluster_spec.get("workerGroupSpecs", []))]:
        for container in spec["template"]["spec"]["containers"]:
            problems += check_image(container.get("image"), ray_version, group.gpus > 0, f"{where} {group.name}/{container['name']}")
        limits = spec["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        requests = spec["template"]["spec"]["containers"][0].get("resources", {}).get("requests", {})
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            problems.append(f"{where} {group.name}: nvidia.com/gpu requests and limits differ (Kubernetes requires them equal)")
    return problems


def check_rayjob(spec: dict, constraints: dict[str, str], runtime_env_pip: list[str], where: str) -> list[str]:
    problems = []
    job, argv = parse_entrypoint(spec.get("entrypoint", ""))
    if job is None:
        return [f"{where}: entrypoint {spec.get('entrypoint')!r} is not `python -m jobs.<name> ...`"]
    option_problems, options = parse_job_options(job, argv, where)
    problems += option_problems
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes is not true: the GPUs would stay up after the job")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append(f"{where}: ttlSecondsAfterFinished is not set")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    problems += ray_runtime_env_problems(runtime_env, f"{where} runtimeEnvYAML")
    working_dir = str(runtime_env.get("working_dir", ""))
    if not re.match(r"^(https?|s3|gs)://.+\.(zip|tar\.gz|tgz|tar\.xz)$", working_dir):
        problems.append(f"{where}: working_dir {working_dir!r} is not a zip URI; the submitter pod has no checkout to upload")
    problems += check_pins(runtime_env.get("pip", []), constraints, f"{where} runtimeEnvYAML")
    if sorted(runtime_env.get("pip", [])) != sorted(runtime_env_pip):
        problems.append(f"{where}: runtimeEnvYAML's pip list differs from cluster/runtime_env.yaml's")
    cluster_spec = spec.get("rayClusterSpec")
    if cluster_spec is None:
        return problems + [f"{where}: no rayClusterSpec"]
    problems += check_kuberay_cluster(cluster_spec, constraints, where)
    if options is not None:
        head, workers = kuberay_groups(cluster_spec)
        problems += check_job_resources(job, options, head, workers, where)
    return problems


def check_autoscaling_raycluster(doc: dict, constraints: dict[str, str], where: str) -> list[str]:
    spec = doc["spec"]
    problems = check_kuberay_cluster(spec, constraints, where)
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling is not true")
    head, workers = kuberay_groups(spec)
    gpu_groups = [(g, s) for g, s in zip(workers, spec.get("workerGroupSpecs", [])) if g.gpus > 0]
    if not gpu_groups:
        problems.append(f"{where}: no worker group with nvidia.com/gpu limits")
    for group, group_spec in gpu_groups:
        if group_spec.get("minReplicas") != 0:
            problems.append(f"{where} {group.name}: minReplicas {group_spec.get('minReplicas')}, want 0 (GPU nodes from zero)")
        if not group_spec.get("maxReplicas", 0) > 0:
            problems.append(f"{where} {group.name}: maxReplicas must be positive")
    if head.gpus > 0:
        problems.append(f"{where}: the head has GPUs")
    return problems


def check_cronjob_bundle(docs: list[dict], where: str) -> list[str]:
    """The fallback schedule: CronJob (Forbid) -> pod with a ServiceAccount allowed to create RayJobs,
    the RayJob read from a mounted ConfigMap."""
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    problems = []
    for kind, api in [("CronJob", "batch/v1"), ("ServiceAccount", "v1"), ("Role", "rbac.authorization.k8s.io/v1"),
                      ("RoleBinding", "rbac.authorization.k8s.io/v1"), ("ConfigMap", "v1")]:
        if kind not in by_kind:
            problems.append(f"{where}: no {kind}")
        elif by_kind[kind][0]["apiVersion"] != api:
            problems.append(f"{where}: {kind} has apiVersion {by_kind[kind][0]['apiVersion']}, want {api}")
    if problems:
        return problems
    cronjob = by_kind["CronJob"][0]["spec"]
    if cronjob.get("concurrencyPolicy") != "Forbid":
        problems.append(f"{where}: concurrencyPolicy {cronjob.get('concurrencyPolicy')!r}, want Forbid (no two nights at once)")
    if len(str(cronjob.get("schedule", "")).split()) != 5:
        problems.append(f"{where}: schedule {cronjob.get('schedule')!r} is not a 5-field cron expression")
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    account = pod.get("serviceAccountName")
    if account not in [sa["metadata"]["name"] for sa in by_kind["ServiceAccount"]]:
        problems.append(f"{where}: the pod's serviceAccountName {account!r} is not the ServiceAccount defined here")
    roles = {role["metadata"]["name"]: role for role in by_kind["Role"]}
    bound = [
        roles.get(binding["roleRef"]["name"])
        for binding in by_kind["RoleBinding"]
        if binding["roleRef"]["kind"] == "Role" and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"])
    ]
    may_create = any(
        "ray.io" in rule.get("apiGroups", []) and "rayjobs" in rule.get("resources", []) and "create" in rule.get("verbs", [])
        for role in bound if role for rule in role.get("rules", [])
    )
    if not may_create:
        problems.append(f"{where}: no Role bound to {account!r} allows create on rayjobs.ray.io")
    script = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in pod["containers"])
    if "kubectl create" not in script:
        problems.append(f"{where}: the pod does not run `kubectl create`")
    mounted = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    configmaps = {cm["metadata"]["name"]: cm for cm in by_kind["ConfigMap"]}
    held = [key for name in mounted & configmaps.keys() for key in configmaps[name].get("data", {}) if key in script]
    if not held:
        problems.append(f"{where}: the pod reads no RayJob manifest from a ConfigMap it mounts")
    return problems


def aws_node_types(config: dict) -> tuple[dict, dict]:
    """(head node type, {name: worker node type}) of a Ray cluster launcher config."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    return head, {name: spec for name, spec in types.items() if name != config["head_node_type"]}


def check_aws_config(config: dict, constraints: dict[str, str], runtime_env_pip: list[str], where: str) -> list[str]:
    problems = []
    ray_schema = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    import jsonschema

    schema = json.loads(ray_schema.read_text())
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(config), key=str)
    problems += [f"{where}: Ray's cluster schema: {error.message} at {'/'.join(map(str, error.path))}" for error in errors]
    if config.get("provider", {}).get("type") != "aws":
        problems.append(f"{where}: provider.type is not aws")
    ray_version = constraints["ray"]
    docker = config.get("docker", {})
    head, workers = aws_node_types(config)
    problems += check_image(docker.get("head_image", docker.get("image")), ray_version, False, f"{where} head image")
    if head.get("resources", {}).get("GPU", 0) or re.match(r"^(g|p)\d", head["node_config"].get("InstanceType", "")):
        problems.append(f"{where}: the head is a GPU machine; keep the GPUs on the workers")
    gpu_workers = {name: spec for name, spec in workers.items() if spec.get("resources", {}).get("GPU", 0) > 0}
    if not gpu_workers:
        problems.append(f"{where}: no worker type declares GPU resources")
    for name, spec in gpu_workers.items():
        image = spec.get("docker", {}).get("worker_image", docker.get("worker_image", docker.get("image")))
        problems += check_image(image, ray_version, True, f"{where} {name} image")
        if spec.get("min_workers", 0) != 0:
            problems.append(f"{where} {name}: min_workers {spec.get('min_workers')}, want 0 (GPU nodes from zero)")
        if not spec.get("max_workers", 0) > 0:
            problems.append(f"{where} {name}: max_workers must be positive")
        if spec.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") != "spot":
            problems.append(f"{where} {name}: not spot (InstanceMarketOptions.MarketType: spot)")
    if not config.get("max_workers", 0) >= max([s.get("max_workers", 0) for s in workers.values()] or [0]):
        problems.append(f"{where}: the global max_workers is below a node type's max_workers")
    installed = [token for command in config.get("setup_commands", []) for token in shlex.split(command) if "==" in token]
    problems += check_pins(installed, constraints, f"{where} setup_commands")
    if sorted(installed) != sorted(runtime_env_pip):
        problems.append(f"{where}: setup_commands install other pins than cluster/runtime_env.yaml")
    if "." not in config.get("file_mounts", {}).values():
        problems.append(f"{where}: file_mounts does not carry the working dir '.'")
    return problems


def check_runtime_env(env: dict, constraints: dict[str, str], where: str) -> list[str]:
    """working_dir '.', pins = constraints.txt, and excludes that drop .venv/data/runs but no source file."""
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to excludes

    problems = ray_runtime_env_problems(env, where)
    if problems:
        return problems
    if env.get("working_dir") != ".":
        problems.append(f"{where}: working_dir {env.get('working_dir')!r}, want '.' (submitted from the repository root)")
    problems += check_pins(env.get("pip", []), constraints, where)
    excludes = PathSpec.from_lines("gitwildmatch", env.get("excludes", []))
    for path in (".venv/bin/python", "data/shapes/train/annotations.json", "runs/demo/model.pt"):
        if not excludes.match_file(path):
            problems.append(f"{where}: excludes do not drop {path}")
    sources = [str(p.relative_to(REPO)) for folder in ("jobs", "maskrcnn") for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    dropped = [path for path in sources if excludes.match_file(path)]
    if dropped:
        problems.append(f"{where}: excludes drop source files the jobs import, e.g. {dropped[:3]}")
    return problems


# --------------------------------------------------------------------------------------------
# The real files


@pytest.fixture(scope="module")
def constraints() -> dict[str, str]:
    return read_constraints()


@pytest.fixture(scope="module")
def runtime_env_pip() -> list[str]:
    return load_documents(RUNTIME_ENV)[0]["pip"]


def test_cluster_folder_has_the_promised_files():
    expected = [
        "README.md", "runtime_env.yaml", "aws/cluster.yaml", "local/start_head.sh", "local/stop.sh",
        "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-label.yaml",
        "kuberay/raycronjob-label.yaml", "kuberay/cronjob-label.yaml",
    ]
    missing = [name for name in expected if not (CLUSTER / name).is_file()]
    assert not missing, f"cluster/ lacks {missing}"


@pytest.mark.parametrize("path", cluster_yamls(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = load_documents(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
    if path.is_relative_to(KUBERAY):
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: a document lacks apiVersion/kind/metadata"
            if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
                assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['kind']} apiVersion {doc['apiVersion']}"


def test_constraints_pin_what_the_cluster_files_need(constraints):
    for name in ("ray", *JOB_PACKAGES):
        assert canonical(name) in constraints, f"constraints.txt does not pin {name}"


def test_runtime_env(constraints):
    assert check_runtime_env(load_documents(RUNTIME_ENV)[0], constraints, "cluster/runtime_env.yaml") == []


def test_rayjobs_fit_the_jobs_and_their_clusters(constraints, runtime_env_pip):
    specs = rayjob_specs()
    assert len(specs) >= 4, f"expected the train and label RayJobs, the RayCronJob template and the ConfigMap RayJob, got {[w for w, _ in specs]}"
    jobs = {parse_entrypoint(spec["entrypoint"])[0] for _, spec in specs}
    assert {"train", "label"} <= jobs
    not_yet = sorted(job for job in jobs if job and not (REPO / "jobs" / f"{job}.py").is_file())
    if not_yet:
        pytest.skip(f"jobs/{', jobs/'.join(not_yet)}.py do not exist yet; the manifests' options are checked once they do")
    problems = [problem for where, spec in specs for problem in check_rayjob(spec, constraints, runtime_env_pip, where)]
    assert problems == []


def test_raycluster_autoscales_gpu_workers_from_zero(constraints):
    clusters = [(name, doc) for name, doc in kuberay_documents() if doc["kind"] == "RayCluster"]
    assert clusters, "no RayCluster in cluster/kuberay/"
    for name, doc in clusters:
        assert check_autoscaling_raycluster(doc, constraints, name) == []


def test_raycronjob_is_scheduled_and_names_its_feature_gate():
    path = KUBERAY / "raycronjob-label.yaml"
    (doc,) = load_documents(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(doc["spec"]["schedule"].split()) == 5
    assert "entrypoint" in doc["spec"]["jobTemplate"], "jobTemplate holds the RayJob spec itself (KubeRay 1.6: no spec: wrapper)"
    assert "--feature-gates=RayCronJob=true" in path.read_text(), "the file must say which operator feature gate RayCronJob needs"


def test_cronjob_fallback_creates_rayjobs():
    assert check_cronjob_bundle(load_documents(KUBERAY / "cronjob-label.yaml"), "cronjob-label.yaml") == []


def test_aws_cluster_config(constraints, runtime_env_pip):
    assert check_aws_config(load_documents(AWS_CONFIG)[0], constraints, runtime_env_pip, "aws/cluster.yaml") == []


def test_local_head_scripts():
    for name in ("start_head.sh", "stop.sh"):
        path = CLUSTER / "local" / name
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"
    start = (CLUSTER / "local" / "start_head.sh").read_text()
    for needed in ("ray start --head", "--node-ip-address 127.0.0.1", "--dashboard-host 127.0.0.1"):
        assert needed in start, f"start_head.sh does not run {needed!r}"


def commands_for_clusters_from_zero() -> list[tuple[str, str]]:
    """(where, command) of each ``python -m jobs.X`` command sent to a cluster of FROM_ZERO: those in
    its file's comments, and the ``ray job submit`` commands of cluster/README.md's sections on AWS
    and on KubeRay (there only the RayCluster takes submissions; the RayJobs bring their own pods)."""
    found = []
    for path in FROM_ZERO:
        found += [
            (str(path.relative_to(CLUSTER)), line[line.index("python -m jobs."):])
            for line in path.read_text().splitlines()
            if line.lstrip().startswith("#") and "python -m jobs." in line
        ]
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading = section.splitlines()[0]
        if heading.startswith(("AWS", "Kubernetes")):
            found += [
                (f"README {heading}", line[line.index("python -m jobs."):])
                for line in section.splitlines()
                if "ray job submit" in line and "python -m jobs." in line
            ]
    return found


def readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return [line[line.index("python -m jobs."):] for line in text.splitlines() if "python -m jobs." in line]


def test_readme_commands_are_accepted_by_the_jobs():
    commands = readme_commands()
    assert commands, "cluster/README.md shows no `python -m jobs.X` command"
    problems = []
    for command in commands:
        job, argv = parse_entrypoint(command.rstrip("`").strip())
        if job is None:
            problems.append(f"cannot read {command!r}")
        elif "..." not in argv and (REPO / "jobs" / f"{job}.py").is_file():  # "..." elides options
            problems += parse_job_options(job, argv, f"README: {command[:60]}...")[0]
    assert problems == []


def test_gpu_jobs_on_clusters_from_zero_wait_for_their_gpus():
    commands = commands_for_clusters_from_zero()
    places = {where.split(":")[0] for where, _ in commands}
    assert {"kuberay/raycluster.yaml", "aws/cluster.yaml", "README AWS", "README Kubernetes"} <= places, places
    assert [problem for where, command in commands for problem in check_waits_for_gpus(command, where)] == []


def test_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"\bcluster/[\w./-]+\.(?:ya?ml|sh|md)\b", text))
    assert named, "cluster/README.md names none of the cluster files"
    assert sorted(path for path in named if not (REPO / path).is_file()) == []


# --------------------------------------------------------------------------------------------
# The checks can fail: each is shown a copy of a real file with one thing broken


def _rayjob(name: str) -> dict:
    return copy.deepcopy(load_documents(KUBERAY / name)[0]["spec"])


def _problems_of(spec, constraints, runtime_env_pip) -> str:
    return "\n".join(check_rayjob(spec, constraints, runtime_env_pip, "broken"))


def test_check_rayjob_catches_a_gpu_job_on_a_cluster_without_gpus(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-train.yaml")
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        for section in ("requests", "limits"):
            container["resources"][section].pop("nvidia.com/gpu")
    problems = _problems_of(spec, constraints, runtime_env_pip)
    assert "uses GPUs, but no worker group has nvidia.com/gpu limits" in problems
    assert "CPU image" not in problems and "GPU image" in problems  # the -gpu image on a pod without GPUs


def test_check_rayjob_catches_more_workers_than_gpus(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-train.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("--num-workers 8", "--num-workers 9")
    assert "needs 9 slots, the cluster has 8" in _problems_of(spec, constraints, runtime_env_pip)
    spec = _rayjob("rayjob-label.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("--gpus-per-actor 1", "--gpus-per-actor 2")
    assert "needs 4 slots, the cluster has 0" in _problems_of(spec, constraints, runtime_env_pip)


def test_check_rayjob_catches_cpu_jobs_on_gpu_clusters(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-train.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("--use-gpu", "")
    assert "leaves idle" in _problems_of(spec, constraints, runtime_env_pip)
    spec = _rayjob("rayjob-label.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("--gpus-per-actor 1", "--gpus-per-actor 0")
    assert "leaves idle" in _problems_of(spec, constraints, runtime_env_pip)


def test_check_rayjob_catches_options_the_job_rejects(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-label.yaml")
    spec["entrypoint"] += " --no-such-option 4"
    assert "rejects its options: " in _problems_of(spec, constraints, runtime_env_pip)
    spec = _rayjob("rayjob-label.yaml")
    spec["entrypoint"] += " --score 0.5"  # argparse would take it for --score-threshold
    assert "spell out --score: python -m jobs.label has no option of that exact name" in _problems_of(spec, constraints, runtime_env_pip)
    spec = _rayjob("rayjob-train.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("--num-workers 8", "--num-workers eight")
    assert "rejects its options" in _problems_of(spec, constraints, runtime_env_pip)
    spec = _rayjob("rayjob-label.yaml")
    spec["entrypoint"] = spec["entrypoint"].replace("jobs.label", "jobs.no_such_job")
    assert "jobs/no_such_job.py does not exist" in _problems_of(spec, constraints, runtime_env_pip)
    spec["entrypoint"] = "python label.py --input x"
    assert "is not `python -m jobs.<name> ...`" in _problems_of(spec, constraints, runtime_env_pip)


def test_check_waits_for_gpus_catches_gpu_jobs_that_would_stop_at_once():
    for where, command in commands_for_clusters_from_zero():
        without = re.sub(r"\s--wait-for-gpus[ =]\S+", "", command)
        assert without != command, command
        assert check_waits_for_gpus(without, where) == [
            f"{where}: python -m jobs.{parse_entrypoint(command)[0]} uses GPUs on a cluster whose GPU nodes start from zero; "
            "pass --wait-for-gpus SECONDS (e.g. 600)"
        ]
        assert check_waits_for_gpus(re.sub(r"--wait-for-gpus[ =]\S+", "--wait-for-gpus 0", command), where) != []
    label = "python -m jobs.label --input s3://b/in/ --output s3://b/out/ --checkpoint s3://b/m.pt"
    assert check_waits_for_gpus(label, "x") != [], "no --gpus-per-actor on a cluster without GPUs yet: labels on the CPU"
    assert check_waits_for_gpus(label + " --gpus-per-actor 0", "x") == []  # CPU on purpose
    assert check_waits_for_gpus(label + " --wait-for-gpus 600", "x") == []
    assert "rejects its options" in check_waits_for_gpus(label + " --wait-for-gpus soon", "x")[0]


def test_help_fallback_checks_option_names():
    """A job module without build_parser() is checked against its --help (here on the real jobs.label)."""
    argv = ["--input", "s3://b/in/", "--output", "s3://b/out/", "--checkpoint", "m.pt", "--num-actors", "3", "--gpus-per-actor=0.5"]
    problems, values = parse_job_options("label", argv, "real", use_parser=False)
    assert problems == []
    assert values == {"gpus_per_actor": 0.5, "num_actors": 3, "cpus_per_actor": 1.0, "wait_for_gpus": 0}
    problems, values = parse_job_options("label", [*argv, "--gpus", "2"], "broken", use_parser=False)
    assert problems == ["broken: python -m jobs.label --help does not list --gpus"] and values is None
    assert option_values("train", ["--use-gpu", "--num-workers", "4", "--wait-for-gpus", "600"]) == {
        "use_gpu": True, "num_workers": 4, "cpus_per_worker": 1.0, "wait_for_gpus": 600}


def test_check_rayjob_catches_pins_and_images_off_the_constraints(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-label.yaml")
    spec["runtimeEnvYAML"] = spec["runtimeEnvYAML"].replace("torch==2.14.1", "torch==2.0.0").replace("numpy==2.4.6", "numpy")
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.9.0-py311-gpu"
    spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:latest"
    spec["rayClusterSpec"]["rayVersion"] = "2.9.0"
    problems = _problems_of(spec, constraints, runtime_env_pip)
    assert f"torch==2.0.0, but constraints.txt has torch=={constraints['torch']}" in problems
    assert "'numpy' is not pinned with ==" in problems
    assert "differs from cluster/runtime_env.yaml's" in problems
    assert f"has Ray 2.9.0, constraints.txt has ray=={constraints['ray']}" in problems
    assert "image 'rayproject/ray:latest' is not rayproject/ray:<version>" in problems
    assert "rayVersion '2.9.0'" in problems
    assert check_pins(["torch==" + constraints["torch"]], constraints, "x") != []  # the other job packages are missing


def test_check_rayjob_catches_a_local_working_dir_and_a_cluster_left_running(constraints, runtime_env_pip):
    spec = _rayjob("rayjob-train.yaml")
    spec["runtimeEnvYAML"] = re.sub(r"working_dir: .*", "working_dir: .", spec["runtimeEnvYAML"])
    spec["shutdownAfterJobFinishes"] = False
    problems = _problems_of(spec, constraints, runtime_env_pip)
    assert "working_dir '.' is not a zip URI" in problems
    assert "shutdownAfterJobFinishes is not true" in problems
    spec["runtimeEnvYAML"] = re.sub(r"working_dir: .*", "working_dir: s3://YOUR-BUCKET/code/maskrcnn-ray", spec["runtimeEnvYAML"])
    assert "Ray rejects it: Only .zip, .tar.gz, .tgz, .tar.xz files are supported" in _problems_of(spec, constraints, runtime_env_pip)


def test_check_raycluster_catches_fixed_gpu_groups(constraints):
    (doc,) = load_documents(KUBERAY / "raycluster.yaml")
    doc["spec"]["enableInTreeAutoscaling"] = False
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = 2
    problems = "\n".join(check_autoscaling_raycluster(doc, constraints, "broken"))
    assert "enableInTreeAutoscaling is not true" in problems and "minReplicas 2, want 0" in problems
    for section in ("requests", "limits"):
        doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][section].pop("nvidia.com/gpu")
    assert "no worker group with nvidia.com/gpu limits" in "\n".join(check_autoscaling_raycluster(doc, constraints, "broken"))


def test_check_cronjob_catches_overlap_and_missing_rights():
    docs = load_documents(KUBERAY / "cronjob-label.yaml")
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["kind"] == "CronJob")["spec"]["concurrencyPolicy"] = "Allow"
    next(d for d in broken if d["kind"] == "Role")["rules"][0]["verbs"] = ["get"]
    problems = "\n".join(check_cronjob_bundle(broken, "broken"))
    assert "concurrencyPolicy 'Allow', want Forbid" in problems
    assert "allows create on rayjobs.ray.io" in problems
    broken = [d for d in copy.deepcopy(docs) if d["kind"] != "ConfigMap"]
    assert "no ConfigMap" in "\n".join(check_cronjob_bundle(broken, "broken"))


def test_check_aws_config_catches_what_breaks_gpus_from_zero(constraints, runtime_env_pip):
    config = load_documents(AWS_CONFIG)[0]
    broken = copy.deepcopy(config)
    _, workers = aws_node_types(broken)
    worker = next(iter(workers.values()))
    worker["min_workers"] = 1
    del worker["node_config"]["InstanceMarketOptions"]
    broken["setup_commands"] = [c.replace("torch==2.14.1", "torch==2.13.0") for c in broken["setup_commands"]]
    broken["docker"]["worker_image"] = "rayproject/ray:2.60.0-py311"
    broken["no_such_field"] = 1
    problems = "\n".join(check_aws_config(broken, constraints, runtime_env_pip, "broken"))
    assert "min_workers 1, want 0" in problems
    assert "not spot" in problems
    assert "torch==2.13.0, but constraints.txt has" in problems
    assert "is a CPU image" in problems
    assert "Ray's cluster schema: Additional properties are not allowed ('no_such_field'" in problems


def test_check_runtime_env_catches_excludes_that_drop_sources(constraints):
    env = copy.deepcopy(load_documents(RUNTIME_ENV)[0])
    env["excludes"] = [pattern.lstrip("/") for pattern in env["excludes"]]  # "data/" also matches maskrcnn/data/
    problems = "\n".join(check_runtime_env(env, constraints, "broken"))
    assert "excludes drop source files the jobs import, e.g. ['maskrcnn/data/" in problems
    env["excludes"] = []
    env["working_dir"] = str(REPO / "jobs")
    problems = "\n".join(check_runtime_env(env, constraints, "broken"))
    assert "excludes do not drop .venv/bin/python" in problems and f"working_dir '{REPO / 'jobs'}', want '.'" in problems
    env["working_dir"] = "/home/me/maskrcnn-ray"
    assert "Ray rejects it: /home/me/maskrcnn-ray is not a valid path" in "\n".join(check_runtime_env(env, constraints, "broken"))
    env["working_dir"], env["excludes"] = ".", "/data/"
    assert "Ray rejects it: runtime_env['excludes'] must be of type List[str]" in "\n".join(check_runtime_env(env, constraints, "broken"))
