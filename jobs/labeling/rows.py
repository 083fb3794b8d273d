"""Stage 3, in CPU tasks: detections -> rows of the labeling output, whose Parquet schema
(shared/DESIGN.md, "Labeling output") is defined here, once.

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


def rows_table(table: pa.Table, *, label_map: dict[int, dict], model_hash: str) -> pa.Table:
    """Detections (``predict.DETECTION_SCHEMA``) -> rows of ``PIECE_SCHEMA``: boxes as COCO xywh,
    class indices as categories (``label_map``: class index -> {"id", "name"}; an index it lacks
    is "class K", id K), masks (crops or runs) as COCO RLE in the image (``Detections.mask_rles``)."""
    from maskrcnn.inference import Detections  # torch: imported where rows are made, not by readers of the schema

    per_row = list_lengths(table.column("scores"))
    total = int(per_row.sum())
    boxes = flat(table.column("boxes"), np.float32).reshape(total, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    labels = flat(table.column("labels"), np.int64)
    categories = {int(k): label_map.get(int(k)) or {"id": int(k), "name": f"class {int(k)}"} for k in np.unique(labels)}
    has_masks = table.column("mask_extents").null_count < table.num_rows or total == 0
    areas, counts = np.zeros(0, np.int64), []
    if has_masks and total:
        heights, widths = table.column("height").to_pylist(), table.column("width").to_pylist()
        extents = flat(table.column("mask_extents"), np.int32).reshape(total, 4)
        scores, starts, area_parts = flat(table.column("scores"), np.float32), np.cumsum(per_row) - per_row, []
        has_runs = table.column("mask_runs").null_count < table.num_rows
        if has_runs:
            runs, run_lengths = flat(table.column("mask_runs"), np.int64), flat(table.column("mask_run_lengths"), np.int64)
            run_ends = np.cumsum(list_lengths(table.column("mask_runs")))
        else:
            bits = table.column("mask_bits").to_pylist()
        for r in np.flatnonzero(per_row).tolist():
            rows = slice(starts[r], starts[r] + per_row[r])
            det = Detections(boxes[rows], scores[rows], labels[rows], extents[rows], image_size=(heights[r], widths[r]))
            if has_runs:
                det.mask_runs, det.mask_run_lengths = runs[run_ends[r - 1] if r else 0: run_ends[r]], run_lengths[rows]
            else:
                det.mask_bits = np.frombuffer(bits[r], np.uint8)
            rles, row_areas = det.mask_rles()
            counts.extend(rle["counts"] for rle in rles)
            area_parts.append(row_areas)
        areas = np.concatenate(area_parts)
    keypoints = None
    if table.column("keypoints").null_count < table.num_rows and total:
        keypoints = flat(table.column("keypoints"), np.float32).reshape(total, -1, 3)
    sizes = np.repeat(np.stack([table.column("height").to_numpy(), table.column("width").to_numpy()], axis=1), per_row, axis=0)
    instances = instances_array(
        per_row.tolist(),
        np.asarray([categories[k]["id"] for k in labels.tolist()], np.int32),
        [categories[k]["name"] for k in labels.tolist()],
        flat(table.column("scores"), np.float32),
        xywh,
        areas if has_masks else None,
        sizes if has_masks else None,
        counts if has_masks else None,
        keypoints,
    )
    failed = table.column("height").to_numpy() < 0  # did not decode: null width and height
    return pa.Table.from_arrays(
        [
            table.column("image_uri"),
            pa.array(table.column("width").to_numpy(), pa.int32(), mask=failed),
            pa.array(table.column("height").to_numpy(), pa.int32(), mask=failed),
            instances,
            table.column("error"),
            pa.array([model_hash] * table.num_rows, pa.string()),
            table.column("shard"),
            table.column("index"),
        ],
        schema=PIECE_SCHEMA,
    )


def list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Each row's list length (0 for a null list)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64, copy=False)


def flat(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """The values of a list column laid end to end."""
    import pyarrow.compute as pc

    values = pc.list_flatten(column)
    return np.array(values.to_numpy(zero_copy_only=False) if len(values) else np.zeros(0), dtype)  # a writable copy
