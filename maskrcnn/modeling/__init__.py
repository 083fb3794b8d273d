"""The model's parts, and ``build_model``: the one place that reads a ModelConfig."""

from __future__ import annotations

from torch import nn

from maskrcnn.config import ModelConfig
from maskrcnn.modeling.anchor_generator import AnchorGenerator
from maskrcnn.modeling.backbone import HEAD_NORMS, build_resnet_c4_backbone, build_resnet_fpn_backbone, head_norm_layer
from maskrcnn.modeling.meta_arch import MaskRCNN
from maskrcnn.modeling.poolers import MultiScaleRoIPooler
from maskrcnn.modeling.preprocessing import ImagePreprocessor
from maskrcnn.modeling.roi_heads import ConvFCHead, FastRCNNPredictor, MaskRCNNConvHead, MaskRCNNPredictor, RoIHeads, TwoMLPHead
from maskrcnn.modeling.roi_heads.keypoint_head import KeypointRCNNConvHead, KeypointRCNNPredictor
from maskrcnn.modeling.rpn import RegionProposalNetwork, RPNHead
from maskrcnn.modeling.roi_heads.c4_head import Res5BoxHead, Res5MaskFeatures
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNMLPHead, MLPMaskPredictor

BACKBONE_KINDS = ("fpn", "c4")
MASK_HEAD_TYPES = ("fcn", "mlp")
BOX_HEAD_TYPES = ("mlp", "conv_fc")


def validate_config(cfg: ModelConfig) -> None:
    """Rejects combinations that cannot work, naming the field."""
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {cfg.num_classes}")
    _validate_variants(cfg)
    if cfg.mask_head.loss_type not in ("sigmoid", "softmax"):
        raise ValueError(f"mask_head.loss_type must be 'sigmoid' or 'softmax', got {cfg.mask_head.loss_type!r}")
    if cfg.mask_head.loss_type == "softmax" and cfg.mask_head.class_agnostic:
        raise ValueError("mask_head.loss_type 'softmax' competes across classes; it cannot be class_agnostic")
    _validate_keypoint_head(cfg)
    _validate_norms_and_heads(cfg)


def _validate_norms_and_heads(cfg: ModelConfig) -> None:
    """The FPN's and the heads' norms, the RPN's conv depth, the box head type (r50_fpn_v2's fields)."""
    b, h, m = cfg.backbone, cfg.roi_heads, cfg.mask_head
    for where, norm in (("backbone.fpn_norm", b.fpn_norm), ("roi_heads.box_head_norm", h.box_head_norm), ("mask_head.norm", m.norm)):
        if norm not in HEAD_NORMS:
            raise ValueError(f"{where} must be one of {HEAD_NORMS}, got {norm!r}")
    if cfg.rpn.conv_depth < 1:
        raise ValueError(f"rpn.conv_depth must be at least 1, got {cfg.rpn.conv_depth}")
    if h.box_head_type not in BOX_HEAD_TYPES:
        raise ValueError(f"roi_heads.box_head_type must be one of {BOX_HEAD_TYPES}, got {h.box_head_type!r}")
    if h.box_head_type == "conv_fc" and (not h.box_conv_layers or any(c <= 0 for c in h.box_conv_layers)):
        raise ValueError(f"roi_heads.box_conv_layers must be positive widths, at least one, got {tuple(h.box_conv_layers)}")
    unused = [f"{where} {value!r}" for where, value, default in (
        ("backbone.fpn_norm", b.fpn_norm, "none"), ("roi_heads.box_head_type", h.box_head_type, "mlp"),
        ("roi_heads.box_head_norm", h.box_head_norm, "none"), ("mask_head.norm", m.norm, "none"),
    ) if value != default and b.kind == "c4"]
    if unused:
        raise ValueError(f"{', '.join(unused)}: backbone.kind 'c4' has no FPN, and res5 is its box and mask heads; leave the defaults")
    if h.box_head_norm != "none" and h.box_head_type != "conv_fc":
        raise ValueError(f"roi_heads.box_head_norm {h.box_head_norm!r} is for the 'conv_fc' box head's convs; 'mlp' has none")
    if m.norm != "none" and m.head_type != "fcn":
        raise ValueError(f"mask_head.norm {m.norm!r} is for the 'fcn' head's convs; head_type {m.head_type!r} has none")


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
    r, h, m, i = cfg.rpn, cfg.roi_heads, cfg.mask_head, cfg.input
    backbone, res5, res5_channels = _build_backbone(cfg)
    channels = backbone.out_channels
    anchor_generator = _build_anchor_generator(cfg)
    rpn = RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=RPNHead(channels, anchor_generator.num_anchors_per_location()[0], conv_depth=r.conv_depth),
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
    box_parts = _build_box_parts(cfg, channels, res5, res5_channels)
    mask_parts = {}
    if m.enabled:
        mask_parts = dict(
            **_build_mask_parts(cfg, channels, box_parts["box_head"], res5_channels),
            mask_loss_type=m.loss_type,
        )
    keypoint_parts = {}
    if cfg.keypoint_head.enabled:
        k = cfg.keypoint_head
        keypoint_parts = dict(
            keypoint_pooler=_pooler(cfg, k.pooled_resolution),
            keypoint_head=KeypointRCNNConvHead(channels, tuple(k.conv_layers)),
            keypoint_predictor=KeypointRCNNPredictor(k.conv_layers[-1], k.num_keypoints),
        )
    roi_heads = RoIHeads(
        **box_parts,
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


def _build_backbone(cfg: ModelConfig):
    """(backbone, res5 for the C4 RoI head or None, res5's channels or None)."""
    b = cfg.backbone
    if b.kind == "c4":
        return build_resnet_c4_backbone(
            b.name, norm=b.norm, trainable_layers=b.trainable_layers, small_widths=b.small_widths, small_blocks=b.small_blocks
        )
    backbone = build_resnet_fpn_backbone(
        b.name, norm=b.norm, trainable_layers=b.trainable_layers, fpn_channels=b.fpn_channels,
        small_widths=b.small_widths, small_blocks=b.small_blocks, fpn_norm=b.fpn_norm,
    )
    return backbone, None, None


def _build_anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    a = cfg.anchors
    if cfg.backbone.kind == "c4":  # every size at the one level (res4)
        return AnchorGenerator((tuple(a.sizes),), (tuple(a.aspect_ratios),))
    return AnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes))


def _pooler(cfg: ModelConfig, output_size: int) -> MultiScaleRoIPooler:
    h = cfg.roi_heads
    return MultiScaleRoIPooler(output_size=output_size, sampling_ratio=h.sampling_ratio, pooler_type=h.pooler_type, aligned=h.aligned)


def _build_box_parts(cfg: ModelConfig, channels: int, res5, res5_channels) -> dict:
    h = cfg.roi_heads
    if cfg.backbone.kind == "c4":
        # 2S x 2S RoIs from res4 -> res5 -> S x S -> average pool
        head = Res5BoxHead(res5, res5_channels)
        return dict(
            box_pooler=_pooler(cfg, 2 * h.box_resolution), box_head=head, box_predictor=FastRCNNPredictor(res5_channels, cfg.num_classes)
        )
    if h.box_head_type == "conv_fc":
        box_head = ConvFCHead(
            channels, h.box_resolution, tuple(h.box_conv_layers), h.representation_size, head_norm_layer(h.box_head_norm)
        )
    else:
        box_head = TwoMLPHead(channels * h.box_resolution**2, h.representation_size)
    return dict(
        box_pooler=_pooler(cfg, h.box_resolution),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(h.representation_size, cfg.num_classes),
    )


def _build_mask_parts(cfg: ModelConfig, channels: int, box_head, res5_channels) -> dict:
    """The mask branch: its RoI features (S x S), head and predictor (2S x 2S masks).

    FPN: pooled at mask_resolution from P2-P5, S = mask_resolution (28x28 masks);
    C4: pooled at mask_resolution from res4 then res5 (shared with the box head), S = mask_resolution / 2 (14x14)."""
    h, m = cfg.roi_heads, cfg.mask_head
    num_masks = 1 if m.class_agnostic else cfg.num_classes
    if cfg.backbone.kind == "c4":
        pooler = Res5MaskFeatures(_pooler(cfg, h.mask_resolution), box_head)
        in_channels = res5_channels
    else:
        pooler = _pooler(cfg, h.mask_resolution)
        in_channels = channels
    size = pooler.output_size[0]
    if m.head_type == "mlp":
        head = MaskRCNNMLPHead(in_channels * size * size, tuple(m.mlp_dims))
        predictor = MLPMaskPredictor(m.mlp_dims[-1], num_masks, 2 * size)
    elif cfg.backbone.kind == "c4":
        head = nn.Identity()  # res5 is the C4 head's conv tower
        predictor = MaskRCNNPredictor(in_channels, m.conv_layers[-1], num_masks)
    else:
        head = MaskRCNNConvHead(in_channels, tuple(m.conv_layers), m.dilation, head_norm_layer(m.norm))
        predictor = MaskRCNNPredictor(m.conv_layers[-1], m.conv_layers[-1], num_masks)
    return dict(mask_pooler=pooler, mask_head=head, mask_predictor=predictor)


def _validate_variants(cfg: ModelConfig) -> None:
    """The backbone kind (fpn / c4), its anchors and RoI sizes, and the mask head type."""
    b, a, h, m = cfg.backbone, cfg.anchors, cfg.roi_heads, cfg.mask_head
    if b.kind not in BACKBONE_KINDS:
        raise ValueError(f"backbone.kind must be one of {BACKBONE_KINDS}, got {b.kind!r}")
    if not a.sizes or any(s <= 0 for s in a.sizes):
        raise ValueError(f"anchors.sizes must be positive sizes in pixels, got {tuple(a.sizes)}")
    if not a.aspect_ratios or any(r <= 0 for r in a.aspect_ratios):
        raise ValueError(f"anchors.aspect_ratios must be positive (h/w), got {tuple(a.aspect_ratios)}")
    if b.kind == "fpn" and len(a.sizes) != 5:
        raise ValueError(
            f"anchors.sizes needs one size per FPN level P2-P6 (5), got {len(a.sizes)}: {tuple(a.sizes)} "
            "(several sizes at one level is backbone.kind 'c4')"
        )
    if b.kind == "c4":
        if len(set(a.sizes)) != len(a.sizes):
            raise ValueError(f"anchors.sizes of backbone.kind 'c4' all sit on res4 and must differ, got {tuple(a.sizes)}")
        if h.mask_resolution % 2 or h.mask_resolution < 2:
            raise ValueError(
                f"roi_heads.mask_resolution must be even with backbone.kind 'c4' (res5 halves the pooled RoI), got {h.mask_resolution}"
            )
        if m.dilation != 1:
            raise ValueError(
                f"mask_head.dilation is {m.dilation}, but backbone.kind 'c4' has no mask convs to dilate (res5 is its conv tower); use 1"
            )
    if m.head_type not in MASK_HEAD_TYPES:
        raise ValueError(f"mask_head.head_type must be one of {MASK_HEAD_TYPES}, got {m.head_type!r}")
    if m.head_type == "fcn" and (not m.conv_layers or any(c <= 0 for c in m.conv_layers)):
        raise ValueError(f"mask_head.conv_layers must be positive widths, at least one, got {tuple(m.conv_layers)}")
    if m.head_type == "mlp" and (not m.mlp_dims or any(d <= 0 for d in m.mlp_dims)):
        raise ValueError(f"mask_head.mlp_dims must be positive widths, at least one, for head_type 'mlp', got {tuple(m.mlp_dims)}")
    keypoint_head = getattr(cfg, "keypoint_head", None)
    if b.kind == "c4" and keypoint_head is not None and keypoint_head.enabled:
        raise ValueError("keypoint_head is built for backbone.kind 'fpn' (the paper's Keypoint R-CNN); it is not available with 'c4'")


__all__ = ["build_model", "validate_config", "MaskRCNN"]
