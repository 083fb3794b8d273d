"""jobs.label: the plan, decoding, and whole runs on a real local Ray, a real S3 server (moto),
with bad images, a killed job and a killed model actor."""

from __future__ import annotations

import copy

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.common import JobError, run_main
from jobs.label import main as label_main
from maskrcnn.inference import prepare_image
from jobs.labeling.inputs import iter_input_uris
from jobs.labeling.plan import read_plan, read_shard_uris, write_plan
from jobs.labeling.shards import finished_shards, part_name
from jobs.labeling.rows import OUTPUT_SCHEMA
from maskrcnn.checkpoint import load_checkpoint
from maskrcnn.data.images import ImageDecodeError, decode_image, to_rgb_float
from maskrcnn.masks import encode_masks
from maskrcnn.modeling.optimize import optimize_for_inference
from maskrcnn.storage import open_uri
from tests.labeling_helpers import awkward_images, encode, local_parts, make_checkpoint, process_table, read_output, rgb_noise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    """60 synthetic images in nested shard folders (plus their annotations.json, not images)."""
    from maskrcnn.data.synthetic import make_sample_dataset

    root = tmp_path_factory.mktemp("shapes")
    for k in range(3):
        make_sample_dataset(str(root / f"shard-{k:02d}"), {"part": 20}, seed=k)
    return root


# ---------------------------------------------------------------- no Ray: plan, listing, decoding


def test_listing_is_recursive_sorted_and_skips_non_images(tmp_path):
    for name in ["b/2.png", "a/x/1.JPG", "a/0.webp", "c.tiff", "notes.txt", "a/annotations.json", "out/p.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    uris = list(iter_input_uris(str(tmp_path), exclude_uri=str(tmp_path / "out")))
    assert uris == [str(tmp_path / n) for n in ["a/0.webp", "a/x/1.JPG", "b/2.png", "c.tiff"]]


def test_files_left_out_as_not_images_are_counted_and_named(tmp_path, capsys):
    """Every still format Pillow decodes is an image (AVIF, GIF, JPEG 2000, the PNM family); a
    folder's other files are left out, and planning says how many of which kind: a phone's HEIC
    photos would otherwise go unlabelled in silence. A folder of HEIC photos alone says so in its
    one-line error."""
    from collections import Counter

    from jobs.labeling.plan import plan_for_run

    photos = tmp_path / "photos"
    images = ["a.avif", "b.gif", "c.jp2", "d.pgm", "e.JFIF", "f.jpg"]
    others = ["IMG_1.HEIC", "IMG_2.heic", "IMG_3.heic", "clip.MOV", "README", "_plan.heic", ".x.heic"]
    for name in images + others:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"x")
    counted = Counter()
    assert list(iter_input_uris(str(photos), not_images=counted)) == [str(photos / n) for n in images]
    assert counted == {"heic": 3, "mov": 1, "": 1}  # hidden and bookkeeping names are no input at all

    plan = plan_for_run(str(photos), str(tmp_path / "labels"), None, {}, None)
    assert plan.num_images == len(images)
    note = (f"note: 5 files in --input {photos} left out as not images by name (3 .heic, 1 without an extension, 1 .mov); "
            "HEIC/HEIF photos cannot be decoded here: convert them (to JPEG, say) to label them")
    assert note in capsys.readouterr().out.splitlines()

    for name in images:
        (photos / name).unlink()
    with pytest.raises(JobError, match=r"^--input .*photos holds no images \(looked for jpg, jpeg, .*\); 5 files in --input .* left out"):
        plan_for_run(str(photos), str(tmp_path / "other"), None, {}, None)


SKIPPED_NAMES = ["_preview/0000-000001.png", ".thumbs/a.png", "a/.hidden.png", "a/_tmp/b.png",
                 "old_labels/_plan/plan.json", "old_labels/part-000000.parquet", "old_labels/keep.png"]


def test_listing_skips_hidden_bookkeeping_and_other_runs_outputs(tmp_path):
    """Names starting with . or _ (another run's _preview/, editors' dotfiles) are never inputs,
    nor anything in a folder that holds a labeling plan (another run's output)."""
    for name in ["a/1.png", "z.png", *SKIPPED_NAMES]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list(iter_input_uris(str(tmp_path))) == [str(tmp_path / "a/1.png"), str(tmp_path / "z.png")]


def test_listing_an_s3_prefix_skips_hidden_and_bookkeeping_keys(s3_bucket):
    from maskrcnn.storage import filesystem

    fs, root = filesystem(s3_bucket)
    for name in ["in/a/1.png", "in/z.png", *[f"in/{n}" for n in SKIPPED_NAMES if "old_labels" not in n]]:
        fs.pipe(f"{root}/{name}", b"x")
    assert list(iter_input_uris(f"{s3_bucket}/in")) == [f"{s3_bucket}/in/a/1.png", f"{s3_bucket}/in/z.png"]


@pytest.mark.parametrize("output", ["images", "."])
def test_an_output_that_is_or_holds_the_input_is_refused(tmp_path, checkpoint, capsys, output):
    images = tmp_path / "images"
    images.mkdir()
    rgb_noise(32, 24).save(images / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        run_main(label_main, ["--input", str(images), "--output", str(tmp_path / output), "--checkpoint", checkpoint])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output") and "--input" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "images"]  # nothing written


def test_an_output_holding_part_files_of_no_plan_is_refused(tmp_path, checkpoint, capsys):
    """Part files with no _plan/ of this job's (another tool's output, an output whose plan was
    removed) are not taken for labelled shards, whose images would never be labelled: refused in
    one line, and the folder left as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        rgb_noise(32, 24, seed=k).save(images / f"{k}.png")
    output = tmp_path / "spark"
    output.mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), output / "part-000000.parquet")
    (output / "other.csv").write_text("x\n")
    before = sorted((p.name, p.read_bytes()) for p in output.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_main(label_main, ["--input", str(images), "--output", str(output), "--checkpoint", checkpoint, "--shard-size", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {output} holds 1 part-NNNNNN.parquet file(s) but no _plan/ of jobs.label: they are not this "
                   "job's labels (or their plan was removed); give an empty or new --output"], err
    assert sorted((p.name, p.read_bytes()) for p in output.iterdir()) == before


def test_manifests_txt_and_parquet(tmp_path):
    import pyarrow as pa

    (tmp_path / "m.txt").write_text("# a comment\ns3://b/1.png\n\n/data/2.jpg\n")
    assert list(iter_input_uris(str(tmp_path / "m.txt"))) == ["s3://b/1.png", "/data/2.jpg"]
    (tmp_path / "w.txt").write_bytes("s3://b/1.png\r\n/data/2 é.jpg\r\n".encode("utf-8-sig"))  # as Notepad saves it
    assert list(iter_input_uris(str(tmp_path / "w.txt"))) == ["s3://b/1.png", "/data/2 é.jpg"]
    pq.write_table(pa.table({"image_uri": ["a.png", "b.png"], "other": [1, 2]}), tmp_path / "m.parquet")
    assert list(iter_input_uris(str(tmp_path / "m.parquet"))) == ["a.png", "b.png"]


def test_plan_shards_and_finished_shards(tmp_path):
    out = str(tmp_path / "out")
    uris = (f"img/{i:05d}.png" for i in range(1000))
    plan = write_plan(uris, out, "img", shard_size=7, settings={"model": "x"})
    assert (plan.num_images, plan.num_shards) == (1000, 143)
    assert read_plan(out) == plan
    # spans two plan files (64 shards per file); the last shard is short
    assert read_shard_uris(out, 70) == [f"img/{i:05d}.png" for i in range(490, 497)]
    assert read_shard_uris(out, 142) == [f"img/{i:05d}.png" for i in range(994, 1000)]
    assert finished_shards(out) == set()
    for shard in (0, 5, 142):
        (tmp_path / "out" / part_name(shard)).write_bytes(b"")
    (tmp_path / "out" / "part-000009.parquet.tmp").write_bytes(b"")
    assert finished_shards(out) == {0, 5, 142}


def test_a_mixed_batch_gives_each_image_its_batch_1_detections(tmp_path, checkpoint):
    """Images of other sizes in one batch would pad each other: the actor batches an image only
    with others of its padded size, so every image's detections are those of the model on it
    alone (the small preset's GroupNorm sees the padding, so a whole-batch forward gives other
    detections)."""
    from jobs.labeling.decode import decode_batch
    from jobs.labeling.predict import LabelActor

    sizes = [(120, 90), (90, 130), (140, 100), (80, 150)]  # (width, height): landscape, portrait, ...
    uris = []
    for k, (w, h) in enumerate(sizes):
        uris.append(str(tmp_path / f"{k}.png"))
        Path(uris[-1]).write_bytes(encode(rgb_noise(w, h, seed=k), "PNG"))
    loaded = load_checkpoint(checkpoint)
    batch = {"shard": np.zeros(4, dtype=np.int64), "index": np.arange(4), "image_uri": np.asarray(uris, dtype=object)}
    size = {"min_size": loaded.config.input.min_size, "max_size": loaded.config.input.max_size, "max_pixels": 10**8}
    threads = torch.get_num_threads()
    try:
        actor = LabelActor(checkpoint_uri=checkpoint, load_kwargs={}, storage_options=None, use_gpu=False, max_batch=4)
        table = actor(decode_batch(batch, storage_options=None, **size))  # (it sets the actor's torch threads)
    finally:
        torch.set_num_threads(threads)
    got = [{"boxes": np.asarray(b, np.float32).reshape(-1, 4), "scores": np.asarray(s, np.float32)}
           for b, s in zip(table.column("boxes").to_pylist(), table.column("scores").to_pylist())]

    fast = optimize_for_inference(copy.deepcopy(loaded.model))
    images = [decode_image(Path(u).read_bytes(), 10**8) for u in uris]
    with torch.inference_mode():
        alone = {i: fast([image])[0] for i, image in enumerate(images)}
        together = fast(images)
    for i in range(4):
        assert len(got[i]["scores"]) > 0
        np.testing.assert_allclose(got[i]["boxes"], alone[i]["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(got[i]["scores"], alone[i]["scores"].numpy(), atol=1e-5)
    # the case the grouping avoids: padded to one square, the same images detect differently
    assert any(together[i]["scores"].shape != alone[i]["scores"].shape
               or not torch.allclose(together[i]["scores"], alone[i]["scores"], atol=1e-5) for i in range(4))


def test_decode_modes_convert_correctly():
    grey16 = Image.fromarray(np.array([[0, 65535], [32768, 257]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    values = to_rgb_float(grey16)
    assert values.shape == (3, 2, 2)
    torch.testing.assert_close(values[0], torch.tensor([[0.0, 1.0], [32768 / 65535, 257 / 65535]]))
    cmyk = rgb_noise(8, 8).convert("CMYK")
    expected = torch.from_numpy(np.array(cmyk.convert("RGB"))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(to_rgb_float(cmyk), expected)
    bilevel = to_rgb_float(Image.new("1", (4, 4), color=1))
    assert bilevel.min() == 1.0
    for name, (data, error_word, size) in awkward_images().items():
        if error_word is None:
            image = decode_image(data, max_pixels=100_000_000)
            assert image.dtype == torch.float32 and image.shape[0] == 3, name
            assert (image.shape[2], image.shape[1]) == size, name
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0, name
        else:
            with pytest.raises(ImageDecodeError, match=error_word):
                prepare_image(data, 256, 384, max_pixels=100_000_000)


def test_bad_arguments_stop_before_any_work(tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode(rgb_noise(8, 8), "PNG"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    cases = {
        "missing input": (
            ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o1"), "--checkpoint", checkpoint],
            "does not exist",
        ),
        "empty input": (["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o2"), "--checkpoint", checkpoint], "no images"),
        "unwritable output": (["--input", str(images), "--output", str(blocked / "sub"), "--checkpoint", checkpoint], "cannot write"),
        "missing checkpoint": (
            ["--input", str(images), "--output", str(tmp_path / "o3"), "--checkpoint", str(tmp_path / "no.pt")],
            "does not exist",
        ),
        "unreadable checkpoint": (
            ["--input", str(images), "--output", str(tmp_path / "o4"), "--checkpoint", str(tmp_path / "junk.pt")],
            "not a readable",
        ),
        "negative wait": (
            ["--input", str(images), "--output", str(tmp_path / "o5"), "--checkpoint", checkpoint, "--wait-for-gpus", "-1"],
            "--wait-for-gpus must be 0 or more seconds, got -1",
        ),
        "negative cpus": (
            ["--input", str(images), "--output", str(tmp_path / "o6"), "--checkpoint", checkpoint, "--cpus-per-actor", "-1"],
            "--cpus-per-actor must be positive, got -1",
        ),
        "nan gpus": (
            ["--input", str(images), "--output", str(tmp_path / "o7"), "--checkpoint", checkpoint, "--gpus-per-actor", "nan"],
            "argument --gpus-per-actor: not a finite number: 'nan'",
        ),
    }
    for name, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_main(label_main, argv)
        assert exit_info.value.code == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
    assert not list(tmp_path.glob("o*/part-*")), "no work may have been done"
    assert not list(tmp_path.glob("o*/_plan")), "nor any plan written"


def test_wait_for_gpus_asks_the_autoscaler_then_gives_up_naming_the_option(tmp_path, checkpoint, ray_local, capsys):
    """On this CPU-only Ray, a job that asks for GPUs with --wait-for-gpus 3 requests them from the
    autoscaler, waits 3 s, withdraws the request and stops with a reason that names the option.
    Its request is replaced once during the wait, as Ray Data's AutoscalingCoordinator (left on
    the cluster by any Ray Data job) replaces it every 20 s: the job must ask again."""
    from ray.autoscaler.sdk import request_resources
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    assert not is_autoscaler_v2(), "a local Ray runs autoscaler v1, whose requests are read from the KV store here"

    def asked() -> list | None:  # what the autoscaler is asked for now
        return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"null")

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode(rgb_noise(8, 8), "PNG"))
    cases = {  # extra options -> (what the job needs, the bundles it asks for)
        ("--gpus-per-actor", "0.5", "--num-actors", "3"): (
            "--gpus-per-actor 0.5 --num-actors 3 needs 1.5 GPUs",
            [{"GPU": 0.5, "CPU": 1.0}] * 3,
        ),
        # --wait-for-gpus alone means GPUs: without it, this cluster would label on the CPU
        (): ("--gpus-per-actor 1 needs 1 GPUs", [{"GPU": 1.0, "CPU": 1.0}]),
    }
    for extra, (needs, bundles) in cases.items():
        seen: list = []
        replaced_at: list = []  # len(seen) when the request was replaced
        done = threading.Event()

        def watch(seen=seen, replaced_at=replaced_at, done=done) -> None:
            while not done.is_set():
                seen.append(asked())
                if seen[-1] == bundles and not replaced_at:
                    request_resources(bundles=[])  # what the coordinator's tick sends when it has no requests
                    replaced_at.append(len(seen))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            with pytest.raises(SystemExit) as exit_info:
                run_main(
                    label_main,
                    ["--input", str(images), "--output", str(tmp_path / "out"), "--checkpoint", checkpoint, *extra, "--wait-for-gpus", "3"],
                )
        finally:
            elapsed = time.monotonic() - started
            done.set()
            watcher.join(5)
        captured = capsys.readouterr()
        assert exit_info.value.code == 2, captured
        assert f"error: {needs}, but the Ray cluster has 0 after --wait-for-gpus 3 s" in captured.err, captured.err
        assert "waiting up to 3 s (--wait-for-gpus)" in captured.out, captured.out
        assert 3 <= elapsed < 60, elapsed
        assert replaced_at, ("the request was never seen", len(seen), sorted({json.dumps(s) for s in seen}))
        assert bundles in seen[replaced_at[0]:], ("not asked again after being replaced", seen[replaced_at[0]:])
        assert asked() == [], "the request must be withdrawn when the wait ends"
    assert not list((tmp_path / "out").glob("part-*")), "no work may have been done"


def test_a_pool_that_leaves_no_cpu_to_decode_stops_the_job_on_a_private_ray(ray_local, capsys):
    """Model actors holding every CPU would leave the decoding tasks none: Ray Data then waits for
    ever, with no error. On a private local Ray (this session's ``ray.init()``, as a job's own
    one), which no autoscaler grows, the job stops at the start naming the options; on a cluster
    that may grow it warns (the warning path is the same check without ``ray_is_fixed``)."""
    from jobs.common import ray_is_fixed
    from jobs.label import build_parser
    from jobs.labeling.resources import actor_resources

    assert ray_is_fixed(ray_local)
    cpus = int(ray_local.cluster_resources()["CPU"])
    base = ["--input", "in", "--output", "out", "--checkpoint", "m.pt", "--gpus-per-actor", "0"]
    with pytest.raises(
        JobError,
        match=rf"--num-actors {cpus} cannot start on this private local Ray: the job needs {cpus} x "
        rf"--cpus-per-actor 1 CPUs for the actors plus 1 CPU to decode, it has {cpus} CPUs",
    ):
        actor_resources(ray_local, build_parser().parse_args([*base, "--num-actors", str(cpus), "--cpus-per-actor", "1"]))
    with pytest.raises(JobError, match=rf"--cpus-per-actor {cpus} CPUs"):
        actor_resources(ray_local, build_parser().parse_args([*base, "--num-actors", "1", "--cpus-per-actor", str(cpus)]))
    assert actor_resources(ray_local, build_parser().parse_args([*base, "--num-actors", str(cpus - 1), "--cpus-per-actor", "1"]))[:2] == (
        cpus - 1,
        0.0,
    )
    assert "decoding needs" not in capsys.readouterr().err


def test_without_gpus_the_actor_runs_as_many_torch_threads_as_its_node_has_cpus(tmp_path, checkpoint, ray_local):
    """The CPU default: one model actor per node, its torch threads all the node's CPUs (the model
    is the work; decoding costs a few ms an image), Ray reserving it the node's CPUs less the one
    that decoding runs on. Given, --cpus-per-actor is both the reservation and the threads."""
    from jobs.label import build_parser
    from jobs.labeling.predict import LabelActor, node_cpus
    from jobs.labeling.resources import actor_resources, cpu_actor_sizing

    # (node CPUs, --num-actors, --cpus-per-actor) -> (actors, CPUs reserved each, threads; 0 = its node's CPUs)
    assert cpu_actor_sizing([2.0], None, None) == (1, 1.0, 0)
    assert cpu_actor_sizing([8.0, 0.0, 8.0], None, None) == (2, 7.0, 0)  # a head without CPUs holds no actor
    assert cpu_actor_sizing([1.0], None, None) == (1, 0.0, 0)
    assert cpu_actor_sizing([3.0, 1.0], 2, None) == (2, 1.0, 0)  # nothing reserved would put both on one node
    assert cpu_actor_sizing([2.0], 2, None) == (2, 0.5, 1)  # two on one node share it
    assert cpu_actor_sizing([16.0], 3, None) == (3, 5.0, 5)
    assert cpu_actor_sizing([2.0], None, 1.0) == (1, 1.0, 1)
    assert cpu_actor_sizing([4.0], 2, 0.5) == (2, 0.5, 1)

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert node_cpus() == cpus == 2
    args = build_parser().parse_args(["--input", "in", "--output", "out", "--checkpoint", "m.pt", "--gpus-per-actor", "0"])
    assert actor_resources(ray_local, args) == (1, 0.0, cpus - 1.0, 0)
    actor = {"checkpoint_uri": checkpoint, "load_kwargs": {}, "storage_options": None, "use_gpu": False}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        LabelActor(**actor, threads=0)
        assert torch.get_num_threads() == cpus
        LabelActor(**actor, threads=1)  # --cpus-per-actor 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "jobs.label", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in [
        "--input",
        "--output",
        "--checkpoint",
        "--arch",
        "--categories",
        "--min-size",
        "--max-size",
        "--score-threshold",
        "--max-detections",
        "--batch-size",
        "--num-actors",
        "--gpus-per-actor",
        "--shard-size",
        "--preview",
        "--storage-options",
        "--wait-for-gpus",
    ]:
        assert option in result.stdout, option


# ---------------------------------------------------------------- whole runs on a real Ray


def _expected_instances(loaded, model, image: torch.Tensor) -> list[dict]:
    """``model`` run directly on one decoded image, as output rows."""
    with torch.inference_mode():
        out = model([image])[0]
    boxes = out["boxes"].numpy()
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float32)
    return [
        {
            "category_id": loaded.label_map[label]["id"],
            "category": loaded.label_map[label]["name"],
            "score": float(score),
            "bbox": [float(v) for v in box],
            "area": int(mask.sum()),
            "mask": rle,
            "keypoints": None,  # the model has no keypoint head
        }
        for label, score, box, mask, rle in zip(
            out["labels"].tolist(), out["scores"].numpy(), xywh, out["masks"], encode_masks(out["masks"])
        )
    ]


def _parts_schema_ok(fs_parts: list) -> None:
    for schema in fs_parts:
        assert schema.remove_metadata() == OUTPUT_SCHEMA, schema


@pytest.mark.slow
def test_label_s3_nested_shards_matches_the_model_in_a_loop(s3_server, s3_bucket, ray_local, tmp_path, capsys):
    from maskrcnn.data.synthetic import make_sample_dataset

    options = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    images = f"{s3_bucket}/images"
    for k in range(3):  # images/shard-0k/part/images/00000n.png, beside annotations.json files
        make_sample_dataset(f"{images}/shard-{k:02d}", {"part": 7}, seed=k, storage_options=options)
    for k, fmt in enumerate(["JPEG", "WEBP", "BMP", "TIFF"]):
        ext = {"JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}[fmt]
        with open_uri(f"{images}/other/deeper/x{k}.{ext}", "wb", options) as f:
            f.write(encode(rgb_noise(90 + 10 * k, 70, seed=k), fmt))
    model_uri = f"{s3_bucket}/models/model.pt"
    make_checkpoint(model_uri, storage_options=options)
    output = f"{s3_bucket}/labels"

    code = label_main(
        [
            "--input",
            images,
            "--output",
            output,
            "--checkpoint",
            model_uri,
            "--shard-size",
            "5",
            "--batch-size",
            "1",
            "--preview",
            "3",
            "--storage-options",
            json.dumps(options),
            "--batches-in-flight",
            "2",
        ]
    )  # two threads per actor: the GPU default
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "shards: 5 labelled this run, 0 already done, 5 in all" in stdout
    assert "2 batch(es) in flight per actor" in stdout
    assert "(0 GPU, 1 CPU each, 2 torch threads: its node's CPUs)" in stdout  # the CPU default on this 2-CPU Ray

    listed = list(iter_input_uris(images, options))
    assert len(listed) == 25 and all(u.startswith("s3://") for u in listed)
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    parts = sorted(p for p in fs.ls(output.removeprefix("s3://")) if p.rsplit("/", 1)[-1].startswith("part-"))
    assert len(parts) == 5
    _parts_schema_ok([pq.read_schema(fs.open(p, "rb")) for p in parts])
    table = read_output(output, options)
    assert table.num_rows == 25
    assert sorted(table.column("image_uri").to_pylist()) == sorted(listed)
    assert table.column("error").null_count == 25

    loaded = load_checkpoint(model_uri, storage_options=options)
    # the model as jobs.label runs it by default (the fast path), on the actor's thread count
    # (without GPUs, its node's CPUs): same kernels, same floats
    fast = optimize_for_inference(copy.deepcopy(loaded.model))
    torch.set_num_threads(int(ray_local.cluster_resources()["CPU"]))
    with_instances = 0
    for row in table.to_pylist():
        with open_uri(row["image_uri"], "rb", options) as f:
            image = decode_image(f.read(), max_pixels=100_000_000)
        assert (row["height"], row["width"]) == tuple(image.shape[-2:])
        assert row["model"] == loaded.model_hash
        assert row["instances"] == _expected_instances(loaded, fast, image), row["image_uri"]
        with_instances += bool(row["instances"])
    assert with_instances == 25
    previews = fs.ls(f"{output.removeprefix('s3://')}/_preview")
    assert len(previews) == 3 and all(p.endswith(".png") for p in previews)
    assert not fs.exists(f"{output.removeprefix('s3://')}/_pieces")


@pytest.mark.slow
def test_every_bad_input_gets_its_row_and_the_job_finishes(tmp_path, checkpoint, ray_local, capsys):
    files = awkward_images()
    for name, (data, _, _) in files.items():
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    output = str(tmp_path / "out")
    code = label_main(
        ["--input", str(tmp_path / "in"), "--output", output, "--checkpoint", checkpoint, "--shard-size", "8", "--max-detections", "5"]
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    table = read_output(output)
    rows = {Path(r["image_uri"]).relative_to(tmp_path / "in").as_posix(): r for r in table.to_pylist()}
    assert sorted(rows) == sorted(files) and table.num_rows == len(files)
    failed = 0
    for name, (_, error_word, size) in files.items():
        row = rows[name]
        if error_word is None:
            assert row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == size, name
            assert 0 < len(row["instances"]) <= 5, name
        else:
            failed += 1
            assert row["error"] and error_word in row["error"], (name, row["error"])
            assert row["instances"] == [] and row["width"] is None and row["height"] is None, name
    assert f"{failed} errors" in stdout


def _ray_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


@pytest.mark.slow
def test_killed_job_reruns_exactly_once_with_less_work(tmp_path, checkpoint, shapes_folder, ray_local, capsys):
    output = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "jobs.label",
        "--input",
        str(shapes_folder),
        "--output",
        str(output),
        "--checkpoint",
        checkpoint,
        "--shard-size",
        "4",
        "--batch-size",
        "1",
        "--max-detections",
        "10",
    ]
    env = dict(os.environ, RAY_ADDRESS=_ray_address(ray_local))
    job = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(local_parts(str(output))) < 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        committed_at_kill = len(local_parts(str(output)))
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    first_log = job.stdout.read().decode(errors="replace")
    assert job.returncode == -signal.SIGKILL, first_log[-3000:]
    plan = read_plan(str(output))
    assert plan.num_shards == 15 and 3 <= committed_at_kill < 15, (committed_at_kill, first_log[-3000:])

    # The rerun: only the missing shards. (It runs in this process, on the same Ray.)
    time.sleep(1.0)
    done_before = len(local_parts(str(output)))
    assert label_main(argv[3:]) == 0
    stdout = capsys.readouterr().out
    line = next(s for s in stdout.splitlines() if s.startswith("shards:"))
    labelled, already = int(line.split()[1]), int(line.split(",")[1].split()[0])
    assert already >= done_before >= 3 and labelled == 15 - already, line

    table = read_output(str(output))
    uris = table.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 60
    assert sorted(uris) == sorted(iter_input_uris(str(shapes_folder)))

    # Over finished output: no model work, and it says so.
    assert label_main(argv[3:]) == 0
    stdout = capsys.readouterr().out
    assert "nothing to do" in stdout and "no model work" in stdout
    assert "shards: 0 labelled this run, 15 already done" in stdout


def _raylet_pid() -> int | None:
    """This session's raylet (every worker of the test's Ray is its child); None when this
    process joined a Ray it did not start."""
    import ray

    try:
        return ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError):
        return None


def _predictor_pids(raylet: int | None) -> set[int]:
    """This Ray's model actors: its raylet's children whose title names the LabelActor stage."""
    return {
        pid
        for pid, (parent, cmdline) in process_table().items()
        if raylet in (None, parent) and cmdline.startswith("ray::") and "MapBatches(LabelActor)" in cmdline
    }


def test_a_runs_model_actors_end_with_it(tmp_path, checkpoint, ray_local):
    """Ray Data lets a pool's actors go by dropping its handles, and after a failed run one could
    stay, holding its CPU or GPU: the next run in the same process (a notebook, a scheduler's
    loop) waited for ever. A model actor joins its run (the ShardCommitter); the run's end stops
    every actor that joined, and one that starts after it stops at once."""
    import ray

    from jobs.labeling.pipeline import _end_run
    from jobs.labeling.plan import Plan
    from jobs.labeling.predict import LabelActor
    from jobs.labeling.shards import ShardCommitter

    plan = Plan(input="x", shard_size=2, settings={}, generations=[], created="now")
    committer = ShardCommitter.remote(plan)
    kwargs = {"checkpoint_uri": checkpoint, "load_kwargs": {}, "storage_options": None, "use_gpu": False, "run": committer}

    @ray.remote(num_cpus=1)
    class Model(LabelActor):
        def ready(self) -> bool:
            return True

    model = Model.remote(**kwargs)
    assert ray.get(model.ready.remote(), timeout=120)
    _end_run(committer)
    deadline, dead = time.monotonic() + 60, False
    while not dead and time.monotonic() < deadline:  # ray.kill is asynchronous: a call just after it may still run
        try:
            ray.get(model.ready.remote(), timeout=30)
            time.sleep(0.5)
        except ray.exceptions.RayActorError:
            dead = True
    assert dead, "the run's model actor is still alive after its end"
    ended = ShardCommitter.remote(plan)
    assert ray.get(ended.end_run.remote()) == []
    too_late = Model.remote(**dict(kwargs, run=ended))
    with pytest.raises(ray.exceptions.RayActorError, match="has ended"):
        ray.get(too_late.ready.remote(), timeout=120)
    ray.kill(ended)


@pytest.mark.slow
def test_killed_model_actor_is_replaced_and_the_run_completes_exactly_once(tmp_path, checkpoint, shapes_folder, ray_local, capsys):
    output = tmp_path / "out"
    killed: list[int] = []
    parts_at_kill: list[int] = []
    replacements: list[int] = []
    raylet = _raylet_pid()
    earlier = _predictor_pids(raylet)  # an earlier test's actors, possibly still exiting

    def kill_an_actor() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            pids = _predictor_pids(raylet) - earlier
            # once a shard is committed: the actor is serving, most of the 60 images still to do
            if pids and len(local_parts(str(output))) >= 1:
                pid = min(pids)
                parts_at_kill.append(len(local_parts(str(output))))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)
        while time.monotonic() < deadline and not replacements:  # Ray Data restarts it
            replacements.extend(_predictor_pids(raylet) - earlier - set(killed))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    killer.start()
    code = label_main(
        [
            "--input",
            str(shapes_folder),
            "--output",
            str(output),
            "--checkpoint",
            checkpoint,
            "--shard-size",
            "4",
            "--batch-size",
            "1",
            "--max-detections",
            "10",
        ]
    )
    killer.join(timeout=5)
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert killed, "no model actor was found to kill"
    assert parts_at_kill[0] < 10, f"the actor was killed late (after {parts_at_kill[0]} of 15 commits)"
    # Whether a replacement actor is seen depends on timing (the pool may finish on the
    # survivors); what the issue asks is the outcome: the job completes, every image once.
    assert "shards: 15 labelled this run, 0 already done, 15 in all" in stdout
    table = read_output(str(output))
    uris = table.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 60
    assert table.column("error").null_count == 60
