"""Detections back to the input image: boxes rescaled, m x m masks pasted into the image.

Shapes: D detections; M x M mask probabilities; H x W the image.

``paste_masks`` pastes all D masks in one batched operation. Bilinear resampling is separable,
so pasting mask d is ``Wy_d @ mask_d @ Wx_d^T`` with (H, M+2) and (W, M+2) interpolation matrices
(zero outside the box): two batched matmuls instead of torchvision's Python loop over detections.
The result equals torchvision's ``paste_masks_in_image`` (one-pixel zero padding around the
mask, boxes expanded to match and truncated to whole pixels, bilinear with half-pixel centres).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


_CHUNK_ELEMENTS = 1 << 26  # 64M floats (256 MB)


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _interpolation_matrix(start: Tensor, length: Tensor, src_size: int, out_size: int, dtype) -> Tensor:
    """(D, out_size, src_size) weights mapping a source row of ``src_size`` samples, stretched over
    the ``length`` pixels starting at ``start``, onto output pixels 0..out_size-1."""
    device = start.device
    pos = torch.arange(out_size, device=device, dtype=torch.int64)[None, :] - start[:, None]  # (D, out)
    inside = (pos >= 0) & (pos < length[:, None])
    # source coordinate with half-pixel centres, clamped at 0 as F.interpolate does
    scale = src_size / length.to(torch.float32)
    src = ((pos.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.floor().to(torch.int64).clamp(max=src_size - 1)
    i1 = (i0 + 1).clamp(max=src_size - 1)
    frac = src - i0.to(torch.float32)
    weights = torch.zeros((start.shape[0], out_size, src_size), dtype=torch.float32, device=device)
    w0 = (1 - frac) * inside
    w1 = frac * inside
    weights.scatter_add_(2, i0[..., None], w0[..., None])
    weights.scatter_add_(2, i1[..., None], w1[..., None])
    return weights.to(dtype)


def _paste_frames(boxes: Tensor, mask_size: int, padding: int, image_size: tuple[int, int], box_local: bool) -> tuple[Tensor, ...]:
    """Where each padded mask lands: (D,) x0, y0 (relative to its output's origin), w, h, and for
    ``box_local`` the (D, 4) extents y0, x0, y1, x1 of its box inside the image (else None)."""
    height, width = image_size
    src = mask_size + 2 * padding
    boxes = _expand_boxes(boxes.float(), src / mask_size).to(torch.int64)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    w = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=1)
    h = (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=1)
    if not box_local:
        return x0, y0, w, h, None
    # the region of each box inside the image; positions taken relative to its start
    top, left = y0.clamp(0, height), x0.clamp(0, width)
    bottom = torch.maximum((y0 + h).clamp(max=height), top)
    right = torch.maximum((x0 + w).clamp(max=width), left)
    return x0 - left, y0 - top, w, h, torch.stack([top, left, bottom, right], dim=1)


def _paste(mask_probs: Tensor, frames: tuple[Tensor, ...], out_size: tuple[int, int], threshold: float | None, padding: int) -> Tensor:
    """(D, M, M) probabilities pasted at ``frames`` (``_paste_frames``) into (D, *out_size)."""
    x0, y0, w, h, _ = frames
    num, out_h, out_w = mask_probs.shape[0], *out_size
    dtype = torch.bool if threshold is not None else mask_probs.dtype
    padded = F.pad(mask_probs, (padding,) * 4)  # (D, M+2, M+2)
    src = padded.shape[-1]
    out = torch.zeros((num, out_h, out_w), dtype=dtype, device=mask_probs.device)
    if num and out_h and out_w:
        # chunks bound the float intermediate to ~_CHUNK_ELEMENTS whatever the image size
        chunk = max(1, _CHUNK_ELEMENTS // max(out_h * out_w, 1))
        # fp32 under the caller's autocast too: bf16 weights would move mask edges by a pixel
        with torch.autocast(mask_probs.device.type, enabled=False):
            for start in range(0, num, chunk):
                sl = slice(start, start + chunk)
                wy = _interpolation_matrix(y0[sl], h[sl], src, out_h, torch.float32)  # (d, H, M+2)
                wx = _interpolation_matrix(x0[sl], w[sl], src, out_w, torch.float32)  # (d, W, M+2)
                # (d, H, M+2) @ (d, M+2, M+2) @ (d, M+2, W) -> (d, H, W)
                pasted = torch.bmm(torch.bmm(wy, padded[sl].float()), wx.transpose(1, 2))
                out[sl] = pasted >= threshold if threshold is not None else pasted.to(out.dtype)
    return out


def paste_masks(
    mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float | None = 0.5, padding: int = 1, *,
    box_local: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(D, M, M) probabilities and (D, 4) boxes -> (D, H, W) masks in the image.

    With ``threshold`` the masks are boolean (probability >= threshold; the paper cuts at 0.5),
    else float probabilities. ``box_local``: only each mask's box region is pasted (the pixels
    outside it are 0 anyway): returns (D, 4) int64 extents y0, x0, y1, x1 (exclusive, inside the
    image) and (D, h, w) crops, crop d valid in its top-left (y1 - y0, x1 - x0): the same pixels
    as the full paste, at the cost of the boxes instead of D whole images (``paste_masks_box_local``
    for a batch of images).
    """
    if box_local:
        return paste_masks_box_local([mask_probs], [boxes], [image_size], threshold, padding)[0]
    frames = _paste_frames(boxes, mask_probs.shape[-1], padding, image_size, box_local=False)
    return _paste(mask_probs, frames, image_size, threshold, padding)


def paste_masks_box_local(
    mask_probs: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]], threshold: float | None = 0.5, padding: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """``paste_masks(box_local=True)`` for each image of a batch: its (extents, crops). The crops'
    sizes (each image's largest box) are read on the host once for the whole batch: one GPU sync."""
    frames = [_paste_frames(b, p.shape[-1], padding, size, box_local=True) for p, b, size in zip(mask_probs, boxes, image_sizes)]
    # (h, w) of each image's largest extent; the zero row stands in for an image without detections
    sizes = [torch.cat([f[4][:, 2:] - f[4][:, :2], f[4].new_zeros((1, 2))]).amax(dim=0) for f in frames]
    crop_sizes = torch.stack(sizes).tolist() if sizes else []  # the host sync
    return [(f[4], _paste(p, f, tuple(size), threshold, padding)) for p, f, size in zip(mask_probs, frames, crop_sizes)]


def postprocess_detections(
    result: dict[str, Tensor], resized_size: tuple[int, int], original_size: tuple[int, int], mask_threshold: float | None = 0.5,
    box_local_masks: bool = False,
) -> dict[str, Tensor]:
    """One image's detections from the resized input back to the original image; with
    ``box_local_masks``, ``mask_extents`` and ``mask_crops`` (``paste_masks(box_local=True)``)
    in place of ``masks``."""
    return postprocess_batch([result], [resized_size], [original_size], mask_threshold, box_local_masks)[0]


def postprocess_batch(
    results: list[dict[str, Tensor]], resized_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]],
    mask_threshold: float | None = 0.5, box_local_masks: bool = False,
) -> list[dict[str, Tensor]]:
    """``postprocess_detections`` for each image of a batch, the box-local masks' crop sizes read
    in one host sync for all of them (``paste_masks_box_local``)."""
    from maskrcnn.modeling.preprocessing import resize_boxes, resize_keypoints

    outs = []
    for result, resized_size, original_size in zip(results, resized_sizes, original_sizes):
        out = {k: v for k, v in result.items() if k != "mask_probs"}
        out["boxes"] = resize_boxes(result["boxes"], resized_size, original_size)
        if "mask_probs" in result and not box_local_masks:
            out["masks"] = paste_masks(result["mask_probs"], out["boxes"], original_size, threshold=mask_threshold)
        if "keypoints" in result:
            out["keypoints"] = resize_keypoints(result["keypoints"], resized_size, original_size)
        outs.append(out)
    local = [i for i, result in enumerate(results) if "mask_probs" in result and box_local_masks]
    pasted = paste_masks_box_local([results[i]["mask_probs"] for i in local], [outs[i]["boxes"] for i in local],
                                   [original_sizes[i] for i in local], mask_threshold)
    for i, (extents, crops) in zip(local, pasted):
        outs[i]["mask_extents"], outs[i]["mask_crops"] = extents, crops
    return outs
