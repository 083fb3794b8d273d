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
        matches[below] = self.BELOW_LOW
        matches[between] = self.BETWEEN
        if all_matches is not None:
            best_per_gt, _ = quality.max(dim=1)
            # every prediction tied for a ground truth's best IoU keeps its match
            _, pred_idx = torch.where(quality == best_per_gt[:, None])
            matches[pred_idx] = all_matches[pred_idx]
        return matches


def sample_positives_negatives(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[Tensor, Tensor]:
    """Random positive (label >= 1) and negative (label == 0) subsets; label -1 is ignored.

    Returns two boolean masks over ``labels``: at most ``batch_size_per_image * positive_fraction``
    positives, and negatives filling the rest of ``batch_size_per_image``.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size_per_image * positive_fraction))
    num_neg = min(negative.numel(), batch_size_per_image - num_pos)
    perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[positive[perm_pos]] = True
    neg_mask[negative[perm_neg]] = True
    return pos_mask, neg_mask
