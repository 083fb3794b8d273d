"""Label images with a Mask R-CNN checkpoint: every instance mask, as Parquet, exactly once.

    python -m jobs.label --input s3://bucket/images/ --output s3://bucket/labels/ --checkpoint s3://bucket/model.pt

The input (a folder/prefix searched recursively, or a .txt/.parquet manifest) is planned into
shards of ``--shard-size`` images; each shard becomes one ``part-<shard>.parquet`` in the output,
committed atomically. Rerunning the same command labels only the shards without a part file and
the images added to the input since the last run (``--no-new-inputs``: not those); over finished
output it does no model work. One run at a time holds the output (a lease, ``--wait-for-lease``).
See jobs/labeling/ for the pipeline.
"""

from __future__ import annotations

import argparse
import sys
import uuid

from jobs.atomic import check_output_writable
from jobs.common import JobError, init_ray, run_main, shutdown_ray
from jobs.options import check_tta, parse_storage_options, resolve_uri_options, warn_slow_cpu_precision
from jobs.lease import Lease
from jobs.labeling.options import build_parser, check_args
from jobs.labeling.plan import PLAN_DIR, plan_for_run, read_plan
from jobs.labeling.resources import actor_resources, threads_note


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
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    resolve_uri_options(parser, args)
    storage_options = parse_storage_options(args.storage_options)
    # Everything that can be wrong with the arguments fails here, before any work.
    from jobs.labeling.inputs import check_output_apart, input_kind

    check_output_apart(args.input, args.output)
    if not args.no_new_inputs:  # a run that only finishes its plan needs no listing of --input
        input_kind(args.input, storage_options)
    check_output_writable(args.output, storage_options, PLAN_DIR)  # both before reading the checkpoint, which may be large
    loaded, config, load_kwargs = load_model_for_labeling(args, storage_options)
    tta = check_tta(args.tta, loaded.model)
    settings_fingerprint = {
        "model": loaded.model_hash,
        "min_size": config.input.min_size,
        "max_size": config.input.max_size,
        "score_threshold": config.roi_heads.score_thresh,
        "max_detections": config.roi_heads.detections_per_img,
        **({"tta": tta} if tta else {}),  # only when on: outputs labelled before --tta existed resume as they were
    }

    # One run at a time plans, labels and commits this output (jobs/lease.py).
    run_id = uuid.uuid4().hex[:12]
    lease = Lease(args.output, PLAN_DIR, run_id, storage_options)
    lease.acquire(wait=args.wait_for_lease)
    try:
        return _label(args, storage_options, loaded, config, load_kwargs, settings_fingerprint, run_id, lease)
    finally:  # a run that stopped before planning leaves nothing in the output, not even its lease
        try:
            planned = read_plan(args.output, storage_options) is not None
        except Exception:  # the store is unreachable: keep the lease file (released) rather than fail here
            planned = True
        lease.release(remove=not planned)


def _label(args, storage_options, loaded, config, load_kwargs, settings_fingerprint, run_id: str, lease: Lease) -> int:
    """Plan, label the pending shards, report: the run, holding the output's lease."""
    from jobs.labeling.shards import PIECES_DIR, finished_shards, output_refused  # Ray Data: imported once the arguments hold

    earlier = read_plan(args.output, storage_options)
    if earlier is None and (foreign := finished_shards(args.output, storage_options)):
        # part files no plan of this job's made (another tool's output, or an output whose _plan/
        # was removed): taken for labelled shards, their images would never be labelled
        raise JobError(
            f"--output {args.output} holds {len(foreign)} part-NNNNNN.parquet file(s) but no {PLAN_DIR}/ of jobs.label: they are "
            "not this job's labels (or their plan was removed); give an empty or new --output"
        )
    tta = settings_fingerprint.get("tta", "")
    if earlier is not None and earlier.settings.get("tta", "") != tta:  # a plan records --tta only when it was on
        before = f"--tta {earlier.settings['tta']}" if earlier.settings.get("tta") else "no --tta"
        raise JobError(f"--output {args.output} was labelled with {before}; give the same to resume it, or another --output "
                       f"to label with {f'--tta {tta}' if tta else 'no --tta'}")
    plan = plan_for_run(args.input, args.output, args.shard_size, settings_fingerprint, storage_options, new_inputs=not args.no_new_inputs)
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
        run_id=run_id,
        fast_path=not args.reference_path,
        precision=args.precision,
        tta=settings_fingerprint.get("tta", ""),
        batches_in_flight=args.batches_in_flight or (2 if gpus_per_actor > 0 else 1),
    )
    print(
        f"labelling {len(pending)} of {plan.num_shards} shards with {num_actors} model actor(s) "
        f"({gpus_per_actor:g} GPU, {cpus_per_actor:g} CPU each{threads_note(ray, gpus_per_actor, torch_threads)}), "
        f"batch {args.batch_size}, "
        f"{settings.batches_in_flight} batch(es) in flight per actor",
        flush=True,
    )
    warn_slow_cpu_precision(args.precision, on_cpu=gpus_per_actor == 0)
    try:
        totals = run_pipeline(plan, pending, settings)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (jobs.common.run_main): stop, then count what is committed
        shutdown_ray()  # commits are atomic: each part file is whole or absent
        committed = len(finished_shards(args.output, storage_options))
        why = "another run took over the lease on --output (this one had stopped renewing it); " if lease.lost.is_set() else ""
        exc.args = (f"{why}{committed} of {plan.num_shards} shards committed; run the same command again to resume",)
        raise
    except Exception as exc:
        refused = output_refused(exc)
        if refused is None:
            raise
        shutdown_ray()
        committed = len(finished_shards(args.output, storage_options))
        raise JobError(f"cannot write to --output {args.output}: {refused}; {committed} of {plan.num_shards} shards committed: "
                       "run the same command again once it takes files, to label the rest") from None
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
        from jobs.labeling.shards import PREVIEW_DIR

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
