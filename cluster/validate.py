"""Checks the cluster files against the jobs and constraints.txt, before anything is submitted.

    python -m cluster.validate                     # every YAML under cluster/ and cluster/README.md
    python -m cluster.validate my-rayjob.yaml ...  # files or folders of your own

Run from the repository root. Prints one line per problem and exits 1 when there is any, 0 when
all is fine. A file is checked by what it holds:

- Kubernetes manifests (documents with ``kind``): RayJobs, the RayJob template of a RayCronJob and
  the RayJob a CronJob's ConfigMap holds (:func:`cluster.manifests.check_rayjob`), RayClusters
  (GPU workers from zero), the CronJob fallback, RayCronJobs;
- a Ray cluster launcher config (``available_node_types``): :func:`cluster.manifests.check_aws_config`;
- a runtime env (``working_dir`` / ``pip``): :func:`cluster.manifests.check_runtime_env`;
- a README (``.md``): its ``python -m jobs.X`` commands are accepted by the jobs, its AWS and
  Kubernetes sections' GPU submissions pass ``--wait-for-gpus``, and the ``cluster/...`` files it
  names exist.

A GPU job sent to a cluster whose GPU nodes start from zero (a RayCluster, a launcher config: the
commands in their comments) must pass ``--wait-for-gpus`` > 0. No Ray cluster and no Kubernetes
here: the files are only read (the jobs' argparse parsers and Ray's own validators are imported).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from cluster.entrypoints import REPO, check_waits_for_gpus, parse_entrypoint, parse_job_options
from cluster.manifests import (
    AWS_CONFIG,
    CLUSTER,
    KUBERAY,
    RUNTIME_ENV,
    check_autoscaling_raycluster,
    check_aws_config,
    check_cronjob_bundle,
    check_raycronjob,
    check_rayjob,
    check_runtime_env,
    load_documents,
    rayjob_specs_of,
    read_constraints,
)

README = CLUSTER / "README.md"
# The repository's clusters whose GPU nodes start from zero: a GPU job sent to them must wait for its GPUs.
FROM_ZERO = (KUBERAY / "raycluster.yaml", AWS_CONFIG)


def display(path: Path) -> str:
    """``path`` as the messages name it: relative to the repository where it is inside."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def cluster_files(folder: Path = CLUSTER) -> list[Path]:
    """Every YAML under ``folder`` and its README.md, the files ``python -m cluster.validate`` checks."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml"))
    return files + [p for p in [folder / "README.md"] if p.is_file()]


# --------------------------------------------------------------------------------------------
# Commands written in comments and in the README


def commented_commands(path: Path) -> list[tuple[str, str]]:
    """(where, command) of each ``python -m jobs.X`` command in ``path``'s ``#`` comments."""
    return [
        (display(path), line[line.index("python -m jobs."):])
        for line in path.read_text().splitlines()
        if line.lstrip().startswith("#") and "python -m jobs." in line
    ]


def readme_submissions(path: Path = README) -> list[tuple[str, str]]:
    """(where, command) of the ``ray job submit`` commands in a README's sections on AWS and on
    KubeRay (there only the RayCluster takes submissions; the RayJobs bring their own pods)."""
    found = []
    text = path.read_text().replace("\\\n", " ")
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading = section.splitlines()[0]
        if heading.startswith(("AWS", "Kubernetes")):
            found += [
                (f"{display(path)} {heading}", line[line.index("python -m jobs."):])
                for line in section.splitlines()
                if "ray job submit" in line and "python -m jobs." in line
            ]
    return found


def commands_for_clusters_from_zero() -> list[tuple[str, str]]:
    """(where, command) of each ``python -m jobs.X`` command sent to a cluster of FROM_ZERO: those in
    its file's comments, and the submissions of cluster/README.md's sections on AWS and KubeRay."""
    return [found for path in FROM_ZERO for found in commented_commands(path)] + readme_submissions(README)


def readme_commands(path: Path = README) -> list[str]:
    """Every ``python -m jobs.X ...`` command of a README, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    return [line[line.index("python -m jobs."):] for line in text.splitlines() if "python -m jobs." in line]


def readme_problems(path: Path) -> list[str]:
    """The README's job commands, its GPU submissions to clusters from zero, and the files it names."""
    name = display(path)
    commands = readme_commands(path)
    problems = []
    for command in commands:
        job, argv = parse_entrypoint(command.rstrip("`").strip())
        if job is None:
            problems.append(f"{name}: cannot read {command!r}")
        elif "..." not in argv and (REPO / "jobs" / f"{job}.py").is_file():  # "..." elides options
            problems += parse_job_options(job, argv, f"{name}: {command[:60]}...")[0]
    problems += [problem for where, command in readme_submissions(path) for problem in check_waits_for_gpus(command, where)]
    named = set(re.findall(r"\bcluster/[\w./-]+\.(?:ya?ml|sh|md|py)\b", path.read_text()))
    problems += [f"{name}: names {named_path}, which does not exist" for named_path in sorted(named) if not (REPO / named_path).is_file()]
    return problems


# --------------------------------------------------------------------------------------------
# One file


def document_problems(docs: list, name: str) -> list[str]:
    """A file of YAML mappings; Kubernetes documents with apiVersion, kind and metadata (ray.io/v1 for Ray's kinds)."""
    if not docs:
        return [f"{name}: holds no YAML document"]
    problems = [f"{name}: a document is a {type(doc).__name__}, not a mapping" for doc in docs if not isinstance(doc, dict)]
    if problems or not any("kind" in doc for doc in docs):
        return problems
    for doc in docs:
        if not {"apiVersion", "kind", "metadata"} <= doc.keys():
            problems.append(f"{name}: a document lacks apiVersion/kind/metadata")
        elif doc["kind"] in ("RayCluster", "RayJob", "RayCronJob") and doc["apiVersion"] != "ray.io/v1":
            problems.append(f"{name}: {doc['kind']} apiVersion {doc['apiVersion']}, want ray.io/v1")
    return problems


def kubernetes_problems(path: Path, docs: list[dict], constraints: dict[str, str], runtime_env_pip: list[str]) -> list[str]:
    name = display(path)
    problems = []
    kinds = {doc["kind"] for doc in docs}
    for doc in docs:
        where = f"{name} {doc['kind']} {doc['metadata'].get('name')}"
        if doc["kind"] == "RayCluster":
            problems += check_autoscaling_raycluster(doc, constraints, where)
        elif doc["kind"] == "RayCronJob":
            problems += check_raycronjob(doc, path.read_text(), where)
    if "CronJob" in kinds:
        problems += check_cronjob_bundle(docs, name)
    for where, spec in rayjob_specs_of(docs, name):
        problems += check_rayjob(spec, constraints, runtime_env_pip, where)
    if "RayCluster" in kinds:  # autoscaled from zero, as checked above
        problems += [problem for where, command in commented_commands(path) for problem in check_waits_for_gpus(command, where)]
    return problems


def file_problems(path: Path, constraints: dict[str, str], runtime_env_pip: list[str]) -> list[str]:
    """The problems of one cluster file (a YAML or a README), one line each."""
    path, name = Path(path), display(path)
    if not path.is_file():
        return [f"{name}: no such file"]
    try:
        if path.suffix == ".md":
            return readme_problems(path)
        docs = load_documents(path)
        problems = document_problems(docs, name)
        if problems:
            return problems
        if "kind" in docs[0]:
            return kubernetes_problems(path, docs, constraints, runtime_env_pip)
        if "available_node_types" in docs[0]:  # a Ray cluster launcher config: GPU workers from zero
            problems = check_aws_config(docs[0], constraints, runtime_env_pip, name)
            return problems + [p for where, command in commented_commands(path) for p in check_waits_for_gpus(command, where)]
        if {"working_dir", "pip"} & docs[0].keys():
            return check_runtime_env(docs[0], constraints, name)
        return [f"{name}: neither Kubernetes manifests, a Ray cluster launcher config nor a runtime env"]
    except yaml.YAMLError as exc:
        return [f"{name}: not valid YAML: {exc}"]
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        return [f"{name}: cannot check it, a field is missing or malformed: {type(exc).__name__} {exc}"]


def validate(paths: Iterable[Path] | None = None) -> list[str]:
    """The problems of ``paths`` (files, or folders: their YAMLs and README.md; default: cluster/)."""
    files = []
    for path in [CLUSTER] if paths is None else map(Path, paths):
        files += cluster_files(path) if path.is_dir() else [path]
    constraints = read_constraints()
    runtime_env_pip = load_documents(RUNTIME_ENV)[0]["pip"]
    return [problem for path in files for problem in file_problems(path, constraints, runtime_env_pip)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.validate",
        description="Check cluster files (KubeRay manifests, Ray launcher configs, runtime envs, READMEs) "
        "against the jobs' options and constraints.txt. Prints one line per problem; exits 1 if any.",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders (default: cluster/)")
    args = parser.parse_args(argv)
    problems = validate(args.paths or None)
    for problem in problems:
        print(" ".join(problem.split()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
