"""Multi-scale RoI feature extraction: each RoI is pooled from the FPN level that fits its size.

Shapes: N images; R RoIs over the whole batch; C channels; S x S output.

RoIAlign runs as a weighted gather (``roi_align_gather``) on the inference fast path, and on the
CPU in training: all levels in one gather, no host sync (on a GPU, per-level calls need the
levels' RoI counts on the host). torchvision's CPU kernel walks one output element at a time on one thread,
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


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: Tensor) -> tuple[Tensor, ...]:
    """Sample positions along one axis, as torchvision's roi_align places and clamps them.

    ``start``/``length``: (R,) the RoI's first coordinate and extent on its feature map;
    ``size``: (R,) that map's extent along the axis. Returns (valid, low, high, weight_low,
    weight_high), each (R, bins, grid)."""
    bin_size = length / bins
    offsets = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None] * bin_size[:, None, None]
    within = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5)[None, None, :] * bin_size[:, None, None] / grid
    pos = start[:, None, None] + offsets + within
    size = size[:, None, None]
    # A sample more than one pixel outside the map contributes nothing (but still counts in the
    # bin's average); one within a pixel of the edge reads the edge.
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64)  # truncation is floor here: pos >= 0
    last = low >= size - 1
    low = torch.minimum(low, size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return valid, low, high, 1.0 - frac, frac


def _per_level(levels: Tensor, values: list, dtype: torch.dtype) -> Tensor:
    """(R,) ``values[levels[i]]``, built on ``levels``' device from host scalars without a copy
    from the host (a GPU sync): one ``where`` per level."""
    out = torch.full(levels.shape, values[0], dtype=dtype, device=levels.device)
    for level, value in enumerate(values[1:], start=1):
        out = torch.where(levels == level, torch.full((), value, dtype=dtype, device=levels.device), out)
    return out


def roi_align_gather(feature: Tensor | list[Tensor], rois: Tensor, output_size: tuple[int, int], spatial_scale: float | list[float],
                     sampling_ratio: int, aligned: bool = False, levels: Tensor | None = None) -> Tensor:
    """torchvision's ``roi_align`` (sampling_ratio > 0) as one weighted gather over NHWC rows, of
    one feature map or of several at once: ``feature`` a list of levels, ``spatial_scale`` one
    per level, and ``levels`` (R,) the level each RoI pools from (FPN: one launch for all levels,
    no host sync; without ``levels``, the first level).

    ``feature``: (N, C, Hl, Wl) each, any memory layout (channels_last is read without a copy);
    ``rois``: (R, 5) batch index, x1, y1, x2, y2. Returns (R, C, S_h, S_w), stored NHWC, in the
    RoIs' order. Differentiable in ``feature`` (not in ``rois``, as torchvision's)."""
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_gather needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    features = list(feature) if isinstance(feature, (list, tuple)) else [feature]
    scales = list(spatial_scale) if isinstance(spatial_scale, (list, tuple)) else [spatial_scale]
    n, channels = features[0].shape[:2]
    out_h, out_w = output_size
    grid = sampling_ratio
    num_rois = rois.shape[0]
    dtype = features[0].dtype
    # Under autocast, torchvision's roi_align runs in fp32 and returns the input's dtype.
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    with torch.autocast(features[0].device.type, enabled=False):
        if levels is None:
            levels = torch.zeros(num_rois, dtype=torch.int64, device=rois.device)
        # each RoI's level: its map's height, width, scale, and first row in the table of all levels
        heights = _per_level(levels, [f.shape[-2] for f in features], torch.int64)
        widths = _per_level(levels, [f.shape[-1] for f in features], torch.int64)
        scale = _per_level(levels, scales, compute)
        first_rows = [0]
        for f in features[:-1]:
            first_rows.append(first_rows[-1] + n * f.shape[-2] * f.shape[-1])
        first_row = _per_level(levels, first_rows, torch.int64)

        boxes = rois.detach().to(compute)
        offset = 0.5 if aligned else 0.0
        x1 = boxes[:, 1] * scale - offset
        y1 = boxes[:, 2] * scale - offset
        roi_w = boxes[:, 3] * scale - offset - x1
        roi_h = boxes[:, 4] * scale - offset - y1
        if not aligned:  # torchvision's legacy mode: every RoI at least 1x1
            roi_w = roi_w.clamp(min=1.0)
            roi_h = roi_h.clamp(min=1.0)
        vy, y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, roi_h, out_h, grid, heights)
        vx, x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, roi_w, out_w, grid, widths)

        def ys(t: Tensor) -> Tensor:  # (R, out_h, grid) -> (R, out_h, 1, grid, 1)
            return t[:, :, None, :, None]

        def xs(t: Tensor) -> Tensor:  # (R, out_w, grid) -> (R, 1, out_w, 1, grid)
            return t[:, None, :, None, :]

        image = first_row + rois[:, 0].detach().to(torch.int64).clamp(0, n - 1) * (heights * widths)
        row_lo = image[:, None, None] + y_lo * widths[:, None, None]
        row_hi = image[:, None, None] + y_hi * widths[:, None, None]
        index = torch.stack([ys(row_lo) + xs(x_lo), ys(row_lo) + xs(x_hi), ys(row_hi) + xs(x_lo), ys(row_hi) + xs(x_hi)], dim=-1)
        weight = torch.stack([ys(wy_lo) * xs(wx_lo), ys(wy_lo) * xs(wx_hi), ys(wy_hi) * xs(wx_lo), ys(wy_hi) * xs(wx_hi)], dim=-1)
        valid = (ys(vy) & xs(vx))[..., None]
        weight = torch.where(valid, weight / (grid * grid), torch.zeros_like(weight))
        index = torch.where(valid, index, image[:, None, None, None, None, None])
        per_bin = grid * grid * 4
        # every level's NHWC rows, one after another (a view, not a copy, for one NHWC level). An
        # NCHW level (the Winograd path's, winograd.py) is made NHWC first: torch.cat reads a
        # transposed view element by element, 8x slower than this copy
        rows = [f.permute(0, 2, 3, 1).contiguous().view(-1, channels).to(compute) for f in features]
        table = rows[0] if len(rows) == 1 else torch.cat(rows)
        pooled = F.embedding_bag(index.reshape(-1, per_bin), table, mode="sum", per_sample_weights=weight.reshape(-1, per_bin))
    return pooled.view(num_rois, out_h, out_w, channels).permute(0, 3, 1, 2).to(dtype)


class MultiScaleRoIPooler(nn.Module):
    """RoIAlign (bilinear sampling, no quantization) or RoIPool (quantized max) over FPN levels.

    ``exact_inference`` (default True): in eval mode, RoIAlign runs torchvision's kernel on every
    device, one call per level, for outputs bit-identical to torchvision's. On the fast path
    (``optimize_for_inference`` turns ``exact_inference`` off), and in training on the CPU,
    RoIAlign with a fixed sampling ratio runs ``roi_align_gather`` over all levels at once: each
    RoI's level is an index, one gather for the whole batch, no host sync (same samples and
    weights as torchvision's kernel, summed in another order; on the CPU multithreaded, each bin's
    weights computed once for all channels; docs/performance.md). Training on other devices,
    and RoIPool, run torchvision's kernels level by level."""

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
        """Whether RoIAlign runs as ``roi_align_gather`` (all levels at once) on ``device`` in the
        current mode."""
        if self.pooler_type != "align" or self.sampling_ratio <= 0:
            return False
        return not self.exact_inference if not self.training else device.type == "cpu"

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.pooler_type == "align":
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
        levels = assign_levels(concat, k_min, k_max) if len(features) > 1 else None
        if self.gathers(features[0].device):
            return roi_align_gather(features, rois, self.output_size, scales, self.sampling_ratio, self.aligned, levels=levels)
        channels = features[0].shape[1]
        if levels is None:
            return self._pool(features[0], rois, scales[0])
        # The RoIs in level order (a stable sort: each level's in their order), so that each level
        # pools one contiguous slice. Its bounds are the one host read (a GPU sync) of the call,
        # where selecting each level's RoIs (torch.where) would be one per level.
        order = torch.argsort(levels, stable=True)
        bounds = torch.searchsorted(levels[order], torch.arange(len(features) + 1, device=levels.device)).tolist()
        sorted_rois = rois[order]
        result = torch.zeros((rois.shape[0], channels, *self.output_size), dtype=features[0].dtype, device=features[0].device)
        for feature, scale, start, end in zip(features, scales, bounds, bounds[1:]):
            # an empty level too: every level stays in the graph (its gradient zeros, not None)
            pooled = self._pool(feature, sorted_rois[start:end], scale)
            result.index_copy_(0, order[start:end], pooled.to(result.dtype))
        return result
