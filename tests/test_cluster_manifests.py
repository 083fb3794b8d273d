"""cluster/: every file passes ``python -m cluster.validate``, which checks them against the jobs.

The checks themselves (cluster/validate.py, cluster/manifests.py, cluster/entrypoints.py) say what
they check. Here they run on the real files and, to show that each can fail, on copies with one
thing broken. No Ray cluster and no Kubernetes: the files are only read.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import yaml

from cluster.entrypoints import REPO, check_waits_for_gpus, option_values, parse_entrypoint, parse_job_options
from cluster.manifests import (
    AWS_CONFIG,
    CLUSTER,
    JOB_PACKAGES,
    KUBERAY,
    RUNTIME_ENV,
    aws_node_types,
    canonical,
    check_autoscaling_raycluster,
    check_aws_config,
    check_cronjob_bundle,
    check_pins,
    check_raycronjob,
    check_rayjob,
    check_runtime_env,
    load_documents,
    rayjob_specs_of,
    read_constraints,
)
from cluster.validate import cluster_files, commands_for_clusters_from_zero, file_problems, main, readme_problems


@pytest.fixture(scope="module")
def constraints() -> dict[str, str]:
    return read_constraints()


@pytest.fixture(scope="module")
def runtime_env_pip() -> list[str]:
    return load_documents(RUNTIME_ENV)[0]["pip"]


# --------------------------------------------------------------------------------------------
# The real files


def test_cluster_folder_has_the_promised_files():
    expected = [
        "README.md", "runtime_env.yaml", "aws/cluster.yaml", "local/start_head.sh", "local/stop.sh",
        "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-label.yaml",
        "kuberay/raycronjob-label.yaml", "kuberay/cronjob-label.yaml", "validate.py",
    ]
    missing = [name for name in expected if not (CLUSTER / name).is_file()]
    assert not missing, f"cluster/ lacks {missing}"


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_passes_the_validator(path, constraints, runtime_env_pip):
    assert file_problems(path, constraints, runtime_env_pip) == []


def test_constraints_pin_what_the_cluster_files_need(constraints):
    for name in ("ray", *JOB_PACKAGES):
        assert canonical(name) in constraints, f"constraints.txt does not pin {name}"


def test_the_validator_sees_every_job_and_cluster():
    """What the checks above passed over is there: the RayJobs of both jobs, the RayCluster, and the
    commands sent to the clusters from zero."""
    specs = [spec for path in sorted(KUBERAY.glob("*.yaml")) for spec in rayjob_specs_of(load_documents(path), path.name)]
    assert len(specs) >= 4, f"expected the train and label RayJobs, the RayCronJob template and the ConfigMap RayJob, got {specs}"
    assert {"train", "label"} <= {parse_entrypoint(spec["entrypoint"])[0] for _, spec in specs}
    assert any(doc["kind"] == "RayCluster" for path in KUBERAY.glob("*.yaml") for doc in load_documents(path))
    places = {where.split(":")[0] for where, _ in commands_for_clusters_from_zero()}
    expected = {"cluster/kuberay/raycluster.yaml", "cluster/aws/cluster.yaml", "cluster/README.md AWS", "cluster/README.md Kubernetes"}
    assert expected <= places, places


def test_local_head_scripts():
    for name in ("start_head.sh", "stop.sh"):
        path = CLUSTER / "local" / name
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"
    start = (CLUSTER / "local" / "start_head.sh").read_text()
    for needed in ("ray start --head", "--node-ip-address 127.0.0.1", "--dashboard-host 127.0.0.1"):
        assert needed in start, f"start_head.sh does not run {needed!r}"


def test_the_command_line_prints_one_line_per_problem(tmp_path, capsys):
    assert main([str(KUBERAY / "rayjob-train.yaml")]) == 0
    assert capsys.readouterr().out == ""
    broken = tmp_path / "rayjob-train.yaml"
    broken.write_text((KUBERAY / "rayjob-train.yaml").read_text().replace("--num-workers 8", "--num-workers 9"))
    (tmp_path / "notes.yaml").write_text("a: [1\n")
    assert main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{tmp_path / 'notes.yaml'}: not valid YAML: ")
    assert lines[1].startswith(f"{broken} RayJob ") and "needs 9 slots, the cluster has 8" in lines[1]
    result = subprocess.run([sys.executable, "-m", "cluster.validate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "python -m cluster.validate" in result.stdout, result.stderr


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


def test_check_raycronjob_catches_a_wrapped_template_and_no_feature_gate():
    path = KUBERAY / "raycronjob-label.yaml"
    (doc,) = load_documents(path)
    doc["spec"]["jobTemplate"] = {"spec": doc["spec"]["jobTemplate"]}
    doc["spec"]["schedule"] = "nightly"
    problems = "\n".join(check_raycronjob(doc, yaml.safe_dump(doc), "broken"))
    assert "jobTemplate must hold the RayJob spec itself" in problems
    assert "'nightly' is not a 5-field cron expression" in problems
    assert "feature gate RayCronJob needs" in problems


def test_readme_problems_catch_bad_commands_and_missing_files(tmp_path):
    text = (CLUSTER / "README.md").read_text()
    broken = tmp_path / "README.md"
    broken.write_text(
        text.replace("--wait-for-gpus 600", "", 1).replace("cluster/aws/cluster.yaml", "cluster/aws/no-such.yaml", 1)
        + "\n    python -m jobs.train --no-such-option 1\n"
    )
    problems = "\n".join(readme_problems(broken))
    assert "pass --wait-for-gpus SECONDS" in problems
    assert "names cluster/aws/no-such.yaml, which does not exist" in problems
    assert "python -m jobs.train rejects its options" in problems
