"""Class-wise (batched) NMS: torchvision's results, without a scan of all boxes per class.

torchvision's ``batched_nms`` runs, above a size (4000 coordinates on the CPU, 100,000 on a GPU),
one ``nms`` per class, finding each class's boxes with ``torch.where(idxs == class_id)``: a pass
over all N boxes per class. At a score threshold of 0 the box head hands it 1000 proposals x 90
classes, and those 90 passes over 90,000 boxes cost more than the NMS itself. Here the boxes are
put in class order once (a stable sort, so each class keeps its boxes in their original order),
and each class's ``nms`` gets exactly the boxes, in exactly the order, that torchvision's would:
the kept indices are the same. Below that size torchvision's own (coordinate-offset) path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by NMS within each ``idxs`` group, by decreasing score."""
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    order = torch.argsort(idxs, stable=True)
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in order.split(counts.tolist()):
        keep_mask[group[box_ops.nms(boxes[group], scores[group], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]
