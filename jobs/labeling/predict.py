"""Stage 2, the model actors: prepared images -> each image's detections, with their masks as
box-local crops (on a CPU) or COCO run lengths (on a GPU), as typed columns. One
``maskrcnn.inference.Predictor`` per actor, loaded once.

Columns out (R rows; D detections of a row, K keypoints): ``shard``, ``index``, ``image_uri``,
``height``, ``width`` as they came; ``error`` (string, null when none); ``boxes`` (list of 4D
float32: x1, y1, x2, y2 in the image), ``scores`` (D float32), ``labels`` (D int32 class
indices); ``mask_extents`` (4D int32: y0, x0, y1, x1), null without a mask head; the masks in
one of two forms, the other null: ``mask_bits`` (binary, the crops bit-packed end to end), or
``mask_runs`` (int32, each mask's run lengths in the image, ``maskrcnn.masks.crop_runs``) with
``mask_run_lengths`` (D int32, how many runs each mask has); ``keypoints`` (3KD float32: x, y,
score), null without a keypoint head.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs.labeling.decode import prepared_images
from maskrcnn.inference import Detections, Predictor

DETECTION_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("index", pa.int32()),
        ("image_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("error", pa.string()),
        ("boxes", pa.list_(pa.float32())),
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int32())),
        ("mask_extents", pa.list_(pa.int32())),
        ("mask_bits", pa.binary()),
        ("mask_runs", pa.list_(pa.int32())),
        ("mask_run_lengths", pa.list_(pa.int32())),
        ("keypoints", pa.list_(pa.float32())),
    ]
)


def node_cpus() -> int:
    """The CPUs of this process's Ray node (Ray's count: a container's share, not the host's), or
    of this machine without Ray."""
    if ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here and node["Resources"].get("CPU", 0) >= 1:
                return int(node["Resources"]["CPU"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LabelActor:
    """Loads the checkpoint once (``load_kwargs``: ``arch``, ``categories``, ``overrides`` of
    ``load_checkpoint``), then labels batches. ``use_gpu``: on this actor's GPU; else on the CPU
    with ``threads`` torch threads (0: as many as its node has CPUs). ``fast``, ``precision``,
    ``max_batch``, ``tta`` (a ``maskrcnn.tta`` spec, "" for none): ``maskrcnn.inference.Predictor``'s.
    ``run``: jobs.label's ShardCommitter, which the actor tells that it started (the run stops
    its actors when it ends); an actor that starts after its run ended stops at once."""

    def __init__(self, *, checkpoint_uri: str, load_kwargs: dict, storage_options: dict | None, use_gpu: bool,
                 threads: int = 1, fast: bool = True, precision: str = "auto", max_batch: int | None = None, tta: str = "",
                 run=None):
        if run is not None and not ray.get(run.join_run.remote(ray.get_runtime_context().current_actor)):
            raise RuntimeError("the labeling run this model actor was started for has ended")
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Built on one torch thread: Ray runs an actor's constructor and its batches on different
        # threads, and OpenMP gives each thread that runs a parallel region a team of its own. A
        # team started here stays beside the batches' one, and libgomp, counting more of its
        # threads than CPUs, then puts waiting threads to sleep at every barrier instead of
        # spinning (the model's threads slept ~350 times a second each; with OMP_WAIT_POLICY=active
        # the idle team spun a core away: 64 s instead of 39 for 30 images). Only the thread that
        # runs the batches starts a team, with the actor's thread count (on a GPU: as before).
        threads = (threads or node_cpus()) if device.type == "cpu" else torch.get_num_threads()
        torch.set_num_threads(1)
        self.predictor = Predictor.from_checkpoint(
            checkpoint_uri, storage_options=storage_options, **load_kwargs,
            device=device, fast=fast, precision=precision, max_batch=max_batch, tta=tta,
        )
        torch.set_num_threads(threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [e or None for e in batch["error"].tolist()]
        ok = [i for i, e in enumerate(errors) if e is None]
        detections: list[Detections | None] = [None] * len(errors)
        images = prepared_images(batch, ok)
        try:
            found = self.predictor.predict(images)
        except Exception:  # one bad image (or out of memory) must not fail the batch: go one by one
            found = []
            for image in images:
                try:
                    found.extend(self.predictor.predict([image]))
                except Exception as exc:
                    found.append(f"model failed on this image: {type(exc).__name__}: {str(exc)[:300]}")
        for i, result in zip(ok, found):
            if isinstance(result, str):
                errors[i] = result
            else:
                detections[i] = result
        return detection_table(batch, errors, detections)


def detection_table(batch: dict[str, np.ndarray], errors: list[str | None], detections: list[Detections | None]) -> pa.Table:
    """Rows of ``DETECTION_SCHEMA`` (a row without detections: empty lists and masks)."""
    def lists(values: list[np.ndarray | None], dtype) -> pa.Array:
        return pa.array([None if v is None else np.asarray(v, dtype).reshape(-1) for v in values], pa.list_(pa.from_numpy_dtype(dtype)))

    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    dets = [d if d is not None else empty for d in detections]
    has_masks = any(d.mask_extents is not None for d in detections if d is not None)
    has_runs = any(d.mask_runs is not None for d in detections if d is not None)
    has_bits = has_masks and not has_runs

    def masks(values: list[np.ndarray | None], has: bool, dtype) -> pa.Array:  # null without a mask head
        return lists([(v if v is not None else np.zeros(0, dtype)) if has else None for v in values], dtype)
    columns = {
        "shard": pa.array(np.asarray(batch["shard"], np.int32)),
        "index": pa.array(np.asarray(batch["index"], np.int32)),
        "image_uri": pa.array(batch["image_uri"].tolist(), pa.string()),
        "height": pa.array(np.asarray(batch["height"], np.int32)),
        "width": pa.array(np.asarray(batch["width"], np.int32)),
        "error": pa.array(errors, pa.string()),
        "boxes": lists([d.boxes for d in dets], np.float32),
        "scores": lists([d.scores for d in dets], np.float32),
        "labels": lists([d.labels for d in dets], np.int32),
        "mask_extents": masks([d.mask_extents for d in dets], has_masks, np.int32),
        "mask_bits": pa.array([(d.mask_bits.tobytes() if d.mask_bits is not None else b"") if has_bits else None for d in dets],
                              pa.binary()),
        "mask_runs": masks([d.mask_runs for d in dets], has_runs, np.int32),
        "mask_run_lengths": masks([d.mask_run_lengths for d in dets], has_runs, np.int32),
        "keypoints": lists([d.keypoints for d in dets], np.float32),
    }
    return pa.Table.from_pydict(columns, schema=DETECTION_SCHEMA)
