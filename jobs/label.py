"""Label images with a Mask R-CNN checkpoint: every instance mask, as Parquet, exactly once.

    python -m jobs.label --input s3://bucket/images/ --output s3://bucket/labels/ --checkpoint s3://bucket/model.pt

The input (a folder/prefix searched recursively, or a .txt/.parquet manifest) is planned into
shards of ``--shard-size`` images; each shard becomes one ``part-<shard>.parquet`` in the output,
committed atomically. Rerunning the same command after a crash labels only the shards without a
part file; over finished output it does no model work. See jobs/labeling/ for the pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from jobs.common import (
    HelpFormatter,
    JobError,
    add_storage_options,
    add_ray_options,
    add_wait_for_gpus,
    init_ray,
    parse_storage_options,
    run_main,
    shutdown_ray,
)
from jobs.labeling.resources import actor_resources, threads_note
from jobs.labeling.shards import PIECES_DIR, PLAN_DIR, PREVIEW_DIR, finished_shards, read_plan, write_plan

DEFAULT_SHARD_SIZE = 1000


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
        help="a folder or prefix of images (JPEG, PNG, WebP, BMP, TIFF; searched recursively), or a manifest: "
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
        help="a model.pt written by jobs.train, or a torchvision Mask R-CNN or Keypoint R-CNN state dict "
        "(then give --arch, and --categories unless it is torchvision's COCO one)",
    )
    io_group.add_argument(
        "--arch",
        default=None,
        metavar="PRESET",
        help="architecture preset of a bare torchvision state dict (r50_fpn, r101_fpn, x101_32x8d_fpn, small; "
        "keypoint_r50_fpn for keypointrcnn_resnet50_fpn)",
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
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help="images per shard = rows per output file; the unit of commit and resume (fixed by the first run)",
    )
    io_group.add_argument(
        "--preview", type=int, default=0, metavar="N", help="also write N PNG images with their masks drawn to <output>/_preview/"
    )
    io_group.add_argument(
        "--preview-min-score",
        type=float,
        default=0.5,
        metavar="F",
        help="previews draw only the detections scoring at least F (the labels keep every one above --score-threshold)",
    )
    add_storage_options(io_group)

    model_group = parser.add_argument_group("model (defaults: the checkpoint's own; torchvision's 800, 1333, 0.05, 100 for r50_fpn)")
    model_group.add_argument("--min-size", type=int, default=None, metavar="N", help="resize so the short side is N pixels ...")
    model_group.add_argument("--max-size", type=int, default=None, metavar="N", help="... unless the long side would pass N")
    model_group.add_argument("--score-threshold", type=float, default=None, metavar="F", help="keep detections scoring at least F")
    model_group.add_argument(
        "--max-detections", type=int, default=None, metavar="N", help="keep at most N detections per image, best first"
    )

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
        type=float,
        default=None,
        metavar="F",
        help="GPUs per model replica, fractions allowed (0.5: two replicas per GPU); default 1 when the cluster has GPUs, else 0 (CPU)",
    )
    run_group.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        metavar="F",
        help="CPUs Ray reserves per model replica; given, on the CPU also its torch threads (at least 1). Default: 1 with GPUs; "
        "without GPUs, the node's CPUs less the 1 CPU decoding needs (0 on a 1-CPU node; split among the actors a node holds "
        "with --num-actors), while the actor's torch threads use all the CPUs of its node: decoding, a few ms an image, "
        "fits in the gaps of the model's ~0.5 s",
    )
    run_group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="autocast precision of the model; auto: bf16 on GPUs (fp16 where bf16 is unsupported), fp32 on CPUs",
    )
    run_group.add_argument(
        "--reference-path",
        action="store_true",
        help="run the model exactly as built (no norm folding, no channels_last) instead of the fast path; "
        "with --precision fp32, the outputs of the model in a plain loop",
    )
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


def _check_args(args: argparse.Namespace) -> None:
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
        raise JobError(f"--gpus-per-actor must be 0 or more, got {args.gpus_per_actor}")
    if args.wait_for_gpus < 0:
        raise JobError(f"--wait-for-gpus must be 0 or more seconds, got {args.wait_for_gpus:g}")
    if args.preview < 0:
        raise JobError(f"--preview must be 0 or more, got {args.preview}")
    for name in ("min_size", "max_size", "max_detections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _check_output_writable(output_uri: str, storage_options: dict | None) -> None:
    from maskrcnn.storage import filesystem, is_local

    probe = f"{PLAN_DIR}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs, root = filesystem(output_uri, storage_options)
        path = f"{root.rstrip('/')}/{probe}"
        if fs.exists(root) and fs.isfile(root):
            raise JobError(f"--output {output_uri} is a file; give a folder or prefix")
        if is_local(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"probe")
        fs.rm(path)
    except JobError:
        raise
    except Exception as exc:
        from maskrcnn.storage import explain_storage_error

        raise JobError(f"cannot write to --output {output_uri}: {explain_storage_error(exc)}") from None


def _name_option(message: str) -> str:
    """A checkpoint module's message, naming the option: "checkpoint X ..." -> "--checkpoint X ..."."""
    for prefix, option in (("checkpoint ", "--checkpoint "), ("categories file ", "--categories ")):
        if message.startswith(prefix):
            return option + message[len(prefix) :]
    return message


def load_model_for_labeling(args: argparse.Namespace, storage_options: dict | None):
    """The checkpoint read and checked on the driver, without building the model (to fail before
    any work), and the keyword arguments with which every actor loads it."""
    from maskrcnn.checkpoint import CheckpointError, categories_from_coco, load_checkpoint

    overrides = {
        "min_size": args.min_size,
        "max_size": args.max_size,
        "score_thresh": args.score_threshold,
        "detections_per_img": args.max_detections,
    }
    try:
        categories = categories_from_coco(args.categories, storage_options) if args.categories else None
        # on the meta device: the weights are checked against the model, no model is built
        loaded = load_checkpoint(
            args.checkpoint, arch=args.arch, categories=categories, storage_options=storage_options, overrides=overrides, device="meta"
        )
    except CheckpointError as exc:
        raise JobError(_name_option(str(exc))) from None
    if loaded.categories_note:
        print(loaded.categories_note, flush=True)
    load_kwargs = {"arch": args.arch, "categories": categories, "overrides": overrides}
    return loaded, loaded.config, load_kwargs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from maskrcnn.storage import absolute_uri

    for name in ("input", "output", "checkpoint", "categories"):  # Ray's workers may run in another directory
        setattr(args, name, absolute_uri(getattr(args, name)))
    storage_options = parse_storage_options(args.storage_options)
    started = time.perf_counter()

    # Everything that can be wrong with the arguments fails here, before any work.
    from jobs.labeling.inputs import check_output_apart

    check_output_apart(args.input, args.output, storage_options)
    loaded, config, load_kwargs = load_model_for_labeling(args, storage_options)
    _check_output_writable(args.output, storage_options)
    settings_fingerprint = {
        "model": loaded.model_hash,
        "min_size": config.input.min_size,
        "max_size": config.input.max_size,
        "score_threshold": config.roi_heads.score_thresh,
        "max_detections": config.roi_heads.detections_per_img,
    }

    plan = read_plan(args.output, storage_options)
    if plan is None:
        from jobs.labeling.inputs import iter_input_uris

        print(f"planning: listing {args.input} ...", flush=True)
        uris = iter_input_uris(args.input, storage_options, exclude_uri=args.output)
        plan = write_plan(uris, args.output, args.input, args.shard_size, settings_fingerprint, storage_options)
        print(
            f"planned {plan.num_images} images in {plan.num_shards} shards of {plan.shard_size} ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    else:
        if plan.input != args.input:
            raise JobError(
                f"--output {args.output} holds the labels of --input {plan.input}, not {args.input}; "
                "give another --output, or the same --input to resume"
            )
        changed = {k: (plan.settings.get(k), v) for k, v in settings_fingerprint.items() if plan.settings.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise JobError(f"--output {args.output} was labelled with other settings ({what}); give another --output to label with these")
        if args.shard_size != plan.shard_size and args.shard_size != DEFAULT_SHARD_SIZE:
            print(f"note: --shard-size {args.shard_size} ignored: the plan of {args.output} has shards of {plan.shard_size}", flush=True)
        print(f"resuming the plan of {plan.created}: {plan.num_images} images in {plan.num_shards} shards", flush=True)

    done = finished_shards(args.output, storage_options)
    pending = [s for s in range(plan.num_shards) if s not in done]
    already = plan.num_shards - len(pending)
    if not pending:
        print(
            f"nothing to do: all {plan.num_shards} shards ({plan.num_images} images) of {args.output} are already labelled; "
            "no model work done",
            flush=True,
        )
        print(f"shards: 0 labelled this run, {already} already done, {plan.num_shards} in all")
        _write_preview(args, storage_options)
        return 0
    label_map = loaded.label_map

    ray = init_ray(args.address)
    num_actors, gpus_per_actor, cpus_per_actor, torch_threads = actor_resources(ray, args)
    from jobs.labeling.pipeline import LabelSettings, run_pipeline
    from maskrcnn.data.images import DEFAULT_MAX_PIXELS
    from maskrcnn.storage import filesystem

    fs, root = filesystem(args.output, storage_options)
    pieces_root = f"{root.rstrip('/')}/{PIECES_DIR}"
    if fs.exists(pieces_root):  # rows of shards a killed run left unfinished: those shards start over
        fs.rm(pieces_root, recursive=True)
    settings = LabelSettings(
        output_uri=args.output,
        checkpoint_uri=args.checkpoint,
        load_kwargs=load_kwargs,
        storage_options=storage_options,
        model_hash=settings_fingerprint["model"],
        label_map=label_map,
        min_size=config.input.min_size,
        max_size=config.input.max_size,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        num_actors=num_actors,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        torch_threads=torch_threads,
        run_id=uuid.uuid4().hex[:12],
        fast_path=not args.reference_path,
        precision=args.precision,
        batches_in_flight=args.batches_in_flight or (2 if gpus_per_actor > 0 else 1),
    )
    print(
        f"labelling {len(pending)} of {plan.num_shards} shards with {num_actors} model actor(s) "
        f"({gpus_per_actor:g} GPU, {cpus_per_actor:g} CPU each{threads_note(ray, gpus_per_actor, torch_threads)}), "
        f"batch {args.batch_size}, "
        f"{settings.batches_in_flight} batch(es) in flight per actor",
        flush=True,
    )
    try:
        totals = run_pipeline(plan, pending, settings)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (jobs.common.run_main): stop, then count what is committed
        shutdown_ray()  # commits are atomic: each part file is whole or absent
        committed = len(finished_shards(args.output, storage_options))
        exc.args = (f"{committed} of {plan.num_shards} shards committed; run the same command again to resume",)
        raise
    if fs.exists(pieces_root):
        fs.rm(pieces_root, recursive=True)

    done = finished_shards(args.output, storage_options)
    missing = [s for s in range(plan.num_shards) if s not in done]
    seconds = totals["seconds"]
    print(
        f"labelled {totals['images']} images in {seconds:.1f} s ({totals['images'] / max(seconds, 1e-9):.2f} images/s): "
        f"{totals['detections']} detections, {totals['errors']} errors"
    )
    print(f"shards: {totals['shards']} labelled this run, {already} already done, {plan.num_shards} in all")
    print(f"output: {args.output} ({plan.num_shards - len(missing)} part files, {plan.num_images} images planned)")
    if missing:
        print(
            f"error: {len(missing)} shards are unfinished (e.g. {missing[:5]}); rerun the same command to label them",
            file=sys.stderr,
        )
        return 1
    _write_preview(args, storage_options)
    return 0


def _write_preview(args, storage_options) -> None:
    if args.preview:
        from jobs.labeling.preview import write_previews

        written = write_previews(args.output, args.preview, storage_options, min_score=args.preview_min_score)
        print(
            f"preview: {written} images with the masks scoring at least {args.preview_min_score:g} (--preview-min-score) "
            f"drawn in {args.output.rstrip('/')}/{PREVIEW_DIR}/"
        )


def label(input: str, output: str, checkpoint: str, **options) -> None:
    """This job from Python: ``label("photos/", "labels/", "model.pt", batch_size=8)`` runs what
    ``python -m jobs.label --input photos/ --output labels/ --checkpoint model.pt --batch-size 8``
    runs, in this process and on its Ray when it has one. ``options`` are the command line's
    options with underscores; a flag takes True; ``storage_options`` may be a dict. Raises
    JobError for bad input, RuntimeError when shards are left unfinished (call it again)."""
    import json

    argv = ["--input", input, "--output", output, "--checkpoint", checkpoint]
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "input", "output", "checkpoint")}
    for name, value in options.items():
        action = actions.get(name)
        if action is None:
            raise TypeError(f"label() got an unknown option {name!r}; the options are {sorted(actions)}")
        if value is None or value is False:
            continue
        if action.nargs == 0:  # a flag
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], json.dumps(value) if isinstance(value, dict) else str(value)]
    code = main(argv)
    if code:
        raise RuntimeError(f"jobs.label ended with exit status {code}; call label() again with the same arguments to finish")


if __name__ == "__main__":
    run_main(main)
