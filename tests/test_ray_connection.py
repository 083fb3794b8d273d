"""Which Ray a job runs on, and how it ends: jobs.common.init_ray and run_main, through real
`python -m jobs.label` processes.

Each job here gets its own RAY_TMPDIR: Ray derives every path it looks at from it (its
``ray_current_cluster`` record, its session folders), so these tests neither see nor disturb
the other Rays of the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.common import JobError, run_main
from jobs.label import main as label_main
from jobs.labeling.inputs import iter_input_uris
from tests.job_process import Job
from tests.labeling_helpers import local_parts, process_table, read_output, rgb_noise

ROOT = Path(__file__).resolve().parents[1]


def _images(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rgb_noise(64, 48, seed=i).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("few"), 12)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("many"), 60)


@pytest.fixture
def ray_tmpdir():
    """A short, private RAY_TMPDIR (Unix socket paths under it must stay short)."""
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmpdir: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmpdir, PYTHONUNBUFFERED="1", **extra)
    return env


def _label_args(images: Path, output: Path, checkpoint: str, *extra: str) -> list[str]:
    return ["--input", str(images), "--output", str(output), "--checkpoint", checkpoint, *extra]


def _assert_each_image_once(output: Path, images: Path) -> None:
    uris = read_output(str(output)).column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) and sorted(uris) == sorted(iter_input_uris(str(images)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_under(path: str) -> list[int]:
    return [pid for pid, (_, cmdline) in process_table().items() if path in cmdline and pid != os.getpid()]


# ---------------------------------------------------------------- errors are one line, no Ray


def test_value_and_job_errors_are_one_line_exit_2(capsys):
    def bad_value(argv):
        raise ValueError("--thing must be positive")

    def bad_input(argv):
        raise JobError("no such file")

    for main, message in ((bad_value, "error: --thing must be positive"), (bad_input, "error: no such file")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, [])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip() == message and "Traceback" not in err


def test_a_ray_address_that_does_not_answer_is_one_line_quickly(tmp_path, checkpoint, few_images, ray_tmpdir):
    dead = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    job = Job("jobs.label", _label_args(few_images, tmp_path / "out", checkpoint), environ=_env(ray_tmpdir, RAY_ADDRESS=dead))
    assert job.wait(120) == 2, job.output[-3000:]
    assert time.monotonic() - started < 60
    assert f"error: cannot reach the Ray cluster at {dead} (from RAY_ADDRESS)" in job.lines[-1], job.output[-3000:]
    assert "Traceback" not in job.output
    # --address says the same, naming the option
    job = Job("jobs.label", _label_args(few_images, tmp_path / "out", checkpoint, "--address", dead), environ=_env(ray_tmpdir))
    assert job.wait(120) == 2, job.output[-3000:]
    assert f"error: cannot reach the Ray cluster at {dead} (from --address)" in job.lines[-1], job.output[-3000:]


# ---------------------------------------------------------------- which Ray


def test_another_programs_private_ray_is_never_joined(tmp_path, checkpoint, few_images, ray_tmpdir):
    """Another program's private ``ray.init()`` on this machine (in the same RAY_TMPDIR, even) is
    not the job's: it writes no ``ray_current_cluster``, the job starts its own Ray, and
    killing the other program mid-run costs the job nothing. Also: the line per committed
    shard that a job prints when its stdout is not a terminal."""
    other_code = (
        "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
        "print('up', ray.get_runtime_context().gcs_address, flush=True); time.sleep(600)"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", other_code], env=_env(ray_tmpdir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )
    try:
        line = other.stdout.readline()
        assert line.startswith("up "), line
        other_address = line.split()[1]
        assert not os.path.exists(os.path.join(ray_tmpdir, "ray", "ray_current_cluster")), "a private ray.init() wrote the record"

        output = tmp_path / "out"
        job = Job("jobs.label", _label_args(few_images, output, checkpoint, "--shard-size", "2"), environ=_env(ray_tmpdir))
        assert job.wait_for(lambda: any(s.startswith("ray: ") for s in job.lines), 180), job.output[-3000:]
        os.killpg(other.pid, signal.SIGKILL)  # the other program goes away mid-run
        other.wait(timeout=30)
        assert job.wait(240) == 0, job.output[-3000:]
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait(timeout=30)
    where = next(s for s in job.lines if s.startswith("ray: "))
    assert where.startswith("ray: private local Ray (") and other_address not in job.output, where
    _assert_each_image_once(output, few_images)
    progress = [s for s in job.lines if s.startswith("shard ") and " committed: " in s]
    assert progress, job.output[-3000:]
    assert progress[-1].startswith("shard 6/6 committed: 12 of 12 images, ") and " images/s, ETA " in progress[-1], progress


@pytest.mark.slow
def test_a_stale_ray_start_record_is_warned_about_and_skipped(tmp_path, checkpoint, few_images, ray_tmpdir):
    """``ray_current_cluster`` names a head that is gone (``ray start`` then a reboot or a crash):
    Ray's own ``address="auto"`` would retry it for ever; the job says so and runs on a private Ray."""
    dead = f"127.0.0.1:{_free_port()}"
    os.makedirs(os.path.join(ray_tmpdir, "ray"))
    with open(os.path.join(ray_tmpdir, "ray", "ray_current_cluster"), "w") as f:
        f.write(dead)
    output = tmp_path / "out"
    job = Job("jobs.label", _label_args(few_images, output, checkpoint), environ=_env(ray_tmpdir))
    assert job.wait(240) == 0, job.output[-3000:]
    assert any(
        s.startswith("warning: the `ray start` head recorded in") and dead in s and "does not answer" in s for s in job.lines
    ), job.output[-3000:]
    assert any(s.startswith("ray: private local Ray (") for s in job.lines), job.output[-3000:]
    _assert_each_image_once(output, few_images)


@pytest.mark.slow
def test_a_private_ray_that_does_not_start_in_time_is_started_again(tmp_path, checkpoint, few_images, ray_tmpdir):
    """Ray gives a local node 30 s to register its raylet, and on a machine busy with other work
    ``ray.init`` can give up. Here the first raylet is stopped (SIGSTOP) as it starts: the job
    says so in a warning, kills what that start left, starts its Ray again and labels every
    image once; once it ends, no process of either Ray is left."""
    output = tmp_path / "out"
    job = Job("jobs.label", _label_args(few_images, output, checkpoint), environ=_env(ray_tmpdir))
    stopped = []
    try:
        def stop_the_first_raylet() -> bool:
            for pid, (_, cmdline) in process_table().items():
                if "/raylet" in cmdline.split("\0", 1)[0] and ray_tmpdir in cmdline:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                    return True
            return False

        assert job.wait_for(stop_the_first_raylet, 120), job.output[-3000:]
        assert job.wait(300) == 0, job.output[-3000:]
    finally:
        job.kill()
    assert any(s.startswith("warning: the private local Ray did not start in time (attempt 1 of 3)") for s in job.lines), job.output[-3000:]
    _assert_each_image_once(output, few_images)
    deadline = time.monotonic() + 30
    while _processes_under(ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_under(ray_tmpdir), [process_table()[pid] for pid in _processes_under(ray_tmpdir)]


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.slow
def test_an_interrupted_job_says_how_far_it_got_and_resumes(tmp_path, checkpoint, many_images, ray_local, capsys):
    """Ctrl-C, then SIGTERM to the rerun, then a rerun to the end (one output: each job start
    costs a Ray start-up): each interrupted job stops within a minute with its exit status (130,
    143) and one line saying how many shards are committed, takes its private Ray with it, and
    the next run labels only the rest; in the end each image is labelled once."""
    output = tmp_path / "out"
    args = _label_args(many_images, output, checkpoint, "--shard-size", "2", "--batch-size", "1")
    committed = 0
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        ray_tmpdir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        try:
            job = Job("jobs.label", args, environ=_env(ray_tmpdir))
            assert job.wait_for(lambda: len(local_parts(str(output))) > committed, 240), job.output[-3000:]
            job.process.send_signal(sig)
            sent = time.monotonic()
            assert job.wait(120) == code, (sig, job.output[-3000:])
            assert time.monotonic() - sent < 60, sig
            before, committed = committed, len(local_parts(str(output)))
            assert before < committed < 30, (sig, job.output[-3000:])
            assert f"interrupted: {committed} of 30 shards committed; run the same command again to resume" in job.lines, job.output[-3000:]
            assert "Traceback" not in job.output, job.output[-5000:]
            if before:  # the rerun labelled only the shards not yet committed
                assert f"labelling {30 - before} of 30 shards" in job.output, job.output[-3000:]
            # its private Ray went with it
            deadline = time.monotonic() + 30
            while _processes_under(ray_tmpdir) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not _processes_under(ray_tmpdir), sig
        finally:
            shutil.rmtree(ray_tmpdir, ignore_errors=True)

    assert label_main(args) == 0  # the last rerun (in this process, on the session's Ray)
    assert f"{30 - committed} labelled this run, {committed} already done" in capsys.readouterr().out
    _assert_each_image_once(output, many_images)
