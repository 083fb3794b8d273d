"""Multi-scale RoI feature extraction: each RoI is pooled from the FPN level that fits its size.

Shapes: N images; R RoIs over the whole batch; C channels; S x S output.

RoIAlign on the CPU runs as a weighted gather (``roi_align_gather``) in training and on the
inference fast path: torchvision's CPU kernel walks one output element at a time on one thread,
recomputing each sample's bilinear weights for every channel, and its backward scatters the
same way; it was about a fifth of a CPU training step. The gather computes each sample's four
corners and weights once per RoI bin and reads all C channels of a corner as one contiguous
row of the NHWC feature map; ``F.embedding_bag`` (a multithreaded weighted row gather and sum,
whose backward is the matching scatter-add) does the arithmetic. Same samples, same weights as
torchvision's kernel; only the order of the float additions differs. The reference inference
path keeps torchvision's kernel, so its outputs stay bit-identical to torchvision's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area, roi_align, roi_pool


# FPN paper eq. 1: a box of ImageNet's 224 x 224 pixels pools from level k0 = 4.
_CANONICAL_SCALE = 224
_CANONICAL_LEVEL = 4


def assign_levels(boxes: Tensor, k_min: int, k_max: int) -> Tensor:
    """FPN paper eq. 1: level k = floor(k0 + log2(sqrt(wh) / 224)), clamped; returns k - k_min."""
    scale = torch.sqrt(box_area(boxes))
    levels = torch.floor(_CANONICAL_LEVEL + torch.log2(scale / _CANONICAL_SCALE) + torch.tensor(1e-6, dtype=scale.dtype))
    return (torch.clamp(levels, min=k_min, max=k_max).to(torch.int64) - k_min)


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, ...]:
    """Sample positions along one axis, as torchvision's roi_align places and clamps them.

    ``start``/``length``: (R,) the RoI's first coordinate and extent on the feature map.
    Returns (valid, low, high, weight_low, weight_high), each (R, bins, grid)."""
    bin_size = length / bins
    offsets = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None] * bin_size[:, None, None]
    within = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5)[None, None, :] * bin_size[:, None, None] / grid
    pos = start[:, None, None] + offsets + within
    # A sample more than one pixel outside the map contributes nothing (but still counts in the
    # bin's average); one within a pixel of the edge reads the edge.
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64)  # truncation is floor here: pos >= 0
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return valid, low, high, 1.0 - frac, frac


def roi_align_gather(feature: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                     sampling_ratio: int, aligned: bool = False) -> Tensor:
    """torchvision's ``roi_align`` (sampling_ratio > 0) as one weighted gather over NHWC rows.

    ``feature``: (N, C, H, W), any memory layout (channels_last is read without a copy);
    ``rois``: (R, 5) batch index, x1, y1, x2, y2. Returns (R, C, S_h, S_w), stored NHWC.
    Differentiable in ``feature`` (not in ``rois``, as torchvision's)."""
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_gather needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    n, channels, height, width = feature.shape
    out_h, out_w = output_size
    grid = sampling_ratio
    num_rois = rois.shape[0]
    # Under autocast, torchvision's roi_align runs in fp32 and returns the input's dtype.
    compute = torch.float32 if feature.dtype in (torch.float16, torch.bfloat16) else feature.dtype
    with torch.autocast(feature.device.type, enabled=False):
        boxes = rois.detach().to(compute)
        offset = 0.5 if aligned else 0.0
        x1 = boxes[:, 1] * spatial_scale - offset
        y1 = boxes[:, 2] * spatial_scale - offset
        roi_w = boxes[:, 3] * spatial_scale - offset - x1
        roi_h = boxes[:, 4] * spatial_scale - offset - y1
        if not aligned:  # torchvision's legacy mode: every RoI at least 1x1
            roi_w = roi_w.clamp(min=1.0)
            roi_h = roi_h.clamp(min=1.0)
        vy, y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, roi_h, out_h, grid, height)
        vx, x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, roi_w, out_w, grid, width)

        def ys(t: Tensor) -> Tensor:  # (R, out_h, grid) -> (R, out_h, 1, grid, 1)
            return t[:, :, None, :, None]

        def xs(t: Tensor) -> Tensor:  # (R, out_w, grid) -> (R, 1, out_w, 1, grid)
            return t[:, None, :, None, :]

        image = rois[:, 0].detach().to(torch.int64).clamp(0, n - 1) * (height * width)
        row_lo = image[:, None, None] + y_lo * width
        row_hi = image[:, None, None] + y_hi * width
        index = torch.stack([ys(row_lo) + xs(x_lo), ys(row_lo) + xs(x_hi), ys(row_hi) + xs(x_lo), ys(row_hi) + xs(x_hi)], dim=-1)
        weight = torch.stack([ys(wy_lo) * xs(wx_lo), ys(wy_lo) * xs(wx_hi), ys(wy_hi) * xs(wx_lo), ys(wy_hi) * xs(wx_hi)], dim=-1)
        valid = (ys(vy) & xs(vx))[..., None]
        weight = torch.where(valid, weight / (grid * grid), torch.zeros_like(weight))
        index = torch.where(valid, index, image[:, None, None, None, None, None])
        per_bin = grid * grid * 4
        table = feature.permute(0, 2, 3, 1).reshape(n * height * width, channels).to(compute)
        pooled = F.embedding_bag(index.reshape(-1, per_bin), table, mode="sum", per_sample_weights=weight.reshape(-1, per_bin))
    return pooled.view(num_rois, out_h, out_w, channels).permute(0, 3, 1, 2).to(feature.dtype)


class MultiScaleRoIPooler(nn.Module):
    """RoIAlign (bilinear sampling, no quantization) or RoIPool (quantized max) over FPN levels.

    ``exact_inference`` (default True): in eval mode, RoIAlign runs torchvision's kernel on every
    device, for outputs bit-identical to torchvision's. In training, and in eval mode with
    ``exact_inference`` off (``optimize_for_inference`` turns it off), RoIAlign with a fixed
    sampling ratio runs ``roi_align_gather`` on the CPU (same result up to float rounding;
    multithreaded, with each bin's weights computed once for all channels; its speed:
    docs/performance.md). Other devices always run torchvision's kernel."""

    def __init__(self, *, output_size: int, sampling_ratio: int, pooler_type: str = "align", aligned: bool = False):
        super().__init__()
        if pooler_type not in ("align", "pool"):
            raise ValueError(f"pooler_type must be 'align' or 'pool', got {pooler_type!r}")
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type
        self.aligned = aligned
        self.exact_inference = True

    def gathers(self, device: torch.device) -> bool:
        """Whether RoIAlign runs as ``roi_align_gather`` on ``device`` in the current mode."""
        return (self.pooler_type == "align" and self.sampling_ratio > 0 and device.type == "cpu"
                and (self.training or not self.exact_inference))

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.pooler_type == "align":
            if self.gathers(feature.device):
                return roi_align_gather(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)
            return roi_align(feature, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        return roi_pool(feature, rois, self.output_size, spatial_scale=scale)

    def forward(self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """``features``: the levels to pool from, finest first; ``boxes``: (Ri, 4) per image -> (R, C, S, S)."""
        # A level's scale is its size relative to the largest image, rounded to a power of two.
        max_h = max(s[0] for s in image_sizes)
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
        # The RoIs in level order (a stable sort: each level's in their order), so that each level
        # pools one contiguous slice. Its bounds are the one host read (a GPU sync) of the call,
        # where selecting each level's RoIs (torch.where) would be one per level.
        order = torch.argsort(levels, stable=True)
        bounds = torch.searchsorted(levels[order], torch.arange(len(features) + 1, device=levels.device)).tolist()
        sorted_rois = rois[order]
        # NHWC when the gather writes NHWC: no layout change on the way in
        layout = torch.channels_last if self.gathers(features[0].device) else torch.contiguous_format
        result = torch.empty((rois.shape[0], channels, *self.output_size), dtype=features[0].dtype,
                             device=features[0].device, memory_format=layout).zero_()
        for feature, scale, start, end in zip(features, scales, bounds, bounds[1:]):
            # an empty level too: every level stays in the graph (its gradient zeros, not None)
            pooled = self._pool(feature, sorted_rois[start:end], scale)
            result.index_copy_(0, order[start:end], pooled.to(result.dtype))
        return result
