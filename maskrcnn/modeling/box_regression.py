"""Box deltas (dx, dy, dw, dh) between reference boxes and targets, as in R-CNN.

Shapes: R boxes; K classes. Boxes are (x1, y1, x2, y2) in pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Caps exp(dw), exp(dh) so that a wild prediction cannot overflow: at most 1000/16 times the anchor.
_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = _DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, gt_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """(R, 4) gt boxes and (R, 4) reference boxes -> (R, 4) regression targets."""
        wx, wy, ww, wh = self.weights
        ref_w = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_h = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_cx = reference_boxes[:, 0] + 0.5 * ref_w
        ref_cy = reference_boxes[:, 1] + 0.5 * ref_h
        gt_w = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_h = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_cx = gt_boxes[:, 0] + 0.5 * gt_w
        gt_cy = gt_boxes[:, 1] + 0.5 * gt_h
        dx = wx * (gt_cx - ref_cx) / ref_w
        dy = wy * (gt_cy - ref_cy) / ref_h
        dw = ww * torch.log(gt_w / ref_w)
        dh = wh * torch.log(gt_h / ref_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """(R, 4*K) deltas applied to (R, 4) reference boxes -> (R, K, 4) boxes."""
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        ctr_x = reference_boxes[:, 0] + 0.5 * widths
        ctr_y = reference_boxes[:, 1] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * torch.exp(dw) * widths[:, None]
        half_h = 0.5 * torch.exp(dh) * heights[:, None]
        # (R, K) x 4 -> (R, K, 4)
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
