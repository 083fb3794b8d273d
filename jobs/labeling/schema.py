"""The labeling output's Parquet schema (shared/DESIGN.md, "Labeling output"), defined once.

One row per input image. ``instances`` holds one struct per detection, best score first; a row
whose image could not be labelled has ``error`` set, ``instances`` empty, and ``width``/``height``
null when the image did not decode. ``mask`` and ``area`` are null when the model has no mask
head (e.g. Keypoint R-CNN), ``keypoints`` is null when it has no keypoint head.

D: detections of one image; H x W: the image as decoded (after EXIF orientation).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
KEYPOINTS_TYPE = pa.list_(pa.list_(pa.float32(), 3))
INSTANCE_TYPE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32(), 4)),  # COCO x, y, width, height in pixels
        ("area", pa.int64()),  # pixels in the mask
        ("mask", MASK_TYPE),  # COCO compressed RLE, counts as pycocotools writes them
        # Keypoint R-CNN: K triples x, y (image pixels), score (the heatmap's logit at the keypoint)
        ("keypoints", KEYPOINTS_TYPE),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
# While a shard is in flight its rows also carry where they belong; the committed file drops these.
PIECE_SCHEMA = OUTPUT_SCHEMA.append(pa.field("shard", pa.int32())).append(pa.field("index", pa.int32()))


def instances_array(
    counts: list[int],
    category_ids: np.ndarray,
    categories: list[str],
    scores: np.ndarray,
    boxes_xywh: np.ndarray,
    areas: np.ndarray,
    mask_sizes: np.ndarray | None,
    mask_counts: list[str] | None,
    keypoints: np.ndarray | None = None,
) -> pa.Array:
    """The ``instances`` column of R rows from their detections laid end to end.

    ``counts[r]`` detections belong to row r; the other arguments hold sum(counts) entries:
    ``boxes_xywh`` (sum, 4) float32, ``mask_sizes`` (sum, 2) int32 (height, width),
    ``keypoints`` (sum, K, 3) float32 x, y, score. ``areas``, ``mask_sizes`` and ``mask_counts``
    None: no masks (null ``area`` and ``mask``); ``keypoints`` None: null ``keypoints``.
    Built column-wise, no Python object per detection.
    """
    total = int(sum(counts))
    if mask_counts is None:
        mask = pa.nulls(total, MASK_TYPE)
        area = pa.nulls(total, pa.int64())
    else:
        mask_size = pa.ListArray.from_arrays(
            pa.array(np.arange(0, 2 * total + 1, 2, dtype=np.int32)), pa.array(np.asarray(mask_sizes, np.int32).reshape(-1))
        )
        mask = pa.StructArray.from_arrays([mask_size, pa.array(mask_counts, pa.string())], fields=list(MASK_TYPE))
        area = pa.array(np.asarray(areas, np.int64))
    if keypoints is None or total == 0:
        points = pa.nulls(total, KEYPOINTS_TYPE)
    else:
        keypoints = np.asarray(keypoints, np.float32).reshape(total, -1, 3)
        per_instance = keypoints.shape[1]
        triples = pa.FixedSizeListArray.from_arrays(pa.array(keypoints.reshape(-1)), 3)
        offsets = pa.array(np.arange(0, total * per_instance + 1, per_instance, dtype=np.int32))
        points = pa.ListArray.from_arrays(offsets, triples, type=KEYPOINTS_TYPE)
    bbox = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(boxes_xywh, np.float32).reshape(-1)), 4)
    values = pa.StructArray.from_arrays(
        [
            pa.array(np.asarray(category_ids, np.int32)),
            pa.array(categories, pa.string()),
            pa.array(np.asarray(scores, np.float32)),
            bbox,
            area,
            mask,
            points,
        ],
        fields=list(INSTANCE_TYPE),
    )
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(INSTANCE_TYPE))
