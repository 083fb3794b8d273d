"""Box branch: a 2-layer MLP (or convs and one fc) on pooled RoI features, class scores and
per-class box deltas.

Shapes: R RoIs; C channels; S x S pooled size; K classes including background (index 0).
The head only produces logits; the loss and inference are the free functions below it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops
from maskrcnn.modeling.roi_heads.mask_head import conv_blocks, init_convs

from maskrcnn.modeling.box_regression import BoxCoder
from maskrcnn.modeling.nms import batched_nms, fixed_shape, top_m_batched_nms


class TwoMLPHead(nn.Module):
    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # (R, C, S, S) -> (R, C*S*S)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class ConvFCHead(nn.Sequential):
    """3x3 convs of ``conv_layers`` (with ReLU, and ``norm_layer`` then without bias), flatten,
    one fc of ``representation_size`` with ReLU: (R, C, S, S) -> (R, representation_size).
    torchvision's maskrcnn_resnet50_fpn_v2 box head (4 convs of 256 with BatchNorm, fc 1024), in
    the key layout of its FastRCNNConvFCHead ("0.0.weight", ..., "{n + 1}.weight" for the fc)."""

    def __init__(self, in_channels: int, resolution: int, conv_layers: tuple[int, ...], representation_size: int, norm_layer=None):
        blocks = conv_blocks(in_channels, conv_layers, norm_layer)
        channels = conv_layers[-1] if conv_layers else in_channels
        blocks += [nn.Flatten(), nn.Linear(channels * resolution * resolution, representation_size), nn.ReLU(inplace=True)]
        super().__init__(*blocks)
        init_convs(self)


class FastRCNNPredictor(nn.Module):
    FP32_LAYERS = ("cls_score", "bbox_pred")  # run in fp32 under autocast (forward)

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 under autocast, as the RPN's predictors (see RPNHead.forward): class scores and
        # box deltas are where bf16 costs accuracy, and these layers are cheap.
        with torch.autocast(x.device.type, enabled=False):
            x = x.flatten(start_dim=1).float()
            return self.cls_score(x), self.bbox_pred(x)  # (R, K), (R, K*4)


def fast_rcnn_loss(
    pred_class_logits: Tensor, pred_box_deltas: Tensor, gt_labels: Tensor, gt_deltas: Tensor, positives: Tensor | None = None
) -> dict[str, Tensor]:
    """Cross-entropy over all sampled RoIs; smooth-L1 (beta 1/9) on the deltas of the true class
    of positive RoIs, normalised by the number of sampled RoIs. ``positives``: the indices of the
    RoIs with ``gt_labels > 0``, in order, when the caller has them (else found here: a GPU sync)."""
    loss_cls = F.cross_entropy(pred_class_logits, gt_labels)
    pos = torch.where(gt_labels > 0)[0] if positives is None else positives
    # (R, K*4) -> (R, K, 4)
    deltas = pred_box_deltas.reshape(pred_box_deltas.shape[0], -1, 4)
    loss_box = F.smooth_l1_loss(deltas[pos, gt_labels[pos]], gt_deltas[pos], beta=1 / 9, reduction="sum")
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box / max(gt_labels.numel(), 1)}


def fast_rcnn_inference(
    pred_class_logits: Tensor,
    pred_box_deltas: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    *,
    leading_nms: bool = False,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image: (D, 4) boxes, (D,) scores, (D,) labels after class-wise NMS, best first.

    Each RoI yields one candidate per foreground class whose score passes ``score_thresh``.
    ``leading_nms``: NMS stops once it has ``detections_per_img`` boxes (``nms.batched_nms``'s
    ``max_keep``; equal scores then come in index order); on an accelerator all images at once
    with fixed shapes (``nms.top_m_batched_nms``), the same detections.
    """
    num_classes = pred_class_logits.shape[-1]
    boxes_per_image = [p.shape[0] for p in proposals]
    # (R, K*4) on (R, 4) -> (R, K, 4)
    pred_boxes = box_coder.decode(pred_box_deltas, torch.cat(proposals, dim=0))
    pred_scores = F.softmax(pred_class_logits, -1)
    if leading_nms and fixed_shape(pred_boxes.device):
        return _fixed_shape_inference(pred_boxes, pred_scores, boxes_per_image, image_sizes, score_thresh, nms_thresh, detections_per_img)
    results = []
    for boxes, scores, size in zip(pred_boxes.split(boxes_per_image), pred_scores.split(boxes_per_image), image_sizes):
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        # drop background, then (R, K-1, ...) -> (R*(K-1), ...)
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh, max_keep=detections_per_img if leading_nms else None)
        keep = keep[:detections_per_img]
        results.append((boxes[keep], scores[keep], labels[keep]))
    return results


def _fixed_shape_inference(
    pred_boxes: Tensor, pred_scores: Tensor, boxes_per_image: list[int], image_sizes: list[tuple[int, int]],
    score_thresh: float, nms_thresh: float, detections_per_img: int,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``fast_rcnn_inference`` with ``leading_nms`` for all images at once: candidates that fail the
    score or size filter are marked invalid rather than removed, each image's candidates padded
    to the batch's most, and one host sync in all (``nms.top_m_batched_nms``)."""
    num_classes = pred_scores.shape[-1]
    most = max(boxes_per_image) * (num_classes - 1)
    padded_boxes, padded_scores, padded_valid = [], [], []
    for boxes, scores, size in zip(pred_boxes.split(boxes_per_image), pred_scores.split(boxes_per_image), image_sizes):
        # drop background, then (R, K-1, ...) -> (R*(K-1), ...), padded to the batch's most
        boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        valid = (scores > score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)  # remove_small_boxes's test
        pad = most - scores.shape[0]
        padded_boxes.append(F.pad(boxes, (0, 0, 0, pad)))
        padded_scores.append(F.pad(scores, (0, pad)))
        padded_valid.append(F.pad(valid, (0, pad), value=False))
    boxes, scores = torch.stack(padded_boxes), torch.stack(padded_scores)
    # (R*(K-1),) flat candidate index -> class: RoI-major, classes 1..K-1 within
    labels = (torch.arange(most, device=boxes.device) % (num_classes - 1) + 1).expand(len(boxes_per_image), most)
    keep = top_m_batched_nms(boxes, scores, labels, torch.stack(padded_valid), nms_thresh, detections_per_img)
    return [(b[k], s[k], lb[k]) for b, s, lb, k in zip(boxes, scores, labels, keep)]
