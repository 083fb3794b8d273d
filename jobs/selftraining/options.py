"""The command line of ``python -m jobs.selftrain``, the checks of its values, and the command
lines it hands to jobs.train for the teacher and the students."""

from __future__ import annotations

import argparse
import json

from jobs.common import HelpFormatter, JobError, add_ray_options
from jobs.options import add_size_options, add_storage_options, add_tta_option, check_tta, finite_float, resolve_uri_options

DEFAULT_THRESHOLD = 0.7
# Options passed on to every jobs.train run as they are (dest names); None or False: not passed.
TRAIN_OPTIONS = ("epochs", "max_steps", "batch_size", "lr", "seed", "min_size", "max_size", "num_workers", "cpus_per_worker",
                 "loader_workers", "ingest", "log_every", "use_gpu", "storage_options", "address")
# What decides the results of a run in --output: a rerun must give the same (--rounds may grow).
SETTINGS = ("annotations", "images", "unlabeled", "val_annotations", "val_images", "arch", "weights", "student_init", "negatives",
            "labelled_repeat", "epochs", "max_steps", "batch_size", "lr", "seed", "min_size", "max_size", "shard_size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.selftrain",
        description="Self-training on Ray: train a teacher on the labelled images (jobs.train), label the unlabeled ones with it "
        "(jobs.label), keep the detections scoring at least --score-threshold as pseudo-labels (jobs.export_coco), train a "
        "student on both (jobs.train), and compare the two on held-out images (jobs.evaluate). Every URI may be a local path "
        "or s3:// (any fsspec URI). Rerunning the same command continues at the stage a killed run reached.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--annotations", required=True, metavar="URI", help="the labelled images' COCO instances JSON")
    data.add_argument("--images", required=True, metavar="URI", help="folder or prefix that --annotations' file_names are relative to")
    data.add_argument(
        "--unlabeled", required=True, metavar="URI",
        help="the unlabeled images: a folder or prefix (searched recursively), or a .txt/.parquet manifest, as jobs.label's --input; "
        "images the labelled set names are left out of the pseudo-labels",
    )
    data.add_argument("--val-annotations", required=True, metavar="URI", help="held-out COCO JSON on which teacher and students are scored")
    data.add_argument("--val-images", required=True, metavar="URI", help="image root of --val-annotations")
    data.add_argument(
        "--output", required=True, metavar="URI",
        help="run folder: teacher/, round-N/{labels/, detections.json, pseudo.json, train.json, student/}, selftrain.json",
    )
    add_storage_options(data)

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None, metavar="PRESET", help="model preset of the teacher and of fresh students (default r50_fpn)")
    model.add_argument(
        "--weights", default=None, metavar="URI",
        help="a trained teacher (a jobs.train model.pt on --annotations' categories): no teacher is trained, this one is scored and labels",
    )
    model.add_argument(
        "--student-init", choices=("fresh", "teacher"), default="fresh",
        help="each student starts from --arch's initialisation (fresh) or from its teacher's weights",
    )
    add_size_options(model, "the preset's, for every stage")

    selftrain = parser.add_argument_group("self-training")
    selftrain.add_argument("--rounds", type=int, default=1, metavar="N", help="label-select-train rounds; a student teaches the next round")
    selftrain.add_argument(
        "--score-threshold", default=str(DEFAULT_THRESHOLD), metavar="F|JSON",
        help="a detection becomes a pseudo-label when it scores at least this: one value, or a JSON map of category name or id "
        "to value, '*' for the others, e.g. '{\"circle\": 0.8, \"*\": 0.6}'",
    )
    selftrain.add_argument(
        "--negatives", choices=("keep", "drop"), default="drop",
        help="unlabeled images left with no pseudo-label: train the student on them as background (keep), or leave them out "
        "(drop: an image without one confident detection is more often hard than empty)",
    )
    selftrain.add_argument(
        "--labelled-repeat", type=int, default=1, metavar="K",
        help="list each labelled image K times in the student's training set (oversampling the human labels)",
    )
    add_tta_option(selftrain, "the views' detections are merged before --score-threshold selects them (jobs.label's --tta)")
    selftrain.add_argument(
        "--label-batch-size", type=int, default=None, metavar="N",
        help="at most N images per forward pass when labeling (jobs.label's --batch-size; default its own)",
    )
    selftrain.add_argument(
        "--shard-size", type=int, default=None, metavar="N",
        help="images per jobs.label shard (its unit of commit and resume; default jobs.label's)",
    )

    schedule = parser.add_argument_group("schedule (jobs.train's, for the teacher and each student)")
    length = schedule.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, metavar="N", help="passes over each training set (default 12)")
    length.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps of each training run")
    schedule.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per worker per step")
    schedule.add_argument("--lr", type=finite_float, default=None, metavar="F", help="peak learning rate (default: jobs.train's)")
    schedule.add_argument("--seed", type=int, default=0, help="seed of the data order and of new layers")
    schedule.add_argument("--log-every", type=int, default=20, metavar="N", help="training steps between progress lines")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--num-workers", type=int, default=1, metavar="N", help="training workers (one GPU each with --use-gpu)")
    cluster.add_argument("--use-gpu", action="store_true", help="train on GPUs; labeling takes the cluster's GPUs by itself")
    cluster.add_argument("--cpus-per-worker", type=finite_float, default=1.0, metavar="F",
                         help="CPUs Ray reserves for each training worker")
    cluster.add_argument(
        "--loader-workers", type=int, default=None, metavar="N",
        help="processes per training worker that read and decode images (jobs.train's --loader-workers; default: its default)",
    )
    cluster.add_argument(
        "--ingest", choices=("dataloader", "ray-data"), default="dataloader",
        help="how training images reach the workers (jobs.train's --ingest)",
    )
    add_ray_options(cluster)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked, local paths made absolute. Raises JobError naming a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    resolve_uri_options(parser, args)
    return args


def check_args(args: argparse.Namespace) -> None:
    from jobs.training.options import validate_args

    if args.rounds < 1:
        raise JobError(f"--rounds must be at least 1, got {args.rounds}")
    if args.labelled_repeat < 1:
        raise JobError(f"--labelled-repeat must be at least 1, got {args.labelled_repeat}")
    for name in ("shard_size", "label_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.student_init == "fresh" and args.weights and not args.arch:
        raise JobError(
            "--student-init fresh with --weights needs --arch (the preset a fresh student starts from); "
            "or give --student-init teacher to start each student from its teacher"
        )
    parse_thresholds(args.score_threshold)
    args.tta = check_tta(args.tta)  # canonical: what the run's settings record
    # the values jobs.train checks (--epochs, --batch-size, --arch, ...), named as it names them
    validate_args(build_train_parser_namespace(args))


def build_train_parser_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """jobs.train's parsed command line for these options (its defaults for the rest)."""
    from jobs.training.options import build_parser as train_parser

    return train_parser().parse_args(train_argv(args, args.annotations, args.images, args.output, arch=args.arch))


def parse_thresholds(text: str) -> float | dict[str, float]:
    """``--score-threshold``: one value, or a map of category name or id (or "*") to value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise JobError(f"--score-threshold must be a number in [0, 1] or a JSON object of them, got {text!r}") from None
    values = value if isinstance(value, dict) else {"*": value}
    if not values:
        raise JobError("--score-threshold is an empty JSON object; name a category (or '*') and its threshold")
    for key, number in values.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= 1:
            where = "" if not isinstance(value, dict) else f" for {key!r}"
            raise JobError(f"--score-threshold{where} must be a number in [0, 1] (a detection's score), got {json.dumps(number)}")
    return float(value) if not isinstance(value, dict) else {str(k): float(v) for k, v in value.items()}


def resolve_thresholds(text: str, categories: list[dict]) -> dict[int, float]:
    """Category id -> threshold for every category of the labelled set; JobError for a key that
    names none of them."""
    parsed = parse_thresholds(text)
    if not isinstance(parsed, dict):
        return {int(c["id"]): parsed for c in categories}
    fallback = parsed.get("*", DEFAULT_THRESHOLD)
    by_key: dict[str, int] = {}
    for c in categories:
        by_key[str(c["name"])] = int(c["id"])
        by_key.setdefault(str(c["id"]), int(c["id"]))
    unknown = [k for k in parsed if k != "*" and k not in by_key]
    if unknown:
        names = ", ".join(f"{c['name']} ({c['id']})" for c in categories)
        raise JobError(f"--score-threshold names {', '.join(map(repr, unknown))}, not a category of --annotations (they are: {names})")
    thresholds = {int(c["id"]): fallback for c in categories}
    for key, number in parsed.items():
        if key != "*":
            thresholds[by_key[key]] = number
    return thresholds


def train_argv(args: argparse.Namespace, annotations: str, images: str, output: str, arch: str | None = None,
               weights: str | None = None) -> list[str]:
    """jobs.train's command line for one training run of this job."""
    argv = ["--annotations", annotations, "--images", images, "--output", output]
    if arch:
        argv += ["--arch", arch]
    if weights:
        argv += ["--weights", weights]
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        option = "--" + name.replace("_", "-")
        argv += [option] if value is True else [option, str(value)]
    return argv


def settings_of(args: argparse.Namespace, thresholds: dict[int, float]) -> dict:
    """What decides this run's results; recorded in --output, compared on every rerun."""
    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["score_threshold"] = {str(k): v for k, v in sorted(thresholds.items())}
    if args.tta:  # only when on: runs started before --tta existed continue as they were
        settings["tta"] = args.tta
    return settings


def shown(argv: list[str]) -> list[str]:
    """``argv`` with the value of --storage-options hidden (it may hold credentials)."""
    return [("<hidden>" if k and argv[k - 1] == "--storage-options" else a) for k, a in enumerate(argv)]
