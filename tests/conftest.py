"""Shared fixtures: a real S3 server (moto's, over HTTP on 127.0.0.1) and a real local Ray.

Both are session-scoped and started lazily: a test that names neither fixture starts neither.
"""

from __future__ import annotations

import os
import socket

import pytest

# OpenMP threads that wait at a barrier spin first (libgomp: ~300k iterations) and sleep after.
# Alone, a process's spinning threads only wait for each other; the Makefile's two test processes,
# and the Ray workers and actors a test starts, share this machine's cores, and each one's spinning
# threads take the cores the other's working threads need. R50-FPN on a 2-core CPU, two processes
# of 2 torch threads each: 5 s an image each spinning, 1.9 s passive (1.0 s alone either way). Set
# before torch is imported; every process a test starts inherits it. Outputs do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The files whose tests take longest on a 2-core CPU, longest first (seconds in a suite run, with
# the slow tests / without them). The two test processes (``-n 2 --dist loadfile
# --no-loadscope-reorder``, the Makefile's) take whole files in collection order, so these start
# first and the short files fill in around them; a long file begun last ran alone for minutes.
LONGEST_FIRST = [
    "test_job_train.py",  # ~870 / ~60
    "test_selftrain_gain.py",  # ~780 / -
    "test_torchvision_parity.py",  # ~710 / ~400
    "test_ray_connection.py",  # ~590 / ~130
    "test_selftrain.py",  # ~520 / ~20
    "test_overfit.py",  # ~500 / -
    "test_v2_parity.py",  # ~470 / ~170
    "test_cluster_local.py",  # ~425 / -
    "test_job_label.py",  # ~250 / ~40
    "test_readme.py",  # ~245 / ~110
    "test_storage_faults.py",  # ~220 / ~100
    "test_train_mistakes.py",  # ~200 / ~95
    "test_label_schedule.py",  # ~160 / ~70
    "test_user_errors.py",  # ~150 / ~150
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, reached through s3fs as a user's job reaches S3.

    Yields the endpoint URL. The standard AWS variables are set for the whole session, so
    code under test (and Ray workers started afterwards, which inherit the environment) finds
    the endpoint and credentials the way it would in production.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=endpoint,
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket named after the test; yields its ``s3://`` URI."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def short_dir():
    """``short_dir(prefix)``: a new, empty folder with a short path, removed after the session.
    For Ray's temp dirs: its sockets live under them and a Unix socket's path must stay under 108
    bytes, which pytest's own (``/tmp/pytest-of-USER/pytest-N/popen-gwK/...``) can pass."""
    import shutil
    import tempfile
    from pathlib import Path

    made = []

    def make(prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp" if os.path.isdir("/tmp") else None))
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(short_dir):
    """A real local Ray with 2 CPUs, shared by every test of the session that needs one: started
    as the jobs start their private one (never another program's Ray; started again when a busy
    machine keeps it from registering in time), without naming it in this process's environment,
    which the tests' job subprocesses inherit."""
    import ray

    from jobs.common import _start_private_ray

    if ray.is_initialized():
        yield ray
        return
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    try:
        _start_private_ray(
            ray, dict(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=str(short_dir("ray")))
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A small checkpoint (``tests.labeling_helpers.make_checkpoint``) for a module's labeling runs."""
    from tests.labeling_helpers import make_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    make_checkpoint(path)
    return path
