"""COCO run-length encoding (RLE) of instance masks, on top of ``pycocotools.mask``.

N: masks, H x W: the image. Masks are binary ``[N, H, W]`` (bool or uint8); an RLE is the dict
pycocotools writes to JSON: ``{"size": [H, W], "counts": str}``. A COCO ``segmentation`` is one
of three forms, all read by :func:`annotation_to_mask`:

- polygons: ``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates (one object, several parts);
- compressed RLE: ``{"size": [H, W], "counts": "..."}`` (str, or bytes);
- uncompressed RLE: ``{"size": [H, W], "counts": [run, run, ...]}`` (column-major runs).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert

__all__ = [
    "encode_masks",
    "encode_crops",
    "decode_masks",
    "validate_segmentation",
    "annotation_to_rle",
    "annotation_to_mask",
    "mask_area",
    "mask_boxes",
]

RLE = dict  # {"size": [H, W], "counts": str}


def _as_numpy_masks(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu").numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    return masks


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[RLE]:
    """Binary masks ``[N, H, W]`` (nonzero = inside) -> N compressed RLEs with str counts."""
    masks = _as_numpy_masks(masks)
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran (column-major) order.
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False) != 0, dtype=np.uint8)
    rles = mask_utils.encode(fortran)
    return [_plain_rle(rle) for rle in rles]


def encode_crops(height: int, width: int, extents: np.ndarray, crops: Sequence[np.ndarray]) -> tuple[list[RLE], np.ndarray]:
    """Masks given as crops -> their compressed RLEs in the (height, width) image, and areas.

    ``extents`` (N, 4) are y0, x0, y1, x1 (exclusive) of each crop in the image; ``crops[i]`` is
    the binary (y1 - y0, x1 - x0) inside; everything outside is 0. The runs are computed from the
    crop alone (padded with a zero row above and below, its changes mapped to positions in the
    image's column-major order), so the work grows with the crop and its runs, not with the
    image: no full-size mask is ever made. Equal to ``encode_masks`` of the full masks.
    """
    uncompressed, areas = [], np.zeros(len(crops), dtype=np.int64)
    for i, ((y0, x0, y1, x1), crop) in enumerate(zip(np.asarray(extents).tolist(), crops)):
        h, w = y1 - y0, x1 - x0
        crop = np.asarray(crop).reshape(h, w) != 0
        if h <= 0 or w <= 0 or not crop.any():
            uncompressed.append({"size": [height, width], "counts": [height * width]})
            continue
        areas[i] = int(crop.sum())
        padded = np.zeros((h + 2, w), dtype=np.int8)
        padded[1:-1] = crop
        flat = padded.ravel(order="F")
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # index in ``flat`` of a run's first element
        column, row = np.divmod(change, h + 2)
        position = (x0 + column) * height + y0 + row - 1  # the same element in the image, column-major
        position = position[position < height * width]  # a run ending at the last pixel ends the image
        if h == height:  # full-height crop: a column ending on and the next starting on touch
            same = np.flatnonzero(position[1:] == position[:-1])
            position = np.delete(position, np.concatenate([same, same + 1]))
        counts = np.diff(np.concatenate([[0], position, [height * width]]))
        uncompressed.append({"size": [height, width], "counts": counts.tolist()})
    if not uncompressed:
        return [], areas
    return [_plain_rle(rle) for rle in mask_utils.frPyObjects(uncompressed, height, width)], areas


def _plain_rle(rle: dict) -> RLE:
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _compressed(rle: dict) -> dict:
    """An RLE pycocotools' C functions accept: bytes counts, or uncompressed counts converted."""
    counts = rle["counts"]
    height, width = (int(v) for v in rle["size"])
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [height, width], "counts": counts}


def decode_masks(rles: Sequence[dict], height: int | None = None, width: int | None = None) -> np.ndarray:
    """RLEs (compressed or uncompressed) -> uint8 masks ``[N, H, W]`` of 0 and 1.

    ``height`` and ``width`` give the shape of an empty result (``[0, H, W]``); when given with
    RLEs, each RLE's size must match them.
    """
    if len(rles) == 0:
        return np.zeros((0, height or 0, width or 0), dtype=np.uint8)
    compressed = [_compressed(rle) for rle in rles]
    for index, rle in enumerate(compressed):
        size = [int(v) for v in rle["size"]]
        if (height is not None and size[0] != height) or (width is not None and size[1] != width):
            raise ValueError(f"RLE {index} has size {size}, expected [{height}, {width}]")
    decoded = mask_utils.decode(compressed)  # (H, W, N)
    return np.ascontiguousarray(decoded.transpose(2, 0, 1))


def validate_segmentation(segmentation: Any, height: int, width: int) -> None:
    """Raise ``ValueError`` unless ``segmentation`` is one of COCO's three forms for an image of
    ``height`` x ``width``. Checks the structure only; rasterizes nothing (cheap)."""
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError("an RLE segmentation needs 'size' and 'counts'")
        size = segmentation["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise ValueError(f"RLE size must be [height, width], got {size!r}")
        if [int(size[0]), int(size[1])] != [int(height), int(width)]:
            raise ValueError(f"RLE size {list(size)} does not match the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if not isinstance(counts, (str, bytes, list)):
            raise ValueError(f"RLE counts must be a string or a list of runs, got {type(counts).__name__}")
        if isinstance(counts, list) and sum(int(c) for c in counts) != height * width:
            raise ValueError(f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, expected {height * width}")
        return
    if isinstance(segmentation, (list, tuple)):
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)) or not all(isinstance(v, (int, float)) for v in polygon):
                raise ValueError("a polygon must be a flat list of numbers [x1, y1, x2, y2, ...]")
            if len(polygon) % 2:
                raise ValueError(f"a polygon needs an even number of coordinates, got {len(polygon)}")
        return
    raise ValueError(f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}")


def annotation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, compressed or uncompressed RLE) -> one compressed RLE
    (bytes counts, as pycocotools' C functions take it).

    Polygons with fewer than 3 points enclose nothing and are skipped (pycocotools would read a
    4-number polygon as a box). Raises ``ValueError`` on anything else than the three forms.
    """
    validate_segmentation(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _compressed(segmentation)
    polygons = [list(polygon) for polygon in segmentation if len(polygon) >= 6]
    if not polygons:
        return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def annotation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, compressed or uncompressed RLE) -> uint8 mask ``[H, W]``."""
    return mask_utils.decode(annotation_to_rle(segmentation, height, width))


def mask_area(masks: torch.Tensor | np.ndarray | Sequence[dict]) -> np.ndarray:
    """Pixels inside each mask, int64 ``[N]``; ``masks`` is ``[N, H, W]`` or a list of RLEs."""
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        masks = _as_numpy_masks(masks)
        return (masks != 0).reshape(masks.shape[0], -1).sum(axis=1).astype(np.int64)
    if len(masks) == 0:
        return np.zeros(0, dtype=np.int64)
    return mask_utils.area([_compressed(rle) for rle in masks]).astype(np.int64)


def mask_boxes(masks: torch.Tensor | np.ndarray | Sequence[dict]) -> np.ndarray:
    """The tight box of each mask, float32 ``[N, 4]`` as x1, y1, x2, y2 on pixel edges.

    x2 = x1 + width as in COCO's xywh (a one-pixel mask at column 3 spans 3..4), unlike
    ``torchvision.ops.masks_to_boxes`` whose x2 is the last column's index. Empty masks give zeros.
    """
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        rles = [_compressed(rle) for rle in encode_masks(masks)]
    else:
        rles = [_compressed(rle) for rle in masks]
    if not rles:
        return np.zeros((0, 4), dtype=np.float32)
    xywh = torch.from_numpy(mask_utils.toBbox(rles).astype(np.float32))
    return box_convert(xywh, "xywh", "xyxy").numpy()
