"""A real Ray cluster on this machine, used the way a user uses one (cluster/README.md): a head
from cluster/local/start_head.sh, jobs sent with ``ray job submit --working-dir <repo>``, and a
second node that joins with ``ray start --address`` and dies while a labeling job runs on it.

Each cluster has its own temp dir and free ports, so other Ray instances on the machine (this
session's ``ray_local``, other users') are never touched; it is stopped with cluster/local/stop.sh,
which stops only the processes of its temp dir. This process never joins these clusters itself:
it talks to them through the ``ray`` CLI, as a user does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from maskrcnn.data.synthetic import make_sample_dataset
from tests.conftest import _free_port
from tests.labeling_helpers import local_parts, process_table, read_output

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: its ray and python run the cluster
OBJECT_STORE = str(200 * 2**20)  # per node; the jobs here move a few MB


@functools.cache
def ray_home() -> Path:
    """The HOME of the ``ray`` commands here: a new folder, without the ~/.ray/auth_token this
    machine may have, as on a fresh machine (start_head.sh makes the token there)."""
    return Path(tempfile.mkdtemp(prefix="ray-home-"))


def ray_env(**settings: str) -> dict[str, str]:
    """The environment of the ``ray`` commands: this venv first on PATH (so a job's ``python`` is
    its python), Ray's token authentication as start_head.sh sets it, ``ray_home()`` as HOME, and no
    RAY_ADDRESS or token of another Ray (an in-process ``ray.init`` of this session may have set one)."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=sys.prefix, RAY_AUTH_MODE="token",
               HOME=str(ray_home()))
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env.update(settings)
    return env


@dataclass
class Head:
    temp_dir: Path
    port: int  # GCS: where nodes join
    dashboard_port: int  # the job API: where jobs are submitted

    @property
    def job_api(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


def stop_ray(temp_dir: Path) -> None:
    result = subprocess.run([str(REPO / "cluster" / "local" / "stop.sh")], env=ray_env(RAY_TEMP_DIR=str(temp_dir)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def local_head(temp_dir: Path, num_cpus: int, *ray_start_args: str):
    """A head started by cluster/local/start_head.sh on free ports (the arguments go on to
    ``ray start``), stopped by stop.sh at the end."""
    head = Head(temp_dir, _free_port(), _free_port())
    env = ray_env(
        RAY_PORT=str(head.port), RAY_DASHBOARD_PORT=str(head.dashboard_port), RAY_TEMP_DIR=str(temp_dir), RAY_NUM_CPUS=str(num_cpus)
    )
    try:
        result = subprocess.run([str(REPO / "cluster" / "local" / "start_head.sh"), "--object-store-memory", OBJECT_STORE, *ray_start_args],
                                env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"start_head.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        yield head
    finally:
        stop_ray(temp_dir)


def join_node(head: Head, temp_dir: Path, num_cpus: int, resources: dict) -> None:
    """A second node on this machine, as start_head.sh's comment says: its own temp dir, and a free
    port for its dashboard agent (another Ray here may hold the default 52365)."""
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "start", "--address", f"127.0.0.1:{head.port}", "--node-ip-address", "127.0.0.1",
         "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
         "--dashboard-agent-listen-port", str(_free_port()), "--object-store-memory", OBJECT_STORE, "--disable-usage-stats"],
        env=ray_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"ray start --address failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def submit(head: Head, entrypoint: list[str], timeout: float = 300) -> tuple[int, str, str]:
    """``ray job submit --working-dir <repo> -- ENTRYPOINT``, waiting for the job (the CLI exits
    with the job's status); returns the exit status, the submission id and the CLI's output."""
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.job_api, "--working-dir", str(REPO), "--", *entrypoint],
        env=ray_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert match, f"the job was not submitted:\n{output[-5000:]}"
    return result.returncode, match.group(1), output


def job_logs(head: Head, submission_id: str) -> str:
    result = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address", head.job_api, submission_id],
                            env=ray_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def processes_of(temp_dir: Path) -> set[int]:
    """The processes of the Ray node whose temp dir this is: its daemons name its session folder on
    their command line; its workers and agents (renamed ray::...) are their children."""
    table = process_table()
    parents = {pid: parent for pid, (parent, _) in table.items()}
    found = {pid for pid, (_, cmdline) in table.items() if f"{temp_dir}/session_" in cmdline}
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return found
        found |= children


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").replace("\0", " ").strip()
    except OSError:
        return ""


def check_labels(output: Path, images: Path, count: int) -> None:
    """Every image exactly once, labelled, with instances (the test checkpoint detects on every image)."""
    table = read_output(str(output))
    assert table is not None, f"no part file in {output}"
    uris = table.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == count, (len(uris), len(set(uris)), count)
    assert sorted(uris) == sorted(str(p) for p in images.rglob("*.png"))
    assert table.column("error").null_count == count, [e for e in table.column("error").to_pylist() if e][:3]
    assert all(len(instances) > 0 for instances in table.column("instances").to_pylist())


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_label_job_submitted_to_a_local_head(tmp_path_factory, short_dir, checkpoint):
    data = tmp_path_factory.mktemp("data")
    make_sample_dataset(str(data / "images"), {"part": 8}, seed=0)
    output = data / "labels"
    with local_head(short_dir("head"), 2) as head:
        # start_head.sh made the token that ray start needs, as on a fresh machine
        assert (ray_home() / ".ray" / "auth_token").stat().st_size > 0
        # The job's interpreter is the venv's (the head's PATH) and `jobs` is the uploaded copy.
        code, _, text = submit(head, ["python", "-c", "import sys, jobs; print('job python:', sys.prefix, jobs.__file__)"])
        assert code == 0, text[-3000:]
        prefix, jobs_file = re.search(r"job python: (\S+) (\S+)", text).groups()
        assert prefix == sys.prefix
        assert jobs_file.startswith(f"{head.temp_dir}/session_") and "/runtime_resources/working_dir_files/" in jobs_file, jobs_file

        code, submission_id, text = submit(head, ["python", "-m", "jobs.label", "--input", str(data / "images"), "--output", str(output),
                                                  "--checkpoint", checkpoint, "--shard-size", "4"])
        assert code == 0, text[-5000:]
        logs = job_logs(head, submission_id)
        assert re.search(r"labelled 8 images in [\d.]+ s .*: \d+ detections, 0 errors", logs), logs[-3000:]
        assert "shards: 2 labelled this run, 0 already done, 2 in all" in logs, logs[-3000:]

        # What --working-dir uploaded: the sources, without .git, .venv, data/ or runs/ (Ray skips
        # .git and what .gitignore names), far below Ray's 512 MiB limit on a package.
        # (The latest: a file changed between the two submissions gives each its own package.)
        packages = [p for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
        assert packages
        package = max(packages, key=lambda p: p.stat().st_mtime)
        names = {p.name for p in package.iterdir()}
        assert {"jobs", "maskrcnn", "pyproject.toml"} <= names, names
        assert not names & {".git", ".venv", "data", "runs", "build", ".pytest_cache"}, names
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 20 * 2**20, f"the uploaded working dir is {size / 2**20:.1f} MiB"
    check_labels(output, data / "images", 8)


@pytest.mark.slow
def test_label_job_finishes_after_losing_a_node(tmp_path_factory, short_dir, checkpoint):
    """A head of 3 CPUs and a node of 1: Ray Data spreads the 2 model actors over both. Once a
    shard is committed, node 2 dies (SIGKILL to its raylet, agents and workers); its actor is
    restarted on the head and the work lost with the node is redone, and the job ends with exit 0
    and every image exactly once."""
    data = tmp_path_factory.mktemp("data")
    for k in range(3):
        make_sample_dataset(str(data / "images" / f"s{k}"), {"part": 20}, seed=k)
    output = data / "labels"
    node2_dir = short_dir("node2")
    with local_head(short_dir("head"), 3, "--resources", json.dumps({"head": 1})) as head:
        try:
            join_node(head, node2_dir, 1, {"node2": 1})
            deadline = time.monotonic() + 60
            while True:  # `ray status` is the autoscaler's view, a few seconds behind
                status = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", f"127.0.0.1:{head.port}"],
                                        env=ray_env(), capture_output=True, text=True, timeout=60).stdout
                if all(total in status for total in ("/4.0 CPU", "/1.0 head", "/1.0 node2")):
                    break
                assert time.monotonic() < deadline, f"the cluster is not head + node 2:\n{status}"
                time.sleep(1)
            job = subprocess.Popen(
                [str(VENV_BIN / "ray"), "job", "submit", "--address", head.job_api, "--working-dir", str(REPO), "--",
                 "python", "-m", "jobs.label", "--input", str(data / "images"), "--output", str(output), "--checkpoint", checkpoint,
                 "--shard-size", "4", "--batch-size", "1", "--max-detections", "10", "--num-actors", "2"],
                env=ray_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
            reader.start()
            on_node2: set[str] = set()
            killed: list[int] = []
            parts_at_kill = None
            deadline = time.monotonic() + 300
            while job.poll() is None and time.monotonic() < deadline:
                pids = processes_of(node2_dir)
                on_node2 |= {title(pid) for pid in pids if title(pid).startswith("ray::")}
                parts = len(local_parts(str(output)))
                if not killed and parts >= 1 and any("MapBatches(LabelActor)" in name for name in on_node2):
                    parts_at_kill = parts
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed.extend(pids)
                time.sleep(0.1)
            if job.poll() is None:
                job.kill()
            job.wait(60)
            reader.join(10)
        finally:
            stop_ray(node2_dir)
    text = "".join(lines)
    assert killed, f"no model actor ever ran on node 2 (its processes: {sorted(on_node2)}):\n{text[-5000:]}"
    assert parts_at_kill < 15, f"node 2 died late: {parts_at_kill} of 15 shards were committed"
    assert not [pid for pid in killed if title(pid)], "node 2's processes outlived SIGKILL"
    assert job.returncode == 0, f"the job did not survive losing node 2:\n{text[-8000:]}"
    assert "shards: 15 labelled this run, 0 already done, 15 in all" in text, text[-5000:]
    check_labels(output, data / "images", 60)
