"""Multi-scale RoI feature extraction: each RoI is pooled from the FPN level that fits its size.

Shapes: N images; R RoIs over the whole batch; C channels; S x S output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import box_area, roi_align, roi_pool


def assign_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224, canonical_level: int = 4) -> Tensor:
    """FPN paper eq. 1: level k = floor(k0 + log2(sqrt(wh) / 224)), clamped; returns k - k_min."""
    scale = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + torch.tensor(1e-6, dtype=scale.dtype))
    return (torch.clamp(levels, min=k_min, max=k_max).to(torch.int64) - k_min)


class MultiScaleRoIPooler(nn.Module):
    """RoIAlign (bilinear sampling, no quantization) or RoIPool (quantized max) over FPN levels."""

    def __init__(self, *, output_size: int, sampling_ratio: int, pooler_type: str = "align", aligned: bool = False):
        super().__init__()
        if pooler_type not in ("align", "pool"):
            raise ValueError(f"pooler_type must be 'align' or 'pool', got {pooler_type!r}")
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type
        self.aligned = aligned

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.pooler_type == "align":
            return roi_align(feature, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        return roi_pool(feature, rois, self.output_size, spatial_scale=scale)

    def forward(self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """``features``: the levels to pool from, finest first; ``boxes``: (Ri, 4) per image -> (R, C, S, S)."""
        # A level's scale is its size relative to the largest image, rounded to a power of two.
        max_h = max(s[0] for s in image_sizes)
        max_w = max(s[1] for s in image_sizes)
        scales = []
        for feature in features:
            approx = float(feature.shape[-2]) / max_h
            scales.append(2.0 ** round(math.log2(approx)))
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))

        concat = torch.cat(boxes, dim=0)
        # (R, 5): batch index, x1, y1, x2, y2
        image_idx = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
        rois = torch.cat([image_idx, concat], dim=1)
        channels = features[0].shape[1]
        if len(features) == 1:
            return self._pool(features[0], rois, scales[0])
        levels = assign_levels(concat, k_min, k_max)
        result = features[0].new_zeros((rois.shape[0], channels, *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            idx = torch.where(levels == level)[0]
            result[idx] = self._pool(feature, rois[idx], scale).to(result.dtype)
        return result
