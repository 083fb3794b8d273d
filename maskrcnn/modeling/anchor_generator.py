"""Anchors: one size and several aspect ratios per feature level, on every cell of its grid.

Shapes: L levels; A anchors per cell; Hi, Wi the grid of level i.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    def __init__(self, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...]):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} anchor sizes but {len(aspect_ratios)} aspect-ratio sets: need one per level")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        # (A, 4) anchors centred on (0, 0) for each level, rounded to whole pixels
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _cell_anchors(scales, aspect_ratios) -> Tensor:
        scales = torch.as_tensor(scales, dtype=torch.float32)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]], dtype, device) -> list[Tensor]:
        """Per level: (Hi*Wi*A, 4) anchors, ordered cell by cell (row-major), A per cell."""
        key = (tuple(grid_sizes), tuple(strides), dtype, device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        anchors = []
        for (gh, gw), (sh, sw), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(0, gw, dtype=torch.int32, device=device) * sw
            shifts_y = torch.arange(0, gh, dtype=torch.int32, device=device) * sh
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            # (Hi*Wi, 1, 4) + (1, A, 4) -> (Hi*Wi*A, 4)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, batch_shape: tuple[int, int], feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors of every level for the padded batch of spatial size ``batch_shape`` (h, w)."""
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        strides = [(batch_shape[0] // gh, batch_shape[1] // gw) for gh, gw in grid_sizes]
        return self.grid_anchors(grid_sizes, strides, feature_maps[0].dtype, feature_maps[0].device)
