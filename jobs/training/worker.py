"""The training loop every Ray Train worker of ``jobs.train`` runs, as named steps: resume or
start (``jobs.training.resume``), one training step, log, evaluate, save (a Ray Train
checkpoint, and at the end ``model.pt``). Everything here is module-level, so that Ray can
ship ``train_loop_per_worker`` to the workers by reference."""

from __future__ import annotations

import logging
import os
import tempfile
import time

from jobs.mistakes import writing_output
from jobs.training.metrics import Pace, ap_text, log, step_text
from jobs.training.resume import WorkerRun, resume_or_start
from jobs.training.spec import CHECKPOINT_FILE, DEFAULT_LOADER_WORKERS, MODEL_FILE, TrainPlan
from jobs.training.upload import checkpoint_upload


def shard_indices(num_items: int, world_size: int, rank: int, epoch: int, seed: int) -> list[int]:
    """This rank's dataset indices for ``epoch``: one seeded shuffle per epoch, padded to a
    multiple of ``world_size`` and dealt out by rank (``DistributedSampler``'s split), so every
    rank has the same number of items and the ranks' shards do not overlap."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def shard_batches(num_items: int, world_size: int, rank: int, epoch: int, seed: int, batch_size: int,
                  landscape: list[bool] | None = None) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch``: its shard (``shard_indices``) cut
    into ``batch_size``-image batches in order, or, given ``landscape`` (per dataset index,
    ``maskrcnn.data.landscape_images``), with landscape and other images in separate batches
    (``maskrcnn.data.group_by_orientation``). Either way ``ceil(shard / batch_size)`` batches,
    a function of these arguments alone: a resumed run recomputes them and skips those done."""
    from maskrcnn.data import group_by_orientation

    indices = shard_indices(num_items, world_size, rank, epoch, seed)
    if landscape is not None:
        return group_by_orientation(indices, landscape, batch_size)
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


def targets_to(targets: list[dict], device) -> list[dict]:
    """``targets`` (one dict per image) with their tensors moved to ``device``, without waiting."""
    return [{k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in t.items()} for t in targets]


# --------------------------------------------------------------------------------------------
# The loop

RESUMES_ONCE_WRITABLE = "; the same command resumes from the last checkpoint once it takes files"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's loop on each worker. ``config``: ``plan``, a ``TrainPlan`` as a dict, and
    ``storage_options``, a ``Hidden`` dict or None. Trains from the latest checkpoint (or the
    start) to ``plan.total_steps``; rank 0 then writes ``model.pt``."""
    from jobs.mistakes import OutputRefused, mistake_in, publish_mistake, refused_write
    from jobs.retries import report_s3_retries

    # Ray Train sends the worker's root logger to the console at INFO; the job prints its own
    # lines, and libraries' INFO (aiobotocore's "Found credentials in environment variables."
    # at each new S3 client) is no news to a user.
    logging.getLogger().setLevel(logging.WARNING)
    try:
        _train(config)
    except Exception as exc:
        message = mistake_in(exc)
        # --output refused a checkpoint, model.pt or the run's record (a full disk, a quota, a
        # permission withdrawn): a restart would train up to the next checkpoint to meet it again
        if message is None and isinstance(exc, OutputRefused):
            message = f"{exc}{RESUMES_ONCE_WRITABLE}"
        elif message is None and (refused := refused_write(exc)) is not None:  # a full disk elsewhere
            where = f"cannot write {refused.filename}" if refused.filename else "a write failed"
            message = f"{where}: {os.strerror(refused.errno)}; the same command resumes from the last checkpoint once it has room"
        if message is not None and config.get("mistake_key"):
            publish_mistake(config["mistake_key"], message)
            # the driver prints the one line; Ray Train would log the traceback beside it
            logging.getLogger("ray.train.v2._internal.util").disabled = True
        raise
    finally:  # the retries of this worker's DataLoader processes, counted in memory they share with it
        report_s3_retries()


def _train(config: dict) -> None:
    run = resume_or_start(TrainPlan(**config["plan"]), config["storage_options"].value)
    plan = run.plan
    run.model.train()
    pace = Pace(run.start_step)
    while run.step < plan.total_steps:
        for images, targets in remaining_batches(run):
            losses, lr = train_one_step(run, images, targets)
            eval_due = run.step % plan.eval_every == 0  # --eval-every, or epoch ends (jobs.training.spec.eval_interval)
            last = run.step >= plan.total_steps
            checkpoint_due = eval_due or last or (plan.checkpoint_every and run.step % plan.checkpoint_every == 0)
            log_due = run.step % plan.log_every == 0 or checkpoint_due or run.step == run.start_step + 1
            # The loss is read back only at log steps (every checkpoint is one): between them
            # the host queues steps without waiting for the device. A diverged rank poisons
            # every rank through the gradient all-reduce, so all of them stop at the check.
            if not log_due and run.step % 20:
                continue
            check_finite(run, losses)
            if not log_due:
                continue
            report = log_step(run, losses, lr, len(images), pace)
            if (eval_due or last) and run.val_dataset is not None:
                report.update(evaluate(run))
                pace.resume()
            # Only checkpoints are reported to Ray Train: its controller takes one report per
            # worker per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and a worker's next report
            # waits for it, so reporting every log step held fast steps to that poll (at the
            # default 2 s and --log-every 20, 10 steps a second at most).
            if checkpoint_due:
                save(run, report)
                pace.resume()
            if last:
                break
    if run.rank == 0:
        save_model(run)


# --------------------------------------------------------------------------------------------
# Step, log, evaluate, save


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s random transforms in ``epoch`` of a run seeded ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def load_batch(dataset, indices: list[int], seed: int, epoch: int) -> tuple[list, list[dict]]:
    """``dataset``'s images ``indices``, collated (images, targets). Each image's random
    transforms (the flip) draw from torch's generator seeded with ``item_seed(seed, epoch,
    index)``, restored after, so a batch is the same in any process: with any --loader-workers,
    either --ingest, and when a run resumes."""
    import torch

    from maskrcnn.data import collate_fn

    items = []
    for index in indices:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(seed, epoch, index))
            items.append(dataset[index])
    return collate_fn(items)


class RemainingBatches:
    """The batches one rank trains from step ``start`` to the plan's last step, in order: item k
    is the step ``start + k``'s batch, its epoch's ``shard_batches`` (grouped by orientation
    unless --no-aspect-grouping) read by ``load_batch``. A sequence a DataLoader (batch size
    None) and the Ray Data actors (``BatchLoader``) read alike."""

    def __init__(self, dataset, plan, world_size: int, rank: int, start: int) -> None:
        from maskrcnn.data import landscape_images

        self.dataset, self.plan, self.world_size, self.rank, self.start = dataset, plan, world_size, rank, start
        self.landscape = landscape_images(dataset) if plan.aspect_grouping else None
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return max(self.plan.total_steps - self.start, 0)

    def indices(self, k: int) -> tuple[int, list[int]]:
        """The epoch and the dataset indices of item ``k``."""
        epoch, position = divmod(self.start + k, self.plan.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            plan = self.plan
            self._epoch = (epoch, shard_batches(len(self.dataset), self.world_size, self.rank, epoch, plan.seed, plan.batch_size,
                                                self.landscape))
        return epoch, self._epoch[1][position]

    def __getitem__(self, k: int) -> tuple[list, list[dict]]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        epoch, indices = self.indices(k)
        return load_batch(self.dataset, indices, self.plan.seed, epoch)


def remaining_batches(run: WorkerRun):
    """This rank's batches from ``run.step`` to the end of the run (``RemainingBatches``): read
    by --loader-workers DataLoader processes on this node, or with --ingest ray-data by as many
    Ray Data actors anywhere in the cluster (``ray_data_batches``)."""
    import torch

    plan = run.plan
    if plan.ingest == "ray-data":
        return ray_data_batches(run)
    batches = RemainingBatches(run.dataset, plan, run.world_size, run.rank, run.step)
    # its own generator: the worker processes' seeds drawn from it leave the step's (the samplers')
    # random numbers as they are with --loader-workers 0 or --ingest ray-data
    return torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=dataloader_processes(plan), collate_fn=_as_is, pin_memory=run.device.type == "cuda",
        generator=torch.Generator(),
    )


def dataloader_processes(plan: TrainPlan) -> int:
    """--loader-workers; by default DEFAULT_LOADER_WORKERS, at most the CPUs this process may run
    on (where torch's DataLoader would warn that more may run slow or freeze)."""
    if plan.loader_workers is not None:
        return plan.loader_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(DEFAULT_LOADER_WORKERS, cpus)


def _as_is(item):
    return item


class BatchLoader:
    """A Ray Data actor of --ingest ray-data: reads the training dataset once, then turns a
    step's row (``id``: the item of ``RemainingBatches``) into its batch, pickled."""

    def __init__(self, plan, storage_options, world_size: int, rank: int, start: int) -> None:
        from jobs.training.resume import training_dataset

        dataset = training_dataset(plan, storage_options.value)
        self.batches = RemainingBatches(dataset, plan, world_size, rank, start)

    def __call__(self, row: dict) -> dict:
        import pickle

        return {"id": row["id"], "batch": pickle.dumps(self.batches[int(row["id"])], protocol=pickle.HIGHEST_PROTOCOL)}


MAX_BLOCKS = 10_000  # a rank's Ray Data pipeline reads one step per block, or several where a run has more steps


def ray_data_batches(run: WorkerRun):
    """The batches ``RemainingBatches`` gives from ``run.step`` to the run's end, loaded by
    --loader-workers ``BatchLoader`` actors of 1 CPU each, placed by Ray wherever CPUs are free,
    and yielded in order (the streaming executor runs ahead within its memory budget)."""
    import pickle

    import ray.data

    from jobs.common import configure_data_context
    from jobs.training.spec import Hidden

    context = ray.data.DataContext.get_current()
    configure_data_context(context)
    context.execution_options.preserve_order = True
    count = max(run.plan.total_steps - run.step, 0)  # len(RemainingBatches), without reading the dataset here
    rows = ray.data.range(count, override_num_blocks=max(1, min(count, MAX_BLOCKS))).map(
        BatchLoader, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=run.plan.loader_workers),
        fn_constructor_kwargs={"plan": run.plan, "storage_options": Hidden(run.storage_options), "world_size": run.world_size,
                               "rank": run.rank, "start": run.step},
    )
    for expected, row in enumerate(rows.iter_rows()):
        if row["id"] != expected:  # preserve_order keeps them in order; the step's batch must be the step's
            raise RuntimeError(f"Ray Data gave batch {row['id']} where batch {expected} was due")
        yield pickle.loads(row["batch"])


def train_one_step(run: WorkerRun, images: list, targets: list[dict]) -> tuple[dict, float]:
    """One optimizer step on a batch (``images`` and their ``targets``, on the host); advances
    ``run.step``. Returns the loss terms (on the device, unread) and the lr the step used."""
    from maskrcnn.engine import train_step

    images = [image.to(run.device, non_blocking=True) for image in images]
    targets = targets_to(targets, run.device)
    lr = run.optimizer.param_groups[0]["lr"]
    losses = train_step(run.model, run.optimizer, images, targets, scheduler=run.scheduler, autocast_dtype=run.autocast_dtype,
                        scaler=run.scaler, clip_grad_norm=run.plan.clip_grad_norm)
    run.step += 1
    return losses, lr


def check_finite(run: WorkerRun, losses: dict) -> None:
    """Raises FloatingPointError, with what to change, when the step's total loss (``losses["loss"]``) is not finite."""
    import torch

    if not bool(torch.isfinite(losses["loss"])):
        raise FloatingPointError(
            f"the loss is {float(losses['loss'])} at step {run.step} (rank {run.rank}); lower --lr, lengthen --warmup-steps"
            + (" or clip gradients (--clip-grad-norm)" if run.plan.clip_grad_norm is None else "")
        )


def log_step(run: WorkerRun, losses: dict, lr: float, batch_images: int, pace: Pace) -> dict:
    """The record of the step just trained: ``losses`` (this rank's loss terms) averaged over
    the ranks, ``lr``, and images/s from ``batch_images`` (this rank's batch) and ``pace``.
    Rank 0 records and prints it. Returns it as reported to Ray Train (without the time)."""
    import torch

    plan, step = run.plan, run.step
    # Mean loss terms over the ranks, and the images all ranks took in this stretch.
    keys = [k for k in losses if k != "loss"]  # the model's loss terms, in its order: the same on every rank
    values = torch.stack([losses[k].float() for k in keys] + [torch.tensor(float(batch_images), device=run.device)])
    if run.world_size > 1:
        torch.distributed.all_reduce(values)
    values = values.cpu()
    loss_terms = {k: float(values[i]) / run.world_size for i, k in enumerate(keys)}
    record = {
        "step": step,
        "epoch": step / plan.steps_per_epoch,
        "loss": sum(loss_terms.values()),
        **loss_terms,
        "lr": lr,
        # images per step (all ranks, this step's count) x steps since the last record / seconds
        "images_per_s": pace.lap(step, float(values[-1])),
        "time": time.time(),
    }
    if run.metrics_log is not None:
        run.metrics_log.add(record)
        log(step_text(record, plan.total_steps, pace.eta(step, plan.total_steps)))
    return {k: v for k, v in record.items() if k != "time"}


def evaluate(run: WorkerRun) -> dict:
    """Rank 0: COCO AP of the model on ``run.val_dataset`` at this step, recorded and printed.
    Returns the summary metrics (without the per-threshold stats) to report."""
    from maskrcnn.evaluation import evaluate_model

    plan, step = run.plan, run.step
    epoch = int(step // plan.steps_per_epoch)
    started = time.perf_counter()
    loaders = min(dataloader_processes(plan), 2)
    result = evaluate_model(run.bare_model, run.val_dataset, plan.eval_batch_size, run.device, loader_workers=loaders)
    summary = {k: v for k, v in result.items() if not k.endswith("_stats")}
    run.metrics_log.add({"event": "eval", "step": step, "epoch": epoch, **result, "seconds": round(time.perf_counter() - started, 2)})
    run.metrics_log.flush()
    log(f"eval at step {step} (epoch {epoch}): {ap_text(result)}  ({time.perf_counter() - started:.1f} s)")
    return summary


def save(run: WorkerRun, metrics: dict) -> None:
    """Reports ``metrics`` to Ray Train with a checkpoint of the run at this step. Every rank
    reports (it is a barrier); rank 0 alone writes and attaches the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    from maskrcnn.checkpoint import save_checkpoint

    if run.rank != 0:
        ray.train.report(metrics)
        return
    run.metrics_log.flush()
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(os.path.join(folder, CHECKPOINT_FILE), run.bare_model, run.model_config, run.plan.categories, training_state={
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "step": run.step,
        })
        with writing_output(run.plan.output):  # the checkpoint goes up to --output here
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), **checkpoint_upload())
    log(f"checkpoint at step {run.step}")


def save_model(run: WorkerRun) -> None:
    """Rank 0, at the end: the trained model as ``<output>/model.pt``, and the run's last record."""
    from maskrcnn.checkpoint import save_checkpoint
    from maskrcnn.storage import join_uri

    uri = join_uri(run.plan.output, MODEL_FILE)
    with writing_output(run.plan.output):
        save_checkpoint(uri, run.bare_model, run.model_config, run.plan.categories, run.storage_options)
    run.metrics_log.add({"event": "end", "step": run.step, "model": uri, "time": time.time()})
    run.metrics_log.flush()
    log(f"wrote {uri}")
