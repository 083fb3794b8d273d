"""Matching predictions (anchors, proposals) to ground truth, and sampling them for the losses.

Shapes: G ground-truth boxes, P predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction the ground truth it overlaps most.

    A match below ``low_threshold`` is BELOW_LOW (-1, background); between the thresholds it is
    BETWEEN (-2, ignored). With ``allow_low_quality_matches`` each ground truth also keeps the
    predictions it overlaps most, even under the thresholds (Faster R-CNN's RPN rule).
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        """(G, P) IoU matrix -> (P,) index of the matched ground truth, or BELOW_LOW / BETWEEN."""
        if quality.numel() == 0:
            return torch.full((quality.shape[1],), self.BELOW_LOW, dtype=torch.int64, device=quality.device)
        matched_vals, matches = quality.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        # masked_fill_ and where, not boolean indexing: no host sync on a GPU
        matches.masked_fill_(below, self.BELOW_LOW)
        matches.masked_fill_(between, self.BETWEEN)
        if all_matches is not None:
            best_per_gt, _ = quality.max(dim=1)
            # every prediction tied for a ground truth's best IoU keeps its match
            low_quality = (quality == best_per_gt[:, None]).any(dim=0)
            matches = torch.where(low_quality, all_matches, matches)
        return matches


def sample_positives_negatives(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[Tensor, Tensor]:
    """Random positive (label >= 1) and negative (label == 0) subsets; label -1 is ignored.

    Returns two boolean masks over ``labels``: at most ``batch_size_per_image * positive_fraction``
    positives, and negatives filling the rest of ``batch_size_per_image``.

    Uniform without replacement, like a random permutation, but with no host-device sync: every
    candidate draws a random key, the ``k`` largest keys win (``topk`` with a static ``k``), and
    the number of negatives is capped by comparing ranks with a count that stays on the device.
    """
    count = labels.shape[0]
    max_pos = int(batch_size_per_image * positive_fraction)
    keys = torch.rand(count, device=labels.device)
    pos_keys = torch.where(labels >= 1, keys, -1.0)
    neg_keys = torch.where(labels == 0, keys, -1.0)
    pos_mask = torch.zeros(count, dtype=torch.bool, device=labels.device)
    neg_mask = torch.zeros(count, dtype=torch.bool, device=labels.device)
    num_pos = torch.zeros((), dtype=torch.int64, device=labels.device)
    if max_pos > 0 and count > 0:
        vals, idx = pos_keys.topk(min(max_pos, count))
        chosen = vals >= 0
        pos_mask[idx] = chosen
        num_pos = chosen.sum()
    k = min(batch_size_per_image, count)
    if k > 0:
        vals, idx = neg_keys.topk(k)  # sorted: rank r is the (r+1)-th best negative
        rank = torch.arange(k, device=labels.device)
        neg_mask[idx] = (vals >= 0) & (rank < batch_size_per_image - num_pos)
    return pos_mask, neg_mask
