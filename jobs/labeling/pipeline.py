"""The labeling pipeline on Ray Data: wiring only. Each stage is one file:

1. ``plan.read_shard_uris``: a shard id -> its image rows (shard, index, image_uri), from the plan.
2. ``decode.decode_batch`` (CPU tasks): fetch, decode and size each image for the model.
3. ``predict.LabelActor`` (actor pool, ``num_gpus`` per actor): one model per actor, batched
   forwards; each mask leaves the device as a crop of its extent (CPU) or as COCO run lengths (GPU).
4. ``rows.rows_table`` (CPU tasks): crops or runs -> COCO RLE, boxes -> xywh, class -> category: the
   output schema.
5. ``shards.ShardSink``: pieces per shard, each shard committed once, atomically, when whole.

Typed columns (numpy/Arrow) pass between the stages, each file's docstring lists them. Actor
pools restart a killed actor and retry its tasks (Ray Data's defaults: ``max_restarts=-1``,
``max_task_retries=-1``), so a dead actor costs a reload, never a row. A lost node costs its work
in flight: its actors come back on the nodes left and its tasks are retried, as long as those
nodes can hold the whole pool and a decoding task; the ``ShardCommitter`` is kept on the driver's
node, which lives as long as the job (tests/test_cluster_local.py kills a node mid-run).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.common import configure_data_context, cpu_model_runtime_env, format_duration
from jobs.labeling.decode import decode_batch
from jobs.labeling.predict import LabelActor
from jobs.labeling.rows import rows_table
from jobs.labeling.plan import Plan, read_shard_uris
from jobs.labeling.shards import ShardCommitter, ShardSink
from maskrcnn.tta import decode_min_size, parse_tta

# Batches of images an actor takes at once, to form forwards of one padded size from.
SIZE_GROUPING_WINDOW = 4


@dataclass
class LabelSettings:
    """How jobs.label runs the pipeline; ``build_dataset`` hands each stage only its part."""

    output_uri: str
    storage_options: dict | None
    run_id: str  # names this run's pieces folder
    # the model: checkpoint, load_checkpoint's arch/categories/overrides, what the rows record
    checkpoint_uri: str
    load_kwargs: dict
    model_hash: str
    label_map: dict  # class index -> {"id", "name"}
    # decoding: the model's input size, the decompression-bomb limit, images per decode task
    min_size: int
    max_size: int
    max_pixels: int
    decode_batch_size: int
    # the actors: how many, their resources and torch threads on the CPU (0: its node's CPUs),
    # images per forward, batches each works on at once (threads, CUDA streams)
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int
    batch_size: int
    batches_in_flight: int = 1
    fast_path: bool = True  # maskrcnn.inference.Predictor's fast=
    precision: str = "auto"
    tta: str = ""  # maskrcnn.inference.Predictor's tta= (a maskrcnn.tta spec; "": none)


def expand_shards(batch: dict[str, np.ndarray], *, output_uri: str, storage_options: dict | None, plan: Plan) -> dict[str, np.ndarray]:
    """Shard ids -> the rows of their images."""
    shards, indices, uris = [], [], []
    for shard in batch["shard"].tolist():
        shard_uris = read_shard_uris(output_uri, int(shard), storage_options, plan)
        shards.extend([shard] * len(shard_uris))
        indices.extend(range(len(shard_uris)))
        uris.extend(shard_uris)
    return {
        "shard": np.asarray(shards, dtype=np.int32),
        "index": np.asarray(indices, dtype=np.int32),
        "image_uri": np.asarray(uris, dtype=object),
    }


def build_dataset(plan: Plan, pending_shards: list[int], settings: LabelSettings, committer=None) -> ray.data.Dataset:
    """The pending shards' images through the stages, ready to write; the model actors join the
    run of ``committer`` (a ShardCommitter) when one is given."""
    configure_data_context(ray.data.DataContext.get_current())
    ds = ray.data.from_items([{"shard": s} for s in pending_shards], override_num_blocks=max(1, min(len(pending_shards), 200)))
    where = {"output_uri": settings.output_uri, "storage_options": settings.storage_options, "plan": plan}
    ds = ds.map_batches(expand_shards, fn_kwargs=where, batch_size=1, batch_format="numpy")
    # Blocks of a few images, so decoding of one shard spreads over every CPU.
    ds = ds.repartition(target_num_rows_per_block=settings.decode_batch_size)
    # with TTA at a larger scale than the model's, large images are shrunk only to that scale's size
    min_size = decode_min_size(parse_tta(settings.tta), settings.min_size)
    sizes = {"min_size": min_size, "max_size": settings.max_size, "max_pixels": settings.max_pixels}
    decode_kwargs = {"storage_options": settings.storage_options, **sizes}
    ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_size=settings.decode_batch_size, batch_format="numpy")
    # An actor takes SIZE_GROUPING_WINDOW batches' images at once and runs them in forwards of at
    # most batch_size images of one padded size (Predictor.predict): an image is batched only with
    # its own size (its labels do not depend on its batch), and a wider window finds more of them.
    # Repartitioning also keeps Ray Data from fusing the decoding into the model's actors (a task
    # stage followed by an actor stage would otherwise run inside the actors).
    window = settings.batch_size * SIZE_GROUPING_WINDOW
    ds = ds.repartition(target_num_rows_per_block=window)
    # CPU actors keep the heap their images need (jobs.common.CPU_MALLOC_ENV) and run ahead of the
    # job's other workers (CPU_MODEL_NICENESS); GPU actors' host allocations are small
    runtime_env = cpu_model_runtime_env() if settings.gpus_per_actor == 0 else {}
    ds = ds.map_batches(
        LabelActor,
        fn_constructor_kwargs={
            "checkpoint_uri": settings.checkpoint_uri, "load_kwargs": settings.load_kwargs,
            "storage_options": settings.storage_options, "use_gpu": settings.gpus_per_actor > 0,
            "threads": settings.torch_threads, "fast": settings.fast_path, "precision": settings.precision,
            "max_batch": settings.batch_size, "tta": settings.tta, "run": committer,
        },
        batch_size=window,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=settings.num_actors,
            max_concurrent_calls_per_actor=settings.batches_in_flight,
            enable_true_multi_threading=settings.batches_in_flight > 1,
            max_tasks_in_flight_per_actor=max(4, 2 * settings.batches_in_flight),
        ),
        num_gpus=settings.gpus_per_actor,
        num_cpus=settings.cpus_per_actor,
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )
    row_kwargs = {"label_map": settings.label_map, "model_hash": settings.model_hash}
    ds = ds.map_batches(rows_table, fn_kwargs=row_kwargs, batch_size=settings.batch_size, batch_format="pyarrow")
    return ds


def run_pipeline(plan: Plan, pending_shards: list[int], settings: LabelSettings) -> dict:
    """Labels the pending shards; returns the committer's totals and the wall time."""
    # On the driver's node: on another, losing that node would lose the record of the shards in
    # flight and end the run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    committer = ShardCommitter.options(scheduling_strategy=here).remote(plan)
    stop = threading.Event()
    progress = None
    try:
        started = time.perf_counter()
        if not sys.stdout.isatty():
            args = (committer, plan, pending_shards, started, stop)
            progress = threading.Thread(target=_print_progress, args=args, name="label-progress", daemon=True)
            progress.start()
        sink = ShardSink(output_uri=settings.output_uri, storage_options=settings.storage_options, run_id=settings.run_id,
                         committer=committer, plan=plan)
        with _no_ray_data_tracebacks_on_the_console():
            build_dataset(plan, pending_shards, settings, committer).write_datasink(sink)
        totals = ray.get(committer.summary.remote())
        totals["seconds"] = time.perf_counter() - started
        stop.set()
        if progress is not None:
            progress.join(timeout=30)
    finally:
        stop.set()
        _end_run(committer)
    return totals


def _end_run(committer) -> None:
    """Stops the run's model actors, then its committer. Ray Data lets a pool's actors go by
    dropping its handles to them, and after a failed run (an output that refuses writes, Ctrl-C
    in a notebook) one was still held: the next run in the same process waited for ever for the
    CPUs (or GPUs) it kept."""
    with contextlib.suppress(Exception):
        for actor in ray.get(committer.end_run.remote(), timeout=60):
            ray.kill(actor)
    with contextlib.suppress(Exception):
        ray.kill(committer)


@contextlib.contextmanager
def _no_ray_data_tracebacks_on_the_console():
    """Ray Data logs a failed task's traceback to the console, at length, before the failure
    reaches this job, which says it in one line (jobs.label: an output that refuses the writes)
    or with its traceback (anything else); Ray Data's log file keeps them all."""
    import logging

    def console_filter(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith(("ray.data._internal.execution", "ray.data.exceptions")))

    # its console handlers: every stream handler but its log file's (the stream a console handler
    # holds may be one sys.stderr was before: a notebook's, a test's capture)
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in handlers:
        handler.addFilter(console_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(console_filter)


def _print_progress(committer, plan: Plan, pending_shards: list[int], started: float, stop: threading.Event) -> None:
    """For logs: a line per committed shard, e.g. ``shard 12/40 committed: 12000 of 40000
    images, 35.2 images/s, ETA 13m20s`` (the rate and ETA of this run's images)."""
    to_label = sum(plan.shard_length(s) for s in pending_shards)
    done_before = plan.num_images - to_label
    shards_before = plan.num_shards - len(pending_shards)
    reported = 0
    stopped = False
    while not stopped:
        stopped = stop.wait(1.0)  # after the last commit: one more look, for the shards of the last second
        try:
            summary = ray.get(committer.summary.remote(), timeout=30)
        except Exception:  # the run is ending
            return
        if summary["shards"] <= reported:
            continue
        reported = summary["shards"]
        rate = summary["images"] / max(time.perf_counter() - started, 1e-9)
        eta = format_duration((to_label - summary["images"]) / rate) if rate > 0 else "?"
        print(
            f"shard {shards_before + reported}/{plan.num_shards} committed: {done_before + summary['images']} of "
            f"{plan.num_images} images, {rate:.1f} images/s, ETA {eta}",
            flush=True,
        )
