"""The run spec of ``python -m jobs.train``: the plan the driver builds from the command line
(schedule, model, paths) and hands every worker, and the check that a resumed run is the one
this command describes."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

from jobs.atomic import check_output_writable
from jobs.common import JobError
from jobs.training.inputs import check_dataset, resolve_model
from maskrcnn.engine import default_lr, default_warmup_steps, milestone_steps

RUN_NAME = "ray_train"  # Ray Train's run folder inside --output
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
LEASE_DIR = "_lease"  # the lease of the one run training into --output (jobs/lease.py)
CHECKPOINT_FILE = "checkpoint.pt"  # inside each Ray Train checkpoint folder
DEFAULT_LOADER_WORKERS = 4  # --loader-workers


class Hidden:
    """A value kept out of logs: Ray Train records the train loop config for its dashboard,
    and storage options may hold credentials."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


@dataclass
class TrainPlan:
    """Everything a worker needs, checked by the driver; plain data so Ray can ship it."""

    annotations: str
    images: str
    output: str
    model_config: dict
    categories: list[dict]
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    base_lr: float
    warmup_steps: int
    warmup_factor: float
    lr_steps: list[int]
    lr_gamma: float
    momentum: float
    weight_decay: float
    clip_grad_norm: float | None
    seed: int
    flip_prob: float
    loader_workers: int | None  # None: DEFAULT_LOADER_WORKERS, at most the CPUs of the worker (worker.dataloader_processes)
    precision: str
    checkpoint_every: int
    log_every: int
    eval_every: int  # steps between evaluations (and their checkpoints): whole epochs unless --eval-every said otherwise
    val_annotations: str | None = None
    val_images: str | None = None
    eval_batch_size: int = 2
    weights: str | None = None
    # "project" or "torchvision"; with reinit_class_layers the class-specific layers stay fresh
    weights_kind: str | None = None
    reinit_class_layers: bool = False
    # landscape and portrait images in separate batches (jobs.training.worker.shard_batches)
    aspect_grouping: bool = True
    # "dataloader" or "ray-data": who reads the batches (jobs.training.worker.remaining_batches)
    ingest: str = "dataloader"


def resolve_lr_steps(text: str, total_steps: int) -> list[int]:
    """``--lr-steps`` ``text`` (comma-separated; below 1 a fraction of ``total_steps``, else a
    step) as sorted steps; JobError when it is not positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise JobError(f"--lr-steps must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise JobError(f"--lr-steps must be positive numbers, got {text!r}")
    return milestone_steps(values, total_steps)


def steps_per_epoch(num_items: int, world_size: int, batch_size: int) -> int:
    """Steps of one pass over ``num_items`` images, each of ``world_size`` ranks taking
    ``batch_size`` images a step from its shard (``shard_indices``: padded to equal shards)."""
    return math.ceil(math.ceil(num_items / world_size) / batch_size)


def plan_run(args: argparse.Namespace, storage_options: dict | None) -> TrainPlan:
    """The plan of the run that ``args`` (the checked command line, ``options.parse_args``'s)
    asks for, its inputs checked first (read with ``storage_options``): the datasets, the model
    and --weights, the schedule. Prints the run's one-line summary; raises JobError naming a
    problem."""
    train_set = check_dataset(args.annotations, args.images, storage_options, "")
    val_images = args.val_images or args.images
    if args.val_annotations:
        check_dataset(args.val_annotations, val_images, storage_options, "val-")
    categories = train_set.categories
    keypoints = (train_set.keypoint_names, train_set.keypoint_skeleton) if train_set.num_keypoints else None
    model_config, weights_kind, reinit = resolve_model(args, categories, storage_options, keypoints)
    if args.weights is None and model_config["backbone"]["norm"] == "frozen_bn":
        print(f"warning: training a {model_config['backbone']['name']} trunk with frozen BatchNorm from random weights; "
              "start from --weights (e.g. torchvision's COCO checkpoint) for useful results", file=sys.stderr)

    check_output_writable(args.output, storage_options, RUN_NAME)  # the inputs are right: the output is made

    per_epoch = steps_per_epoch(len(train_set), args.num_workers, args.batch_size)
    total_steps = args.max_steps or per_epoch * (args.epochs or 12)
    base_lr = args.lr or default_lr(args.batch_size * args.num_workers, model_config["backbone"]["norm"])
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup_steps(total_steps)
    plan = TrainPlan(
        annotations=args.annotations, images=args.images, output=args.output.rstrip("/"), model_config=model_config,
        categories=categories, total_steps=total_steps, steps_per_epoch=per_epoch, batch_size=args.batch_size,
        base_lr=base_lr, warmup_steps=warmup, warmup_factor=args.warmup_factor,
        lr_steps=resolve_lr_steps(args.lr_steps, total_steps), lr_gamma=args.lr_gamma, momentum=args.momentum,
        weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm or None, seed=args.seed, flip_prob=args.flip_prob,
        loader_workers=args.loader_workers, precision=args.precision, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        eval_every=eval_interval(args.eval_every, per_epoch, total_steps),
        val_annotations=args.val_annotations, val_images=val_images if args.val_annotations else None,
        eval_batch_size=args.eval_batch_size, weights=args.weights, weights_kind=weights_kind, reinit_class_layers=reinit,
        aspect_grouping=not args.no_aspect_grouping, ingest=args.ingest,
    )
    start = "from scratch"
    if args.weights:
        start = f"from {weights_kind} weights {args.weights}" + (" (class-specific layers re-initialised)" if reinit else "")
    print(
        f"[jobs.train] {len(train_set)} images, {len(categories)} categories; {args.num_workers} worker(s) x {args.batch_size} images; "
        f"{total_steps} steps ({per_epoch} per epoch); lr {base_lr:g} (warmup {warmup}, x{args.lr_gamma:g} at {plan.lr_steps}"
        f"{f', gradient norm clipped at {plan.clip_grad_norm:g}' if plan.clip_grad_norm else ''}); {start}",
        flush=True,
    )
    return plan


MAX_EPOCH_END_EVALS = 20  # a run of many short epochs evaluates (and checkpoints) every few epochs


def eval_interval(eval_every: int, per_epoch: int, total_steps: int) -> int:
    """Steps between the run's evaluations on --val-annotations and the checkpoints saved with
    them: ``eval_every`` (--eval-every) when it is given; else (0) each epoch's end, or every
    k-th one where a run has more than ``MAX_EPOCH_END_EVALS`` epochs: a tiny training set
    (12 images on 2 workers x 2 are 3 steps an epoch) would otherwise spend its run evaluating
    and writing checkpoints."""
    if eval_every > 0:
        return eval_every
    epochs = math.ceil(total_steps / per_epoch)
    return per_epoch * math.ceil(epochs / MAX_EPOCH_END_EVALS)


class RunMismatch(ValueError):
    """A resumed run's checkpoint is of another model or other categories than the command's: a
    mistake no restart fixes (``jobs.mistakes.MISTAKES``)."""


def check_same_run(plan: TrainPlan, resume_state: dict) -> None:
    """Raises RunMismatch when ``resume_state`` (a Ray Train checkpoint's, with its
    ``categories`` and model ``config``) is not of the run ``plan`` describes: a resumed run
    must be the same model on the same classes. Configs are compared field by field, with
    defaults for fields the saved one leaves out (a run checkpointed by an older version
    resumes under a newer one that added fields)."""
    from maskrcnn.config import ModelConfig

    hint = "use a new --output, or the original --annotations/--arch/--weights/--min-size/--max-size"
    if resume_state["categories"] != plan.categories:
        raise RunMismatch(f"the run in {plan.output} was started with other categories than this command's; {hint}")
    try:
        saved = ModelConfig.from_dict(resume_state["config"])
    except ValueError as exc:
        raise RunMismatch(
            f"the run in {plan.output} was checkpointed with a model config this version cannot read ({exc}); {hint}"
        ) from None
    changed = saved.differences(ModelConfig.from_dict(plan.model_config))
    if changed:
        raise RunMismatch(
            f"the run in {plan.output} was started with another model config than this command's "
            f"(run -> command: {'; '.join(changed)}); {hint}"
        )
