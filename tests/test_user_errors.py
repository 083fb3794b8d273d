"""The mistakes people make on the command line, each run as the real job in a subprocess: exit
status 2, exactly one ``error:`` line on stderr that names the option (and the URI), no
traceback, and nothing half-written where the output goes. S3 is moto's server (a second one
that checks credentials for the wrong-credentials cases); no mock of anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import PRESETS, get_preset
from maskrcnn.modeling import build_model
from tests.labeling_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_job(module: str, args: list[str], env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{module}", *map(str, args)],
        cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout,
    )
    return proc, time.monotonic() - started


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The one ``error:`` line, after checking the exit status, that there is no traceback and
    that the line holds every needle."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Images, a project checkpoint, a bare state dict of the small preset (4 classes), COCO files."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(root / "images" / "a.png")
    make_checkpoint(str(root / "model.pt"))
    torch.manual_seed(0)
    torch.save(build_model(get_preset("small")).state_dict(), root / "bare.pt")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
                         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 7, "name": "triangle"}],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "two.json").write_text(json.dumps({"categories": coco["categories"][:1]}))
    return root


def label_args(inputs: Path, output: Path, **changes) -> list[str]:
    options = {"--input": inputs / "images", "--output": output, "--checkpoint": inputs / "model.pt", **changes}
    return [str(v) for kv in options.items() for v in kv]


# -- presets, thresholds, categories ----------------------------------------------------------


@pytest.mark.parametrize("job", ["label", "train", "evaluate"])
def test_unknown_arch_lists_the_presets(job, inputs, tmp_path):
    out = tmp_path / "out"
    if job == "label":
        args = label_args(inputs, out, **{"--checkpoint": inputs / "bare.pt", "--arch": "r50fpn"})
    elif job == "train":
        args = ["--annotations", inputs / "coco.json", "--images", inputs / "images", "--output", out, "--arch", "r50fpn"]
    else:
        args = ["--checkpoint", inputs / "bare.pt", "--annotations", inputs / "coco.json", "--images", inputs / "images",
                "--output", out / "eval.json", "--arch", "r50fpn"]
    proc, _ = run_job(job, args)
    line = assert_user_error(proc, "--arch r50fpn", *sorted(PRESETS))
    assert "r50_fpn" in line
    assert files_under(out) == []


@pytest.mark.parametrize("option, value", [("--score-threshold", "2"), ("--score-threshold", "-0.1"), ("--preview-min-score", "1.5")])
def test_scores_outside_zero_one(option, value, inputs, tmp_path):
    proc, _ = run_job("label", label_args(inputs, tmp_path / "out", **{option: value}))
    assert_user_error(proc, option, "[0, 1]")
    assert files_under(tmp_path / "out") == []


def test_categories_naming_a_class_the_model_lacks(inputs, tmp_path):
    # the bare small state dict has 4 classes (ids 1-3); coco.json names id 7
    args = label_args(
        inputs, tmp_path / "out", **{"--checkpoint": inputs / "bare.pt", "--arch": "small", "--categories": inputs / "coco.json"}
    )
    proc, _ = run_job("label", args)
    assert_user_error(proc, "--categories", "[7]", "4 classes")
    assert files_under(tmp_path / "out") == []


def test_categories_covering_fewer_classes_name_the_rest_by_index(inputs):
    from maskrcnn.checkpoint import categories_from_coco, load_checkpoint

    loaded = load_checkpoint(str(inputs / "bare.pt"), arch="small", categories=categories_from_coco(str(inputs / "two.json")))
    assert loaded.label_map == {1: {"id": 1, "name": "circle"}}  # classes 2 and 3: "class 2", "class 3" in the labels


def test_missing_files(inputs, tmp_path):
    out = tmp_path / "run"
    proc, _ = run_job("train", ["--annotations", tmp_path / "nope.json", "--images", inputs / "images", "--output", out, "--arch", "small"])
    assert_user_error(proc, "--annotations", "nope.json", "does not exist")
    assert not out.exists()
    proc, _ = run_job("evaluate", ["--checkpoint", tmp_path / "no.pt", "--annotations", inputs / "coco.json", "--images", inputs / "images",
                                   "--output", out / "eval.json"])
    assert_user_error(proc, "--checkpoint", "no.pt", "does not exist")
    assert not out.exists()
    # jobs.label checks --input and --output before it reads the checkpoint (which may be large)
    proc, _ = run_job("label", ["--input", tmp_path / "no_photos", "--output", out, "--checkpoint", tmp_path / "no.pt"])
    assert_user_error(proc, "--input", "no_photos", "does not exist")
    assert not out.exists()


# -- manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["int64", "list", "no column"])
def test_parquet_manifest_without_a_column_of_uri_strings(case, inputs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = str(inputs / "images" / "a.png")
    table, needles = {
        "int64": (pa.table({"image_uri": [1, 2]}), ["the manifest's image_uri column holds int64, not strings (one image URI per row)"]),
        "list": (pa.table({"image_uri": [[image], [image]]}), ["image_uri column holds list<element: string>, not strings"]),
        "no column": (pa.table({"path": [image], "size": [1]}), ["the manifest has no 'image_uri' column (its columns: path, size)"]),
    }[case]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "out"
    proc, _ = run_job("label", label_args(inputs, out, **{"--input": manifest}))
    assert_user_error(proc, f"--input {manifest}: ", *needles)
    # no plan, no labels; the listing comes after the run took the output's lease, whose ended record stays
    assert [p for p in files_under(out) if not p.name.startswith("lease-")] == []


def test_parquet_manifest_nulls_and_empty_values_are_skipped_and_counted(tmp_path, capsys):
    """As a .txt manifest's blank lines: no request, no row; the listing says how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.labeling.inputs import iter_input_uris

    manifest = tmp_path / "m.parquet"
    column = pa.array(["a.png", None, "", "b.png", "a.png"]).dictionary_encode()  # as pandas' categoricals write it
    pq.write_table(pa.table({"image_uri": column}), manifest)
    assert list(iter_input_uris(str(manifest))) == ["a.png", "b.png", "a.png"]  # a line listed twice is two requests
    assert f"note: --input {manifest}: 2 manifest rows with a null or empty image_uri skipped" in capsys.readouterr().out


# -- S3 ------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_credentials_env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_CONFIG_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookup: this test machine is no EC2 instance
    )
    return env


@pytest.fixture
def s3_inputs(s3_bucket, inputs):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(inputs / "model.pt"), f"{s3_bucket}/model.pt")
    fs.put(str(inputs / "images" / "a.png"), f"{s3_bucket}/images/a.png")
    return s3_bucket


@pytest.fixture(scope="module")
def checking_s3_server():
    """A second moto server, in its own process, that checks credentials (moto's
    INITIAL_NO_AUTH_ACTION_COUNT=0): every key it is given is unknown to it."""
    port = _closed_port()
    code = ("import sys, time; from moto.server import ThreadedMotoServer; "
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("which", ["--checkpoint", "--input", "--output"])
def test_s3_without_credentials(which, s3_inputs, s3_server, inputs, tmp_path):
    uri = {"--checkpoint": f"{s3_inputs}/model.pt", "--input": f"{s3_inputs}/images", "--output": f"{s3_inputs}/labels"}[which]
    out = tmp_path / "out"
    args = label_args(inputs, out, **{which: uri})
    proc, _ = run_job("label", args, env=_no_credentials_env(s3_server))
    assert_user_error(proc, which, uri, "credentials", "AWS_ACCESS_KEY_ID")
    assert files_under(out) == []


@pytest.mark.parametrize("which", ["--checkpoint", "--input", "--output"])
def test_s3_bucket_that_does_not_exist(which, s3_server, inputs, tmp_path):
    uri = {"--checkpoint": "s3://no-such-bucket/model.pt", "--input": "s3://no-such-bucket/images", "--output": "s3://no-such-bucket/labels"}[which]
    out = tmp_path / "out"
    proc, _ = run_job("label", label_args(inputs, out, **{which: uri}))
    assert_user_error(proc, which, uri)
    assert files_under(out) == []


@pytest.mark.parametrize("where", ["a file", "a bucket that does not exist"])
def test_train_output_that_cannot_take_the_run_stops_before_training(where, s3_server, inputs, tmp_path):
    """jobs.train writes checkpoints, metrics and model.pt to --output: one it cannot write to is
    named in one line before Ray starts, not in Ray Train's traceback (or at the first checkpoint)."""
    output = tmp_path / "run.txt" if where == "a file" else "s3://no-such-bucket/runs/r1"
    if where == "a file":
        output.write_text("not a folder")
    args = ["--annotations", inputs / "coco.json", "--images", inputs / "images", "--output", output, "--arch", "small",
            "--num-workers", "1", "--max-steps", "1"]
    proc, _ = run_job("train", args)
    assert_user_error(proc, "--output", str(output), "is a file" if where == "a file" else "")
    assert "ray:" not in proc.stdout + proc.stderr  # no Ray started
    assert files_under(tmp_path) == ([output] if where == "a file" else [])


@pytest.mark.parametrize("where", ["under a file", "a bucket that does not exist"])
def test_evaluate_output_that_cannot_be_written_stops_before_evaluating(where, s3_server, inputs, tmp_path):
    """jobs.evaluate's --output is written at the end: one it cannot write is named in one line
    before the evaluation runs (which on COCO takes minutes), not in a traceback after it."""
    (tmp_path / "taken").write_text("a file")
    output = str(tmp_path / "taken" / "eval.json") if where == "under a file" else "s3://no-such-bucket/eval.json"
    args = ["--checkpoint", inputs / "model.pt", "--annotations", inputs / "coco.json", "--images", inputs / "images", "--output", output]
    proc, _ = run_job("evaluate", args)
    assert_user_error(proc, "--output", output)
    assert "mask AP" not in proc.stdout  # not evaluated
    assert files_under(tmp_path) == [tmp_path / "taken"]


def file_contents(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in files_under(path)}


@pytest.mark.parametrize("which", ["--annotations", "--annotations by a symlink", "--checkpoint", "--categories"])
def test_evaluate_output_that_is_an_input_stops_before_the_model_loads(which, inputs, tmp_path):
    """An --output that is a file the job reads would be replaced by the metrics. Refused first:
    the checkpoint and the images given here do not exist, which any later check would name."""
    import shutil

    shutil.copy(inputs / "coco.json", tmp_path / "gt.json")
    shutil.copy(inputs / "bare.pt", tmp_path / "model.json")  # a checkpoint whose name ends in .json
    args = {"--checkpoint": tmp_path / "no.pt", "--annotations": tmp_path / "gt.json", "--images": tmp_path / "no_images"}
    if which == "--annotations":
        args["--output"] = tmp_path / "sub" / ".." / "gt.json"  # another spelling of the same file
    elif which == "--annotations by a symlink":
        (tmp_path / "link.json").symlink_to(tmp_path / "gt.json")
        args["--output"] = tmp_path / "link.json"
    elif which == "--checkpoint":
        args["--checkpoint"] = args["--output"] = tmp_path / "model.json"
    else:
        args.update({"--arch": "small", "--categories": tmp_path / "gt.json", "--output": tmp_path / "gt.json"})
        args["--annotations"] = inputs / "coco.json"
    before = file_contents(tmp_path)
    proc, _ = run_job("evaluate", [str(v) for kv in args.items() for v in kv])
    assert_user_error(proc, "--output", which.split()[0], "would replace it")
    assert file_contents(tmp_path) == before


@pytest.mark.parametrize("which", ["--checkpoint", "--input", "--output"])
def test_s3_wrong_credentials(which, checking_s3_server, inputs, tmp_path):
    uri = {"--checkpoint": "s3://bucket/model.pt", "--input": "s3://bucket/images", "--output": "s3://bucket/labels"}[which]
    env = {**_no_credentials_env(checking_s3_server), "AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    out = tmp_path / "out"
    proc, _ = run_job("label", label_args(inputs, out, **{which: uri}), env=env)
    line = assert_user_error(proc, which, uri, "access denied", "AWS_ACCESS_KEY_ID", "permissions")
    assert "wrong-secret" not in proc.stdout + proc.stderr and "wrong-secret" not in line
    assert files_under(out) == []


@pytest.mark.parametrize("which", ["--checkpoint", "--input"])
def test_s3_endpoint_that_does_not_answer(which, inputs, tmp_path):
    env = {**_no_credentials_env(f"http://127.0.0.1:{_closed_port()}"), "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    uri = {"--checkpoint": "s3://bucket/model.pt", "--input": "s3://bucket/images"}[which]
    proc, seconds = run_job("label", label_args(inputs, tmp_path / "out", **{which: uri}), env=env, timeout=90)
    assert_user_error(proc, which, uri, "AWS_ENDPOINT_URL")
    # botocore's defaults (60 s connect timeout, 5 attempts) took minutes; a bound, not a figure
    assert seconds < 45, seconds


# -- jobs.export_coco leaves nothing behind ------------------------------------------------------


def test_export_of_something_else_writes_nothing(tmp_path):
    not_labels = tmp_path / "photos"
    not_labels.mkdir()
    (not_labels / "a.png").write_bytes(b"png")
    out = tmp_path / "export"
    proc, _ = run_job("export_coco", ["--input", not_labels, "--output", out / "results.json"])
    assert_user_error(proc, "--input", str(not_labels), "jobs.label --output")
    assert files_under(out) == []
    # a part file that is not Parquet: found while writing, and still no file
    (not_labels / "part-000000.parquet").write_bytes(b"not parquet")
    for fmt in ("results", "annotations"):
        proc, _ = run_job("export_coco", ["--input", not_labels, "--output", out / "results.json", "--format", fmt])
        assert_user_error(proc, "--input", "part-000000.parquet")
        assert files_under(out) == []


def _one_row_labels(tmp_path: Path) -> Path:
    """A jobs.label output of one part file, one image without detections."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.labeling.shards import part_name
    from jobs.labeling.rows import OUTPUT_SCHEMA

    labels = tmp_path / "labels"
    labels.mkdir()
    row = {"image_uri": "/images/a.png", "width": 8, "height": 6, "instances": [], "error": None, "model": "sha256:x"}
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA), labels / part_name(0))
    return labels


def test_export_to_an_unwritable_output_writes_nothing(tmp_path):
    labels = _one_row_labels(tmp_path)
    (tmp_path / "a-file").write_text("x")
    for output in (tmp_path / "a-file" / "results.json", tmp_path):  # under a file; a folder
        proc, _ = run_job("export_coco", ["--input", labels, "--output", output])
        assert_user_error(proc, "--output", str(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "labels"]
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("score", ["2", "-0.5"])
def test_export_min_score_outside_zero_one(score, tmp_path):
    """Above 1 every detection would be left out, silently."""
    labels = _one_row_labels(tmp_path)
    proc, _ = run_job("export_coco", ["--input", labels, "--output", tmp_path / "out.json", "--min-score", score])
    assert_user_error(proc, "--min-score", "[0, 1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]


@pytest.mark.parametrize("case", ["--annotations", "--annotations by a symlink", "--categories", "its .images.json is --categories",
                                  "a part file of --input", "inside --input"])
def test_export_output_that_is_an_input_writes_nothing(case, tmp_path):
    """An --output (or the .images.json written beside it) that is a file the export reads, or
    lies among jobs.label's files, would replace them: refused before anything is written."""
    labels = _one_row_labels(tmp_path)
    coco = {"images": [{"id": 5, "file_name": "images/a.png", "width": 8, "height": 6}], "annotations": [],
            "categories": [{"id": 1, "name": "circle"}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    args = {"--input": labels, "--output": tmp_path / "gt.json", "--annotations": tmp_path / "gt.json"}
    needles = ["--output", "is --annotations"]
    if case == "--annotations by a symlink":
        (tmp_path / "link.json").symlink_to(tmp_path / "gt.json")
        args["--output"] = tmp_path / "link.json"
    elif case == "--categories":
        args = {"--input": labels, "--output": tmp_path / "gt.json", "--format": "annotations", "--categories": tmp_path / "gt.json"}
        needles = ["--output", "is --categories"]
    elif case == "its .images.json is --categories":
        (tmp_path / "results.images.json").write_text(json.dumps(coco))
        args = {"--input": labels, "--output": tmp_path / "results.json", "--categories": tmp_path / "results.images.json"}
        needles = ["--output", "results.images.json beside it", "is --categories"]
    elif case == "a part file of --input":
        args = {"--input": labels, "--output": next(labels.iterdir())}
        needles = ["--output", "is inside --input", str(labels)]
    elif case == "inside --input":
        args = {"--input": labels, "--output": labels / "results.json"}
        needles = ["--output", "is inside --input", str(labels)]
    before = file_contents(tmp_path)
    proc, _ = run_job("export_coco", [str(v) for kv in args.items() for v in kv])
    assert_user_error(proc, *needles)
    assert file_contents(tmp_path) == before
    if case == "--annotations":  # the same export to another file is fine
        proc, _ = run_job("export_coco", ["--input", labels, "--output", tmp_path / "results.json", "--annotations", tmp_path / "gt.json"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((tmp_path / "results.json").read_text()) == []


# -- jobs.demo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [(["--steps", "0"], "--steps must be at least 1"),
                                          (["--val-images", "-1"], "--val-images must be at least 1"),
                                          (["--output", "{file}"], "is a file")])
def test_demo_options_out_of_range_stop_it_before_any_step(args, needle, tmp_path):
    """The demo's own options, named as the user gave them (not as the jobs it runs name theirs),
    before it makes any data."""
    (tmp_path / "taken").write_text("a file")
    args = [a.format(file=tmp_path / "taken") for a in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "demo")]
    proc, _ = run_job("demo", [*args, *output])
    assert_user_error(proc, needle)
    assert "==" not in proc.stdout  # no step began
    assert files_under(tmp_path) == [tmp_path / "taken"]


def test_demo_output_holding_what_it_did_not_make_is_refused_before_deleting(tmp_path):
    """The demo replaces its own earlier output: a folder that holds anything else (here folders
    with the names of the demo's) is named with what is there, and nothing is deleted."""
    (tmp_path / "data").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data" / "mydata.csv").write_text("precious")
    proc, _ = run_job("demo", ["--output", tmp_path, "--steps", "1"])
    assert_user_error(proc, f"--output {tmp_path}", "(data, labels)", "did not make")
    assert "==" not in proc.stdout  # no step began
    assert files_under(tmp_path) == [tmp_path / "data" / "mydata.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "labels"]


def test_demo_replaces_its_own_earlier_output_only(tmp_path):
    """What a rerun (make demo's, into runs/demo) finds: the demo's marker, or, from before the
    marker, exactly the demo's files with their eval.json. It removes what the demo made there."""
    from jobs.common import JobError
    from jobs.demo import MARKER, claim_output

    def earlier_demo(out: Path, checkpoint: Path) -> None:
        for name in ("data/val", "train", "labels"):
            (out / name).mkdir(parents=True)
        (out / "train" / "model.pt").write_bytes(b"weights")
        (out / "eval.json").write_text(json.dumps({"checkpoint": str(checkpoint), "annotations": str(out / "data/val/annotations.json")}))

    marked = tmp_path / "marked"
    earlier_demo(marked, marked / "train/model.pt")
    (marked / MARKER).write_text("")
    (marked / "notes.txt").write_text("mine")
    claim_output(str(marked), "marked")
    assert sorted(p.name for p in marked.iterdir()) == [MARKER, "notes.txt"]
    assert (marked / "notes.txt").read_text() == "mine"

    old = tmp_path / "before-the-marker"
    earlier_demo(old, old / "train/model.pt")
    claim_output(str(old), "before-the-marker")
    assert sorted(p.name for p in old.iterdir()) == [MARKER]
    claim_output(str(tmp_path / "new"), "new")  # a new folder
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER]

    other = tmp_path / "another-run"  # the demo's names, but its eval.json scored another model
    earlier_demo(other, tmp_path / "elsewhere/model.pt")
    with pytest.raises(JobError, match="did not make"):
        claim_output(str(other), "another-run")
    assert (other / "train" / "model.pt").read_bytes() == b"weights"


# -- every job: a URI whose storage this machine cannot open ---------------------------------------


@pytest.mark.parametrize("job, args, needles", [
    ("label", ["--input", "gs://photos/", "--output", "{tmp}/out", "--checkpoint", "{tmp}/model.pt"],
     ["--input gs://photos/", "gcsfs"]),
    ("label", ["--input", "{tmp}", "--output", "foo://labels/", "--checkpoint", "{tmp}/model.pt"],
     ["--output foo://labels/", "unknown storage protocol foo://"]),
    ("train", ["--annotations", "{tmp}/a.json", "--images", "{tmp}", "--output", "{tmp}/run", "--weights", "az://models/w.pt"],
     ["--weights az://models/w.pt", "adlfs"]),
    ("evaluate", ["--checkpoint", "gs://models/m.pt", "--annotations", "{tmp}/a.json", "--images", "{tmp}"],
     ["--checkpoint gs://models/m.pt", "gcsfs"]),
    ("export_coco", ["--input", "{tmp}/labels", "--output", "gs://out/labels.json"], ["--output gs://out/labels.json", "gcsfs"]),
    ("selftrain", ["--annotations", "{tmp}/a.json", "--images", "{tmp}", "--unlabeled", "gs://unlabeled/", "--val-annotations",
                   "{tmp}/v.json", "--val-images", "{tmp}", "--output", "{tmp}/st"], ["--unlabeled gs://unlabeled/", "gcsfs"]),
])
def test_a_uri_of_storage_this_machine_cannot_open_is_named(job, args, needles, tmp_path):
    """gs:// without gcsfs, az:// without adlfs, a protocol fsspec does not know: one line naming
    the option, before anything is read or written (it was a traceback, or a line without the option)."""
    proc, _ = run_job(job, [a.format(tmp=tmp_path) for a in args])
    assert_user_error(proc, *needles)
    assert files_under(tmp_path) == []


# -- every job: --help and a mistake in its options answer at once --------------------------------

_WITHOUT_TORCH = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    print(f"exit {exc.code}; torch imported: {'torch' in sys.modules}")
"""


@pytest.mark.parametrize("job", ["label", "train", "evaluate", "export_coco", "selftrain", "demo"])
@pytest.mark.parametrize("args", [["--help"], ["--no-such-option"]])
def test_help_and_option_mistakes_answer_without_importing_torch(job, args):
    """torch's import takes seconds (3-5 s here): a job's --help, and a mistake its parser
    catches, answer before it."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, f"jobs.{job}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    status = 0 if args == ["--help"] else 2
    assert proc.stdout.strip().splitlines()[-1] == f"exit {status}; torch imported: False", proc.stdout + proc.stderr


# -- make clean ------------------------------------------------------------------------------------


def test_make_clean_keeps_runs_and_data(tmp_path):
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    keep = [tmp_path / "runs" / "labels" / "part-000000.parquet", tmp_path / "data" / "sample" / "a.png",
            tmp_path / "runs" / "pkg" / "__pycache__" / "x.pyc"]
    gone = [tmp_path / ".venv" / "bin" / "python", tmp_path / ".pytest_cache" / "v", tmp_path / "jobs" / "__pycache__" / "a.pyc",
            tmp_path / "maskrcnn_ray.egg-info" / "PKG-INFO"]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert [p for p in keep if not p.exists()] == []
    assert [p for p in gone if p.exists()] == []
