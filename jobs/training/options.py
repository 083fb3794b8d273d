"""The command line of ``python -m jobs.train``: its options, and the checks of their values
that stop the job (exit status 2) before it reads anything."""

from __future__ import annotations

import argparse

from jobs.autoscaling import add_wait_for_gpus
from jobs.common import HelpFormatter, JobError, add_ray_options
from jobs.options import add_precision_options, add_size_options, add_storage_options, finite_float, resolve_uri_options, wait_seconds
from jobs.training.spec import DEFAULT_LOADER_WORKERS, MAX_EPOCH_END_EVALS
from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM


def build_parser() -> argparse.ArgumentParser:
    """The job's options, in groups: data, model, schedule, cluster, checkpoints and metrics."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train or fine-tune Mask R-CNN with Ray Train (DDP across --num-workers workers). "
        "Every URI may be a local path or s3:// (any fsspec URI). Rerunning the same command resumes "
        "the run in --output from its latest checkpoint.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--annotations", required=True, metavar="URI",
        help="training annotations, a COCO instances JSON; its categories are the model's classes",
    )
    data.add_argument("--images", required=True, metavar="URI", help="folder or prefix that the training JSON's file_names are relative to")
    data.add_argument(
        "--val-annotations", default=None, metavar="URI",
        help="COCO JSON to evaluate box and mask AP on at the end of every epoch (see --eval-every) and of the run",
    )
    data.add_argument("--val-images", default=None, metavar="URI", help="image root of --val-annotations (default: --images)")
    data.add_argument(
        "--output", required=True, metavar="URI",
        help="run folder: Ray Train checkpoints, metrics.jsonl, metrics.png and the final model.pt",
    )
    add_size_options(data, "the preset's or the --weights checkpoint's")
    data.add_argument("--flip-prob", type=finite_float, default=0.5, metavar="P",
                      help="probability of a horizontal flip of a training image")
    data.add_argument(
        "--loader-workers", type=int, default=None, metavar="N",
        help=f"processes per training worker that read and decode images: DataLoader processes on the worker's node (0: in the "
        f"worker itself; default {DEFAULT_LOADER_WORKERS}, at most the CPUs the worker's process may run on), or with --ingest "
        f"ray-data Ray Data actors of 1 CPU each anywhere in the cluster (default {DEFAULT_LOADER_WORKERS})",
    )
    data.add_argument(
        "--ingest", choices=("dataloader", "ray-data"), default="dataloader",
        help="how the images reach the workers: dataloader, read and decoded beside each worker; ray-data, by Ray Data actors on "
        "any node with free CPUs, for images in cloud storage whose decoding needs more CPUs than the GPU nodes have. "
        "The same batches either way",
    )
    data.add_argument(
        "--no-aspect-grouping", action="store_true",
        help="batch the shuffled images as they come; by default a batch holds only landscape (wider than high) or only "
        "portrait and square images, so that neither is padded to the other's shape (at most the epoch's last batch mixes them); "
        "keep the choice when resuming a run, or the resumed epoch repeats and skips images",
    )
    add_storage_options(data)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch", default=None, metavar="PRESET",
        help="model preset: r50_fpn, r50_fpn_v2 (torchvision's v2), r101_fpn, x101_32x8d_fpn, small; "
        "the paper's ResNet-C4: r50_c4, r101_c4, small_c4; "
        "or a Keypoint R-CNN: keypoint_r50_fpn (torchvision's keypointrcnn_resnet50_fpn) "
        "or small_keypoint (needs keypoints in --annotations) (default: r50_fpn, or the --weights checkpoint's own architecture)",
    )
    model.add_argument(
        "--weights", default=None, metavar="URI",
        help="start from these weights: a jobs.train model.pt (or its --output folder) or a torchvision Mask R-CNN state dict "
        "(e.g. the COCO checkpoint); "
        "when its classes differ from the annotations' categories, the class-specific layers are re-initialised (fine-tuning)",
    )

    schedule = parser.add_argument_group("schedule")
    length = schedule.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=int, default=None, metavar="N",
        help="passes over the training set (default 12 when --max-steps is not given)",
    )
    length.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps to train for, instead of --epochs")
    schedule.add_argument(
        "--batch-size", type=int, default=2, metavar="N",
        help="images per worker per step; the total batch is N x --num-workers",
    )
    schedule.add_argument(
        "--lr", type=finite_float, default=None, metavar="F",
        help="peak learning rate (default: the linear scaling rule, 0.02 x total batch / 16; at least 0.02 for the small presets, "
        "whose GroupNorm trunk trains from scratch)",
    )
    schedule.add_argument(
        "--warmup-steps", type=int, default=None, metavar="N",
        help="linear warmup steps (default: min(1000, a tenth of the run))",
    )
    schedule.add_argument("--warmup-factor", type=finite_float, default=0.001, metavar="F",
                          help="learning rate at step 0, as a fraction of --lr")
    schedule.add_argument(
        "--lr-steps", default="0.667,0.889", metavar="LIST",
        help="comma-separated steps where the learning rate is multiplied by --lr-gamma; values below 1 are fractions of the run",
    )
    schedule.add_argument("--lr-gamma", type=finite_float, default=0.1, metavar="F",
                          help="learning rate decay factor at each of --lr-steps")
    schedule.add_argument("--momentum", type=finite_float, default=0.9, metavar="F", help="SGD momentum")
    schedule.add_argument("--weight-decay", type=finite_float, default=1e-4, metavar="F",
                          help="SGD weight decay (none on norm layers and biases)")
    schedule.add_argument(
        "--clip-grad-norm", type=finite_float, default=DEFAULT_CLIP_GRAD_NORM, metavar="F",
        help="clip the gradients' total norm at F before each step (0: no clipping)",
    )
    schedule.add_argument("--seed", type=int, default=0, help="seed of the data order and of new layers' initialisation")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--num-workers", type=int, default=1, metavar="N", help="training workers (one GPU each with --use-gpu)")
    cluster.add_argument(
        "--use-gpu", action="store_true",
        help="train on GPUs (NCCL); fails before training when the cluster has none (see --wait-for-gpus)",
    )
    cluster.add_argument(
        "--cpus-per-worker", type=finite_float, default=1.0, metavar="F",
        help="CPUs Ray reserves for each worker (its DataLoader processes run there too)",
    )
    add_wait_for_gpus(cluster)
    add_ray_options(cluster)
    add_precision_options(cluster)

    run = parser.add_argument_group("checkpoints and metrics")
    run.add_argument(
        "--checkpoint-every", type=int, default=500, metavar="N",
        help="save a Ray Train checkpoint every N steps, besides those saved with each evaluation (--eval-every) and at the end "
        "(0: only those)",
    )
    run.add_argument(
        "--eval-every", type=int, default=0, metavar="N",
        help="evaluate on --val-annotations, and save a checkpoint, every N steps (0, the default: at each epoch's end, or every "
        f"few epochs so that a run has at most {MAX_EPOCH_END_EVALS} of them; and at the end)",
    )
    run.add_argument("--keep-checkpoints", type=int, default=3, metavar="K", help="Ray Train checkpoints kept in --output (the newest K)")
    run.add_argument(
        "--max-failures", type=int, default=3, metavar="N",
        help="times a failed worker group is restarted from the latest checkpoint (-1: always)",
    )
    run.add_argument("--log-every", type=int, default=20, metavar="N", help="print and record metrics every N steps")
    run.add_argument(
        "--wait-for-lease", type=wait_seconds, default=0.0, metavar="SECONDS",
        help="when another run is training into --output, wait up to SECONDS for it to end instead of stopping at once",
    )
    run.add_argument(
        "--eval-batch-size", type=int, default=2, metavar="N",
        help="images per forward pass when evaluating on --val-annotations",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line ``argv`` (default: ``sys.argv[1:]``), checked, with its local paths made
    absolute (Ray Train workers run elsewhere). Raises JobError naming a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args)
    resolve_uri_options(parser, args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raises JobError for the first value of ``args`` (``build_parser``'s) out of its range."""
    from maskrcnn.config import PRESETS

    if args.arch is not None and args.arch not in PRESETS:
        raise JobError(f"--arch {args.arch} is not a model preset; choose one of: {', '.join(sorted(PRESETS))}")
    positive = ("num_workers", "batch_size", "max_steps", "epochs", "min_size", "max_size", "log_every", "keep_checkpoints",
                "eval_batch_size")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("loader_workers", "checkpoint_every", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise JobError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.ingest == "ray-data" and args.loader_workers is None:
        args.loader_workers = DEFAULT_LOADER_WORKERS  # actors anywhere in the cluster: the driver counts their CPUs
    if args.ingest == "ray-data" and args.loader_workers < 1:
        raise JobError("--ingest ray-data needs --loader-workers 1 or more (the Ray Data actors that read each worker's images)")
    if args.lr is not None and not args.lr > 0:
        raise JobError(f"--lr must be positive, got {args.lr}")
    if args.cpus_per_worker <= 0:
        raise JobError(f"--cpus-per-worker must be positive, got {args.cpus_per_worker}")
    if not 0 <= args.flip_prob <= 1:
        raise JobError(f"--flip-prob must be in [0, 1], got {args.flip_prob}")
    if args.val_images and not args.val_annotations:
        raise JobError("--val-images needs --val-annotations")
    if args.clip_grad_norm < 0:
        raise JobError(f"--clip-grad-norm must be 0 (no clipping) or more, got {args.clip_grad_norm:g}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise JobError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if not 0 < args.warmup_factor <= 1:
        raise JobError(f"--warmup-factor must be in (0, 1] (the learning rate at step 0 as a fraction of --lr), got {args.warmup_factor:g}")
    if not args.lr_gamma > 0:
        raise JobError(f"--lr-gamma must be positive (the learning rate's factor at each of --lr-steps), got {args.lr_gamma:g}")
    if not 0 <= args.momentum < 1:
        raise JobError(f"--momentum must be in [0, 1), got {args.momentum:g}")
    if args.weight_decay < 0:
        raise JobError(f"--weight-decay must be 0 or more, got {args.weight_decay:g}")
    for name in ("wait_for_gpus", "wait_for_lease"):
        if getattr(args, name) < 0:
            raise JobError(f"--{name.replace('_', '-')} must be 0 or more seconds, got {getattr(args, name):g}")
    if args.wait_for_gpus > 0 and not args.use_gpu:
        raise JobError("--wait-for-gpus waits for the GPUs of --use-gpu: add --use-gpu, or drop --wait-for-gpus to train on CPUs")
