"""Class-wise (batched) NMS: torchvision's results, without a scan of all boxes per class.

torchvision's ``batched_nms`` runs, above a size (4000 coordinates on the CPU, 100,000 on a GPU),
one ``nms`` per class, finding each class's boxes with ``torch.where(idxs == class_id)``: a pass
over all N boxes per class. At a score threshold of 0 the box head hands it 1000 proposals x 90
classes, and those 90 passes over 90,000 boxes cost more than the NMS itself. Here the boxes are
put in class order once (a stable sort, so each class keeps its boxes in their original order),
and each class's ``nms`` gets exactly the boxes, in exactly the order, that torchvision's would:
the kept indices are the same. Below that size torchvision's own (coordinate-offset) path runs.

On a GPU even the grouped loop is slow: each class is one ``nms`` launch whose last kernel
walks the boxes in a single thread block, and at score threshold 0 that is 90 launches an
image (their cost: docs/performance.md). There ``dense_batched_nms`` runs instead: every
group's boxes padded to one (G, K) block, all the pairwise overlaps at once (G, K, K), and
greedy NMS as the fixed point of "a box is kept unless a kept, higher-scoring box overlaps it",
iterated over the whole block until nothing changes.
That fixed point is greedy NMS's result exactly (the equations are triangular, so it is unique);
it takes as many rounds as the longest chain of suppressions, a few in practice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops


_DENSE_ELEMENTS = 1 << 25  # pairwise overlaps computed at once (32M: ~0.5 GB of intermediates)


def _torchvision_runs_one_call(boxes: Tensor) -> bool:
    """torchvision's ``batched_nms`` switch: up to this size one ``nms`` over all groups (boxes
    offset per group), above it one ``nms`` per group."""
    return boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, max_keep: int | None = None) -> Tensor:
    """Indices of the boxes kept by NMS within each ``idxs`` group, by decreasing score.

    ``max_keep``: only the first ``max_keep`` of them are wanted (the caller's top-k). On the CPU
    they are then found by ``leading_batched_nms``, which stops once it has them; equal scores
    come in index order (torchvision's one-call order), not in the order its per-group path's
    unstable sort happens to give them."""
    if max_keep is not None and boxes.device.type == "cpu":
        return leading_batched_nms(boxes, scores, idxs, iou_threshold, max_keep)
    if boxes.device.type == "cuda" and boxes.shape[0] > 0:
        return dense_batched_nms(boxes, scores, idxs, iou_threshold)
    if _torchvision_runs_one_call(boxes):
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    order = torch.argsort(idxs, stable=True)
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in order.split(counts.tolist()):
        keep_mask[group[box_ops.nms(boxes[group], scores[group], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def _overlap_exceeds(a: Tensor, b: Tensor, iou_threshold: float) -> Tensor:
    """(..., A, 4) and (..., B, 4) -> (..., A, B) bool: IoU above the threshold, computed as
    torchvision's nms kernels compute it (same operations, same order, same rounding)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter) > iou_threshold


def _suppressions(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """(G, K, 4) boxes by decreasing score -> (G, K, K) bool: [g, i, j] when the higher-scoring
    box j overlaps box i by more than the threshold, computed as torchvision's kernels do."""
    over = _overlap_exceeds(boxes, boxes, iou_threshold)
    k = boxes.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).tril(-1)  # j < i
    return over & earlier & valid[:, None, :]


def _settle(suppress: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS's kept boxes as the fixed point of "kept unless a kept box that ``suppress``
    marks overlaps it": ``suppress`` (G, K, K) 0/1 in the dtype to multiply in (half precision
    is exact here: the products accumulate in fp32), ``valid`` (G, K) the real boxes. A round is
    one batched matrix-vector product; a few rounds run between checks, as each check syncs
    the host on a GPU."""

    def round_(kept: Tensor) -> Tensor:
        return valid & ~(torch.bmm(suppress, kept.to(suppress.dtype)[..., None])[..., 0] > 0)

    kept = valid
    while True:
        for _ in range(4):
            kept = round_(kept)
        again = round_(kept)
        if torch.equal(again, kept):
            return kept
        kept = again


def dense_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``batched_nms``'s result (torchvision's kept indices, in its order), computed for all
    groups at once: the GPU path (see the module's notes). Works on any device."""
    with torch.autocast(boxes.device.type, enabled=False):
        return _dense_batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


def _dense_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    device = boxes.device
    # group, then within each group decreasing score (stable, as torchvision's nms sorts)
    by_score = torch.sort(scores, descending=True, stable=True)[1]
    order = by_score[torch.sort(idxs[by_score], stable=True)[1]]
    groups, inverse, counts = torch.unique_consecutive(idxs[order], return_inverse=True, return_counts=True)
    k = int(counts.max())  # the one host sync of the set-up
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=device) - starts[inverse]
    num_groups = groups.shape[0]
    padded = boxes.new_zeros((num_groups, k, 4))
    padded[inverse, slot] = boxes[order]
    valid = torch.zeros((num_groups, k), dtype=torch.bool, device=device)
    valid[inverse, slot] = True
    keep = torch.zeros_like(valid)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    per_chunk = max(1, _DENSE_ELEMENTS // (k * k))
    for start in range(0, num_groups, per_chunk):
        sl = slice(start, start + per_chunk)
        keep[sl] = _settle(_suppressions(padded[sl], valid[sl], iou_threshold).to(dtype), valid[sl])
    keep_sorted = torch.zeros(n, dtype=torch.bool, device=device)
    keep_sorted[order] = keep[inverse, slot]
    kept_idx = torch.where(keep_sorted)[0]
    # equal scores in torchvision's order: its one-call path (up to its size switch) keeps them
    # in index order; its per-class path sorts the kept indices as below
    return kept_idx[scores[kept_idx].sort(descending=True, stable=_torchvision_runs_one_call(boxes))[1]]


def leading_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    """The first ``max_keep`` indices of ``batched_nms``'s result, without NMS over the rest.

    Whether greedy NMS keeps a box depends only on the boxes of its group that come before it
    (higher score; equal scores: lower index). So the boxes are walked in that order over all
    groups at once, a block at a time: a block's boxes first lose those that a box kept so far
    overlaps, then the rest are settled among themselves as the fixed point of ``dense_batched_nms``
    (a box stays unless a kept, earlier box of its group in the block overlaps it). The walk stops
    once ``max_keep`` boxes are kept. At the box head's score threshold 0 (1000 RoIs x 90
    classes), 100 detections are settled in the first block or two instead of 90 ``nms`` calls
    over all 90,000 boxes. Exact: the same boxes as the full NMS's first ``max_keep``, by
    decreasing score, equal scores in index order."""
    n = boxes.shape[0]
    if n == 0 or max_keep <= 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    with torch.autocast(boxes.device.type, enabled=False):
        order = torch.sort(scores, descending=True, stable=True)[1]
        block = 128  # small blocks: the fixed point's matrix is block x block, settled in a few rounds
        kept: list[Tensor] = []
        kept_boxes = boxes.new_empty((0, 4))
        kept_groups = idxs.new_empty((0,))
        total = 0
        for start in range(0, n, block):
            candidates = order[start : start + block]
            cand_boxes, cand_groups = boxes[candidates], idxs[candidates]
            alive = ~(_overlap_exceeds(cand_boxes, kept_boxes, iou_threshold)
                      & (cand_groups[:, None] == kept_groups[None, :])).any(dim=1)
            # the block as one group of _suppressions, then only pairs of the same group
            suppress = _suppressions(cand_boxes[None], alive[None], iou_threshold)[0] & (cand_groups[:, None] == cand_groups[None, :])
            chosen = torch.where(_settle(suppress[None].float(), alive[None])[0])[0]
            kept.append(candidates[chosen])
            total += chosen.shape[0]
            if total >= max_keep:
                break
            kept_boxes = torch.cat([kept_boxes, cand_boxes[chosen]])
            kept_groups = torch.cat([kept_groups, cand_groups[chosen]])
        return torch.cat(kept)[:max_keep]
