"""Storage faults: jobs.label and jobs.train against an S3 that answers ``503 SlowDown`` and drops
connections at random, on every kind of request (tests/s3_faults.py: a proxy in front of the
real moto server). Both finish with every image exactly once and no row in error, the retries
bounded and counted in one line at the end ("S3: 41 requests retried")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskrcnn.storage import filesystem, open_uri
from tests.labeling_helpers import encode, make_checkpoint, read_output, rgb_noise
from tests.s3_faults import FaultyS3Proxy

# Share of requests that fail: high enough that every run meets faults of every kind, low
# enough that the bounded retries always get through. S3_FAULT_RATE / S3_FAULT_SEED to stress.
FAULT_RATE = float(os.environ.get("S3_FAULT_RATE", "0.2"))
FAULT_SEED = int(os.environ.get("S3_FAULT_SEED", "20240601"))


@pytest.fixture
def faulty_s3(s3_server):
    """A FaultyS3Proxy in front of the moto server; its ``endpoint`` is what the jobs are given.
    Faults start off (the test uploads its inputs) and go on with ``proxy.enabled = True``."""
    proxy = FaultyS3Proxy(s3_server, rate=FAULT_RATE, seed=FAULT_SEED).start()
    proxy.enabled = False
    try:
        yield proxy
    finally:
        print(proxy.report())
        proxy.stop()


def _options(endpoint: str, **extra) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing", **extra}


def _retried(output: str) -> int:
    found = re.findall(r"^S3: (\d+) requests? retried$", output, flags=re.M)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def _assert_faults_of_several_kinds(proxy: FaultyS3Proxy) -> None:
    """The run met faults: at least 5, on 3 kinds of request or more, of 2 kinds or more (which
    request meets which fault varies with the threads' timing; ~80 requests at 20% make 16)."""
    by_kind, by_fault = proxy.injected_by_kind(), proxy.injected_by_fault()
    assert sum(by_kind.values()) >= 5 and len(by_kind) >= 3 and len(by_fault) >= 2, proxy.report()


def test_every_slowdown_is_counted_once_whichever_layer_retries_it(s3_bucket, faulty_s3):
    """Half the requests answered SlowDown, botocore held to 2 attempts (its back-off is what the
    test waits for): botocore sends again, and when both attempts fail s3fs calls again. Each 503
    the store answered is one retry in ``s3_retries()``, none lost and none counted twice."""
    from maskrcnn.s3 import s3_retries

    options = _options(faulty_s3.endpoint, config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}})
    faulty_s3.rate, faulty_s3.faults = 0.5, ("slowdown",)
    faulty_s3.enabled = True
    before = s3_retries()
    for k in range(6):
        with open_uri(f"{s3_bucket}/k{k}.txt", "w", options) as f:
            f.write(f"object {k}")
    read = []
    for k in range(6):
        with open_uri(f"{s3_bucket}/k{k}.txt", "r", options) as f:
            read.append(f.read())
    faulty_s3.enabled = False
    assert read == [f"object {k}" for k in range(6)]
    injected = sum(faulty_s3.injected_by_kind().values())
    assert injected >= 10 and max(faulty_s3.injected_by_kind().values()) < injected, faulty_s3.report()
    assert s3_retries() - before == injected, faulty_s3.report()


def test_a_second_job_on_the_same_ray_counts_its_workers_retries(ray_local):
    """Two S3 jobs, one after the other, from one driver on one Ray (as tests and notebooks run
    them): the second finds the first's tally, which must outlive the hand-over, and the retries
    its Ray workers report reach its last line."""
    from jobs.retries import s3_retries_line, start_s3_retry_tally
    from maskrcnn import s3

    s3.install_hooks()  # the driver has used S3: the jobs count its workers' retries
    for job in range(2):
        start_s3_retry_tally()

        @ray_local.remote(num_cpus=0)
        def worker_retries(n: int) -> None:
            import jobs  # noqa: F401  (the workers of a job run the project's code: its hand-over is registered)
            from maskrcnn.s3 import count_s3_retry

            for _ in range(n):
                count_s3_retry()

        ray_local.get([worker_retries.remote(2), worker_retries.remote(3)])
        assert s3_retries_line(since=s3.s3_retries()) == "S3: 5 requests retried", f"job {job + 1}"


# A process with a kept-alive S3 connection forks a child (as DataLoader workers are made), then
# writes on that connection. Forked children used to close the parent's pooled connections
# (fsspec drops the parent's filesystems in the child; collected there, they close their sockets,
# which unregisters them from the epoll the parent shares): the PUT waited for ever for its answer.
_FORK_THEN_WRITE = """
import multiprocessing, sys
from maskrcnn.storage import open_uri
options = {"client_kwargs": {"endpoint_url": sys.argv[1]}, "key": "testing", "secret": "testing"}

def write(name, text):
    with open_uri(sys.argv[2] + "/" + name, "w", options) as f:
        f.write(text)

async def collect():
    import asyncio, gc
    gc.collect()
    await asyncio.sleep(0.5)  # what the collection started (closing what it collected) runs

def child():  # collects garbage on its own IO thread, as a DataLoader worker reading from S3 does
    import fsspec.asyn
    fsspec.asyn.sync(fsspec.asyn.get_loop(), collect)

write("before.txt", "kept alive")
process = multiprocessing.get_context("fork").Process(target=child)
process.start()
process.join()
write("after.txt", "x" * 1000)
print("parent done")
"""


def test_a_forked_child_leaves_the_parents_s3_connections_alone(s3_bucket, faulty_s3):
    faulty_s3.rate = 0  # keep-alive without faults: the proxy keeps connections open, as S3 does
    faulty_s3.enabled = True
    try:
        done = subprocess.run([sys.executable, "-c", _FORK_THEN_WRITE, faulty_s3.endpoint, s3_bucket],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        raise AssertionError("the parent's S3 request after the fork never finished") from None
    assert done.returncode == 0 and "parent done" in done.stdout, done.stdout + done.stderr[-3000:]


def test_label_on_a_faulty_s3_labels_every_image_once(s3_server, s3_bucket, faulty_s3, ray_local, capsys):
    """16 PNG and JPEG images, the checkpoint and the output on S3, every request through the
    proxy: the job exits 0, each image has exactly one row, none with an error."""
    from jobs.common import run_main
    from jobs.label import main as label_main
    from maskrcnn.data.synthetic import make_sample_dataset

    direct = _options(s3_server)
    images = f"{s3_bucket}/images"
    make_sample_dataset(f"{images}/shapes", {"part": 12}, seed=5, storage_options=direct)  # PNGs beside an annotations.json
    for k in range(4):
        with open_uri(f"{images}/photos/p{k}.jpg", "wb", direct) as f:
            f.write(encode(rgb_noise(80 + 8 * k, 64, seed=k), "JPEG"))
    make_checkpoint(f"{s3_bucket}/model.pt", storage_options=direct)
    output = f"{s3_bucket}/labels"

    faulty_s3.enabled = True
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_main(label_main, [
            "--input", images, "--output", output, "--checkpoint", f"{s3_bucket}/model.pt",
            "--shard-size", "4", "--batch-size", "2", "--decode-batch-size", "4",
            "--storage-options", json.dumps(_options(faulty_s3.endpoint)),
        ])
    seconds = time.perf_counter() - started
    faulty_s3.enabled = False
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.out[-3000:] + captured.err[-3000:]
    print(f"labelled through the faulty proxy in {seconds:.1f} s; {faulty_s3.report()}")

    fs, root = filesystem(images, direct)
    expected = sorted(f"s3://{p}" for p in fs.find(root) if p.endswith((".png", ".jpg")))
    assert len(expected) == 16
    table = read_output(output, direct)
    assert sorted(table.column("image_uri").to_pylist()) == expected  # every image, exactly once
    errors = [e for e in table.column("error").to_pylist() if e]
    assert errors == []
    assert all(h > 0 for h in table.column("height").to_pylist())
    _assert_faults_of_several_kinds(faulty_s3)
    retried = _retried(captured.out)
    print(f"jobs.label said: S3: {retried} requests retried")
    assert retried > 0  # counted on the driver and in the Ray workers


def test_label_on_an_s3_compatible_store_without_conditional_puts_or_upload_checksums(s3_server, s3_bucket, ray_local, capsys):
    """A store as many S3-compatible ones are (Backblaze B2, older MinIO and Ceph): it refuses
    botocore's default upload checksums (400 on ``x-amz-sdk-checksum-algorithm``) and answers the
    lease's conditional put ``501 NotImplemented`` (tests/s3_faults.py's proxy, no faults). Uploads
    large and small go up, and jobs.label labels every image once, with one warning line a run."""
    from jobs.common import run_main
    from jobs.label import main as label_main

    direct = _options(s3_server)
    images = f"{s3_bucket}/images"
    for k in range(3):
        with open_uri(f"{images}/p{k}.jpg", "wb", direct) as f:
            f.write(encode(rgb_noise(72 + 8 * k, 64, seed=k), "JPEG"))
    make_checkpoint(f"{s3_bucket}/model.pt", storage_options=direct)
    store = FaultyS3Proxy(s3_server, rate=0.0, conditional_writes="rejected", checksum_headers="rejected").start()
    try:
        options = _options(store.endpoint)
        fs, root = filesystem(f"{s3_bucket}/big", {**options, "default_block_size": 5 * 2**20})
        with fs.open(f"{root}/big", "wb") as f:  # a multipart upload, as a checkpoint's
            f.write(b"x" * (11 * 2**20))
        assert store.forwarded["multipart_complete"] == 1 and fs.size(f"{root}/big") == 11 * 2**20
        for _ in range(2):  # the second run finds every shard done
            with pytest.raises(SystemExit) as exit_info:
                run_main(label_main, ["--input", images, "--output", f"{s3_bucket}/labels", "--checkpoint", f"{s3_bucket}/model.pt",
                                      "--storage-options", json.dumps(options)])
            captured = capsys.readouterr()
            assert exit_info.value.code == 0, captured.out[-3000:] + captured.err[-3000:]
            warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
            assert len(warnings) == 1 and "does not implement conditional writes" in warnings[0], captured.err[-3000:]
    finally:
        store.stop()
    table = read_output(f"{s3_bucket}/labels", direct)
    assert sorted(table.column("image_uri").to_pylist()) == [f"{images}/p{k}.jpg" for k in range(3)]
    assert table.column("error").to_pylist() == [None] * 3
    assert "nothing to do" in captured.out


def test_label_to_an_output_that_stops_taking_writes_says_so_in_one_line_and_resumes(s3_server, s3_bucket, ray_local, capsys):
    """The output's store refuses the run's label writes part-way (403 AccessDenied, as after a
    bucket policy changed; a full disk or a quota is the same to the job): jobs.label stops with one
    line naming --output, the reason and how many shards are committed, and no traceback (exit 2);
    once the store takes writes again, the same command labels the rest, each image once."""
    from jobs.common import run_main
    from jobs.label import main as label_main

    direct = _options(s3_server)
    images = f"{s3_bucket}/images"
    for k in range(4):
        with open_uri(f"{images}/p{k}.png", "wb", direct) as f:
            f.write(encode(rgb_noise(64, 56 + 8 * k, seed=k), "PNG"))
    make_checkpoint(f"{s3_bucket}/model.pt", storage_options=direct)
    store = FaultyS3Proxy(s3_server, rate=0.0, refuse_writes="/labels/_pieces/").start()
    args = ["--input", images, "--output", f"{s3_bucket}/labels", "--checkpoint", f"{s3_bucket}/model.pt", "--shard-size", "2",
            "--storage-options", json.dumps(_options(store.endpoint))]
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(label_main, args)
        captured = capsys.readouterr()
        assert exit_info.value.code == 2, captured.out[-3000:] + captured.err[-3000:]
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: cannot write to --output {s3_bucket}/labels: access denied (Access Denied): check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and their permissions on this bucket and prefix; 0 of 2 shards committed: run the same "
            "command again once it takes files, to label the rest"
        ], captured.err[-3000:]
        assert "Traceback" not in captured.out + captured.err, captured.err[-3000:]
        # the failed run's model actors are gone: the next run in this process finds the CPUs free
        # (one was left holding its CPU, and the rerun waited for ever for a CPU to decode on)
        deadline = time.monotonic() + 30
        while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray_local.available_resources().get("CPU", 0) == ray_local.cluster_resources()["CPU"], ray_local.available_resources()
        store.refuse_writes = None
        with pytest.raises(SystemExit) as exit_info:
            run_main(label_main, args)
        captured = capsys.readouterr()
        assert exit_info.value.code == 0, captured.out[-3000:] + captured.err[-3000:]
    finally:
        store.stop()
    table = read_output(f"{s3_bucket}/labels", direct)
    assert sorted(table.column("image_uri").to_pylist()) == [f"{images}/p{k}.png" for k in range(4)]


@pytest.mark.slow
def test_train_on_a_faulty_s3_writes_the_model(s3_server, s3_bucket, faulty_s3):
    """A 1-worker run of a few steps, annotations, images and --output on S3 through the proxy
    (parts of 5 MiB, so checkpoints go up as multipart uploads): exits 0 and writes model.pt."""
    from maskrcnn.data.synthetic import make_sample_dataset
    from tests.test_job_train import run_job

    direct = _options(s3_server)
    annotations, images = make_sample_dataset(f"{s3_bucket}/data", {"train": 8}, seed=2, storage_options=direct)["train"]
    output = f"{s3_bucket}/runs/faulty"

    faulty_s3.enabled = True
    started = time.perf_counter()
    job = run_job(
        "jobs.train",
        [
            "--annotations", annotations, "--images", images, "--output", output,
            "--num-workers", "1", "--batch-size", "2", "--max-steps", "4", "--log-every", "2",
            "--checkpoint-every", "1", "--keep-checkpoints", "1",
            "--arch", "small", "--min-size", "128", "--max-size", "160", "--loader-workers", "1",
            "--storage-options", json.dumps({"default_block_size": 5 * 2**20}),
        ],
        timeout=240,  # ~50 s; a PUT that waits for ever for its answer (a forked DataLoader worker's doing) ends here
        env={"AWS_ENDPOINT_URL": faulty_s3.endpoint},  # the job finds the store the standard way
    )
    seconds = time.perf_counter() - started
    faulty_s3.enabled = False
    print(f"trained through the faulty proxy in {seconds:.1f} s; {faulty_s3.report()}")
    fs, root = filesystem(output, direct)
    fs.invalidate_cache()
    assert fs.exists(f"{root}/model.pt"), job.output[-3000:]
    _assert_faults_of_several_kinds(faulty_s3)
    assert faulty_s3.forwarded["multipart_complete"] > 0, faulty_s3.report()
    retried = _retried(job.output)
    print(f"jobs.train said: S3: {retried} requests retried")
    assert retried > 0


@pytest.mark.slow
@pytest.mark.parametrize("refused, by", [
    ("/checkpoint_2", "the worker's upload of a checkpoint"),
    ("/metrics.jsonl", "the worker's record of the run"),
    ("/checkpoint_manager_snapshot.json", "Ray Train controller's record of the checkpoints"),
])
def test_train_to_an_output_that_stops_taking_writes_says_so_in_one_line_and_resumes(refused, by, s3_server, s3_bucket):
    """--output's store refuses the run's writes part-way (403 AccessDenied, as after a bucket
    policy or the credentials changed), in whichever of the run's processes writes: jobs.train
    stops at once with one line naming --output and the reason, no traceback and no restart of the
    workers (exit 2); once the store takes writes again, the same command resumes from the last
    checkpoint and writes model.pt."""
    from maskrcnn.data.synthetic import make_sample_dataset
    from tests.job_process import Job, run_job

    direct = _options(s3_server)
    annotations, images = make_sample_dataset(f"{s3_bucket}/data", {"train": 8}, seed=2, storage_options=direct)["train"]
    output = f"{s3_bucket}/runs/refused"
    args = [
        "--annotations", annotations, "--images", images, "--output", output, "--num-workers", "1", "--batch-size", "2",
        "--max-steps", "24", "--log-every", "2", "--checkpoint-every", "2", "--arch", "small", "--min-size", "128",
        "--max-size", "160", "--loader-workers", "1",
    ]
    store = FaultyS3Proxy(s3_server, rate=0.0).start()
    try:
        job = Job("jobs.train", args, env={"AWS_ENDPOINT_URL": store.endpoint})
        assert job.wait_for(lambda: "checkpoint at step 2" in job.output, 240), job.output[-3000:]
        store.refuse_writes = refused
        code = job.wait(240)
        assert code == 2, job.output[-6000:]
        assert "Traceback" not in job.output, job.output[-6000:]
        assert len(re.findall(r"starts at step \d+", job.output)) == 1, job.output[-6000:]  # no restart of the workers
        errors = [line for line in job.output.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: training stopped: cannot write to --output {output}: access denied (Access Denied): check the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and their permissions on this bucket and prefix; the same "
            "command resumes from the last checkpoint once it takes files"
        ], f"refused: {by}\n" + job.output[-6000:]
        assert store.refused, f"{by} was not refused"
        if refused == "/checkpoint_2":  # resumes (the other cases leave the same state behind)
            store.refuse_writes = None
            again = run_job("jobs.train", args, env={"AWS_ENDPOINT_URL": store.endpoint})
            resumed = re.findall(r"starts at step (\d+) of 24", again.output)
            assert len(resumed) == 1 and int(resumed[0]) >= 2, again.output[-3000:]
            fs, root = filesystem(output, direct)
            fs.invalidate_cache()
            assert fs.exists(f"{root}/model.pt")
    finally:
        store.stop()
