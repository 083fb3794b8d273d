"""The model's one typed config, and its named presets.

Only the builder (``maskrcnn.modeling.build_model``) reads a ``ModelConfig``; every module takes
plain arguments. A config round-trips through ``to_dict``/``from_dict`` so checkpoints carry it
as plain data (``torch.load(weights_only=True)`` reads it back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    # "resnet50", "resnet101", "resnext101_32x8d", or "small" (a narrow ResNet for CPU training)
    name: str = "resnet50"
    # "fpn": RoI features from FPN levels P2-P5, the RPN on P2-P6 (one anchor size per level).
    # "c4": the paper's ResNet-C4: RPN and RoI features on res4 alone (stride 16, all anchor sizes
    # at that one level); res5 is the box head (14x14 RoIs -> 7x7 -> average pool) and its output
    # also feeds the mask head (2x deconv -> 14x14 masks). fpn_channels is unused.
    kind: str = "fpn"
    # ResNet stages (1..4 = res2..res5) that train; torchvision's default freezes stem and res2.
    trainable_layers: int = 3
    # "frozen_bn" (the paper and torchvision, for pretrained trunks), "bn", or "gn" (from scratch).
    norm: str = "frozen_bn"
    fpn_channels: int = 256
    # The FPN's norm after each of its convs (then without bias): "none" (torchvision's v1, the
    # paper's), "bn" (torchvision's maskrcnn_resnet50_fpn_v2), "frozen_bn" or "gn".
    fpn_norm: str = "none"
    # Widths and depth of the "small" trunk (ignored by the torchvision trunks).
    small_widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    small_blocks: tuple[int, int, int, int] = (1, 1, 1, 1)


@dataclass
class AnchorConfig:
    # One size per FPN level (P2..P6), three aspect ratios (h/w) at every level.
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass
class RPNConfig:
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3
    # 3x3 convs (with ReLU) before the 1x1 predictors: 1 (the paper, torchvision's v1), 2 (v2).
    conv_depth: int = 1


@dataclass
class RoIHeadsConfig:
    # RoI feature extraction: "align" (RoIAlign, bilinear, no quantization) or "pool" (RoIPool).
    pooler_type: str = "align"
    sampling_ratio: int = 2
    # torchvision's (and so the COCO checkpoints') RoIAlign samples without the half-pixel shift;
    # detectron2's ROIAlignV2 sets it. Keep False to match torchvision's outputs.
    aligned: bool = False
    box_resolution: int = 7
    mask_resolution: int = 14
    # A proposal is positive (and gets a mask loss) at IoU >= fg_iou_thresh with a ground truth.
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # FPN box head: "mlp" (the paper's 2 fc layers of representation_size, torchvision's
    # TwoMLPHead) or "conv_fc" (3x3 convs of box_conv_layers, then one fc of representation_size:
    # "4conv1fc", torchvision's FastRCNNConvFCHead in maskrcnn_resnet50_fpn_v2). Unused by C4.
    box_head_type: str = "mlp"
    box_conv_layers: tuple[int, ...] = (256, 256, 256, 256)
    # The norm after each of the "conv_fc" head's convs: "none", "bn" (v2), "frozen_bn" or "gn".
    box_head_norm: str = "none"
    representation_size: int = 1024
    # Inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class MaskHeadConfig:
    enabled: bool = True
    # "fcn": 4 x (3x3 conv, 256) + 2x deconv + 1x1 conv to 28x28 per-class masks (with
    # backbone.kind "c4": res5, shared with the box head, + 2x deconv (conv_layers[-1] wide) +
    # 1x1 conv to 14x14 masks). "mlp": the paper's fully connected comparison (Table 2e): the
    # flattened mask features -> fc layers of mlp_dims -> fc to one m x m mask per class (m as fcn's).
    head_type: str = "fcn"
    # Hidden fc widths of the "mlp" head (the paper: 1024, 1024); unused by "fcn".
    mlp_dims: tuple[int, ...] = (1024, 1024)
    conv_layers: tuple[int, ...] = (256, 256, 256, 256)
    dilation: int = 1
    # The norm after each of the "fcn" head's convs (then without bias): "none" (the paper,
    # torchvision's v1), "bn" (torchvision's maskrcnn_resnet50_fpn_v2), "frozen_bn" or "gn".
    norm: str = "none"
    # "sigmoid": per-class binary masks (the paper's default); "softmax": multinomial across classes.
    loss_type: str = "sigmoid"
    class_agnostic: bool = False


@dataclass
class KeypointHeadConfig:
    """Keypoint R-CNN's branch (He et al. 2017, section 5; torchvision's KeypointRCNN): RoIAlign
    to ``pooled_resolution`` (14), ``conv_layers`` 3x3 convs with ReLU, a stride-2 deconv and a
    bilinear x2 upsampling to one heatmap per keypoint of 4 x ``pooled_resolution`` (56) pixels,
    trained with a softmax over the heatmap's positions for each visible keypoint. One set of
    heatmaps for every class (class-agnostic), as in the paper and torchvision."""

    enabled: bool = False
    num_keypoints: int = 17
    conv_layers: tuple[int, ...] = (512,) * 8
    pooled_resolution: int = 14
    # Optional: the keypoints' names (COCO's category "keypoints") and the skeleton's 1-based
    # index pairs (COCO's "skeleton"); a training run takes them from its annotations.
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # from_dict hands back lists: keep the config comparable and hashable-looking
        self.keypoint_names = tuple(str(n) for n in self.keypoint_names)
        self.skeleton = tuple(tuple(int(v) for v in pair) for pair in self.skeleton)


COCO_PERSON_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip


@dataclass
class InputConfig:
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32
    # Training only: each image's short side drawn at random from these (torchvision's keypoint
    # model: 640..800); empty: always min_size. Inference always uses min_size.
    train_min_sizes: tuple[int, ...] = ()


@dataclass
class ModelConfig:
    # Number of classifier outputs, background included (index 0). For torchvision's COCO
    # weights this is 91 and the class index is the COCO category id.
    num_classes: int = 91
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "config")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(
        self,
        min_size: int | None = None,
        max_size: int | None = None,
        score_thresh: float | None = None,
        detections_per_img: int | None = None,
    ) -> "ModelConfig":
        """This config with the jobs' ``--min-size``, ``--max-size``, ``--score-threshold`` and
        ``--max-detections`` applied; None keeps the config's own value. An explicit ``min_size``
        is also the one training size (``train_min_sizes`` emptied)."""
        config = self
        if min_size is not None or max_size is not None:
            config = config.replace(input=dataclasses.replace(
                config.input,
                min_size=config.input.min_size if min_size is None else min_size,
                max_size=config.input.max_size if max_size is None else max_size,
                train_min_sizes=config.input.train_min_sizes if min_size is None else (),
            ))
        if score_thresh is not None or detections_per_img is not None:
            config = config.replace(roi_heads=dataclasses.replace(
                config.roi_heads,
                score_thresh=config.roi_heads.score_thresh if score_thresh is None else score_thresh,
                detections_per_img=config.roi_heads.detections_per_img if detections_per_img is None else detections_per_img,
            ))
        return config

    def differences(self, other: "ModelConfig") -> list[str]:
        """The fields where ``other`` differs, as ``"rpn.nms_thresh: 0.7 -> 0.5"``; [] when equal.
        Fields a config (say, one saved by an older version) leaves out count as their defaults."""
        return _differences(self.to_dict(), other.to_dict(), "")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"model config: {where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"model config: unknown field(s) {unknown} in {where}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _r50_fpn() -> ModelConfig:
    return ModelConfig()


def _r50_fpn_v2() -> ModelConfig:
    """torchvision's maskrcnn_resnet50_fpn_v2 (Li et al., 2021, "Benchmarking Detection Transfer
    Learning with Vision Transformers"): BatchNorm in the trunk, the FPN and the box and mask
    heads, two RPN convs, a 4conv1fc box head; torchvision's other settings as r50_fpn's."""
    return ModelConfig(
        backbone=BackboneConfig(norm="bn", fpn_norm="bn"),
        rpn=RPNConfig(conv_depth=2),
        roi_heads=RoIHeadsConfig(box_head_type="conv_fc", box_head_norm="bn"),
        mask_head=MaskHeadConfig(norm="bn"),
    )


def _small() -> ModelConfig:
    """A narrow ResNet-FPN that trains to useful masks in minutes on a 2-core CPU."""
    return ModelConfig(
        num_classes=4,
        backbone=BackboneConfig(name="small", trainable_layers=5, norm="gn", fpn_channels=64),
        anchors=AnchorConfig(sizes=(16, 32, 64, 128, 256)),
        rpn=RPNConfig(
            batch_size_per_image=128,
            pre_nms_top_n_train=600,
            post_nms_top_n_train=300,
            pre_nms_top_n_test=300,
            post_nms_top_n_test=100,
        ),
        roi_heads=RoIHeadsConfig(batch_size_per_image=128, representation_size=256, detections_per_img=50),
        mask_head=MaskHeadConfig(conv_layers=(64, 64), mlp_dims=(256, 256)),
        input=InputConfig(min_size=256, max_size=384),
    )


def _r101_fpn() -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name="resnet101"))


def _x101_32x8d_fpn() -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name="resnext101_32x8d"))


def _keypoint_r50_fpn() -> ModelConfig:
    """torchvision's keypointrcnn_resnet50_fpn: person vs background, 17 COCO keypoints, no mask
    head; RPN, box head and inference settings as Mask R-CNN's; trained at short sides 640-800."""
    return ModelConfig(
        num_classes=2,
        mask_head=MaskHeadConfig(enabled=False),
        keypoint_head=KeypointHeadConfig(
            enabled=True, num_keypoints=17, keypoint_names=COCO_PERSON_KEYPOINT_NAMES, skeleton=COCO_PERSON_SKELETON
        ),
        input=InputConfig(train_min_sizes=(640, 672, 704, 736, 768, 800)),
    )


# The synthetic data's keypoints (maskrcnn.data.synthetic, keypoints=True): a square's corners.
SQUARE_CORNER_NAMES = ("top_left", "top_right", "bottom_right", "bottom_left")
SQUARE_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 1))


def _small_keypoint() -> ModelConfig:
    """``small`` with a narrow keypoint head instead of the mask head: trains on a CPU."""
    return _small().replace(
        mask_head=MaskHeadConfig(enabled=False),
        keypoint_head=KeypointHeadConfig(
            enabled=True, num_keypoints=4, conv_layers=(64, 64, 64, 64), keypoint_names=SQUARE_CORNER_NAMES, skeleton=SQUARE_SKELETON
        ),
    )


PRESETS = {
    "r50_fpn": _r50_fpn,
    "r50_fpn_v2": _r50_fpn_v2,
    "r101_fpn": _r101_fpn,
    "x101_32x8d_fpn": _x101_32x8d_fpn,
    "small": _small,
    "keypoint_r50_fpn": _keypoint_r50_fpn,
    "small_keypoint": _small_keypoint,
}


# ---- ResNet-C4 variants (the paper's Faster R-CNN / Mask R-CNN "C4" backbone) ----------------


def _c4(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the C4 backbone: its anchor sizes all at res4 (the paper: 5 scales x 3 ratios)."""
    return cfg.replace(backbone=dataclasses.replace(cfg.backbone, kind="c4"))


def _r50_c4() -> ModelConfig:
    # Detectron's C4 proposal counts: one level holds all the anchors, so more before NMS.
    rpn = RPNConfig(pre_nms_top_n_train=12000, post_nms_top_n_train=2000, pre_nms_top_n_test=6000, post_nms_top_n_test=1000)
    return _c4(ModelConfig(rpn=rpn))


def _r101_c4() -> ModelConfig:
    return _r50_c4().replace(backbone=BackboneConfig(name="resnet101", kind="c4"))


def _small_c4() -> ModelConfig:
    """``small`` with the C4 backbone: res2-res4 of the small trunk, its last stage the box head."""
    small = _small()
    # about the small FPN's proposals before NMS, summed over its levels
    rpn = dataclasses.replace(small.rpn, pre_nms_top_n_train=2000, pre_nms_top_n_test=1000)
    return _c4(small.replace(rpn=rpn))


PRESETS.update(r50_c4=_r50_c4, r101_c4=_r101_c4, small_c4=_small_c4)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config; ``overrides`` replace top-level fields (e.g. ``num_classes``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
