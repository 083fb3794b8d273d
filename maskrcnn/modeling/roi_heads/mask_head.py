"""Mask branch: an FCN on pooled RoI features predicting one m x m mask per class.

Shapes: R RoIs; C channels; S x S pooled size (14); M = 2S mask size (28); K classes.
The paper's key choice: per-class sigmoid masks with a binary loss, so classes do not compete;
the k-th mask is trained (and used) for the RoI's class k only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.misc import Conv2dNormActivation


def conv_blocks(in_channels: int, widths: tuple[int, ...], norm_layer=None, dilation: int = 1) -> list[nn.Module]:
    """3x3 convs of ``widths`` (each with ReLU, and ``norm_layer`` then without bias), one after
    another from ``in_channels``: the conv stacks of the mask head and of the conv box head."""
    blocks: list[nn.Module] = []
    for width in widths:
        blocks.append(Conv2dNormActivation(in_channels, width, kernel_size=3, dilation=dilation, padding=dilation, norm_layer=norm_layer))
        in_channels = width
    return blocks


def init_convs(module: nn.Module) -> None:
    """Every conv of ``module``: He (fan-out) weights, zero biases, as torchvision's heads."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MaskRCNNConvHead(nn.Sequential):
    """``len(layers)`` 3x3 convs with ReLU (key layout of torchvision's MaskRCNNHeads: "0.0.weight"),
    each with ``norm_layer`` (then without bias; torchvision's v2: BatchNorm, "0.1.*") or none."""

    def __init__(self, in_channels: int, layers: tuple[int, ...], dilation: int = 1, norm_layer=None):
        super().__init__(*conv_blocks(in_channels, layers, norm_layer, dilation))
        init_convs(self)


class MaskRCNNPredictor(nn.Module):
    """2x deconv then a 1x1 conv to one mask logit map per class (or a single one, class-agnostic)."""

    def __init__(self, in_channels: int, dim_reduced: int, num_masks: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_masks, 1, 1, 0)
        for layer in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))  # (R, K, M, M)


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """Each positive proposal's ground-truth mask cut to the proposal and sampled to (size, size)
    with RoIAlign on the masks' device: (P, size, size) soft targets in [0, 1]."""
    rois = torch.cat([matched_idxs[:, None].to(proposals), proposals], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), spatial_scale=1.0)[:, 0]


def mask_rcnn_loss(pred_mask_logits: Tensor, gt_labels: Tensor, gt_targets: Tensor, loss_type: str = "sigmoid") -> Tensor:
    """``sigmoid``: binary cross-entropy on the mask of the RoI's class (the paper's Lmask);
    ``softmax``: multinomial cross-entropy across classes per pixel (the ablation).
    Positive RoIs only; a batch without any gives a zero that still reaches every weight."""
    if gt_targets.numel() == 0:
        return pred_mask_logits.sum() * 0
    if loss_type == "softmax":
        # per pixel: the true class where the target is on, background (0) where off
        pixel_class = torch.where(gt_targets >= 0.5, gt_labels[:, None, None], torch.zeros_like(gt_labels)[:, None, None])
        return F.cross_entropy(pred_mask_logits, pixel_class)
    if pred_mask_logits.shape[1] == 1:  # class-agnostic
        logits = pred_mask_logits[:, 0]
    else:
        logits = pred_mask_logits[torch.arange(gt_labels.shape[0], device=gt_labels.device), gt_labels]
    return F.binary_cross_entropy_with_logits(logits, gt_targets)


def mask_rcnn_inference(pred_mask_logits: Tensor, pred_labels: list[Tensor], loss_type: str = "sigmoid") -> list[Tensor]:
    """The predicted class's mask probabilities: (D, M, M) per image."""
    labels = torch.cat(pred_labels)
    if loss_type == "softmax":
        probs = pred_mask_logits.softmax(dim=1)
    else:
        probs = pred_mask_logits.sigmoid()
    if probs.shape[1] == 1:
        probs = probs[:, 0]
    else:
        probs = probs[torch.arange(labels.shape[0], device=labels.device), labels]
    return list(probs.split([len(lb) for lb in pred_labels]))


class MaskRCNNMLPHead(nn.Module):
    """The paper's fully connected mask head (Table 2e, "MLP"): the flattened (R, C, S, S) mask
    features through ``len(dims)`` fc layers with ReLU -> (R, dims[-1])."""

    def __init__(self, in_features: int, dims: tuple[int, ...]):
        super().__init__()
        for k, width in enumerate(dims):
            setattr(self, f"mask_fc{k + 1}", nn.Linear(in_features, width))
            in_features = width
        self.num_layers = len(dims)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # (R, C, S, S) -> (R, C*S*S)
        for k in range(self.num_layers):
            x = F.relu(getattr(self, f"mask_fc{k + 1}")(x))
        return x


class MLPMaskPredictor(nn.Module):
    """One fc layer to ``num_masks`` M x M mask logit maps: (R, D) -> (R, num_masks, M, M).

    The layer keeps the FCN predictor's name, ``mask_fcn_logits`` (as detectron's fc mask
    output does), so it is the class-specific layer that fine-tuning re-initialises."""

    def __init__(self, in_features: int, num_masks: int, resolution: int):
        super().__init__()
        self.num_masks = num_masks
        self.resolution = resolution
        self.mask_fcn_logits = nn.Linear(in_features, num_masks * resolution * resolution)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(x).view(x.shape[0], self.num_masks, self.resolution, self.resolution)
