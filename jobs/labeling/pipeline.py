"""The labeling pipeline on Ray Data: shards -> image rows -> decode -> model -> masks -> Parquet.

Stages (R: rows of a batch; D: detections of one image; H x W its decoded size):

1. ``expand_shards``: a shard id -> its R image rows (shard, index, image_uri), read from the plan.
2. ``decode_batch`` (CPU tasks): fetch and decode each image, resize it for the model; a failure
   becomes the row's ``error``.
3. ``Predictor`` (actor pool, ``num_gpus`` per actor; without GPUs jobs.label's default is one
   actor per node whose torch threads use all the node's CPUs, ``LabelSettings.torch_threads``):
   loads the checkpoint once, runs one batched forward; each mask leaves the device cropped to its extent (D small
   bit-packed crops, not D full-image masks).
4. ``postprocess_batch`` (CPU tasks): crops -> COCO RLE (pycocotools), boxes -> xywh, class
   index -> category; the row in the output schema.
5. ``ShardSink`` (the writer): writes each block's rows as a piece per shard under
   ``_pieces/``, reports them to the ``ShardCommitter`` actor, and the task that completes a
   shard merges its pieces into ``part-<shard>.parquet`` (deduplicated by index, so a retried
   task's rows are never written twice), committed atomically.

Actor pools restart a killed actor and retry its tasks (Ray Data's defaults: ``max_restarts=-1``,
``max_task_retries=-1``), so a dead actor costs a reload, never a row. A lost node costs its work
in flight: its actors come back on the nodes left and its tasks are retried, as long as those
nodes can hold the whole pool and a decoding task; the ``ShardCommitter`` is kept on the driver's
node, which lives as long as the job (tests/test_cluster_local.py kills a node mid-run).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torchvision.ops import box_convert

from jobs.common import format_duration
from jobs.labeling.decode import prepare_image
from jobs.labeling.plan import PIECES_DIR, Plan, part_name, put_atomic, read_shard_uris, table_bytes
from jobs.labeling.schema import OUTPUT_SCHEMA, PIECE_SCHEMA, instances_array
from maskrcnn.data.images import ImageDecodeError, as_float
from maskrcnn.engine import autocast_context, autocast_dtype
from maskrcnn.masks import encode_crops
from maskrcnn.modeling.meta_arch import predict_by_size
from maskrcnn.modeling.optimize import optimize_for_inference
from maskrcnn.storage import filesystem

# Batches of images an actor takes at once, to form forwards of one padded size from.
SIZE_GROUPING_WINDOW = 4

# Committed part files: zstd and row groups of a few hundred rows keep readers' memory small.
PART_WRITE_OPTIONS = {"compression": "zstd", "row_group_size": 256}


@dataclass
class LabelSettings:
    """What the pipeline's stages need, as plain data (it travels to every task and actor)."""

    output_uri: str
    checkpoint_uri: str
    load_kwargs: dict  # arch, categories, overrides for load_checkpoint
    storage_options: dict | None
    model_hash: str
    label_map: dict  # class index -> {"id", "name"}
    min_size: int
    max_size: int
    max_pixels: int
    batch_size: int
    decode_batch_size: int
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    run_id: str
    # The model's fast path (maskrcnn.modeling.optimize: norms folded, channels_last) and the
    # autocast precision (engine.autocast_dtype: auto = bf16 on GPUs, fp32 on CPUs).
    fast_path: bool = True
    precision: str = "auto"
    # Batches an actor runs at once, each in its own thread and (on a GPU) CUDA stream.
    batches_in_flight: int = 1
    # An actor's torch threads on the CPU: None = int(cpus_per_actor); 0 = its node's CPUs (jobs.label's
    # default without GPUs: Ray's accounting then reserves less, so decoding fits in the gaps).
    torch_threads: int | None = None


# ---------------------------------------------------------------- 1. shards -> image rows


def expand_shards(batch: dict[str, np.ndarray], settings: LabelSettings) -> dict[str, np.ndarray]:
    shards, indices, uris = [], [], []
    for shard in batch["shard"].tolist():
        shard_uris = read_shard_uris(settings.output_uri, int(shard), settings.storage_options)
        shards.extend([shard] * len(shard_uris))
        indices.extend(range(len(shard_uris)))
        uris.extend(shard_uris)
    return {
        "shard": np.asarray(shards, dtype=np.int32),
        "index": np.asarray(indices, dtype=np.int32),
        "image_uri": np.asarray(uris, dtype=object),
    }


# ---------------------------------------------------------------- 2. decode (CPU tasks)


def _fetch(uris: list[str], storage_options: dict | None) -> list[bytes | Exception]:
    """The bytes of each URI, or the exception that reading it raised; concurrently on async
    filesystems (s3fs, gcsfs). Paths are never glob-expanded: ``img[1].png`` is a file name."""
    import asyncio

    from fsspec.asyn import sync

    results: list[bytes | Exception] = [b""] * len(uris)
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri, storage_options)
        group = groups.setdefault(id(fs), (fs, [], []))
        group[1].append(i)
        group[2].append(path)
    for fs, positions, paths in groups.values():
        if getattr(fs, "async_impl", False):

            async def gather(fs=fs, paths=paths):
                return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)

            fetched = sync(fs.loop, gather)
        else:
            fetched = [None] * len(paths)
        for position, path, data in zip(positions, paths, fetched):
            if data is None or isinstance(data, Exception) and not isinstance(data, _PERMANENT):
                data = _fetch_one(fs, path)  # local files, and retries of transient errors
            results[position] = data
    return results


# Errors that a retry cannot fix; anything else (a timeout, throttling) is retried before it
# becomes the row's error, since a row with an error is final.
_PERMANENT = (FileNotFoundError, IsADirectoryError, PermissionError)


def _fetch_one(fs, path: str, attempts: int = 4) -> bytes | Exception:
    for attempt in range(attempts):
        try:
            return fs.cat_file(path)
        except _PERMANENT as exc:
            return exc
        except Exception as exc:
            if attempt == attempts - 1:
                return exc
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "cannot read: file not found"
    if isinstance(exc, IsADirectoryError):
        return "cannot read: a folder, not a file"
    if isinstance(exc, PermissionError):
        return f"cannot read: permission denied ({exc})"
    return f"cannot read: {type(exc).__name__}: {exc}"


def decode_batch(batch: dict[str, np.ndarray], settings: LabelSettings) -> dict[str, np.ndarray]:
    """Rows -> rows with the image as it travels to the model (``decode.prepare_image``: the
    decoded uint8 image, or a float32 one already resized) as raw bytes with its dtype and
    shape, its decoded size, or the reason it failed."""
    uris = batch["image_uri"].tolist()
    fetched = _fetch(uris, settings.storage_options)
    count = len(uris)
    images: list[bytes] = [b""] * count
    shapes = np.zeros((count, 2), dtype=np.int32)
    sizes = np.full((count, 2), -1, dtype=np.int32)
    resized = np.zeros(count, dtype=bool)
    errors = [""] * count  # "" = no error: a column of None does not survive Arrow as strings
    for i, data in enumerate(fetched):
        if isinstance(data, Exception):
            errors[i] = _read_error(data)
            continue
        try:
            image, (height, width), resized[i] = prepare_image(data, settings.min_size, settings.max_size, settings.max_pixels)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        images[i] = image.contiguous().numpy().tobytes()
        shapes[i] = image.shape[-2:]
        sizes[i] = (height, width)
    return {
        "shard": batch["shard"],
        "index": batch["index"],
        "image_uri": batch["image_uri"],
        "height": sizes[:, 0],
        "width": sizes[:, 1],
        # the travelling image: (3, tensor_height, tensor_width), float32 if resized else uint8
        "tensor_height": shapes[:, 0],
        "tensor_width": shapes[:, 1],
        "resized": resized,
        "image": np.asarray(images, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


# ---------------------------------------------------------------- 3. the model (actor pool)


def crop_masks(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) bool masks -> (D, 4) int32 extents y0, x0, y1, x1 and the crops, bit-packed.

    Crops are cut on the masks' device, so only the pixels inside each mask's extent travel to
    the CPU. An empty mask has the extent (0, 0, 0, 0).
    """
    count, height, width = masks.shape
    if count == 0:
        return np.zeros((0, 4), dtype=np.int32), np.zeros(0, dtype=np.uint8)
    rows = masks.any(dim=2)  # (D, H)
    cols = masks.any(dim=1)  # (D, W)
    nonempty = rows.any(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = height - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = width - cols.flip(1).int().argmax(dim=1)
    extents = torch.stack([y0, x0, y1, x1], dim=1) * nonempty[:, None]
    extents_cpu = extents.to("cpu", torch.int32).numpy()
    crops = [masks[d, a:c, b:e].reshape(-1) for d, (a, b, c, e) in enumerate(extents_cpu.tolist())]
    flat = torch.cat(crops).to("cpu").numpy()
    return extents_cpu, np.packbits(flat)


def node_cpus() -> int:
    """The CPUs of this process's Ray node (Ray's count: a container's share, not the host's), or
    of this machine without Ray."""
    if ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here and node["Resources"].get("CPU", 0) >= 1:
                return int(node["Resources"]["CPU"])
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Predictor:
    """One model per actor: loads the checkpoint once from its URI, then labels batches."""

    def __init__(self, settings: LabelSettings):
        from maskrcnn.checkpoint import load_checkpoint

        self.device = torch.device("cuda" if settings.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            threads = settings.torch_threads
            if threads is None:
                threads = max(1, int(settings.cpus_per_actor))
            elif threads == 0:
                threads = node_cpus()
            torch.set_num_threads(threads)
        loaded = load_checkpoint(settings.checkpoint_uri, storage_options=settings.storage_options, **settings.load_kwargs)
        self.model = loaded.model.to(self.device).eval()
        self.batch_size = settings.batch_size
        self.label_map, self.model_hash = loaded.label_map, loaded.model_hash
        if settings.fast_path:
            optimize_for_inference(self.model)
        self.autocast_dtype = autocast_dtype(settings.precision, self.device)
        # one CUDA stream per calling thread (--batches-in-flight): a host sync in one batch
        # (NMS sizes, copying results back) then waits for its own work, not the other's
        self._local = threading.local()

    def _stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _forward(self, images: list[torch.Tensor], sizes: list[tuple[int, int]], resized: list[bool]) -> list[dict]:
        with torch.inference_mode(), self._stream():
            # uint8 images become float on the device, as maskrcnn.data.images.to_rgb_float does
            images = [as_float(img.to(self.device, non_blocking=True)) for img in images]
            with autocast_context(self.device, self.autocast_dtype):
                outputs = predict_by_size(self.model, images, max_batch=self.batch_size, resized=resized, original_sizes=sizes)
            return [self._pack(out) for out in outputs]  # on this thread's stream: it waits for its own work

    @staticmethod
    def _pack(out: dict[str, torch.Tensor]) -> bytes:
        packed = {
            "boxes": out["boxes"].to("cpu", torch.float32).numpy(),
            "scores": out["scores"].to("cpu", torch.float32).numpy(),
            "labels": out["labels"].to("cpu", torch.int64).numpy(),
            "extents": None,
            "crops": None,
            "keypoints": None,
        }
        if "masks" in out:  # a model without a mask head (Keypoint R-CNN) has none
            packed["extents"], packed["crops"] = crop_masks(out["masks"])
        if "keypoints" in out:  # (D, K, 3): x, y and the keypoint's score in place of torchvision's visibility 1
            keypoints = out["keypoints"].to(torch.float32).clone()
            keypoints[..., 2] = out["keypoints_scores"].to(torch.float32)
            packed["keypoints"] = keypoints.cpu().numpy()
        return pickle.dumps(packed, protocol=5)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"].copy()
        ok = [i for i, e in enumerate(errors.tolist()) if not e]
        detections = [b""] * len(errors)
        images, sizes, resized = [], [], []
        for i in ok:
            h, w = int(batch["tensor_height"][i]), int(batch["tensor_width"][i])
            pre_resized = bool(batch["resized"][i])
            dtype = np.float32 if pre_resized else np.uint8
            # frombuffer's array is read-only: torch needs its own copy
            images.append(torch.from_numpy(np.frombuffer(batch["image"][i], dtype=dtype).reshape(3, h, w).copy()))
            sizes.append((int(batch["height"][i]), int(batch["width"][i])))
            resized.append(pre_resized)
        if ok:
            try:
                packed = self._forward(images, sizes, resized)
            except Exception:  # one bad image (or out of memory) must not fail the batch: go one by one
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                packed = []
                for image, size, pre_resized in zip(images, sizes, resized):
                    try:
                        packed.extend(self._forward([image], [size], [pre_resized]))
                    except Exception as exc:
                        packed.append(f"model failed on this image: {type(exc).__name__}: {str(exc)[:300]}")
            for i, result in zip(ok, packed):
                if isinstance(result, str):
                    errors[i] = result
                else:
                    detections[i] = result
        return {
            "shard": batch["shard"],
            "index": batch["index"],
            "image_uri": batch["image_uri"],
            "height": batch["height"],
            "width": batch["width"],
            "error": errors,
            "detections": np.asarray(detections, dtype=object),
        }


# ---------------------------------------------------------------- 4. masks -> RLE (CPU tasks)


def _encode_crops(height: int, width: int, extents: np.ndarray, crops: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The bit-packed crops of one image -> their COCO RLE counts in the (H, W) image, and
    pixel counts, straight from the crops (``maskrcnn.masks.encode_crops``)."""
    bits = np.unpackbits(crops)
    sizes = [(y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in extents.tolist()]
    pieces = np.split(bits[: sum(sizes)], np.cumsum(sizes)[:-1]) if sizes else []
    rles, areas = encode_crops(height, width, extents, pieces)
    return [rle["counts"] for rle in rles], areas


def postprocess_batch(batch: dict[str, np.ndarray], settings: LabelSettings) -> pa.Table:
    """Model outputs -> rows of the output schema (plus shard and index)."""
    label_map = settings.label_map
    per_row, all_ids, all_names, all_scores, all_boxes, all_areas, all_sizes, all_counts = [], [], [], [], [], [], [], []
    all_keypoints: list[np.ndarray] = []
    has_masks = has_keypoints = None  # one model: all detections have them, or none
    errors = [e if e else None for e in batch["error"].tolist()]
    heights, widths = batch["height"].tolist(), batch["width"].tolist()
    for i, packed in enumerate(batch["detections"].tolist()):
        if not packed:
            per_row.append(0)
            continue
        det = pickle.loads(packed)
        count = len(det["scores"])
        xywh = box_convert(torch.from_numpy(det["boxes"].reshape(-1, 4)), "xyxy", "xywh").numpy().astype(np.float32, copy=False)
        has_masks = det.get("extents") is not None
        has_keypoints = det.get("keypoints") is not None
        if has_masks:
            counts, areas = _encode_crops(heights[i], widths[i], det["extents"], det["crops"])
            all_areas.append(areas)
            all_sizes.append(np.tile(np.asarray([[heights[i], widths[i]]], dtype=np.int32), (count, 1)))
            all_counts.extend(counts)
        if has_keypoints:
            all_keypoints.append(det["keypoints"])
        for label in det["labels"].tolist():
            category = label_map.get(label) or {"id": label, "name": f"class {label}"}
            all_ids.append(category["id"])
            all_names.append(category["name"])
        per_row.append(count)
        all_scores.append(det["scores"])
        all_boxes.append(xywh)
    masks_given = has_masks is not False  # no detection at all: the (empty) mask columns as before
    instances = instances_array(
        per_row,
        np.asarray(all_ids, dtype=np.int32),
        all_names,
        np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32),
        np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32),
        (np.concatenate(all_areas) if all_areas else np.zeros(0, np.int64)) if masks_given else None,
        (np.concatenate(all_sizes) if all_sizes else np.zeros((0, 2), np.int32)) if masks_given else None,
        all_counts if masks_given else None,
        np.concatenate(all_keypoints) if has_keypoints else None,
    )
    failed = [e is not None for e in errors]
    rows = len(errors)
    return pa.Table.from_arrays(
        [
            pa.array(batch["image_uri"].tolist(), pa.string()),
            pa.array(np.asarray(widths, dtype=np.int32), mask=np.asarray(failed) & (np.asarray(widths) < 0)),
            pa.array(np.asarray(heights, dtype=np.int32), mask=np.asarray(failed) & (np.asarray(heights) < 0)),
            instances,
            pa.array(errors, pa.string()),
            pa.array([settings.model_hash] * rows, pa.string()),
            pa.array(np.asarray(batch["shard"], dtype=np.int32)),
            pa.array(np.asarray(batch["index"], dtype=np.int32)),
        ],
        schema=PIECE_SCHEMA,
    )


# ---------------------------------------------------------------- 5. the writer


@ray.remote(num_cpus=0, max_restarts=0)
class ShardCommitter:
    """Knows which images of each in-flight shard have been written, and which shards are
    committed. State per in-flight shard: a bitmap of its images and its piece files."""

    def __init__(self, plan_num_images: int, shard_size: int):
        self.num_images = plan_num_images
        self.shard_size = shard_size
        self.seen: dict[int, np.ndarray] = {}
        self.pieces: dict[int, list[str]] = {}
        self.committed: set[int] = set()
        self.totals = {"images": 0, "detections": 0, "errors": 0, "shards": 0}

    def add_piece(self, shard: int, indices: np.ndarray, piece: str) -> list[str] | None:
        """Record a written piece; returns the shard's pieces when it is now complete (the
        caller then commits it), an empty list when it was committed already (the piece is
        redundant: a retried task's), else None."""
        if shard in self.committed:
            return []
        length = min(self.shard_size, self.num_images - shard * self.shard_size)
        seen = self.seen.setdefault(shard, np.zeros(length, dtype=bool))
        seen[indices] = True
        self.pieces.setdefault(shard, []).append(piece)
        return list(self.pieces[shard]) if seen.all() else None

    def commit(self, shard: int, images: int, detections: int, errors: int) -> None:
        if shard in self.committed:
            return
        self.committed.add(shard)
        self.seen.pop(shard, None)
        self.pieces.pop(shard, None)
        self.totals["images"] += images
        self.totals["detections"] += detections
        self.totals["errors"] += errors
        self.totals["shards"] += 1

    def summary(self) -> dict:
        return dict(self.totals, in_flight=len(self.seen))


class ShardSink(ray.data.Datasink):
    """Writes rows into per-shard pieces and commits each shard once all its images are in."""

    def __init__(self, settings: LabelSettings, committer, plan: Plan):
        self.settings = settings
        self.committer = committer
        self.shard_size = plan.shard_size
        self.num_images = plan.num_images

    def get_name(self) -> str:
        return "WriteShards"

    @property
    def min_rows_per_write(self) -> int:
        # About a shard per write task: fewer, larger pieces, and Ray Data's bookkeeping of
        # write tasks on the driver grows with shards, not with images.
        return self.shard_size

    def write(self, blocks: Iterable, ctx) -> None:
        fs, root = filesystem(self.settings.output_uri, self.settings.storage_options)
        root = root.rstrip("/")
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            for shard in pc.unique(table.column("shard")).to_pylist():
                rows = table.filter(pc.equal(table.column("shard"), shard))
                piece = f"{root}/{PIECES_DIR}/{self.settings.run_id}/{shard:06d}/{uuid.uuid4().hex}.parquet"
                put_atomic(fs, piece, table_bytes(rows.cast(PIECE_SCHEMA)))
                pieces = ray.get(self.committer.add_piece.remote(shard, rows.column("index").to_numpy(), piece))
                if pieces == []:
                    _remove(fs, [piece])
                elif pieces:
                    self._commit(fs, root, shard, pieces)

    def _commit(self, fs, root: str, shard: int, pieces: list[str]) -> None:
        final = f"{root}/{part_name(shard)}"
        try:
            tables = []
            for piece in pieces:
                with fs.open(piece, "rb") as f:
                    tables.append(pq.read_table(f))
        except FileNotFoundError:
            if fs.exists(final):  # another task committed it meanwhile (a retry raced us)
                return
            raise
        merged = pa.concat_tables(tables).cast(PIECE_SCHEMA)
        # Keep the first row of each index: a retried task may have written some rows twice.
        order = pc.sort_indices(merged, sort_keys=[("index", "ascending")])
        merged = merged.take(order)
        index = merged.column("index").to_numpy()
        keep = np.ones(len(index), dtype=bool)
        keep[1:] = index[1:] != index[:-1]
        merged = merged.filter(pa.array(keep))
        out = merged.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        expected = min(self.shard_size, self.num_images - shard * self.shard_size)
        if out.num_rows != expected:  # the committer said complete: this would be a bug, never commit it
            raise RuntimeError(f"shard {shard}: {out.num_rows} rows merged from {len(pieces)} pieces, expected {expected}")
        put_atomic(fs, final, table_bytes(out, **PART_WRITE_OPTIONS))
        detections = int(pc.sum(pc.list_value_length(out.column("instances"))).as_py() or 0)
        errors = int(pc.sum(pc.is_valid(out.column("error"))).as_py() or 0)
        ray.get(self.committer.commit.remote(shard, out.num_rows, detections, errors))
        _remove(fs, pieces)


def _remove(fs, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- the whole pipeline


def build_dataset(pending_shards: list[int], settings: LabelSettings) -> ray.data.Dataset:
    ctx = ray.data.DataContext.get_current()
    # Ray Data's bars on a terminal; in logs (not a terminal), run_pipeline's line per shard
    # instead of Ray Data's dump of every operator each 10 s.
    ctx.enable_progress_bars = sys.stdout.isatty()
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if ctx.enable_progress_bars else logging.ERROR)
    if not ctx.enable_progress_bars:  # "Starting execution of Dataset ...", the plan, "finished": the shard lines say it
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items([{"shard": s} for s in pending_shards], override_num_blocks=max(1, min(len(pending_shards), 200)))
    ds = ds.map_batches(expand_shards, fn_kwargs={"settings": settings}, batch_size=1, batch_format="numpy")
    # Blocks of a few images, so decoding of one shard spreads over every CPU.
    ds = ds.repartition(target_num_rows_per_block=settings.decode_batch_size)
    ds = ds.map_batches(decode_batch, fn_kwargs={"settings": settings}, batch_size=settings.decode_batch_size, batch_format="numpy")
    # An actor takes SIZE_GROUPING_WINDOW batches' images at once and runs them in forwards of at
    # most batch_size images of one padded size (predict_by_size): an image is batched only with
    # its own size (its labels do not depend on its batch), and a wider window finds more of them.
    # Repartitioning also keeps Ray Data from fusing the decoding into the model's actors (a task
    # stage followed by an actor stage would otherwise run inside the actors).
    window = settings.batch_size * SIZE_GROUPING_WINDOW
    ds = ds.repartition(target_num_rows_per_block=window)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"settings": settings},
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
    )
    ds = ds.map_batches(postprocess_batch, fn_kwargs={"settings": settings}, batch_size=settings.batch_size, batch_format="numpy")
    return ds


def run_pipeline(plan: Plan, pending_shards: list[int], settings: LabelSettings) -> dict:
    """Labels the pending shards; returns the committer's totals and the wall time."""
    # On the driver's node: on another, losing that node would lose the record of the shards in
    # flight and end the run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    committer = ShardCommitter.options(scheduling_strategy=here).remote(plan.num_images, plan.shard_size)
    stop = threading.Event()
    progress = None
    try:
        started = time.perf_counter()
        if not sys.stdout.isatty():
            args = (committer, plan, pending_shards, started, stop)
            progress = threading.Thread(target=_print_progress, args=args, name="label-progress", daemon=True)
            progress.start()
        build_dataset(pending_shards, settings).write_datasink(ShardSink(settings, committer, plan))
        totals = ray.get(committer.summary.remote())
        totals["seconds"] = time.perf_counter() - started
        stop.set()
        if progress is not None:
            progress.join(timeout=30)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            ray.kill(committer)
    return totals


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
