"""jobs.selftrain, run as users run it: ``python -m jobs.selftrain ...`` subprocesses, each with its
own local Ray (``RAY_ADDRESS=local``), on the sample data with the ``small`` preset, tiny images
and a few training steps: the pipeline end to end over two rounds, and a run killed while it
labels, then resumed. The input checks run in this process and start no Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common import JobError
from jobs.selftrain import main
from maskrcnn.data.synthetic import make_sample_dataset
from tests.job_process import Job

REPO = Path(__file__).resolve().parents[1]
FAST = ["--arch", "small", "--min-size", "128", "--max-size", "192", "--max-steps", "4", "--num-workers", "1",
        "--loader-workers", "0", "--log-every", "2"]


def split_labelled(root: Path, splits: dict, count: int) -> tuple[dict, list[str]]:
    """The sample training split's first ``count`` images as ``root/labelled.json``, the others'
    paths in the manifest ``root/unlabeled.txt``: (the labelled COCO dict, the unlabeled paths)."""
    annotations, images = splits["train"]
    data = json.loads(Path(annotations).read_text())
    labelled = {img["id"] for img in data["images"][:count]}
    subset = dict(data, images=[i for i in data["images"] if i["id"] in labelled],
                  annotations=[a for a in data["annotations"] if a["image_id"] in labelled])
    (root / "labelled.json").write_text(json.dumps(subset))
    rest = [os.path.join(images, i["file_name"]) for i in data["images"] if i["id"] not in labelled]
    (root / "unlabeled.txt").write_text("\n".join(rest) + "\n")
    return subset, rest


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """The sample data: 6 of 16 training images labelled (``labelled.json``), the other 10 in a
    manifest (``unlabeled.txt``), 8 held-out images."""
    root = tmp_path_factory.mktemp("selftrain-data")
    splits = make_sample_dataset(str(root), {"train": 16, "val": 8})
    images = splits["train"][1]
    subset, rest = split_labelled(root, splits, 6)
    return {"root": root, "images": images, "val": splits["val"], "labelled": sorted(i["file_name"] for i in subset["images"]),
            "rest": rest, "args": ["--annotations", str(root / "labelled.json"), "--images", images,
                                   "--val-annotations", splits["val"][0], "--val-images", splits["val"][1]]}


def label_rows(labels: Path) -> list[str]:
    parts = sorted(labels.glob("part-*.parquet"))
    return [uri for part in parts for uri in pq.read_table(part, columns=["image_uri"])["image_uri"].to_pylist()]


@pytest.mark.slow
def test_two_rounds_resume_after_a_kill_while_labelling(sample, tmp_path):
    """The pipeline end to end, as a scheduler sees it: the teacher trains and is scored; the run
    is SIGKILLed (the driver and its Ray) once the first shard of pseudo-labels is committed; the
    same command again labels only the rest (each image once, the teacher neither retrained nor
    rescored), selects pseudo-labels (the labelled images of the manifest left out, images left
    without one dropped), trains the student on labelled (twice) + pseudo-labelled images, and the
    round's student teaches round 2. The report has both APs and each round's figures."""
    from pycocotools.coco import COCO

    from maskrcnn.data import CocoDataset, missing_images

    out = tmp_path / "run"
    labels = out / "round-1" / "labels"
    everything = sample["root"] / "all.txt"  # the manifest names the labelled images too
    everything.write_text("\n".join([os.path.join(sample["images"], name) for name in sample["labelled"]] + sample["rest"]) + "\n")
    args = [*sample["args"], "--unlabeled", str(everything), "--output", str(out), *FAST, "--rounds", "2",
            "--shard-size", "2", "--label-batch-size", "1", "--score-threshold", '{"circle": 0.1, "*": 0.08}',
            "--labelled-repeat", "2", "--negatives", "drop"]

    def kill_once_a_shard_is_committed(job: Job, line: str = "") -> None:
        if list(labels.glob("part-*.parquet")):
            job.kill()

    first = Job("jobs.selftrain", args, on_line=kill_once_a_shard_is_committed)
    deadline = time.monotonic() + 400
    while first.process.poll() is None and time.monotonic() < deadline:
        kill_once_a_shard_is_committed(first)  # also between lines
        time.sleep(0.1)
    assert first.wait(60) == -signal.SIGKILL, first.output[-3000:]
    # the killed job's Ray processes may outlive its driver for a moment: count once no shard is added
    committed, settled = len(list(labels.glob("part-*.parquet"))), time.monotonic()
    while time.monotonic() - settled < 3:
        time.sleep(0.2)
        now = len(list(labels.glob("part-*.parquet")))
        if now != committed:
            committed, settled = now, time.monotonic()
    assert 1 <= committed < 8, committed
    teacher = out / "teacher" / "model.pt"
    mtime, eval_mtime = teacher.stat().st_mtime_ns, (out / "teacher" / "eval.json").stat().st_mtime_ns
    assert not (out / "round-1" / "pseudo.json").exists()

    second = Job("jobs.selftrain", args)
    assert second.wait(600) == 0, second.output[-4000:]
    assert second.lines[-1].startswith("selftrain: teacher mask AP "), second.lines[-3:]
    assert "teacher: train on the 6 labelled images: done before" in second.output
    assert f"{committed} already done, 8 in all" in second.output, second.output[-3000:]
    assert teacher.stat().st_mtime_ns == mtime and (out / "teacher" / "eval.json").stat().st_mtime_ns == eval_mtime
    assert sorted(label_rows(labels)) == sorted(everything.read_text().split()), "each image labelled exactly once"

    report = json.loads((out / "selftrain.json").read_text())
    for model in (report["teacher"], report["student"]):
        assert 0 <= model["bbox_AP"] <= 1 and 0 <= model["segm_AP"] <= 1
    assert report["student"]["round"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["teacher"] == str(out / "round-1" / "student" / "model.pt")
    assert set(report["teacher"]["seconds"]) == {"train", "evaluate"}
    for number, figures in enumerate(report["rounds"], start=1):
        assert set(figures["seconds"]) == {"label", "select", "train", "evaluate"}, figures
        assert figures["unlabeled_images"] == 16 and figures["labelled_left_out"] == 6
        assert figures["pseudo_images"] + figures["dropped_images"] == 10
        assert figures["pseudo_annotations"] == sum(figures["per_category"].values())

        pseudo = COCO(str(out / f"round-{number}" / "pseudo.json"))  # valid COCO: pycocotools indexes it
        names = [img["file_name"] for img in pseudo.dataset["images"]]
        assert len(names) == len(set(names)) == figures["pseudo_images"] and all(name in sample["rest"] for name in names)  # full URIs
        assert all(pseudo.getAnnIds(imgIds=[img["id"]]) for img in pseudo.dataset["images"])  # --negatives drop
        thresholds = {1: 0.1, 2: 0.08, 3: 0.08}
        assert all(a["score"] >= thresholds[a["category_id"]] for a in pseudo.dataset["annotations"])

        merged = CocoDataset(str(out / f"round-{number}" / "train.json"), sample["images"])  # file_names resolve
        assert len(merged) == 2 * 6 + figures["pseudo_images"] and not missing_images(merged)
    assert report["rounds"][0]["pseudo_annotations"] > 0  # the low thresholds keep some of an untrained teacher's boxes


def test_selection_keeps_or_drops_the_images_left_without_a_pseudo_label():
    """``--negatives keep`` keeps an image whose detections all fall below its class's threshold
    as a negative; ``drop`` leaves it out; a labelled image is never pseudo-labelled."""
    from jobs.selftraining.pseudo import select

    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    detections = {"images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3)], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "score": 0.9}, {"id": 2, "image_id": 2, "category_id": 2, "score": 0.5},
        {"id": 3, "image_id": 3, "category_id": 1, "score": 0.95}]}
    thresholds = {1: 0.8, 2: 0.6}
    kept, counts = select(detections, categories, thresholds, "keep", {"/data/3.png"}, "/data")
    assert [img["file_name"] for img in kept["images"]] == ["1.png", "2.png"] and len(kept["annotations"]) == 1
    assert (counts["negatives"], counts["dropped_images"], counts["labelled_left_out"]) == (1, 0, 1)
    dropped, counts = select(detections, categories, thresholds, "drop", {"/data/3.png"}, "/data")
    assert [img["file_name"] for img in dropped["images"]] == ["1.png"]
    assert (counts["negatives"], counts["dropped_images"], counts["per_category"]) == (0, 1, {"circle": 1, "square": 0})


def test_wrong_input_stops_the_job_before_any_work(sample, tmp_path):
    base = [*sample["args"], "--output", str(tmp_path / "run"), *FAST]
    unlabeled = ["--unlabeled", sample["images"]]
    cases = [
        (["--unlabeled", str(tmp_path / "nowhere")], "--unlabeled"),
        (["--unlabeled", str(tmp_path / "empty")], r"^--unlabeled .*empty holds no images \(looked for jpg"),
        ([*unlabeled, "--score-threshold", "1.5"], "--score-threshold"),
        ([*unlabeled, "--score-threshold", '{"hexagon": 0.5}'], "not a category"),
        ([*unlabeled, "--score-threshold", "high"], "--score-threshold"),
        ([*unlabeled, "--rounds", "0"], "--rounds"),
        ([*unlabeled, "--batch-size", "0"], "--batch-size"),
        ([*unlabeled, "--weights", str(tmp_path / "missing.pt"), "--student-init", "teacher"], "--weights"),
        ([*unlabeled, "--val-annotations", str(tmp_path / "missing.json")], "--val-annotations"),
    ]
    (tmp_path / "empty").mkdir()
    for extra, expected in cases:
        with pytest.raises(JobError, match=expected):
            main([*base, *extra])
    with pytest.raises(JobError, match="inside --unlabeled"):
        main([*sample["args"], "--unlabeled", str(tmp_path), "--output", str(tmp_path / "run"), *FAST])
    assert not (tmp_path / "run").exists()
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(JobError, match="--output .*taken is a file"):
        main([*sample["args"], *unlabeled, "--output", str(tmp_path / "taken"), *FAST])
    # from the command line: one line, no traceback
    result = subprocess.run([sys.executable, "-m", "jobs.selftrain", *base, *unlabeled, "--score-threshold", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: --score-threshold must be a number in [0, 1]")


def test_tta_reaches_the_labeling_stage_and_the_runs_settings(sample, tmp_path, monkeypatch):
    """--tta is checked with the other options (one line naming it), recorded canonically in the
    run's settings, and handed to jobs.label; no --tta leaves the settings as runs before it had them."""
    import jobs.selftrain as selftrain
    from jobs.selftraining.options import parse_args, resolve_thresholds, settings_of

    base = [*sample["args"], "--unlabeled", sample["images"], "--output", str(tmp_path / "run"), *FAST]
    with pytest.raises(JobError, match="^--tta 'flip,flop' has 'flop', which is neither 'flip', 'vote' nor a short side in pixels"):
        main([*base, "--tta", "flip,flop"])
    assert not (tmp_path / "run").exists()
    assert "tta" not in settings_of(parse_args(base), {1: 0.7})

    args = parse_args([*base, "--tta", " flip, 160 "])
    labelled = selftrain.check_inputs(args, None)
    run = selftrain.SelfTraining(args, None, labelled, resolve_thresholds(args.score_threshold, labelled.categories))
    assert run.state.data["settings"]["tta"] == "flip,160"
    calls = []

    def record(stage: str, module: str, argv: list[str]) -> float:
        calls.append((module, argv))
        raise KeyboardInterrupt  # stop after the first job: only its command line matters here

    monkeypatch.setattr(selftrain, "run_job", record)
    with pytest.raises(KeyboardInterrupt):
        run.pseudo_labels(1, "teacher.pt")
    ((module, argv),) = calls
    assert module == "jobs.label" and argv[argv.index("--tta") + 1] == "flip,160"
