"""``python -m jobs.selftrain``: learn from unlabeled images by self-training, on Ray.

    python -m jobs.selftrain --annotations L.json --images s3://b/labelled/ --unlabeled s3://b/unlabeled/ \\
        --val-annotations V.json --val-images s3://b/val/ --output s3://b/runs/st1 \\
        [--arch small | --weights teacher.pt] [--rounds 1] [--score-threshold 0.7 | '{"circle": 0.8, "*": 0.6}'] \\
        [--negatives drop|keep] [--student-init fresh|teacher] [--tta flip[,SCALES]] [--epochs N | --max-steps N] \\
        [--num-workers N --use-gpu]

Each stage is the very job a user would run, in this process and on one Ray, with its own
folder under ``--output`` (the commands are printed):

1. teacher: ``jobs.train`` on the labelled images -> ``teacher/model.pt`` (with ``--weights``, that
   model is the teacher); scored by ``jobs.evaluate`` on the held-out set -> ``teacher/eval.json``.
2. for each round N: ``jobs.label`` over ``--unlabeled`` with the round's teacher (and ``--tta``: each
   image's views merged, the paper's data distillation) -> ``round-N/labels/``;
   ``jobs.export_coco --format annotations --min-score <lowest threshold>`` -> ``round-N/detections.json``;
   selection: the detections at or above their category's threshold -> ``round-N/pseudo.json`` (COCO,
   each image once, ``file_name``s relative to the unlabeled folder; images without one kept as
   negatives or dropped; its ``info.counts`` say how many); ``round-N/train.json``: labelled +
   pseudo-labelled images under their common folder; ``jobs.train`` on it -> ``round-N/student/``,
   scored -> ``round-N/student/eval.json``. The student teaches round N+1.
3. report: teacher and last student's box and mask AP, each round's counts and stage seconds, in
   ``selftrain.json`` and the log's last line.

Rerunning the same command after a kill continues where the run stopped: a stage whose result
(``model.pt`` that loads, ``eval.json``, ``pseudo.json``) exists is skipped, and the stage that
was cut off resumes itself (jobs.train from its last checkpoint, jobs.label at the shards without
a part file). Other settings than the run's own are refused; ``--rounds`` may grow.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from jobs.atomic import check_output_writable
from jobs.common import JobError, run_main, shutdown_ray
from jobs.options import parse_storage_options
from jobs.selftraining.options import build_parser, parse_args, resolve_thresholds, settings_of, shown, train_argv
from jobs.selftraining.state import REPORT_FILE, Layout, State, read_json_or_none

__all__ = ["main", "build_parser"]


class StageFailed(Exception):
    """A job of a stage ended with a non-zero status (its own output says why)."""


def _say(line: str) -> None:
    print(line, flush=True)


def run_job(stage: str, module: str, argv: list[str]) -> float:
    """Runs ``python -m <module> argv`` in this process; its seconds. A JobError is named after
    the stage; a non-zero status raises StageFailed."""
    import importlib

    _say(f"\n== {stage}\n$ python -m {module} {shlex.join(shown(argv))}")
    started = time.perf_counter()
    try:
        code = importlib.import_module(module).main(argv)
    except JobError as exc:
        raise JobError(f"{stage} ({module}): {exc}") from None
    seconds = time.perf_counter() - started
    if code:
        raise StageFailed(f"{stage} ({module}) ended with exit status {code}; its output above says why; "
                          "run the same command again to resume")
    _say(f"-- {stage}: {seconds:.0f} s")
    return seconds


def model_ready(uri: str, storage_options: dict | None) -> bool:
    """Whether ``uri`` is a whole model.pt (a training run's last act)."""
    from maskrcnn.checkpoint import load_checkpoint

    try:
        load_checkpoint(uri, storage_options=storage_options, device="meta")
    except Exception:
        return False
    return True


def check_inputs(args: argparse.Namespace, storage_options: dict | None):
    """The labelled set (``CocoDataset``), checked with the held-out set, --unlabeled and
    --weights before any work; JobError naming the first problem."""
    from collections import Counter

    from jobs.labeling.inputs import iter_input_uris, no_images
    from jobs.training.inputs import check_dataset

    labelled = check_dataset(args.annotations, args.images, storage_options, "")
    val = check_dataset(args.val_annotations, args.val_images, storage_options, "val-")
    ids = {int(c["id"]) for c in labelled.categories}
    if not ids & {int(c["id"]) for c in val.categories}:
        raise JobError(f"--val-annotations {args.val_annotations} shares no category id with --annotations {args.annotations}: "
                       "the held-out set must be of the labelled set's classes")
    out, unlabeled = args.output.rstrip("/"), args.unlabeled.rstrip("/")
    if out == unlabeled or out.startswith(unlabeled + "/"):
        raise JobError(f"--output {args.output} is inside --unlabeled {args.unlabeled}: its models and plots would be labelled; "
                       "give an --output outside the unlabeled images")
    not_images = Counter()
    try:
        found = next(iter(iter_input_uris(args.unlabeled, storage_options, not_images=not_images)), None)
    except JobError as exc:
        raise JobError(str(exc).replace("--input ", "--unlabeled ")) from None
    if found is None:
        raise no_images(args.unlabeled, not_images, flag="--unlabeled")
    if args.weights:
        from maskrcnn.checkpoint import CheckpointError, load_checkpoint

        try:
            loaded = load_checkpoint(args.weights, storage_options=storage_options, device="meta")
        except CheckpointError as exc:
            raise JobError(f"--weights: {exc}") from None
        theirs = [(int(c["id"]), c["name"]) for _, c in sorted(loaded.label_map.items())]
        if theirs != [(int(c["id"]), c["name"]) for c in labelled.categories]:
            raise JobError(f"--weights {args.weights} was trained on other categories ({theirs[:5]}) than --annotations' "
                           "(give a jobs.train model.pt of these categories, or drop --weights to train a teacher)")
    return labelled


class SelfTraining:
    """The stages of one run, each skipped when its result exists."""

    def __init__(self, args: argparse.Namespace, storage_options: dict | None, labelled, thresholds: dict[int, float]):
        self.args, self.storage_options, self.thresholds = args, storage_options, thresholds
        self.labelled = labelled
        self.at = Layout(args.output)
        self.state = State(self.at, settings_of(args, thresholds), storage_options)
        self.so_argv = ["--storage-options", args.storage_options] if args.storage_options else []
        sizes = (("--min-size", args.min_size), ("--max-size", args.max_size))
        self.size_argv = [a for option, value in sizes if value for a in (option, str(value))]

    def train(self, key: str, stage: str, argv: list[str], output: str) -> str:
        model = f"{output}/model.pt"
        if model_ready(model, self.storage_options):
            _say(f"\n== {stage}: done before ({model}), skipped")
        else:
            self.state.record(key, "train", run_job(stage, "jobs.train", argv))
        return model

    def evaluate(self, key: str, stage: str, model: str, output: str) -> dict:
        uri = f"{output}/eval.json"
        metrics = read_json_or_none(uri, self.storage_options)
        if metrics is not None and "segm_AP" in metrics:
            _say(f"\n== {stage}: done before ({uri}), skipped")
        else:
            argv = ["--checkpoint", model, "--annotations", self.args.val_annotations, "--images", self.args.val_images,
                    "--output", uri, *self.size_argv, *self.so_argv]
            self.state.record(key, "evaluate", run_job(stage, "jobs.evaluate", argv))
            metrics = read_json_or_none(uri, self.storage_options)
        return {"checkpoint": model, "bbox_AP": metrics["bbox_AP"], "segm_AP": metrics["segm_AP"]}

    def teacher(self) -> tuple[str, dict]:
        args = self.args
        if args.weights:
            model = args.weights
            _say(f"\n== teacher: --weights {model}, not trained")
        else:
            argv = train_argv(args, args.annotations, args.images, self.at("teacher"), arch=args.arch)
            model = self.train("teacher", f"teacher: train on the {len(self.labelled)} labelled images", argv, self.at("teacher"))
        return model, self.evaluate("teacher", "teacher: score on the held-out images", model, self.at("teacher"))

    def pseudo_labels(self, number: int, teacher: str) -> dict:
        """Round ``number``'s pseudo.json (label, export, select), made unless it exists."""
        from jobs.labeling.plan import read_plan
        from jobs.selftraining.pseudo import full_uri, read_json, select, write_json

        key, pseudo_uri = f"round-{number}", self.at.round(number, "pseudo.json")
        pseudo = read_json_or_none(pseudo_uri, self.storage_options)
        if pseudo is not None and "images" in pseudo:
            _say(f"\n== round {number}: pseudo-labels done before ({pseudo_uri}), skipped")
            return pseudo
        labels = self.at.round(number, "labels")
        argv = ["--input", self.args.unlabeled, "--output", labels, "--checkpoint", teacher, *self.size_argv, *self.so_argv]
        options = (("--shard-size", self.args.shard_size), ("--batch-size", self.args.label_batch_size), ("--tta", self.args.tta))
        for option, value in options:
            argv += [option, str(value)] if value else []
        self.state.record(key, "label", run_job(f"round {number}: label the unlabeled images with {teacher}", "jobs.label", argv))

        started = time.perf_counter()
        plan = read_plan(labels, self.storage_options)
        root = "" if plan.input.lower().endswith((".txt", ".parquet")) else plan.input
        detections_uri = self.at.round(number, "detections.json")
        argv = ["--input", labels, "--output", detections_uri, "--format", "annotations",
                "--min-score", repr(min(self.thresholds.values())), *(["--images-root", root] if root else []), *self.so_argv]
        run_job(f"round {number}: the detections as COCO annotations", "jobs.export_coco", argv)
        labelled_uris = {full_uri(self.args.images, img["file_name"]) for img in self.labelled.coco.dataset["images"]}
        pseudo, counts = select(read_json(detections_uri, self.storage_options), self.labelled.categories, self.thresholds,
                                self.args.negatives, labelled_uris, root)
        pseudo["info"]["counts"] = counts
        write_json(pseudo_uri, pseudo, self.storage_options)
        self.state.record(key, "select", time.perf_counter() - started)
        _say(f"\n== round {number}: selected {counts['pseudo_annotations']} pseudo-labels on {counts['pseudo_images']} of "
             f"{counts['unlabeled_images']} unlabeled images ({counts['negatives']} negatives kept, {counts['dropped_images']} "
             f"dropped, {counts['labelled_left_out']} labelled ones left out): {pseudo_uri}")
        return pseudo

    def student(self, number: int, teacher: str, pseudo: dict) -> tuple[str, dict]:
        from jobs.selftraining.pseudo import merge, write_json

        key, train_uri = f"round-{number}", self.at.round(number, "train.json")
        merged = read_json_or_none(train_uri, self.storage_options)
        if merged is None or "images" not in merged:
            merged = merge(self.labelled.coco.dataset, self.args.images, pseudo, self.args.labelled_repeat)
            write_json(train_uri, merged, self.storage_options)
        output = self.at.round(number, "student")
        init = {"weights": teacher} if self.args.student_init == "teacher" else {"arch": self.args.arch}
        argv = train_argv(self.args, train_uri, merged["info"]["images_root"], output, **init)
        stage = (f"round {number}: train the student on {len(self.labelled) * self.args.labelled_repeat} labelled + "
                 f"{len(pseudo['images'])} pseudo-labelled images")
        model = self.train(key, stage, argv, output)
        return model, self.evaluate(key, f"round {number}: score the student on the held-out images", model, output)

    def run(self) -> dict:
        teacher, teacher_scores = self.teacher()
        report: dict = {"teacher": {**teacher_scores, "seconds": self.state.seconds("teacher")}, "rounds": []}
        for number in range(1, self.args.rounds + 1):
            pseudo = self.pseudo_labels(number, teacher)
            model, scores = self.student(number, teacher, pseudo)
            counts = pseudo["info"].get("counts", {})
            report["rounds"].append({"round": number, "teacher": teacher, **counts, "student": scores,
                                     "seconds": self.state.seconds(f"round-{number}")})
            report["student"] = {"round": number, **scores}
            teacher = model
        report["settings"] = self.state.data["settings"]
        return report


def main(argv: list[str] | None = None) -> int:
    """Runs the job on ``argv`` (default ``sys.argv[1:]``): 0 when the report is written, 1 when a
    stage's job failed (rerun to resume); bad input raises JobError before any work."""
    from jobs.selftraining.pseudo import write_json_plain

    args = parse_args(argv)
    storage_options = parse_storage_options(args.storage_options)
    labelled = check_inputs(args, storage_options)
    thresholds = resolve_thresholds(args.score_threshold, labelled.categories)
    check_output_writable(args.output, storage_options, "")  # the inputs are right: the output is made
    run = SelfTraining(args, storage_options, labelled, thresholds)
    # One Ray for every stage: the first job that needs Ray connects this process (init_ray, by
    # --address, RAY_ADDRESS, a `ray start` head, else a private one), the next ones keep using
    # it, and it is let go at the end. A run with every stage done starts none.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # as jobs.train sets it, before any Ray starts
    try:
        report = run.run()
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown_ray()
    uri = run.at(REPORT_FILE)
    write_json_plain(uri, report, storage_options)
    teacher, student = report["teacher"], report["student"]
    _say(f"\nwrote {uri}")
    _say(f"selftrain: teacher mask AP {teacher['segm_AP']:.4f} box AP {teacher['bbox_AP']:.4f} -> student (round {student['round']}) "
         f"mask AP {student['segm_AP']:.4f} box AP {student['bbox_AP']:.4f} ({student['segm_AP'] - teacher['segm_AP']:+.4f} mask AP)")
    return 0


if __name__ == "__main__":
    run_main(main)
