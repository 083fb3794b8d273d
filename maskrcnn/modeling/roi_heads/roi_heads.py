"""RoI heads: sample proposals, run the box branch, then the mask and keypoint branches (each
optional) on the boxes it keeps.

Shapes: N images; P proposals of an image; G its ground-truth objects; D its detections;
K classes, background (index 0) included; M x M masks; J keypoints; S x S pooled RoI features.
The two branches are separate methods; ``forward`` only sequences them.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from maskrcnn.modeling.box_regression import BoxCoder
from maskrcnn.modeling.matcher import Matcher, sample_positives_negatives
from maskrcnn.modeling.roi_heads.box_head import fast_rcnn_inference, fast_rcnn_loss
from maskrcnn.modeling.roi_heads.keypoint_head import keypoint_rcnn_inference, keypoint_rcnn_loss, keypoints_to_heatmap
from maskrcnn.modeling.roi_heads.mask_head import mask_rcnn_inference, mask_rcnn_loss, mask_targets


class RoIHeads(nn.Module):
    """The box branch on the proposals, then the mask and keypoint branches on its boxes.

    Training: the ground-truth boxes join the proposals, each is labelled by the ground truth it
    matches, and ``batch_size_per_image`` of them are sampled; the box branch classifies and
    regresses them, the mask and keypoint branches learn on the positive ones. Inference: the box
    branch's detections (class-wise NMS), then each branch on the detected boxes.

    Args:
        box_pooler: RoI features of the boxes from the feature levels (``MultiScaleRoIPooler``).
        box_head: pooled features -> one feature vector per RoI (two fc layers; C4: res5).
        box_predictor: feature vectors -> (P, K) class logits and (P, K*4) box deltas, with K
            classes counting the background (index 0).
        fg_iou_thresh: a proposal with IoU >= this with a ground truth is positive (its class).
        bg_iou_thresh: a proposal whose best IoU is below this is background; in between it is
            left out.
        batch_size_per_image: proposals sampled per image for the losses.
        positive_fraction: at most this fraction of the sampled proposals are positive.
        bbox_reg_weights: (wx, wy, ww, wh), the ``BoxCoder`` weights of the box deltas.
        score_thresh: a detection's class probability must be above this.
        nms_thresh: IoU threshold of the class-wise NMS.
        detections_per_img: at most this many detections per image, best first.
        mask_pooler: RoI features for the mask branch (C4: pooled from res4, then res5); None
            with the other mask arguments: no mask branch.
        mask_head: pooled features -> mask features (the FCN's convs; C4: nothing more).
        mask_predictor: mask features -> (P, K or 1, M, M) mask logits (M = 2 x the pooler's size).
        mask_loss_type: "sigmoid" (per-class binary masks, the paper's) or "softmax" (across classes).
        keypoint_pooler: RoI features for the keypoint branch; None with the other keypoint
            arguments: no keypoint branch.
        keypoint_head: pooled features -> keypoint features (the convs).
        keypoint_predictor: keypoint features -> (P, J, 4S, 4S) heatmap logits, J keypoints and S
            the pooler's size.

    ``forward(features, proposals, image_sizes, targets=None)``: ``features`` the levels the
    poolers read (N, C, Hi, Wi), ``proposals`` per image (P, 4), ``image_sizes`` each image's
    (h, w) in the batch, ``targets`` per image ``boxes`` (G, 4), ``labels`` (G,), and ``masks``
    (G, h, w) / ``keypoints`` (G, J, 3) for the branches there are. Returns ``([], losses)`` with
    targets (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_keypoint``), else
    ``(results, {})``: per image ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), and
    ``mask_probs`` (D, M, M) / ``keypoints`` (D, J, 3) and ``keypoints_scores`` (D, J).
    """

    def __init__(
        self,
        *,
        box_pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: tuple[float, float, float, float],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_pooler: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        mask_loss_type: str = "sigmoid",
        keypoint_pooler: nn.Module | None = None,
        keypoint_head: nn.Module | None = None,
        keypoint_predictor: nn.Module | None = None,
    ):
        super().__init__()
        self.box_roi_pool = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_pooler
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        # Eval mode: torchvision's NMS, for its exact outputs; off on the fast path, where NMS
        # stops once it has detections_per_img boxes (see nms.batched_nms).
        self.exact_inference = True
        self.mask_loss_type = mask_loss_type
        # torchvision's attribute names, so its state dicts' keys match
        self.keypoint_roi_pool = keypoint_pooler
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor

    @property
    def has_mask(self) -> bool:
        return self.mask_head is not None

    @property
    def has_keypoint(self) -> bool:
        return self.keypoint_head is not None

    def sample_proposals(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Adds the ground truth to the proposals, labels each by its best match and samples
        ``batch_size_per_image`` of them with at most ``positive_fraction`` positives.

        Per image: sampled (S, 4) proposals, (S,) matched gt index, (S,) class labels (0 background),
        (S, 4) regression targets, and the (S+,) indices of the positive ones (label > 0) among
        them. The sample sizes of all images are read on the host at once: one GPU sync a batch.
        """
        candidates = []
        for props, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(props.dtype)
            gt_labels = target["labels"]
            props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                matched = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                gt_for_props = torch.zeros_like(props)
            else:
                matched = self.proposal_matcher(box_ops.box_iou(gt_boxes, props))
                labels = gt_labels[matched.clamp(min=0)].to(torch.int64)
                labels.masked_fill_(matched == Matcher.BELOW_LOW, 0)
                labels.masked_fill_(matched == Matcher.BETWEEN, -1)
                matched = matched.clamp(min=0)
                gt_for_props = gt_boxes[matched]
            pos, neg = sample_positives_negatives(labels, self.batch_size_per_image, self.positive_fraction)
            candidates.append((props, matched, labels, gt_for_props, pos | neg, pos))
        # (sampled, positive) per image: the host sync
        sizes = torch.stack([torch.stack([sampled.sum(), pos.sum()]) for *_, sampled, pos in candidates]).tolist() if candidates else []
        sampled_proposals, sampled_matched, sampled_labels, sampled_deltas, sampled_positives = [], [], [], [], []
        for (props, matched, labels, gt_for_props, sampled, _), (num_sampled, num_pos) in zip(candidates, sizes):
            keep = _true_indices(sampled, num_sampled)
            sampled_proposals.append(props[keep])
            sampled_matched.append(matched[keep])
            sampled_labels.append(labels[keep])
            sampled_deltas.append(self.box_coder.encode(gt_for_props[keep], props[keep]))
            sampled_positives.append(_true_indices(sampled_labels[-1] > 0, num_pos))  # label > 0: the positives drawn
        return sampled_proposals, sampled_matched, sampled_labels, sampled_deltas, sampled_positives

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if targets is not None:
            return [], self.forward_train(features, proposals, image_sizes, targets)
        return self.forward_inference(features, proposals, image_sizes), {}

    def forward_train(self, features, proposals, image_sizes, targets) -> dict[str, Tensor]:
        proposals, matched, labels, deltas, positives = self.sample_proposals(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_deltas = self.box_predictor(box_features)
        offsets = itertools.accumulate((props.shape[0] for props in proposals[:-1]), initial=0)
        batch_positives = torch.cat([pos + offset for pos, offset in zip(positives, offsets)])
        losses = fast_rcnn_loss(class_logits, box_deltas, torch.cat(labels), torch.cat(deltas), batch_positives)
        if self.has_mask:
            losses["loss_mask"] = self.mask_loss(features, proposals, matched, labels, positives, image_sizes, targets)
        if self.has_keypoint:
            losses["loss_keypoint"] = self.keypoint_loss(features, proposals, matched, positives, image_sizes, targets)
        return losses

    def mask_loss(self, features, proposals, matched, labels, positives, image_sizes, targets) -> Tensor:
        """Lmask on the positive RoIs of the sampled ones (``positives``: their indices per image)."""
        pos_props, pos_labels, pos_targets = [], [], []
        for props, idx, lbl, pos, target in zip(proposals, matched, labels, positives, targets):
            pos_props.append(props[pos])
            pos_labels.append(lbl[pos])
            if pos.numel() == 0:
                size = self.mask_predictor_size()
                pos_targets.append(props.new_zeros((0, size, size)))
            else:
                pos_targets.append(mask_targets(target["masks"], props[pos], idx[pos], self.mask_predictor_size()))
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_props, image_sizes)))
        return mask_rcnn_loss(logits, torch.cat(pos_labels), torch.cat(pos_targets), self.mask_loss_type)

    def mask_predictor_size(self) -> int:
        return self.mask_roi_pool.output_size[0] * 2

    def detect_boxes(self, features, proposals, image_sizes) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The box branch in eval mode: per image (D, 4) boxes in its input's pixels, (D,) scores
        and (D,) labels after the class-wise NMS, best first."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_deltas = self.box_predictor(box_features)
        return fast_rcnn_inference(
            class_logits, box_deltas, proposals, image_sizes, self.box_coder,
            self.score_thresh, self.nms_thresh, self.detections_per_img, leading_nms=not self.exact_inference,
        )

    def predict_mask_probs(self, features, boxes: list[Tensor], labels: list[Tensor], image_sizes) -> list[Tensor]:
        """The mask branch on given boxes (per image (D, 4) in its input's pixels): per image the
        (D, M, M) probabilities of each box's class ``labels``."""
        if sum(b.shape[0] for b in boxes) == 0:
            size = self.mask_predictor_size()
            return [b.new_zeros((0, size, size)) for b in boxes]
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))
        return mask_rcnn_inference(logits, labels, self.mask_loss_type)

    def forward_inference(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        detections = self.detect_boxes(features, proposals, image_sizes)
        results = [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in detections]
        if self.has_keypoint:
            self.keypoint_inference(features, results, image_sizes)
        if self.has_mask:
            probs = self.predict_mask_probs(features, [r["boxes"] for r in results], [r["labels"] for r in results], image_sizes)
            for r, p in zip(results, probs):
                r["mask_probs"] = p
        return results

    # -- the keypoint branch (Keypoint R-CNN) ---------------------------------------------------

    def keypoint_loss(self, features, proposals, matched, positives, image_sizes, targets) -> Tensor:
        """Lkeypoint on the positive RoIs of the sampled ones (``positives``: their indices per
        image), with their ground truth's visible keypoints."""
        num_keypoints = self.keypoint_predictor.num_keypoints
        size = self.keypoint_heatmap_size()
        pos_props, heatmaps, valid = [], [], []
        for i, (props, idx, pos, target) in enumerate(zip(proposals, matched, positives, targets)):
            gt = target["keypoints"]
            if gt.shape[1:] != (num_keypoints, 3):
                raise ValueError(
                    f"targets[{i}]['keypoints'] has shape {tuple(gt.shape)}; "
                    f"the model predicts {num_keypoints} keypoints: (G, {num_keypoints}, 3)"
                )
            pos_props.append(props[pos])
            h, v = keypoints_to_heatmap(gt[idx[pos]].to(props.dtype), props[pos], size)
            heatmaps.append(h)
            valid.append(v)
        logits = self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, pos_props, image_sizes)))
        return keypoint_rcnn_loss(logits, torch.cat(heatmaps), torch.cat(valid))

    def keypoint_heatmap_size(self) -> int:
        return self.keypoint_roi_pool.output_size[0] * 4

    def keypoint_inference(self, features, results: list[dict[str, Tensor]], image_sizes) -> None:
        """Adds ``keypoints`` (D, J, 3) x, y, 1 and ``keypoints_scores`` (D, J) to each image's result."""
        boxes = [r["boxes"] for r in results]
        num_keypoints = self.keypoint_predictor.num_keypoints
        if sum(b.shape[0] for b in boxes) == 0:
            for r in results:
                r["keypoints"] = r["boxes"].new_zeros((0, num_keypoints, 3))
                r["keypoints_scores"] = r["boxes"].new_zeros((0, num_keypoints))
            return
        logits = self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes, image_sizes)))
        for r, (keypoints, scores) in zip(results, keypoint_rcnn_inference(logits, boxes)):
            r["keypoints"] = keypoints
            r["keypoints_scores"] = scores


def _true_indices(mask: Tensor, count: int) -> Tensor:
    """``torch.where(mask)[0]`` of a 1-D mask whose true count is known on the host: no sync."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]
