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
    "compress_runs",
    "crop_runs",
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
    runs = []
    for (y0, x0, y1, x1), crop in zip(np.asarray(extents).tolist(), crops):
        h, w = y1 - y0, x1 - x0
        crop = np.asarray(crop).reshape(h, w) != 0
        if h <= 0 or w <= 0 or not crop.any():
            runs.append(np.array([height * width]))
            continue
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
        runs.append(np.diff(np.concatenate([[0], position, [height * width]])))
    lengths = np.array([len(r) for r in runs], dtype=np.int64)
    return compress_runs(height, width, np.concatenate(runs) if runs else np.zeros(0, np.int64), lengths)


def compress_runs(height: int, width: int, runs: np.ndarray, lengths: np.ndarray) -> tuple[list[RLE], np.ndarray]:
    """Masks of a (height, width) image as uncompressed RLEs -> their compressed RLEs (str counts,
    as ``pycocotools.mask.encode`` writes them) and areas (int64 pixels).

    ``runs``: each mask's run lengths in column-major order, zeros first (COCO's uncompressed
    counts), laid end to end; ``lengths`` (N,): how many runs each mask has (at least 1).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return [], np.zeros(0, np.int64)
    runs = np.asarray(runs, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    ones = (np.arange(len(runs)) - np.repeat(starts, lengths)) % 2 == 1  # runs 1, 3, 5... are the mask's pixels
    areas = np.add.reduceat(np.where(ones, runs, 0), starts)
    uncompressed = [{"size": [height, width], "counts": counts} for counts in np.split(runs, starts[1:])]
    return [_plain_rle(rle) for rle in mask_utils.frPyObjects(uncompressed, height, width)], areas


def crop_runs(crops: Sequence[torch.Tensor], extents: Sequence[torch.Tensor],
              image_sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Box-local masks of a batch of images -> each mask's COCO run lengths in its whole image,
    computed on the crops' device (CPU or CUDA) for all masks at once and copied to the host in
    one piece: no full-size mask, no loop over masks.

    Per image (a list entry each), D masks of a shared crop size Hc x Wc: ``crops`` (D, Hc, Wc)
    bool, mask d in its top-left (y1 - y0, x1 - x0), anything beyond ignored; ``extents`` (D, 4)
    y0, x0, y1, x1 (exclusive) of each crop in the image; ``image_sizes`` the image's (H, W).
    Returns host int32 arrays over all masks, image after image: ``runs``, each mask's run lengths
    in the image's column-major order (zeros first, as pycocotools counts them) laid end to end,
    and ``lengths``, how many runs each mask has. ``compress_runs`` writes them as COCO strings:
    the same as ``encode_masks`` of the full masks, byte for byte.
    """
    counts = [int(c.shape[0]) for c in crops]
    total = sum(counts)
    if total == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    device = crops[0].device
    # image i's changes: a (D, Wc, Hc + 1) block of one flat buffer, so that one nonzero finds all
    blocks = [int(c.shape[0] * c.shape[2] * (c.shape[1] + 1)) for c in crops]
    changes = torch.zeros(sum(blocks), dtype=torch.bool, device=device)
    bases = np.cumsum([0, *blocks[:-1]])
    for image_crops, image_extents, (height, width), start, block in zip(crops, extents, image_sizes, bases.tolist(), blocks):
        if block:
            count, crop_h, crop_w = image_crops.shape
            _mark_changes(image_crops, image_extents.to(device, torch.int64), int(height), int(width),
                          changes[start: start + block].view(count, crop_w, crop_h + 1))
    # per image: where its block starts, a mask's and a column's length in it, its first mask, H;
    # per mask: H * W (one copy to the device)
    meta = np.concatenate([bases, [c.shape[2] * (c.shape[1] + 1) for c in crops], [c.shape[1] + 1 for c in crops],
                           np.cumsum([0, *counts[:-1]]), [int(size[0]) for size in image_sizes],
                           np.repeat([int(h) * int(w) for h, w in image_sizes], counts)]).astype(np.int64)
    meta = torch.from_numpy(meta).to(device)
    images = len(crops)
    base, mask_stride, column_stride, first_mask, image_height = meta[: 5 * images].view(5, images)
    pixels = meta[5 * images:]
    flat_index = changes.nonzero()[:, 0]  # in image, mask, column, row order: each mask's changes in order
    image = torch.searchsorted(base, flat_index, right=True) - 1
    local = flat_index - base[image]
    mask_index = first_mask[image] + local // mask_stride[image]
    local = local % mask_stride[image]
    column, row = local // column_stride[image], local % column_stride[image]
    all_extents = torch.cat([e.to(device, torch.int64) for e in extents])
    position = (all_extents[mask_index, 1] + column) * image_height[image] + all_extents[mask_index, 0] + row
    # mask d's runs: the differences of its change positions, from 0 and up to H * W
    ends = torch.searchsorted(mask_index, torch.arange(1, total + 1, device=device))  # (D,) one past its last change
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    first = torch.arange(len(position), device=device) == starts[mask_index]
    before = torch.where(first, torch.zeros_like(position), position.roll(1))
    runs = torch.empty(len(position) + total, dtype=torch.int64, device=device)
    runs[torch.arange(len(position), device=device) + mask_index] = position - before
    last = position[(ends - 1).clamp(min=0)] if len(position) else torch.zeros_like(ends)
    runs[ends + torch.arange(total, device=device)] = pixels - torch.where(ends > starts, last, torch.zeros_like(last))
    # the one copy to the host, as int32 (pycocotools counts in 32 bits; an image has fewer pixels)
    host = torch.cat([ends - starts + 1, runs]).to(torch.int32).cpu().numpy()
    return host[total:], host[:total]


def _mark_changes(crops: torch.Tensor, extents: torch.Tensor, height: int, width: int, out: torch.Tensor) -> None:
    """``out`` (D, Wc, Hc + 1) bool <- where a run of ``crop_runs`` starts: element (j, i) is the
    crop's pixel (i, j), in the image's column-major order, and i = h the pixel under the crop."""
    count, crop_h, crop_w = crops.shape
    device = crops.device
    y0, x0, y1, x1 = extents.unbind(1)
    h, w = (y1 - y0).clamp(0, crop_h), (x1 - x0).clamp(0, crop_w)
    # (D, Hc, Wc) -> (D, Wc, Hc + 1): the crop's columns one after another, a zero row under each
    inside = torch.zeros((count, crop_w, crop_h + 1), dtype=torch.bool, device=device)
    rows, cols = torch.arange(crop_h, device=device), torch.arange(crop_w, device=device)
    torch.logical_and(crops.transpose(1, 2), rows < h[:, None, None], out=inside[:, :, :crop_h])
    inside &= (cols < w[:, None])[:, :, None]
    # a change where a pixel differs from the one before it; a column's first follows the zero row
    flat, changes = inside.view(count, -1), out.view(count, -1)
    torch.ne(flat[:, 1:], flat[:, :-1], out=changes[:, 1:])
    changes[:, 0] = flat[:, 0]
    # A full-height crop's columns follow each other in the image: a run through column j's last
    # row and column j + 1's first goes on, neither ends nor starts there.
    last_row = (h - 1).clamp(min=0)[:, None, None].expand(count, crop_w, 1)
    ends_on_last_row = inside.gather(2, last_row)[..., 0]  # (D, Wc)
    goes_on = (h == height)[:, None] & ends_on_last_row[:, :-1] & inside[:, 1:, 0]  # (D, Wc - 1)
    out[:, 1:, 0] &= ~goes_on
    # nor ends a run in the row under the crop there, nor after the image's last pixel
    under = h[:, None, None].expand(count, crop_w, 1)
    past_end = ((y1 == height) & (x1 == width))[:, None] & (cols == w[:, None] - 1)  # (D, Wc)
    no_change = torch.cat([goes_on, goes_on.new_zeros(count, 1)], 1) | past_end
    out.scatter_(2, under, out.gather(2, under) & ~no_change[:, :, None])


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
