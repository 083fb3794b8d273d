"""Resume or start: a ``jobs.train`` worker's model, optimizer, schedule and data, restored
from Ray Train's latest checkpoint of the run when there is one, else new (from ``--weights``
when given): the first of the worker loop's steps (``jobs.training.worker``)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from jobs.training.metrics import MetricsLog, log
from jobs.training.spec import CHECKPOINT_FILE, TrainPlan, check_same_run

@dataclass
class WorkerRun:
    """One worker's share of the run: what ``resume_or_start`` built, and the step it is at."""

    plan: TrainPlan
    storage_options: dict | None
    rank: int
    world_size: int
    device: Any  # torch.device
    dataset: Any  # the training CocoDataset; this rank reads its shard of it
    model_config: Any  # the ModelConfig
    model: Any  # as Ray Train prepared it (DDP across workers)
    bare_model: Any  # the model inside it, as checkpoints hold it
    optimizer: Any
    scheduler: Any
    scaler: Any  # a GradScaler under fp16 autocast, else None
    autocast_dtype: Any  # torch.dtype or None (fp32)
    start_step: int
    step: int
    metrics_log: MetricsLog | None = None  # rank 0's
    val_dataset: Any = None  # rank 0's, with --val-annotations


def resume_or_start(plan: TrainPlan, storage_options: dict | None) -> WorkerRun:
    """This worker's model, optimizer, schedule and data for ``plan`` (inputs read with
    ``storage_options``): restored from Ray Train's latest checkpoint of the run when there is
    one, else new (from ``plan.weights`` when given); rank 0 records the (re)start."""
    import torch
    import ray.train
    import ray.train.torch

    from maskrcnn.config import ModelConfig
    from maskrcnn.engine import autocast_dtype, make_optimizer, make_scheduler, prepare_for_training
    from maskrcnn.modeling import build_model

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    _quiet_worker_logs()

    dataset = training_dataset(plan, storage_options)
    model_config = ModelConfig.from_dict(plan.model_config)
    torch.manual_seed(plan.seed)  # the same fresh layers on every rank
    model = build_model(model_config)
    resume_state = _read_resume_state(plan)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    elif plan.weights and rank == 0:
        # Only rank 0 reads the weights: DDP broadcasts rank 0's parameters and buffers to the
        # other ranks when it wraps the model.
        _load_start_weights(model, plan, storage_options)
    start_step = int(resume_state["step"]) if resume_state else 0
    log(f"worker rank {rank}/{world_size} pid {os.getpid()} on {device}: starts at step {start_step} of {plan.total_steps}")

    # The parameters go to DDP channels_last (``prepare_for_training``), so its gradient buckets
    # take their strides: no copy between a gradient and its bucket view, and no "grad strides do
    # not match" warning (tests/test_train_step.py).
    model = ray.train.torch.prepare_model(prepare_for_training(model))
    bare_model = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(bare_model, plan.base_lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    scheduler = make_scheduler(optimizer, plan.total_steps, plan.warmup_steps, plan.lr_steps, plan.warmup_factor, plan.lr_gamma)
    dtype = autocast_dtype(plan.precision, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    run = WorkerRun(
        plan=plan, storage_options=storage_options, rank=rank, world_size=world_size, device=device, dataset=dataset,
        model_config=model_config, model=model, bare_model=bare_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        autocast_dtype=dtype, start_step=start_step, step=start_step,
    )
    if resume_state:
        _restore_training_state(run, resume_state)
    if rank == 0:
        run.metrics_log = MetricsLog(plan.output, storage_options, start_step)
        record = {"event": "start", "step": start_step, "total_steps": plan.total_steps, "world_size": world_size, "time": time.time()}
        run.metrics_log.add(record)
        run.metrics_log.flush()
        if plan.val_annotations:
            from maskrcnn.data import CocoDataset

            run.val_dataset = CocoDataset(plan.val_annotations, plan.val_images, storage_options)
    return run


def _quiet_worker_logs() -> None:
    """Keep the console to this job's own lines: COCOeval's summary (logged at INFO by
    maskrcnn.evaluation) is in metrics.jsonl, and Ray 2.60's train context logs every
    report's metrics at INFO under a logger named by its file path, out of LoggingConfig's reach."""
    import logging

    logging.getLogger("maskrcnn.evaluation").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: nothing to quiet
        pass


def training_dataset(plan: TrainPlan, storage_options: dict | None):
    """``plan``'s training CocoDataset (read with ``storage_options``), with its random flip."""
    from maskrcnn.data import CocoDataset, RandomHorizontalFlip

    # the driver has said it once; for the whole process (the validation set too)
    warnings.filterwarnings("ignore", message=".*degenerate annotations.*")
    dataset = CocoDataset(plan.annotations, plan.images, storage_options)
    if plan.flip_prob > 0:  # a flip swaps left and right keypoints: the dataset's names say which
        dataset.transforms = RandomHorizontalFlip(plan.flip_prob, keypoint_flip=dataset.keypoint_flip if dataset.num_keypoints else None)
    return dataset


def _read_resume_state(plan: TrainPlan) -> dict | None:
    """The state in Ray Train's latest checkpoint of the run (model, optimizer, scheduler,
    scaler, step), checked to be ``plan``'s run; None when the run starts afresh."""
    import ray.train

    from maskrcnn.checkpoint import read_checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        resume_state, _ = read_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
    check_same_run(plan, resume_state)
    return resume_state


def _load_start_weights(model, plan: TrainPlan, storage_options: dict | None) -> None:
    """Loads ``plan.weights`` (read with ``storage_options``) into ``model``, without the
    class-specific layers when ``plan.reinit_class_layers``."""
    from maskrcnn.checkpoint import load_state, read_weights

    # the driver has checked them against the run's architecture (jobs.train's default r50_fpn for a bare state dict)
    state = read_weights(plan.weights, default_arch="r50_fpn", storage_options=storage_options).state
    load_state(model, state, plan.weights, skip_class_specific=plan.reinit_class_layers)


def _restore_training_state(run: WorkerRun, resume_state: dict) -> None:
    """Loads the optimizer's, scheduler's and scaler's state of a checkpoint's ``resume_state``."""
    try:
        run.optimizer.load_state_dict(resume_state["optimizer"])
    except ValueError:  # a run checkpointed before the optimizer had its two parameter groups
        raise RuntimeError(f"the run in {run.plan.output} was checkpointed with another optimizer's state; use a new --output") from None
    run.scheduler.load_state_dict(resume_state["scheduler"])
    if run.scaler is not None and resume_state.get("scaler"):
        run.scaler.load_state_dict(resume_state["scaler"])
