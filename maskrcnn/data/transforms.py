"""Training transforms on ``(image, target)`` pairs that keep boxes and masks consistent.

image: float ``(3, H, W)``; target: the dict of :mod:`maskrcnn.data.coco` (``boxes`` ``(N, 4)``
x1, y1, x2, y2 on pixel edges, ``masks`` ``(N, H, W)``, optionally ``keypoints`` ``(N, K, 3)``
x, y, visibility). Resizing is not here: the model resizes
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


def hflip(image: torch.Tensor, target: Target, keypoint_flip: Sequence[int] | None = None) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: x -> W - x for box edges and keypoints, columns reversed for image and
    masks. Keypoints also trade places by ``keypoint_flip`` (a left eye becomes a right eye;
    ``CocoDataset.keypoint_flip``), and an unlabelled one (visibility 0) stays at (0, 0, 0), the
    way torchvision's reference flips COCO's person keypoints."""
    width = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        # (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        keypoints = target["keypoints"]
        if keypoint_flip is None:
            raise ValueError(
                "the target has keypoints: a horizontal flip needs keypoint_flip, the left/right swap of the keypoints "
                "(CocoDataset.keypoint_flip; list(range(K)) for keypoints without sides)"
            )
        if len(keypoint_flip) != keypoints.shape[1]:
            raise ValueError(f"keypoint_flip has {len(keypoint_flip)} entries for {keypoints.shape[1]} keypoints")
        flipped = keypoints[:, list(keypoint_flip)].clone()
        flipped[..., 0] = width - flipped[..., 0]
        flipped[flipped[..., 2] == 0] = 0
        target["keypoints"] = flipped
    return image.flip(-1), target


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (drawn from torch's RNG, so ``torch.manual_seed``
    and DataLoader worker seeding make it reproducible). Targets with keypoints need
    ``keypoint_flip``, the left/right swap (``CocoDataset.keypoint_flip``); see :func:`hflip`."""

    def __init__(self, p: float = 0.5, keypoint_flip: Sequence[int] | None = None) -> None:
        self.p = p
        self.keypoint_flip = list(keypoint_flip) if keypoint_flip is not None else None

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) < self.p:
            return hflip(image, target, self.keypoint_flip)
        return image, target

    def __repr__(self) -> str:
        extra = f", keypoint_flip={self.keypoint_flip}" if self.keypoint_flip is not None else ""
        return f"RandomHorizontalFlip(p={self.p}{extra})"
