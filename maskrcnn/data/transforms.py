"""Training transforms on ``(image, target)`` pairs that keep boxes and masks consistent.

image: float ``(3, H, W)``; target: the dict of :mod:`maskrcnn.data.coco` (``boxes`` ``(N, 4)``
x1, y1, x2, y2 on pixel edges, ``masks`` ``(N, H, W)``). Resizing is not here: the model resizes
images and targets to ``InputConfig.min_size``/``max_size`` itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["Compose", "RandomHorizontalFlip", "hflip"]

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


class Compose:
    """Apply transforms one after the other."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: x -> W - x for box edges, columns reversed for image and masks."""
    width = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        # (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (drawn from torch's RNG, so ``torch.manual_seed``
    and DataLoader worker seeding make it reproducible)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"
