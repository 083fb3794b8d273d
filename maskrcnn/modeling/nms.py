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

Both make the host wait for the GPU: the block's size is a count (``int(counts.max())``) and
each check for the fixed point is a ``torch.equal``. Where NMS may stop at the top-k on an
accelerator (the inference fast path, and the RPN in training: ``fixed_shape``), fixed-shape
forms run instead, each with one host sync per batch of images (the kept counts, which the
outputs' sizes need):

- ``top_m_batched_nms`` (the box head): whether greedy NMS keeps a box depends only on the
  boxes of its group that come before it, so the first ``max_keep`` kept boxes among the top M
  candidates of an image are the first ``max_keep`` of the full NMS. Only those M boxes are
  compared (M x M pairs, masked to the same class), whatever the number of classes.
- ``grouped_batched_nms`` (the RPN): groups of sizes known on the host (the levels' top-k),
  each padded to one block.

Both run a fixed number of rounds (``ROUNDS``) of the fixed point and check once, with the
counts, that it has settled. Where it has not, or where fewer than ``max_keep`` boxes are kept
among the top M of more candidates, the exact NMS above runs for that image; ``stats`` counts
how often, for benchmarks.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops


_DENSE_ELEMENTS = 1 << 25  # pairwise overlaps computed at once (32M: ~0.5 GB of intermediates)

TOP_M = 2048  # box-head candidates per image that ``top_m_batched_nms`` compares
ROUNDS = 16  # rounds of the fixed point run before the one check that it has settled

# For benchmarks: "images" through top_m_batched_nms; "full_nms" those of them that needed the
# exact NMS (fewer than max_keep kept among the top M, or not settled in ROUNDS); "unsettled"
# images of either fixed-shape NMS whose fixed point needed more than ROUNDS rounds.
stats: collections.Counter = collections.Counter()

# The fixed-shape NMS runs on accelerators; tests set this to run it on CPU tensors.
FIXED_SHAPE_ON_CPU = False


def fixed_shape(device: torch.device) -> bool:
    """Whether the post-NMS top-k is found by the fixed-shape NMS (few host syncs) on ``device``,
    rather than by ``leading_batched_nms`` (a walk that stops early: the CPU's fastest)."""
    return device.type != "cpu" or FIXED_SHAPE_ON_CPU


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


def _nms_round(suppress: Tensor, valid: Tensor, kept: Tensor) -> Tensor:
    """One round of the fixed point: a valid box is kept unless a kept box that ``suppress``
    (..., K, K) marks overlaps it. A batched matrix-vector product."""
    return valid & ~(torch.bmm(suppress, kept.to(suppress.dtype)[..., None])[..., 0] > 0)


def _settle(suppress: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS's kept boxes as the fixed point of "kept unless a kept box that ``suppress``
    marks overlaps it": ``suppress`` (G, K, K) 0/1 in the dtype to multiply in (half precision
    is exact here: only whether a sum is positive matters), ``valid`` (G, K) the real boxes.
    A few rounds run between checks, as each check syncs the host on a GPU."""
    kept = valid
    while True:
        for _ in range(4):
            kept = _nms_round(suppress, valid, kept)
        again = _nms_round(suppress, valid, kept)
        if torch.equal(again, kept):
            return kept
        kept = again


def _settle_blocks(boxes: Tensor, valid: Tensor, groups: Tensor | None, iou_threshold: float,
                   rounds: int | None) -> tuple[Tensor, Tensor]:
    """(B, K, 4) boxes in NMS order (each after every box that may suppress it), (B, K) valid,
    (B, K) group ids (None: one group per block) -> (B, K) kept, (B, K) certain.

    ``rounds``: that many rounds of the fixed point from "every valid box kept", and one more,
    with no host sync. The rounds alternate between a superset and a subset of greedy NMS's kept
    boxes (a round keeps fewer boxes the more it is given, and greedy NMS's result gives itself),
    so where two consecutive rounds agree they give its result: those boxes are certain. None:
    rounds until nothing changes (``_settle``, syncs), every box certain. Blocks are chunked to
    bound the pairwise intermediates."""
    num, k = valid.shape
    dtype = torch.float16 if boxes.device.type == "cuda" else torch.float32
    per_chunk = max(1, _DENSE_ELEMENTS // max(k * k, 1))
    kept, certain = [], []
    for start in range(0, num, per_chunk):
        sl = slice(start, start + per_chunk)
        suppress = _suppressions(boxes[sl], valid[sl], iou_threshold)
        if groups is not None:
            suppress &= groups[sl, :, None] == groups[sl, None, :]
        suppress = suppress.to(dtype)
        if rounds is None:
            kept.append(_settle(suppress, valid[sl]))
            certain.append(torch.ones_like(kept[-1]))
            continue
        chunk_kept = valid[sl]
        for _ in range(rounds):
            chunk_kept = _nms_round(suppress, valid[sl], chunk_kept)
        kept.append(chunk_kept)
        certain.append(_nms_round(suppress, valid[sl], chunk_kept) == chunk_kept)
    return torch.cat(kept), torch.cat(certain)


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


def _first_kept(kept: Tensor, certain: Tensor, max_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, K) kept and certain flags in NMS order -> the first ``max_keep`` kept positions before
    the first uncertain one, (B, min(K, max_keep)) (the rest padding), how many of them are real
    (B,), and whether every box is certain (B,)."""
    k = kept.shape[1]
    position = torch.arange(k, device=kept.device).expand_as(kept)
    uncertain_from = position.masked_fill(certain, k).min(dim=1, keepdim=True).values
    found = kept & (position < uncertain_from)
    first = position.masked_fill(~found, k).topk(min(k, max_keep), dim=1, largest=False).values
    return first.clamp(max=k - 1), found.sum(dim=1).clamp(max=max_keep), uncertain_from[:, 0] == k


def _in_score_then_index_order(keep: Tensor, scores: Tensor) -> Tensor:
    """Indices by decreasing score, equal scores by increasing index."""
    keep = keep.sort().values
    return keep[scores[keep].sort(descending=True, stable=True)[1]]


def top_m_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor, iou_threshold: float, max_keep: int,
                      *, top_m: int = TOP_M, rounds: int = ROUNDS) -> list[Tensor]:
    """Per image, ``leading_batched_nms``'s result over its valid boxes: the first ``max_keep``
    indices kept by NMS within each ``idxs`` group, by decreasing score, equal scores in index
    order. Inputs for B images of C candidates each: (B, C, 4) boxes, (B, C) finite scores,
    group ids and valid flags (padding and filtered-out boxes False); returns B index tensors
    into C.

    Only each image's top ``top_m`` valid candidates (in that order) are compared, in ``rounds``
    rounds of the fixed point: exact when ``max_keep`` of them are kept before the first box
    still uncertain (see ``_settle_blocks``), or when all are certain and the image has no more.
    One host sync for all images (the counts); any other image gets the full NMS
    (``stats["full_nms"]``; ``stats["unsettled"]`` where the rounds were too few)."""
    num, c = scores.shape
    if num == 0 or c == 0 or max_keep <= 0:
        return [torch.empty(0, dtype=torch.int64, device=boxes.device) for _ in range(num)]
    with torch.autocast(boxes.device.type, enabled=False):
        boxes, scores = boxes.float(), scores.float()
        m = min(top_m, c)
        # (B, C) -> (B, m): the top m valid by decreasing score, then index
        order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True)[1][:, :m]
        cand_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        kept, certain = _settle_blocks(cand_boxes, valid.gather(1, order), idxs.gather(1, order), iou_threshold, rounds)
        first, count, complete = _first_kept(kept, certain, max_keep)
        exact = (count >= max_keep) | (complete & (valid.sum(dim=1) <= m))
        summary = torch.stack([count, exact.to(count.dtype), complete.to(count.dtype)], dim=1).tolist()  # the host sync
        results = []
        for b, (d, is_exact, is_complete) in enumerate(summary):
            if is_exact:
                results.append(order[b, first[b, :d]])
                continue
            stats["full_nms"] += 1
            stats["unsettled"] += not is_complete
            candidates = torch.where(valid[b])[0]
            keep = candidates[dense_batched_nms(boxes[b, candidates], scores[b, candidates], idxs[b, candidates], iou_threshold)]
            results.append(_in_score_then_index_order(keep, scores[b])[:max_keep])
        stats["images"] += num
        return results


def grouped_batched_nms(boxes: Tensor, scores: Tensor, valid: Tensor, group_sizes: list[int], iou_threshold: float,
                        max_keep: int, *, rounds: int = ROUNDS) -> list[Tensor]:
    """``top_m_batched_nms``'s result where the groups are consecutive runs of sizes known on the
    host, the same for every image (the RPN's levels after their top-k): (B, C, 4) boxes, (B, C)
    finite scores and valid flags, C = sum(``group_sizes``). Each group is padded to one block
    of max(``group_sizes``) boxes and NMS'd whole in ``rounds`` rounds. One host sync for all
    images (the counts); where the rounds were too few (``stats["unsettled"]``), the fixed point
    runs on to the end for the batch, syncing."""
    num, c = scores.shape
    if num == 0 or c == 0 or max_keep <= 0:
        return [torch.empty(0, dtype=torch.int64, device=boxes.device) for _ in range(num)]
    with torch.autocast(boxes.device.type, enabled=False):
        boxes, scores = boxes.float(), scores.float()
        k, num_groups = max(group_sizes), len(group_sizes)

        def blocks(x: Tensor, fill) -> Tensor:  # (B, C, ...) -> (B, L, k, ...), each group padded with ``fill``
            tail = (0, 0) * (x.dim() - 2)
            return torch.stack([F.pad(part, (*tail, 0, k - part.shape[1]), value=fill) for part in x.split(group_sizes, dim=1)], dim=1)

        ranked = scores.masked_fill(~valid, float("-inf"))
        # each block by decreasing score, then index; (B, L, k) -> (B*L, k)
        order = torch.sort(blocks(ranked, float("-inf")), dim=2, descending=True, stable=True)[1]
        position = blocks(torch.arange(c, device=boxes.device).expand(num, c), c).gather(2, order).view(num, -1)  # c: padding
        block_valid = blocks(valid, False).gather(2, order).view(num * num_groups, k)
        block_boxes = blocks(boxes, 0.0).gather(2, order[..., None].expand(-1, -1, -1, 4)).view(num * num_groups, k, 4)
        by_score = torch.sort(ranked, dim=1, descending=True, stable=True)[1]  # (B, C): all groups, by score then index
        # the blocks' entries in that order, the padding (ranked c) dropped
        rank = by_score.argsort(dim=1).gather(1, position.clamp(max=c - 1)).masked_fill(position == c, c)
        in_score_order = rank.argsort(dim=1)[:, :c]

        def first_kept(rounds_: int | None) -> tuple[Tensor, Tensor, Tensor]:
            kept, certain = _settle_blocks(block_boxes, block_valid, None, iou_threshold, rounds_)
            # (B*L, k) -> (B, C) in score order
            kept, certain = (flags.view(num, -1).gather(1, in_score_order) for flags in (kept, certain))
            return _first_kept(kept, certain, max_keep)

        first, count, complete = first_kept(rounds)
        summary = torch.stack([count, ((count >= max_keep) | complete).to(count.dtype)], dim=1).tolist()  # the host sync
        unsettled = sum(1 for _, exact in summary if not exact)
        if unsettled:
            stats["unsettled"] += unsettled
            first, count, _ = first_kept(None)
            summary = [(d, 1) for d in count.tolist()]
        return [by_score[b, first[b, :d]] for b, (d, _) in enumerate(summary)]
