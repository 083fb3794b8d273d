"""Checks of the cluster files themselves: KubeRay manifests, the AWS launcher config, the runtime env.

- images are ``rayproject/ray:<ray of constraints.txt>-py3XX[-gpu]`` (GPU ones where the pod has
  GPUs), ``rayVersion`` is that ray, and the pip packages are pinned to constraints.txt's versions,
  the same list as cluster/runtime_env.yaml;
- a RayJob runs ``python -m jobs.<name>`` (checked by :mod:`cluster.entrypoints`) from a zip
  ``working_dir`` and deletes its cluster after; the RayCluster and cluster/aws/cluster.yaml grow
  GPU workers from zero (spot on AWS); the CronJob fallback may create RayJobs and forbids
  overlapping runs; runtime_env.yaml's excludes drop .venv/data/runs but no source file;
- Ray's own validators accept the runtime envs (``ray.runtime_env.RuntimeEnv``) and the launcher
  config (its ray-schema.json).

Each check returns the problems it found, one line each (empty: fine). Part of
``python -m cluster.validate``; no Ray cluster and no Kubernetes: the files are only read.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import yaml

from cluster.entrypoints import REPO, check_job_resources, kuberay_groups, parse_entrypoint, parse_job_options

CLUSTER = REPO / "cluster"
CONSTRAINTS = REPO / "constraints.txt"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
AWS_CONFIG = CLUSTER / "aws" / "cluster.yaml"

# What the jobs import at run time beyond the Ray of the image (pyproject's dependencies).
JOB_PACKAGES = ("torch", "torchvision", "pyarrow", "pycocotools", "fsspec", "s3fs", "pillow", "numpy")
IMAGE_PATTERN = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<python>py3\d+)(?P<platform>-cpu|-gpu|-cu\d+)?$")


# --------------------------------------------------------------------------------------------
# Reading


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503): Pillow == pillow, typing_extensions == typing-extensions."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} of constraints.txt's ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: {line!r} is not a name==version pin")
            pins[canonical(name)] = version.strip()
    return pins


def load_documents(path: Path) -> list:
    """The YAML documents of ``path`` (empty ones left out)."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def rayjob_specs_of(docs: list[dict], name: str) -> list[tuple[str, dict]]:
    """(where, spec) of every RayJob spec in one file: RayJobs, RayCronJob templates, RayJobs held in ConfigMaps."""
    specs = []
    for doc in docs:
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
    """Every requirement pinned with == to constraints.txt's version, and every job package there."""
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
    """``image`` is rayproject/ray of ``ray_version``, a GPU image exactly when the pod has GPUs."""
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


def check_kuberay_cluster(cluster_spec: dict, constraints: dict[str, str], where: str) -> list[str]:
    """A RayCluster spec's rayVersion, its pods' images, and their GPU requests equal to their limits."""
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
    """A RayJob spec: its entrypoint's options, runtime env and cluster, and the job's fit on that cluster."""
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
    """A RayCluster that autoscales its GPU worker groups from zero, with no GPU on the head."""
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


def check_raycronjob(doc: dict, text: str, where: str) -> list[str]:
    """A RayCronJob: a cron schedule, the RayJob spec itself as jobTemplate, and its file (``text``)
    naming the operator feature gate it needs."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion {doc.get('apiVersion')!r}, want ray.io/v1")
    if len(str(doc["spec"].get("schedule", "")).split()) != 5:
        problems.append(f"{where}: schedule {doc['spec'].get('schedule')!r} is not a 5-field cron expression")
    if "entrypoint" not in doc["spec"].get("jobTemplate", {}):
        problems.append(f"{where}: jobTemplate must hold the RayJob spec itself (KubeRay 1.6: no spec: wrapper)")
    if "--feature-gates=RayCronJob=true" not in text:
        problems.append(f"{where}: the file must say which operator feature gate RayCronJob needs (--feature-gates=RayCronJob=true)")
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
        if binding["roleRef"]["kind"] == "Role"
        and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"])
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
    """A launcher config Ray's schema accepts: CPU head, spot GPU workers from zero, the pinned packages."""
    import jsonschema

    problems = []
    ray_schema = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
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
    sources = [
        str(p.relative_to(REPO)) for folder in ("jobs", "maskrcnn") for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts
    ]
    dropped = [path for path in sources if excludes.match_file(path)]
    if dropped:
        problems.append(f"{where}: excludes drop source files the jobs import, e.g. {dropped[:3]}")
    return problems
