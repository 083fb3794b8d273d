"""Backbones: a ResNet/ResNeXt trunk with a Feature Pyramid Network (P2-P6), or the paper's
C4 variant (res4 alone, with res5 handed to the RoI head).

Shapes: N images; the trunk's stages res2..res5 have strides 4, 8, 16, 32; FPN outputs
P2..P5 and P6 (a stride-2 max pool of P5), all with ``fpn_channels`` channels.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

TRUNKS = {
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x8d": resnet.resnext101_32x8d,
}


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(min(32, channels // 4), channels)
    raise ValueError(f"backbone norm must be 'frozen_bn', 'bn' or 'gn', got {norm!r}")


HEAD_NORMS = ("none", "bn", "frozen_bn", "gn")


def head_norm_layer(norm: str):
    """The norm after the convs of the FPN and the RoI heads: None for "none" (convs with bias)."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
    return None if norm == "none" else _norm_layer(norm)


class SmallResNet(nn.Module):
    """A narrow ResNet of BasicBlocks for CPU training; the attribute names of torchvision's
    ResNet, so the same layer getter and freezing rules apply."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(count):
                downsample = None
                if b == 0 and (stride != 1 or in_ch != width):
                    downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm_layer(width))
                layers.append(resnet.BasicBlock(in_ch, width, stride if b == 0 else 1, downsample, norm_layer=norm_layer))
                in_ch = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:  # only used through IntermediateLayerGetter
        raise NotImplementedError


class BackboneWithFPN(nn.Module):
    """Trunk stages res2..res5 -> FPN levels "0".."3" (P2..P5) and "pool" (P6)."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int, norm_layer=None):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
        # norm_layer: after each FPN conv (torchvision's v2: BatchNorm), keys "inner_blocks.i.1.*"
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def build_resnet_fpn_backbone(name: str, *, norm: str, trainable_layers: int, fpn_channels: int,
                              small_widths=(16, 32, 64, 128), small_blocks=(1, 1, 1, 1), fpn_norm: str = "none") -> BackboneWithFPN:
    body, in_channels = build_trunk(
        name, norm=norm, trainable_layers=trainable_layers, small_widths=small_widths, small_blocks=small_blocks
    )
    return BackboneWithFPN(body, in_channels, fpn_channels, head_norm_layer(fpn_norm))


def build_trunk(name: str, *, norm: str, trainable_layers: int,
                small_widths=(16, 32, 64, 128), small_blocks=(1, 1, 1, 1)) -> tuple[nn.Module, list[int]]:
    """The ResNet trunk with its first stages frozen, and the channels of res2..res5."""
    norm_layer = _norm_layer(norm)
    if name == "small":
        body = SmallResNet(tuple(small_widths), tuple(small_blocks), norm_layer)
        in_channels = list(small_widths)
    elif name in TRUNKS:
        body = TRUNKS[name](weights=None, norm_layer=norm_layer)
        in_channels = [256, 512, 1024, 2048]
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of: small, {', '.join(TRUNKS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for param_name, param in body.named_parameters():
        if all(not param_name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)
    return body, in_channels


class BackboneC4(nn.Module):
    """The paper's ResNet-C4 backbone: stem and res2..res4, one output "0" (res4, stride 16).

    res5 is not part of it: it is the RoI head (``roi_heads.c4_head``) that runs on each RoI.
    """

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        # IntermediateLayerGetter keeps the trunk's children up to layer3 and drops layer4 (res5).
        self.body = IntermediateLayerGetter(body, return_layers={"layer3": "0"})
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.body(x)


def build_resnet_c4_backbone(name: str, *, norm: str, trainable_layers: int,
                             small_widths=(16, 32, 64, 128), small_blocks=(1, 1, 1, 1)) -> tuple[BackboneC4, nn.Module, int]:
    """(backbone up to res4, the trunk's res5 stage for the RoI head, res5's output channels).

    ``trainable_layers`` counts res5 as for FPN (1: res5 only trains, ...)."""
    body, in_channels = build_trunk(
        name, norm=norm, trainable_layers=trainable_layers, small_widths=small_widths, small_blocks=small_blocks
    )
    res5 = body.layer4
    return BackboneC4(body, in_channels[2]), res5, in_channels[3]
