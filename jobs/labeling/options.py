"""The command line of ``python -m jobs.label`` and the checks of its values."""

from __future__ import annotations

import argparse

from jobs.autoscaling import add_wait_for_gpus
from jobs.common import HelpFormatter, JobError, add_ray_options
from jobs.options import add_precision_options, add_size_options, add_storage_options, add_tta_option, check_tta, finite_float, wait_seconds
from jobs.labeling.plan import DEFAULT_SHARD_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.label",
        description="Label images with a Mask R-CNN checkpoint on Ray Data; write one Parquet row per image "
        "(image_uri, width, height, instances with COCO RLE masks and, for a Keypoint R-CNN, keypoints, error, model). "
        "Rerun the same command "
        "after a crash: it labels only what is missing.",
        formatter_class=HelpFormatter,
    )
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="a folder or prefix of images (JPEG, PNG, WebP, AVIF, TIFF, BMP, GIF, JPEG 2000, PNM; searched recursively), or a manifest: "
        "a .txt file with one image URI per line, or a .parquet file with an 'image_uri' column",
    )
    io_group.add_argument(
        "--output",
        required=True,
        metavar="URI",
        help="folder or prefix for part-NNNNNN.parquet files (one per shard); _plan/ and _preview/ go beside them",
    )
    io_group.add_argument(
        "--checkpoint",
        required=True,
        metavar="URI",
        help="a model.pt written by jobs.train (or its --output folder), or a torchvision Mask R-CNN or Keypoint R-CNN state dict "
        "(then give --arch, and --categories unless it is torchvision's COCO one)",
    )
    io_group.add_argument(
        "--arch",
        default=None,
        metavar="PRESET",
        help="architecture preset of a bare torchvision state dict (r50_fpn; r50_fpn_v2 for maskrcnn_resnet50_fpn_v2; r101_fpn, "
        "x101_32x8d_fpn, small; keypoint_r50_fpn for keypointrcnn_resnet50_fpn)",
    )
    io_group.add_argument(
        "--categories",
        default=None,
        metavar="URI",
        help="a COCO JSON whose 'categories' name the classes of a bare state dict (class index = category id); "
        "default for torchvision's COCO state dicts: COCO's 80 categories (91 classes), or person (keypoint_r50_fpn)",
    )
    io_group.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="N",
        help=f"images per shard = rows per output file; the unit of commit and resume (default {DEFAULT_SHARD_SIZE}; "
        "fixed by the first run)",
    )
    io_group.add_argument(
        "--no-new-inputs",
        action="store_true",
        help="label only what the output's plan holds (a snapshot); by default every run lists --input again and also "
        "labels the images added since the last run",
    )
    io_group.add_argument(
        "--wait-for-lease",
        type=wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="when another run is labelling --output, wait up to SECONDS for it to end instead of stopping at once",
    )
    io_group.add_argument(
        "--preview", type=int, default=0, metavar="N", help="also write N PNG images with their masks drawn to <output>/_preview/"
    )
    io_group.add_argument(
        "--preview-min-score",
        type=finite_float,
        default=0.5,
        metavar="F",
        help="previews draw only the detections scoring at least F (the labels keep every one above --score-threshold)",
    )
    add_storage_options(io_group)

    model_group = parser.add_argument_group("model (defaults: the checkpoint's own; torchvision's 800, 1333, 0.05, 100 for r50_fpn)")
    add_size_options(model_group, "the checkpoint's")
    model_group.add_argument("--score-threshold", type=finite_float, default=None, metavar="F", help="keep detections scoring at least F")
    model_group.add_argument(
        "--max-detections", type=int, default=None, metavar="N", help="keep at most N detections per image, best first"
    )
    add_tta_option(model_group, "the views' detections are merged before --score-threshold and --max-detections apply")

    run_group = parser.add_argument_group("execution")
    run_group.add_argument(
        "--batch-size",
        type=int,
        default=4,
        metavar="N",
        help="at most N images per forward pass of one actor; an image shares a forward only with images of its own "
        "padded size, so its labels do not depend on the batch",
    )
    run_group.add_argument(
        "--num-actors",
        type=int,
        default=None,
        metavar="N",
        help="model replicas (default: one per --gpus-per-actor share of the cluster's GPUs; "
        "without GPUs, one per node that has CPUs, each running as many torch threads as its node has CPUs)",
    )
    run_group.add_argument(
        "--gpus-per-actor",
        type=finite_float,
        default=None,
        metavar="F",
        help="GPUs per model replica, fractions allowed (0.5: two replicas per GPU); default 1 when the cluster has GPUs, else 0 (CPU)",
    )
    run_group.add_argument(
        "--cpus-per-actor",
        type=finite_float,
        default=None,
        metavar="F",
        help="CPUs Ray reserves per model replica; given, on the CPU also its torch threads (at least 1). Default: 1 with GPUs; "
        "without GPUs, the node's CPUs less the 1 CPU decoding needs (0 on a 1-CPU node; split among the actors a node holds "
        "with --num-actors), while the actor's torch threads use all the CPUs of its node: decoding, a few ms an image, "
        "fits in the gaps of the model's ~0.5 s",
    )
    add_precision_options(run_group, reference_path="; with --precision fp32, the outputs of the model in a plain loop")
    run_group.add_argument(
        "--batches-in-flight",
        type=int,
        default=None,
        metavar="N",
        help="batches one actor works on at once, each in its own thread (and CUDA stream): one's copies, "
        "NMS syncs and mask packing overlap another's GPU work; default 2 on GPUs, 1 on CPUs",
    )
    add_wait_for_gpus(run_group)
    add_ray_options(run_group)
    run_group.add_argument("--decode-batch-size", type=int, default=8, metavar="N", help="images per decode task batch")
    run_group.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse images of more pixels (decompression bombs); the row gets an error (default: 100 million, as training and evaluation)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    from maskrcnn.config import PRESETS

    if args.arch is not None and args.arch not in PRESETS:
        raise JobError(f"--arch {args.arch} is not a model preset; choose one of: {', '.join(sorted(PRESETS))}")
    for name, value in (("--score-threshold", args.score_threshold), ("--preview-min-score", args.preview_min_score)):
        if value is not None and not 0 <= value <= 1:
            raise JobError(f"{name} must be in [0, 1] (a detection's score is a probability), got {value:g}")
    for name in ("shard_size", "batch_size", "decode_batch_size", "max_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batches_in_flight is not None and args.batches_in_flight < 1:
        raise JobError(f"--batches-in-flight must be at least 1, got {args.batches_in_flight}")
    if args.num_actors is not None and args.num_actors < 1:
        raise JobError(f"--num-actors must be at least 1, got {args.num_actors}")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise JobError(f"--gpus-per-actor must be 0 or more, got {args.gpus_per_actor:g}")
    if args.cpus_per_actor is not None and not args.cpus_per_actor > 0:
        raise JobError(f"--cpus-per-actor must be positive, got {args.cpus_per_actor:g}")
    if args.wait_for_lease < 0:
        raise JobError(f"--wait-for-lease must be 0 or more seconds, got {args.wait_for_lease:g}")
    if args.wait_for_gpus < 0:
        raise JobError(f"--wait-for-gpus must be 0 or more seconds, got {args.wait_for_gpus:g}")
    if args.preview < 0:
        raise JobError(f"--preview must be 0 or more, got {args.preview}")
    check_tta(args.tta)
    for name in ("min_size", "max_size", "max_detections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
