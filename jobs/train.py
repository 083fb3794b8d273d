"""``python -m jobs.train``: train or fine-tune Mask R-CNN on a Ray cluster with Ray Train.

    python -m jobs.train --annotations s3://b/train.json --images s3://b/train/ --output s3://b/runs/r1 \\
        [--val-annotations s3://b/val.json --val-images s3://b/val/] [--weights URI] \\
        [--num-workers 8 --use-gpu] [--epochs 12 | --max-steps N] [--batch-size 2]

How it runs:

- The driver (this process) checks the inputs before anything trains: the annotations parse and
  name images that exist, the dataset is not empty, ``--weights`` is readable and fits the
  architecture, ``--use-gpu`` has GPUs to use (with ``--wait-for-gpus S``, after asking the
  autoscaler for them and waiting up to S seconds). Each problem stops the job with exit status 2
  and a message naming it. The driver never reads an image.
- A ``TorchTrainer`` starts ``--num-workers`` workers: DDP over gloo on CPUs, NCCL on GPUs.
  Every worker reads the annotations itself and its own shard of the images (a per-epoch
  shuffle split by world rank, as ``DistributedSampler`` does) through fsspec, in its own
  DataLoader processes.
- The recipe is ``maskrcnn.engine``'s, the one the overfit test and the ablation benchmark
  prove: SGD without weight decay on norms and biases; the linear scaling rule's lr, 0.02 for 16
  images per step (with a floor for the ``small`` GroupNorm presets, which train from scratch);
  linear warmup from ``--warmup-factor`` times that, then x ``--lr-gamma`` at ``--lr-steps``
  (2/3 and 8/9 of the run, detectron's 1x schedule); gradients clipped at ``--clip-grad-norm``.
- On GPUs the forward pass runs under bf16 autocast (fp16 with a GradScaler where the GPU has
  no bf16); on CPUs in fp32. ``--precision`` overrides.
- ``--output`` holds the whole run (local or any fsspec URI, e.g. ``s3://``):
  ``ray_train/`` (Ray Train's checkpoints, the last ``--keep-checkpoints``, each with the model,
  optimizer, scheduler and step), ``metrics.jsonl`` (one JSON object per logged step,
  evaluation and (re)start), ``metrics.png`` (the curves) and, at the end, ``model.pt``: the
  single-file checkpoint that ``jobs.label`` and ``jobs.evaluate`` take as it is.
- A worker that dies is replaced and training goes on from the latest checkpoint
  (``--max-failures`` times). Running the same command again after the job itself died
  resumes from the latest checkpoint in ``--output`` (Ray Train finds the run there by its
  storage path and name); a run that had finished only rewrites ``model.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from jobs.common import (
    HelpFormatter,
    JobError,
    add_ray_options,
    add_storage_options,
    add_wait_for_gpus,
    format_duration,
    parse_storage_options,
    ray_is_fixed,
    run_main,
    shutdown_ray,
    wait_for_gpus,
)
from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, default_lr, default_warmup_steps, milestone_steps

__all__ = ["main", "build_parser", "train_loop_per_worker", "shard_indices", "TrainPlan"]

RUN_NAME = "ray_train"  # Ray Train's run folder inside --output
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"  # inside each Ray Train checkpoint folder


# --------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train or fine-tune Mask R-CNN with Ray Train (DDP across --num-workers workers). "
        "Every URI may be a local path or s3:// (any fsspec URI). Rerunning the same command resumes "
        "the run in --output from its latest checkpoint.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--annotations", required=True, metavar="URI", help="training annotations, a COCO instances JSON; its categories are the model's classes")
    data.add_argument("--images", required=True, metavar="URI", help="folder or prefix that the training JSON's file_names are relative to")
    data.add_argument("--val-annotations", default=None, metavar="URI", help="COCO JSON to evaluate box and mask AP on at the end of every epoch and of the run")
    data.add_argument("--val-images", default=None, metavar="URI", help="image root of --val-annotations (default: --images)")
    data.add_argument("--output", required=True, metavar="URI", help="run folder: Ray Train checkpoints, metrics.jsonl, metrics.png and the final model.pt")
    data.add_argument("--min-size", type=int, default=None, metavar="N", help="resize the shorter image side to N (default: the preset's or the --weights checkpoint's; 800 for r50_fpn)")
    data.add_argument("--max-size", type=int, default=None, metavar="N", help="cap the longer image side at N (default: the preset's or checkpoint's; 1333 for r50_fpn)")
    data.add_argument("--flip-prob", type=float, default=0.5, metavar="P", help="probability of a horizontal flip of a training image")
    data.add_argument("--loader-workers", type=int, default=4, metavar="N", help="DataLoader processes per training worker that read and decode images (0: in the worker itself)")
    add_storage_options(data)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch", default=None, metavar="PRESET",
        help="model preset: r50_fpn, r101_fpn, x101_32x8d_fpn, small; the paper's ResNet-C4: r50_c4, r101_c4, small_c4; "
        "or a Keypoint R-CNN: keypoint_r50_fpn (torchvision's keypointrcnn_resnet50_fpn) "
        "or small_keypoint (needs keypoints in --annotations) (default: r50_fpn, or the --weights checkpoint's own architecture)",
    )
    model.add_argument(
        "--weights", default=None, metavar="URI",
        help="start from these weights: a jobs.train model.pt or a torchvision Mask R-CNN state dict (e.g. the COCO checkpoint); "
        "when its classes differ from the annotations' categories, the class-specific layers are re-initialised (fine-tuning)",
    )

    schedule = parser.add_argument_group("schedule")
    length = schedule.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, metavar="N", help="passes over the training set (default 12 when --max-steps is not given)")
    length.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps to train for, instead of --epochs")
    schedule.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per worker per step; the total batch is N x --num-workers")
    schedule.add_argument(
        "--lr", type=float, default=None, metavar="F",
        help="peak learning rate (default: the linear scaling rule, 0.02 x total batch / 16; at least 0.02 for the small presets, "
        "whose GroupNorm trunk trains from scratch)",
    )
    schedule.add_argument("--warmup-steps", type=int, default=None, metavar="N", help="linear warmup steps (default: min(1000, a tenth of the run))")
    schedule.add_argument("--warmup-factor", type=float, default=0.001, metavar="F", help="learning rate at step 0, as a fraction of --lr")
    schedule.add_argument(
        "--lr-steps", default="0.667,0.889", metavar="LIST",
        help="comma-separated steps where the learning rate is multiplied by --lr-gamma; values below 1 are fractions of the run",
    )
    schedule.add_argument("--lr-gamma", type=float, default=0.1, metavar="F", help="learning rate decay factor at each of --lr-steps")
    schedule.add_argument("--momentum", type=float, default=0.9, metavar="F", help="SGD momentum")
    schedule.add_argument("--weight-decay", type=float, default=1e-4, metavar="F", help="SGD weight decay (none on norm layers and biases)")
    schedule.add_argument(
        "--clip-grad-norm", type=float, default=DEFAULT_CLIP_GRAD_NORM, metavar="F",
        help="clip the gradients' total norm at F before each step (0: no clipping)",
    )
    schedule.add_argument("--seed", type=int, default=0, help="seed of the data order and of new layers' initialisation")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--num-workers", type=int, default=1, metavar="N", help="training workers (one GPU each with --use-gpu)")
    cluster.add_argument("--use-gpu", action="store_true", help="train on GPUs (NCCL); fails before training when the cluster has none (see --wait-for-gpus)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="F", help="CPUs Ray reserves for each worker (its DataLoader processes run there too)")
    add_wait_for_gpus(cluster)
    add_ray_options(cluster)
    cluster.add_argument(
        "--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
        help="autocast precision of the forward pass; auto: bf16 on GPUs (fp16 where bf16 is unsupported), fp32 on CPUs",
    )

    run = parser.add_argument_group("checkpoints and metrics")
    run.add_argument("--checkpoint-every", type=int, default=500, metavar="N", help="save a Ray Train checkpoint every N steps, besides each epoch's end (0: at epoch ends only)")
    run.add_argument("--keep-checkpoints", type=int, default=3, metavar="K", help="Ray Train checkpoints kept in --output (the newest K)")
    run.add_argument("--max-failures", type=int, default=3, metavar="N", help="times a failed worker group is restarted from the latest checkpoint (-1: always)")
    run.add_argument("--log-every", type=int, default=20, metavar="N", help="print, report to Ray Train and record metrics every N steps")
    run.add_argument("--eval-batch-size", type=int, default=2, metavar="N", help="images per forward pass when evaluating on --val-annotations")
    return parser


# --------------------------------------------------------------------------------------------
# What the driver hands the workers


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
    loader_workers: int
    precision: str
    checkpoint_every: int
    log_every: int
    val_annotations: str | None = None
    val_images: str | None = None
    eval_batch_size: int = 2
    weights: str | None = None
    # "project" or "torchvision"; with reinit_class_layers the class-specific layers stay fresh
    weights_kind: str | None = None
    reinit_class_layers: bool = False


# --------------------------------------------------------------------------------------------
# Pieces shared by the workers, the driver and benchmarks/train_step.py


def resolve_lr_steps(text: str, total_steps: int) -> list[int]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise JobError(f"--lr-steps must be comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise JobError(f"--lr-steps must be positive, got {text!r}")
    return milestone_steps(values, total_steps)


def shard_indices(num_items: int, world_size: int, rank: int, epoch: int, seed: int) -> list[int]:
    """This rank's dataset indices for ``epoch``: one seeded shuffle per epoch, padded to a
    multiple of ``world_size`` and dealt out by rank (``DistributedSampler``'s split), so every
    rank has the same number of items and the ranks' shards do not overlap."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def steps_per_epoch(num_items: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(num_items / world_size) / batch_size)


def targets_to(targets: list[dict], device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in t.items()} for t in targets]


def read_metrics(output: str, storage_options: dict | None) -> list[dict]:
    from maskrcnn.storage import join_uri, open_uri

    try:
        with open_uri(join_uri(output, METRICS_FILE), "r", storage_options) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class MetricsLog:
    """Rank 0's record of the run, rewritten whole to ``<output>/metrics.jsonl`` at each
    checkpoint, evaluation and the end (object stores cannot append). On a resume, records
    after the restored step are dropped: that stretch is trained again."""

    def __init__(self, output: str, storage_options: dict | None, start_step: int) -> None:
        self.uri = output
        self.storage_options = storage_options
        self.records = [r for r in read_metrics(output, storage_options) if r.get("step", 0) <= start_step]

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        from maskrcnn.storage import join_uri, open_uri

        text = "".join(json.dumps(r) + "\n" for r in self.records)
        with open_uri(join_uri(self.uri, METRICS_FILE), "w", self.storage_options) as f:
            f.write(text)


# --------------------------------------------------------------------------------------------
# The training loop, run by every Ray Train worker


def _log(message: str) -> None:
    print(f"[jobs.train] {message}", flush=True)


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


def _load_start_weights(model, plan: TrainPlan, storage_options) -> None:
    from maskrcnn.checkpoint import load_state, read_weights

    # the driver has checked them against the run's architecture (jobs.train's default r50_fpn for a bare state dict)
    state = read_weights(plan.weights, default_arch="r50_fpn", storage_options=storage_options).state
    load_state(model, state, plan.weights, skip_class_specific=plan.reinit_class_layers)


def _check_same_run(plan: "TrainPlan", resume_state: dict) -> None:
    """A resumed run must be the same model on the same classes. Configs are compared field by
    field, with defaults for fields the saved one leaves out (a run checkpointed by an older
    version resumes under a newer one that added fields)."""
    from maskrcnn.config import ModelConfig

    hint = "use a new --output, or the original --annotations/--arch/--weights/--min-size/--max-size"
    if resume_state["categories"] != plan.categories:
        raise RuntimeError(f"the run in {plan.output} was started with other categories than this command's; {hint}")
    try:
        saved = ModelConfig.from_dict(resume_state["config"])
    except ValueError as exc:
        raise RuntimeError(f"the run in {plan.output} was checkpointed with a model config this version cannot read ({exc}); {hint}") from None
    changed = saved.differences(ModelConfig.from_dict(plan.model_config))
    if changed:
        raise RuntimeError(
            f"the run in {plan.output} was started with another model config than this command's "
            f"(run -> command: {'; '.join(changed)}); {hint}"
        )


def train_loop_per_worker(config: dict) -> None:
    import torch
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from maskrcnn.checkpoint import read_checkpoint, save_checkpoint
    from maskrcnn.config import ModelConfig
    from maskrcnn.data import CocoDataset, RandomHorizontalFlip, collate_fn
    from maskrcnn.engine import autocast_dtype as engine_autocast_dtype
    from maskrcnn.engine import make_optimizer, make_scheduler, train_step
    from maskrcnn.modeling import build_model
    from maskrcnn.storage import join_uri

    plan = TrainPlan(**config["plan"])
    storage_options = config["storage_options"].value
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    warnings.filterwarnings("ignore", message=".*degenerate annotations.*")  # the driver has said it once
    _quiet_worker_logs()

    dataset = CocoDataset(plan.annotations, plan.images, storage_options)
    if plan.flip_prob > 0:  # a flip swaps left and right keypoints: the dataset's names say which
        dataset.transforms = RandomHorizontalFlip(plan.flip_prob, keypoint_flip=dataset.keypoint_flip if dataset.num_keypoints else None)
    model_config = ModelConfig.from_dict(plan.model_config)
    torch.manual_seed(plan.seed)  # the same fresh layers on every rank
    model = build_model(model_config)

    checkpoint = ray.train.get_checkpoint()
    resume_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume_state, _ = read_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
        _check_same_run(plan, resume_state)
        model.load_state_dict(resume_state["model"])
    elif plan.weights and rank == 0:
        # Only rank 0 reads the weights: DDP broadcasts rank 0's parameters and buffers to the
        # other ranks when it wraps the model.
        _load_start_weights(model, plan, storage_options)
    start_step = int(resume_state["step"]) if resume_state else 0
    _log(f"worker rank {rank}/{world_size} pid {os.getpid()} on {device}: starts at step {start_step} of {plan.total_steps}")

    model = ray.train.torch.prepare_model(model)
    bare_model = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(bare_model, plan.base_lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    scheduler = make_scheduler(optimizer, plan.total_steps, plan.warmup_steps, plan.lr_steps, plan.warmup_factor, plan.lr_gamma)
    autocast_dtype = engine_autocast_dtype(plan.precision, device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    if resume_state:
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except ValueError:  # a run checkpointed before the optimizer had its two parameter groups
            raise RuntimeError(f"the run in {plan.output} was checkpointed with another optimizer's state; use a new --output") from None
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])

    metrics_log = MetricsLog(plan.output, storage_options, start_step) if rank == 0 else None
    if metrics_log is not None:
        metrics_log.add({"event": "start", "step": start_step, "total_steps": plan.total_steps, "world_size": world_size, "time": time.time()})
        metrics_log.flush()
    val_dataset = None
    if plan.val_annotations and rank == 0:
        val_dataset = CocoDataset(plan.val_annotations, plan.val_images, storage_options)

    def save(step: int, metrics: dict) -> None:
        """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint."""
        if rank != 0:
            ray.train.report(metrics)
            return
        metrics_log.flush()
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(os.path.join(folder, CHECKPOINT_FILE), bare_model, model_config, plan.categories, training_state={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
            })
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        _log(f"checkpoint at step {step}")

    def evaluate_now(step: int, epoch: int) -> dict:
        from maskrcnn.evaluation import evaluate_model

        started = time.perf_counter()
        result = evaluate_model(bare_model, val_dataset, plan.eval_batch_size, device, loader_workers=min(plan.loader_workers, 2))
        summary = {k: v for k, v in result.items() if not k.endswith("_stats")}
        metrics_log.add({"event": "eval", "step": step, "epoch": epoch, **result, "seconds": round(time.perf_counter() - started, 2)})
        metrics_log.flush()
        keypoint_ap = f"  keypoint AP {result['keypoints_AP']:.4f}" if "keypoints_AP" in result else ""
        _log(f"eval at step {step} (epoch {epoch}): box AP {result['bbox_AP']:.4f}  mask AP {result['segm_AP']:.4f}{keypoint_ap}  ({time.perf_counter() - started:.1f} s)")
        return summary

    step = last_record_step = start_step
    model.train()
    last_time = time.perf_counter()
    train_seconds = 0.0  # in training steps only (not evaluation or checkpoints): the ETA's mean step time
    while step < plan.total_steps:
        epoch, skip_batches = divmod(step, plan.steps_per_epoch)
        indices = shard_indices(len(dataset), world_size, rank, epoch, plan.seed)[skip_batches * plan.batch_size :]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=plan.batch_size, sampler=indices, num_workers=plan.loader_workers,
            collate_fn=collate_fn, pin_memory=device.type == "cuda",
        )
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            targets = targets_to(targets, device)
            lr = optimizer.param_groups[0]["lr"]
            losses = train_step(model, optimizer, images, targets, scheduler=scheduler, autocast_dtype=autocast_dtype, scaler=scaler,
                                clip_grad_norm=plan.clip_grad_norm)
            step += 1
            epoch_end = step % plan.steps_per_epoch == 0
            last = step >= plan.total_steps
            checkpoint_due = epoch_end or last or (plan.checkpoint_every and step % plan.checkpoint_every == 0)
            log_due = step % plan.log_every == 0 or checkpoint_due or step == start_step + 1
            # The loss is read back only at log steps (every checkpoint is one): between them
            # the host queues steps without waiting for the device. A diverged rank poisons
            # every rank through the gradient all-reduce, so all of them stop at the check.
            if not log_due and step % 20:
                continue
            if not bool(torch.isfinite(losses["loss"])):
                raise FloatingPointError(
                    f"the loss is {float(losses['loss'])} at step {step} (rank {rank}); lower --lr, lengthen --warmup-steps"
                    + (" or clip gradients (--clip-grad-norm)" if plan.clip_grad_norm is None else "")
                )
            if not log_due:
                continue
            # Mean loss terms over the ranks, and the images all ranks took in this stretch.
            keys = [k for k in losses if k != "loss"]  # the model's loss terms, in its order: the same on every rank
            values = torch.stack([losses[k].float() for k in keys] + [torch.tensor(float(len(images)), device=device)])
            if world_size > 1:
                torch.distributed.all_reduce(values)
            values = values.cpu()
            loss_terms = {k: float(values[i]) / world_size for i, k in enumerate(keys)}
            now = time.perf_counter()
            record = {
                "step": step,
                "epoch": step / plan.steps_per_epoch,
                "loss": sum(loss_terms.values()),
                **loss_terms,
                "lr": lr,
                # images per step (all ranks, this step's count) x steps since the last record / seconds
                "images_per_s": float(values[-1]) * (step - last_record_step) / (now - last_time),
                "time": time.time(),
            }
            train_seconds += now - last_time
            last_time, last_record_step = now, step
            if rank == 0:
                metrics_log.add(record)
                terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in loss_terms.items())
                eta = format_duration((plan.total_steps - step) * train_seconds / (step - start_step))
                _log(
                    f"step {step}/{plan.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                    f"({terms}) lr {lr:.5f} {record['images_per_s']:.1f} img/s ETA {eta}"
                )
            report = {k: v for k, v in record.items() if k != "time"}
            if (epoch_end or last) and val_dataset is not None:
                report.update(evaluate_now(step, int(step // plan.steps_per_epoch)))
                last_time = time.perf_counter()
            if checkpoint_due:
                save(step, report)
                last_time = time.perf_counter()
            else:
                ray.train.report(report)
            if last:
                break

    if rank == 0:
        uri = join_uri(plan.output, MODEL_FILE)
        save_checkpoint(uri, bare_model, model_config, plan.categories, storage_options)
        metrics_log.add({"event": "end", "step": step, "model": uri, "time": time.time()})
        metrics_log.flush()
        _log(f"wrote {uri}")


# --------------------------------------------------------------------------------------------
# The driver


def _check_dataset(annotations: str, images: str, storage_options, what: str):
    from maskrcnn.data import AnnotationError, CocoDataset, missing_images

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = CocoDataset(annotations, images, storage_options)
    except FileNotFoundError:
        raise JobError(f"--{what}annotations {annotations} does not exist") from None
    except AnnotationError as exc:
        raise JobError(f"--{what}annotations: {exc}") from None
    except Exception as exc:  # permission, network, credentials (botocore's errors are no OSError)
        from maskrcnn.storage import explain_storage_error

        raise JobError(f"cannot read --{what}annotations {annotations}: {explain_storage_error(exc)}") from None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if len(dataset) == 0:
        raise JobError(f"--{what}annotations {annotations} lists no images: the dataset is empty")
    instances = sum(1 for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd"))
    if instances == 0:
        raise JobError(f"--{what}annotations {annotations} has no (non-crowd) annotations: nothing to learn or evaluate")
    missing = missing_images(dataset)
    if missing:
        raise JobError(
            f"{len(missing)} of the {len(dataset)} images named in --{what}annotations {annotations} are missing under "
            f"--{what}images {images} (e.g. {', '.join(missing[:3])}); fix the image root or the file_names"
        )
    return dataset


def _resolve_model(args, categories: list[dict], storage_options, keypoints: tuple[list, list] | None = None) -> tuple[dict, str | None, bool]:
    """The model config for this run, the kind of --weights, and whether the class-specific
    layers start fresh; loads --weights once into the model to prove they fit. ``keypoints``:
    the annotations' keypoint names and skeleton, which a keypoint head is made to predict."""
    from maskrcnn.checkpoint import CheckpointError, load_state, num_keypoints_of, read_weights
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    num_classes = len(categories) + 1
    kind, reinit, state = None, False, None
    try:
        if args.weights is None:
            config = get_preset(args.arch or "r50_fpn", num_classes=num_classes)
        else:
            weights = read_weights(args.weights, arch=args.arch, default_arch="r50_fpn", storage_options=storage_options)
            kind, state = weights.kind, weights.state
            if kind == "torchvision":
                # torchvision's class index is a category id; ours is the annotations' order
                reinit = True
                if weights.config.num_classes == num_classes:
                    print("warning: --weights has as many classes as the annotations, but a torchvision state dict's classes are its "
                          "own category ids: its class-specific layers are re-initialised", file=sys.stderr)
            else:
                reinit = [(c["id"], c["name"]) for c in weights.categories] != [(c["id"], c["name"]) for c in categories]
            config = weights.config.replace(num_classes=num_classes)
    except CheckpointError as exc:
        raise JobError(f"--weights: {exc}") from None
    except ValueError as exc:  # an unknown --arch preset, a damaged config
        raise JobError(str(exc)) from None
    config = _fit_keypoints(config, keypoints, args.arch)
    if state is not None and config.keypoint_head.enabled and num_keypoints_of(state) not in (None, config.keypoint_head.num_keypoints):
        reinit = True  # other keypoints than the weights': the keypoint predictor starts fresh
    config = config.with_overrides(min_size=args.min_size, max_size=args.max_size)  # an explicit --min-size is the one training size too
    if state is not None:
        try:
            load_state(build_model(config), state, args.weights, skip_class_specific=reinit)
        except CheckpointError as exc:
            raise JobError(f"--weights: {exc}") from None
    return config.to_dict(), kind, reinit


def _fit_keypoints(config, keypoints: tuple[list, list] | None, arch: str | None):
    """A keypoint head made to predict the annotations' keypoints; annotations without keypoints
    stop a keypoint model's run, and keypoints a model without the head cannot learn are noted."""
    from maskrcnn.checkpoint import fit_keypoint_head

    names, skeleton = keypoints or ([], [])
    if not config.keypoint_head.enabled:
        if names:
            print(f"note: --annotations have {len(names)} keypoints per instance; this model has no keypoint head and does not learn them "
                  "(--arch keypoint_r50_fpn or small_keypoint does)", file=sys.stderr)
        return config
    if not names:
        raise JobError(
            f"the model{f' --arch {arch}' if arch else ''} has a keypoint head but --annotations has no keypoints: a Keypoint R-CNN "
            "trains on COCO keypoint annotations (a category's 'keypoints' names and 'skeleton', each annotation's 'keypoints')"
        )
    return fit_keypoint_head(config, len(names), names, skeleton)


def _ray_storage(output: str, storage_options):
    """``RunConfig``'s storage path and filesystem for ``--output``: a local folder as is; any
    other URI through the same fsspec filesystem (credentials, endpoint) the rest of the job uses."""
    from maskrcnn.storage import absolute_uri, filesystem, is_local

    if is_local(output):
        return absolute_uri(output), None
    import pyarrow.fs

    fs, path = filesystem(output, storage_options)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _validate_args(args) -> None:
    from maskrcnn.config import PRESETS

    if args.arch is not None and args.arch not in PRESETS:
        raise JobError(f"--arch {args.arch} is not a model preset; choose one of: {', '.join(sorted(PRESETS))}")
    positive = ("num_workers", "batch_size", "max_steps", "epochs", "min_size", "max_size", "log_every", "keep_checkpoints", "eval_batch_size")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("loader_workers", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise JobError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
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
    if args.wait_for_gpus < 0:
        raise JobError(f"--wait-for-gpus must be 0 or more seconds, got {args.wait_for_gpus:g}")
    if args.wait_for_gpus > 0 and not args.use_gpu:
        raise JobError("--wait-for-gpus waits for the GPUs of --use-gpu: add --use-gpu, or drop --wait-for-gpus to train on CPUs")


def _check_cluster(ray, args) -> None:
    if not args.use_gpu:
        resources = ray.cluster_resources()
        if resources.get("CPU", 0) < args.num_workers * args.cpus_per_worker and ray_is_fixed(ray):
            raise JobError(
                f"--num-workers {args.num_workers} x --cpus-per-worker {args.cpus_per_worker:g} CPUs cannot start on this private "
                f"local Ray of {resources.get('CPU', 0):g} CPUs; lower them, or run on a larger cluster (--address, RAY_ADDRESS)"
            )
        if resources.get("CPU", 0) < args.num_workers * args.cpus_per_worker:
            print(f"warning: {args.num_workers} workers x {args.cpus_per_worker:g} CPUs; the cluster has {resources.get('CPU', 0):g} CPUs now "
                  "(the job waits for an autoscaler to add them)", file=sys.stderr)
        return
    bundles = [{"GPU": 1, "CPU": args.cpus_per_worker}] * args.num_workers
    resources = wait_for_gpus(ray, args.num_workers, bundles, args.wait_for_gpus, f"--use-gpu --num-workers {args.num_workers}")
    gpus = resources.get("GPU", 0)
    if gpus < 1:
        raise JobError(
            f"--use-gpu, but the Ray cluster has no GPUs (its resources: {int(resources.get('CPU', 0))} CPUs, 0 GPUs); "
            "drop --use-gpu to train on CPUs, submit to a cluster with GPU nodes, "
            "or give --wait-for-gpus SECONDS where the cluster adds GPU nodes on demand"
        )
    if gpus < args.num_workers and ray_is_fixed(ray):
        raise JobError(f"--use-gpu --num-workers {args.num_workers} needs {args.num_workers} GPUs; this private local Ray has {gpus:g}")
    if gpus < args.num_workers:
        print(f"warning: --num-workers {args.num_workers} with --use-gpu needs {args.num_workers} GPUs; the cluster has {gpus:g} now "
              "(the job waits for an autoscaler to add them)", file=sys.stderr)


def plot_metrics(records: list[dict], uri: str, storage_options) -> bool:
    """Loss terms, learning rate and AP against step, as a PNG at ``uri``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no metrics plot", file=sys.stderr)
        return False
    import io

    from maskrcnn.storage import open_uri

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    terms = list(dict.fromkeys(k for r in steps for k in r if k.startswith("loss_")))  # whatever the model returned
    for key in ["loss", *terms]:
        axes[0].plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], label=key, linewidth=2 if key == "loss" else 1)
    axes[0].set(title="training loss (mean over workers)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:purple")
    axes[1].set(title="learning rate", xlabel="step")
    twin = axes[1].twinx()
    twin.plot([r["step"] for r in steps], [r["images_per_s"] for r in steps], color="tab:gray", alpha=0.6)
    twin.set_ylabel("images/s (all workers)")
    for key, label in (("bbox_AP", "box AP"), ("segm_AP", "mask AP"), ("bbox_AP50", "box AP50"), ("segm_AP50", "mask AP50"), ("keypoints_AP", "keypoint AP")):
        if evals and key not in evals[0]:
            continue
        axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    axes[2].set(title="COCO AP on --val-annotations", xlabel="step", ylim=(0, 1))
    if evals:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no --val-annotations", ha="center", va="center", transform=axes[2].transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with open_uri(uri, "wb", storage_options) as f:
        f.write(buffer.getvalue())
    return True


def _fit(trainer) -> None:
    """``trainer.fit()`` in a thread, so that Ctrl-C and SIGTERM reach this (main) thread as
    KeyboardInterrupt (jobs.common.run_main: one line, exit 130 or 143) instead of Ray Train's
    own SIGINT handler, which it installs only on the main thread."""
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread; a stopped run's errors go unseen
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate_args(args)
    from maskrcnn.storage import absolute_uri

    for name in ("annotations", "images", "val_annotations", "val_images", "output", "weights"):  # Ray Train workers run elsewhere
        setattr(args, name, absolute_uri(getattr(args, name)))
    storage_options = parse_storage_options(args.storage_options)
    from maskrcnn.storage import join_uri

    # -- inputs, checked before any worker starts --------------------------------------------
    train_set = _check_dataset(args.annotations, args.images, storage_options, "")
    val_images = args.val_images or args.images
    if args.val_annotations:
        _check_dataset(args.val_annotations, val_images, storage_options, "val-")
    categories = train_set.categories
    keypoints = (train_set.keypoint_names, train_set.keypoint_skeleton) if train_set.num_keypoints else None
    model_config, weights_kind, reinit = _resolve_model(args, categories, storage_options, keypoints)
    if args.weights is None and model_config["backbone"]["norm"] == "frozen_bn":
        print(f"warning: training a {model_config['backbone']['name']} trunk with frozen BatchNorm from random weights; "
              "start from --weights (e.g. torchvision's COCO checkpoint) for useful results", file=sys.stderr)

    # -- the schedule ---------------------------------------------------------------------------
    per_epoch = steps_per_epoch(len(train_set), args.num_workers, args.batch_size)
    total_steps = args.max_steps or per_epoch * (args.epochs or 12)
    base_lr = args.lr or default_lr(args.batch_size * args.num_workers, model_config["backbone"]["norm"])
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup_steps(total_steps)
    plan = TrainPlan(
        annotations=args.annotations, images=args.images, output=args.output.rstrip("/"), model_config=model_config,
        categories=categories, total_steps=total_steps, steps_per_epoch=per_epoch, batch_size=args.batch_size,
        base_lr=base_lr, warmup_steps=warmup, warmup_factor=args.warmup_factor,
        lr_steps=resolve_lr_steps(args.lr_steps, total_steps), lr_gamma=args.lr_gamma, momentum=args.momentum,
        weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm or None, seed=args.seed, flip_prob=args.flip_prob, loader_workers=args.loader_workers,
        precision=args.precision, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        val_annotations=args.val_annotations, val_images=val_images if args.val_annotations else None,
        eval_batch_size=args.eval_batch_size, weights=args.weights, weights_kind=weights_kind, reinit_class_layers=reinit,
    )
    start = f"from {weights_kind} weights {args.weights}" + (" (class-specific layers re-initialised)" if reinit else "") if args.weights else "from scratch"
    print(
        f"[jobs.train] {len(train_set)} images, {len(categories)} categories; {args.num_workers} worker(s) x {args.batch_size} images; "
        f"{total_steps} steps ({per_epoch} per epoch); lr {base_lr:g} (warmup {warmup}, x{args.lr_gamma:g} at {plan.lr_steps}"
        f"{f', gradient norm clipped at {plan.clip_grad_norm:g}' if plan.clip_grad_norm else ''}); {start}",
        flush=True,
    )

    # -- Ray Train ----------------------------------------------------------------------------
    from jobs.common import init_ray

    # Workers print to their stdout as is (one copy, in order), and pycocotools' printout
    # stays inside evaluate_coco's redirect; Ray Train propagates this variable to them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray = init_ray(args.address)
    _check_cluster(ray, args)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = _ray_storage(plan.output, storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": asdict(plan), "storage_options": Hidden(storage_options)},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})}),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints),
            failure_config=FailureConfig(max_failures=args.max_failures),
            # Ray Train logs every report's metrics at INFO; the workers print their own lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    try:
        _fit(trainer)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (jobs.common.run_main)
        shutdown_ray()
        exc.args = (f"a rerun of the same command resumes from the last checkpoint in {plan.output}",)
        raise
    except Exception as exc:  # ray.train.TrainingFailedError: the workers' errors, retries spent
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1

    # -- the curves -----------------------------------------------------------------------------
    records = read_metrics(plan.output, storage_options)
    plot_uri = join_uri(plan.output, PLOT_FILE)
    if plot_metrics(records, plot_uri, storage_options):
        print(f"[jobs.train] wrote {plot_uri}")
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        keypoint_ap = f"  keypoint AP {evals[-1]['keypoints_AP']:.4f}" if "keypoints_AP" in evals[-1] else ""
        print(f"[jobs.train] final box AP {evals[-1]['bbox_AP']:.4f}  mask AP {evals[-1]['segm_AP']:.4f}{keypoint_ap}")
    print(f"[jobs.train] done in {time.perf_counter() - started:.0f} s: {join_uri(plan.output, MODEL_FILE)}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
