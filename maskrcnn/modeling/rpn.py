"""Region Proposal Network: objectness and box deltas for every anchor, proposals, and its loss.

Shapes: N images; L levels; A anchors per cell; Hi, Wi the grid of level i;
R = sum_i Hi*Wi*A anchors per image; G ground-truth boxes of an image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import Conv2dNormActivation

from maskrcnn.modeling.anchor_generator import AnchorGenerator
from maskrcnn.modeling.box_regression import BoxCoder
from maskrcnn.modeling.nms import batched_nms, fixed_shape, grouped_batched_nms
from maskrcnn.modeling.matcher import Matcher, sample_positives_negatives


class RPNHead(nn.Module):
    """``conv_depth`` shared 3x3 convs (1; torchvision's v2: 2), then 1x1 convs for A objectness
    logits and 4A box deltas per cell."""

    FP32_LAYERS = ("cls_logits", "bbox_pred")  # run in fp32 under autocast (forward)

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        # Sequential(Sequential(conv, relu), ...): the key layout of torchvision's RPNHead ("conv.0.0.weight").
        self.conv = nn.Sequential(
            *(Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=None) for _ in range(conv_depth))
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            # The 1x1 predictors run in fp32 under autocast: in bf16 the objectness ranking and
            # the deltas lose box AP (docs/performance.md); these layers are cheap in fp32.
            with torch.autocast(t.device.type, enabled=False):
                t = t.float()
                logits.append(self.cls_logits(t))  # (N, A, Hi, Wi)
                deltas.append(self.bbox_pred(t))  # (N, A*4, Hi, Wi)
        return logits, deltas


def flatten_predictions(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per level (N, A, Hi, Wi) and (N, A*4, Hi, Wi) -> (N, R) logits and (N, R, 4) deltas,
    anchors ordered level by level, then cell by cell, then A per cell (as the anchors are)."""
    flat_logits, flat_deltas = [], []
    for lg, dl in zip(logits, deltas):
        n, a, h, w = lg.shape
        # (N, A, Hi, Wi) -> (N, Hi, Wi, A) -> (N, Hi*Wi*A)
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(n, -1))
        # (N, A*4, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Hi*Wi*A, 4)
        flat_deltas.append(dl.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Object proposals from the backbone's levels, and in training the RPN's losses.

    The head scores every one of the R anchors and regresses it; per level the ``pre_nms_top_n``
    best are decoded into boxes, clipped to their image, filtered and NMS'd, and the
    ``post_nms_top_n`` best of all levels are an image's proposals. For the losses, each anchor is
    matched to the ground truth and ``batch_size_per_image`` of them are sampled.

    Args:
        anchor_generator: the A anchors of every cell of each level's grid (one level for C4).
        head: per level (N, C, Hi, Wi) features -> (N, A, Hi, Wi) objectness logits and
            (N, A*4, Hi, Wi) box deltas.
        fg_iou_thresh: an anchor with IoU >= this with a ground-truth box is an object, as is every
            ground truth's best-overlapping anchor (low-quality matches allowed).
        bg_iou_thresh: an anchor whose best IoU is below this is background; in between it is
            left out of the loss.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: at most this fraction of the sampled anchors are objects; background
            anchors fill the rest.
        pre_nms_top_n: ``{"training": k, "testing": k}``: the top-scoring anchors kept per level
            before NMS, in each mode.
        post_nms_top_n: ``{"training": k, "testing": k}``: the proposals kept per image after NMS,
            best first, in each mode.
        nms_thresh: NMS IoU threshold, applied within each level.
        score_thresh: a proposal whose objectness probability is below this is dropped.
        min_size: a proposal narrower or shorter than this (pixels, after clipping) is dropped.

    ``forward(batch_shape, image_sizes, features, gt_boxes=None)``: ``batch_shape`` the padded
    batch's (H, W), ``image_sizes`` each image's (h, w) within it, ``features`` the L levels
    (N, C, Hi, Wi), ``gt_boxes`` per image (G, 4) x1, y1, x2, y2 in the batch's pixels. Returns
    per image its (P, 4) proposals (P <= post_nms_top_n), and with ``gt_boxes`` the losses
    ``loss_objectness`` and ``loss_rpn_box_reg`` (else ``{}``).
    """

    def __init__(
        self,
        *,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        # Eval mode runs torchvision's NMS, for its exact outputs (equal scores in the order its
        # unstable sort gives them); optimize_for_inference turns this off, and training needs
        # no such order: then NMS stops once it has post_nms_top_n boxes (see nms.batched_nms).
        self.exact_inference = True

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def forward(
        self,
        batch_shape: tuple[int, int],
        image_sizes: list[tuple[int, int]],
        features: list[Tensor],
        gt_boxes: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image, (P, 4) each, and the RPN losses when ``gt_boxes`` are given."""
        pred_logits, pred_deltas = self.head(features)
        anchors = self.anchor_generator(batch_shape, features)
        num_anchors_per_level = [a.shape[0] for a in anchors]
        anchors_cat = torch.cat(anchors, dim=0)  # (R, 4)
        pred_logits, pred_deltas = flatten_predictions(pred_logits, pred_deltas)
        num_images = pred_logits.shape[0]
        # (N*R, 4) deltas on (N*R, 4) anchors -> (N, R, 4) proposals
        proposals = self.box_coder.decode(
            pred_deltas.detach().reshape(-1, 4), anchors_cat.repeat(num_images, 1)
        ).view(num_images, -1, 4)
        boxes = self.filter_proposals(proposals, pred_logits.detach(), image_sizes, num_anchors_per_level)

        losses = {}
        if gt_boxes is not None:
            gt_labels, gt_targets = self.label_anchors(anchors_cat, gt_boxes)
            losses = rpn_losses(pred_logits, pred_deltas, gt_labels, gt_targets, self.batch_size_per_image, self.positive_fraction)
        return boxes, losses

    def filter_proposals(
        self, proposals: Tensor, logits: Tensor, image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> list[Tensor]:
        """Top-k per level, clip, drop tiny and low-scoring boxes, NMS per level, keep the best.
        Where NMS may stop at the top-k (training, the fast path) on an accelerator, all images
        at once with fixed shapes and one host sync (``nms.grouped_batched_nms``): the same boxes."""
        num_images = proposals.shape[0]
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=proposals.device) for i, n in enumerate(num_anchors_per_level)]
        )
        top_idx, top_per_level = [], []
        offset = 0
        for per_level in logits.split(num_anchors_per_level, dim=1):
            k = min(self.pre_nms_top_n(), per_level.shape[1])
            _, idx = per_level.topk(k, dim=1)
            top_idx.append(idx + offset)
            top_per_level.append(k)
            offset += per_level.shape[1]
        top_idx = torch.cat(top_idx, dim=1)  # (N, k_total)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        logits = logits[batch_idx, top_idx]
        proposals = proposals[batch_idx, top_idx]
        levels = levels[top_idx]
        scores = torch.sigmoid(logits)
        top_n = self.post_nms_top_n()
        leading = self.training or not self.exact_inference
        if leading and fixed_shape(proposals.device):
            # the same proposals with fixed shapes: filtered boxes marked invalid, not removed
            boxes = torch.stack([box_ops.clip_boxes_to_image(b, size) for b, size in zip(proposals, image_sizes)])
            widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
            keep = grouped_batched_nms(boxes, scores, valid, top_per_level, self.nms_thresh, top_n)
            return [b[k] for b, k in zip(boxes, keep)]

        results = []
        for boxes, score, lvl, size in zip(proposals, scores, levels, image_sizes):
            boxes = box_ops.clip_boxes_to_image(boxes, size)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, score, lvl = boxes[keep], score[keep], lvl[keep]
            keep = torch.where(score >= self.score_thresh)[0]
            boxes, score, lvl = boxes[keep], score[keep], lvl[keep]
            keep = batched_nms(boxes, score, lvl, self.nms_thresh, max_keep=top_n if leading else None)[:top_n]
            results.append(boxes[keep])
        return results

    def label_anchors(self, anchors: Tensor, gt_boxes: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: (R,) labels (1 object, 0 background, -1 ignored) and (R, 4) regression targets."""
        labels, targets = [], []
        for boxes in gt_boxes:
            if boxes.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device))
                targets.append(torch.zeros_like(anchors))
                continue
            matched = self.matcher(box_ops.box_iou(boxes, anchors))
            label = (matched >= 0).to(torch.float32)
            label.masked_fill_(matched == Matcher.BELOW_LOW, 0.0)
            label.masked_fill_(matched == Matcher.BETWEEN, -1.0)
            labels.append(label)
            targets.append(self.box_coder.encode(boxes[matched.clamp(min=0)], anchors))
        return labels, targets


def rpn_losses(
    pred_logits: Tensor,
    pred_deltas: Tensor,
    gt_labels: list[Tensor],
    gt_targets: list[Tensor],
    batch_size_per_image: int,
    positive_fraction: float,
) -> dict[str, Tensor]:
    """Binary cross-entropy on sampled anchors; smooth-L1 (beta 1/9) on the positive ones,
    both normalised by the number of sampled anchors."""
    pos, neg = [], []
    for labels in gt_labels:
        p, n = sample_positives_negatives(labels, batch_size_per_image, positive_fraction)
        pos.append(p)
        neg.append(n)
    pos = torch.cat(pos)
    sampled = pos | torch.cat(neg)
    labels = torch.cat(gt_labels)
    targets = torch.cat(gt_targets)
    # (N, R) -> (N*R,), (N, R, 4) -> (N*R, 4)
    pred_logits = pred_logits.reshape(-1)
    pred_deltas = pred_deltas.reshape(-1, 4)
    # Masked sums over every anchor instead of indexing the sampled ones: the same losses, and
    # no host-device sync (boolean indexing and int() would wait for the GPU).
    num_sampled = sampled.sum().clamp(min=1)
    box_loss = (F.smooth_l1_loss(pred_deltas, targets, beta=1 / 9, reduction="none").sum(dim=1) * pos).sum() / num_sampled
    objectness = F.binary_cross_entropy_with_logits(pred_logits, labels.clamp(min=0), reduction="none")
    objectness_loss = (objectness * sampled).sum() / num_sampled
    return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
