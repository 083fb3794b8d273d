"""jobs.label as a scheduled job meets it: a folder that grows between runs, two runs at once, a
lease left by a run that died elsewhere, and readers that glob the output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.common import JobError
from jobs.label import main as label_main
from jobs.lease import lease_name
from jobs.labeling.plan import read_plan
from tests.labeling_helpers import encode, local_parts, read_output, rgb_noise

ROOT = Path(__file__).resolve().parents[1]


def _add_images(folder: Path, names: list[str], seed: int) -> None:
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(rgb_noise(40 + 8 * (k % 3), 32, seed=seed + k), "PNG"))


def _args(images: Path, output: Path, checkpoint: str, *extra: str) -> list[str]:
    return ["--input", str(images), "--output", str(output), "--checkpoint", checkpoint, "--shard-size", "3",
            "--max-detections", "5", *extra]


def test_a_rerun_labels_the_images_added_since_and_readers_see_only_labels(tmp_path, checkpoint, ray_local, capsys):
    images, output = tmp_path / "images", tmp_path / "out"
    _add_images(images, [f"a{k}.png" for k in range(7)], seed=0)
    assert label_main(_args(images, output, checkpoint)) == 0
    first = {p: Path(p).read_bytes() for p in local_parts(str(output))}
    assert len(first) == 3
    capsys.readouterr()

    # the next night: 4 new images (one in a new folder), one old image gone
    _add_images(images, ["b0.png", "b1.png", "new/c0.png", "new/c1.png"], seed=100)
    (images / "a3.png").unlink()
    assert label_main(_args(images, output, checkpoint)) == 0
    out = capsys.readouterr().out
    assert "4 new images planned in 2 new shards" in out, out
    assert "1 planned image is no longer in the input; its row is kept" in out, out
    assert "shards: 2 labelled this run, 3 already done, 5 in all" in out, out
    for path, data in first.items():  # the rows already written are never rewritten
        assert Path(path).read_bytes() == data
    table = read_output(str(output))
    uris = table.column("image_uri").to_pylist()
    expected = {str(images / f"a{k}.png") for k in range(7)} | {str(images / n) for n in ("b0.png", "b1.png", "new/c0.png", "new/c1.png")}
    assert len(uris) == len(set(uris)) == 11 and set(uris) == expected
    assert [g.num_images for g in read_plan(str(output)).generations] == [7, 4]

    # --no-new-inputs: the plan as it stands, a snapshot
    _add_images(images, ["d0.png"], seed=200)
    assert label_main(_args(images, output, checkpoint, "--no-new-inputs")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert read_output(str(output)).num_rows == 11

    # readers: the obvious call over the folder gives the label rows and nothing else
    import duckdb
    import pyarrow.dataset as pads
    import ray

    for glob in ("*.parquet", "**/*.parquet"):
        count = duckdb.sql(f"select count(*) from read_parquet('{output}/{glob}')").fetchall()[0][0]
        assert count == 11, glob
    assert pads.dataset(str(output), format="parquet").count_rows() == 11
    assert ray.data.read_parquet(str(output)).count() == 11


def _write_lease(output: Path, number: int, host: str, pid: int, expires_in: float) -> None:
    folder = output / "_plan"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"number": number, "owner": "elsewhere-run", "host": host, "pid": pid, "expires": time.time() + expires_in}
    (folder / lease_name(number)).write_text(json.dumps(record))


def test_a_lease_held_elsewhere_is_refused_in_one_line_then_taken_over_when_it_expires(tmp_path, checkpoint, ray_local, capsys):
    images, output = tmp_path / "images", tmp_path / "out"
    _add_images(images, [f"a{k}.png" for k in range(4)], seed=0)
    _write_lease(output, 7, "another-host", 12345, expires_in=600)
    with pytest.raises(JobError, match=r"is being labelled by run elsewhere-run \(host another-host, pid 12345\).*--wait-for-lease"):
        label_main(_args(images, output, checkpoint))
    assert not local_parts(str(output)) and read_plan(str(output)) is None  # nothing planned or written

    _write_lease(output, 8, "another-host", 12345, expires_in=3)  # its owner died: no renewal
    started = time.monotonic()
    assert label_main(_args(images, output, checkpoint, "--wait-for-lease", "60")) == 0
    assert time.monotonic() - started >= 2.5  # it waited for the expiry
    assert read_output(str(output)).num_rows == 4
    lease = json.loads((output / "_plan" / lease_name(9)).read_text())
    assert lease["expires"] == 0 and lease["host"] == socket.gethostname()  # taken as 9, released at the end
    assert not (output / "_plan" / lease_name(7)).exists()  # old leases cleaned up


@pytest.mark.slow
def test_two_runs_at_once_one_refuses_one_waits_and_every_image_is_labelled_once(tmp_path, checkpoint, ray_local):
    images, output = tmp_path / "images", tmp_path / "out"
    _add_images(images, [f"a{k:02d}.png" for k in range(12)], seed=0)
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)

    def start(*extra: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "jobs.label", *_args(images, output, checkpoint, "--batch-size", "1", *extra)]
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start()
    deadline = time.monotonic() + 120
    while not list((output / "_plan").glob("lease-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start()  # refuses at once
    second_out, _ = second.communicate(timeout=120)
    third = start("--wait-for-lease", "300")  # waits for the first, then finds nothing to do
    first_out, _ = first.communicate(timeout=300)
    third_out, _ = third.communicate(timeout=300)
    assert first.returncode == 0, first_out[-3000:]
    assert second.returncode == 2 and "is being labelled by run" in second_out, second_out[-3000:]
    assert "Traceback" not in second_out
    assert third.returncode == 0 and "nothing to do" in third_out, third_out[-3000:]
    uris = read_output(str(output)).column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 12


@pytest.mark.parametrize("conditional_writes", ["supported", "rejected", "ignored"])
def test_on_s3_the_lease_is_created_exclusively_with_a_conditional_put(conditional_writes, s3_server, s3_bucket, capsys):
    """S3's If-None-Match: * (moto honours it): of two runs creating the same lease number one
    wins; the other is refused naming the holder, and takes the next number once it is released.
    The same on S3-compatible stores without the conditional put (tests/s3_faults.py's proxy in
    front of moto): one that answers it 501 NotImplemented (a warning, then write-then-check),
    and one that ignores the condition."""
    from jobs.lease import Lease
    from tests.s3_faults import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server, rate=0.0, conditional_writes=conditional_writes).start()
    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "key": "testing", "secret": "testing"}
    try:
        output = f"{s3_bucket}/labels"
        first = Lease(output, "_plan", "run-a", options)
        first.acquire()
        second = Lease(output, "_plan", "run-b", options)
        if conditional_writes != "ignored":  # a store that ignores the condition overwrites (the renewal then finds out)
            assert second._create(first.number) is False
        with pytest.raises(JobError, match="is being labelled by run run-a"):
            second.acquire(wait=0)
        first.release()
        second.acquire()
        assert second.number == 2 and second.current().owner == "run-b"
        second.release()
    finally:
        proxy.stop()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if conditional_writes == "rejected":  # once a run
        assert len(warnings) == 2 and all("does not implement conditional writes (If-None-Match)" in w for w in warnings), warnings
    else:
        assert warnings == []


def test_a_local_lease_is_never_read_half_written(tmp_path):
    """Another run reads the lease while its holder renews it (--wait-for-lease polls it): a
    renewal written in place could be read empty or cut, taken for an expired lease, and the
    live run's output taken over. Renewals and creations are whole files, read whole."""
    import threading

    from jobs.lease import Lease

    output = str(tmp_path / "labels")
    holder = Lease(output, "_plan", "run-a")
    holder.acquire()
    reader = Lease(output, "_plan", "run-b")
    stop, seen = threading.Event(), set()

    def read():
        while not stop.is_set():
            seen.add(reader.current().owner)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(3000):
            holder._write(holder.number, time.time() + holder.ttl)
    finally:
        stop.set()
        thread.join()
    holder.release()
    assert seen == {"run-a"}
    assert sorted(p.name for p in (tmp_path / "labels" / "_plan").iterdir()) == [lease_name(1)]  # nothing left aside
