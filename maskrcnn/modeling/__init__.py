"""The model's parts, and ``build_model``: the one place that reads a ModelConfig."""

from __future__ import annotations

from maskrcnn.config import ModelConfig
from maskrcnn.modeling.anchor_generator import AnchorGenerator
from maskrcnn.modeling.backbone import build_resnet_fpn_backbone
from maskrcnn.modeling.meta_arch import MaskRCNN
from maskrcnn.modeling.poolers import MultiScaleRoIPooler
from maskrcnn.modeling.preprocessing import ImagePreprocessor
from maskrcnn.modeling.roi_heads import FastRCNNPredictor, MaskRCNNConvHead, MaskRCNNPredictor, RoIHeads, TwoMLPHead
from maskrcnn.modeling.roi_heads.keypoint_head import KeypointRCNNConvHead, KeypointRCNNPredictor
from maskrcnn.modeling.rpn import RegionProposalNetwork, RPNHead


def validate_config(cfg: ModelConfig) -> None:
    """Rejects combinations that cannot work, naming the field."""
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {cfg.num_classes}")
    if len(cfg.anchors.sizes) != 5:
        raise ValueError(f"anchors.sizes needs one size per FPN level P2-P6 (5), got {len(cfg.anchors.sizes)}")
    if cfg.mask_head.head_type != "fcn":
        raise ValueError(f"mask_head.head_type {cfg.mask_head.head_type!r} is not available; use 'fcn'")
    if cfg.mask_head.loss_type not in ("sigmoid", "softmax"):
        raise ValueError(f"mask_head.loss_type must be 'sigmoid' or 'softmax', got {cfg.mask_head.loss_type!r}")
    if cfg.mask_head.loss_type == "softmax" and cfg.mask_head.class_agnostic:
        raise ValueError("mask_head.loss_type 'softmax' competes across classes; it cannot be class_agnostic")
    _validate_keypoint_head(cfg)


def _validate_keypoint_head(cfg: ModelConfig) -> None:
    k = cfg.keypoint_head
    if not k.enabled:
        return
    if k.num_keypoints < 1:
        raise ValueError(f"keypoint_head.num_keypoints must be at least 1, got {k.num_keypoints}")
    if not k.conv_layers or any(w < 1 for w in k.conv_layers):
        raise ValueError(f"keypoint_head.conv_layers needs at least one positive width, got {k.conv_layers}")
    if k.pooled_resolution < 1:
        raise ValueError(f"keypoint_head.pooled_resolution must be at least 1, got {k.pooled_resolution}")
    if k.keypoint_names and len(k.keypoint_names) != k.num_keypoints:
        raise ValueError(f"keypoint_head.keypoint_names has {len(k.keypoint_names)} names for {k.num_keypoints} keypoints")
    for pair in k.skeleton:
        if len(pair) != 2 or not all(1 <= v <= k.num_keypoints for v in pair):
            raise ValueError(f"keypoint_head.skeleton pair {list(pair)} must be two 1-based keypoint numbers in 1..{k.num_keypoints}")


def build_model(cfg: ModelConfig) -> MaskRCNN:
    validate_config(cfg)
    b, a, r, h, m, i = cfg.backbone, cfg.anchors, cfg.rpn, cfg.roi_heads, cfg.mask_head, cfg.input
    backbone = build_resnet_fpn_backbone(
        b.name, norm=b.norm, trainable_layers=b.trainable_layers, fpn_channels=b.fpn_channels,
        small_widths=b.small_widths, small_blocks=b.small_blocks,
    )
    channels = backbone.out_channels
    anchor_generator = AnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes))
    rpn = RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        score_thresh=r.score_thresh,
        min_size=r.min_size,
    )
    mask_parts = {}
    if m.enabled:
        mask_parts = dict(
            mask_pooler=MultiScaleRoIPooler(output_size=h.mask_resolution, sampling_ratio=h.sampling_ratio, pooler_type=h.pooler_type, aligned=h.aligned),
            mask_head=MaskRCNNConvHead(channels, tuple(m.conv_layers), m.dilation),
            mask_predictor=MaskRCNNPredictor(m.conv_layers[-1], m.conv_layers[-1], 1 if m.class_agnostic else cfg.num_classes),
            mask_loss_type=m.loss_type,
        )
    keypoint_parts = {}
    if cfg.keypoint_head.enabled:
        k = cfg.keypoint_head
        keypoint_parts = dict(
            keypoint_pooler=MultiScaleRoIPooler(output_size=k.pooled_resolution, sampling_ratio=h.sampling_ratio, pooler_type=h.pooler_type, aligned=h.aligned),
            keypoint_head=KeypointRCNNConvHead(channels, tuple(k.conv_layers)),
            keypoint_predictor=KeypointRCNNPredictor(k.conv_layers[-1], k.num_keypoints),
        )
    roi_heads = RoIHeads(
        box_pooler=MultiScaleRoIPooler(output_size=h.box_resolution, sampling_ratio=h.sampling_ratio, pooler_type=h.pooler_type, aligned=h.aligned),
        box_head=TwoMLPHead(channels * h.box_resolution**2, h.representation_size),
        box_predictor=FastRCNNPredictor(h.representation_size, cfg.num_classes),
        fg_iou_thresh=h.fg_iou_thresh,
        bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.bbox_reg_weights),
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        **mask_parts,
        **keypoint_parts,
    )
    preprocessor = ImagePreprocessor(
        min_size=i.min_size, max_size=i.max_size, image_mean=i.image_mean, image_std=i.image_std, size_divisible=i.size_divisible,
        train_min_sizes=i.train_min_sizes,
    )
    return MaskRCNN(preprocessor=preprocessor, backbone=backbone, rpn=rpn, roi_heads=roi_heads)


__all__ = ["build_model", "validate_config", "MaskRCNN"]
