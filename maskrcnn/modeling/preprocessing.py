"""Input preprocessing: normalize, resize to (min_size, max_size), pad into one batch tensor.

Shapes: N images; each image (3, Hi, Wi), float in [0, 1].

The resize reproduces torchvision's GeneralizedRCNNTransform to the bit (the scale is computed
in Python floats and handed to ``interpolate`` with ``recompute_scale_factor=True``), because parity
with torchvision's outputs at the same weights depends on identical inputs. It is a separate,
explicit step: the model calls it, and a caller that resized on the CPU already (the labeling
job's decode tasks) calls the same function there and tells the model with ``resized=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ImageList:
    """A padded batch and the size of each image inside it before padding."""

    tensor: Tensor  # (N, 3, H, W), H and W multiples of size_divisible
    image_sizes: list[tuple[int, int]]  # (h, w) of each image as resized


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """The factor that brings the short side to min_size without the long side passing max_size."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """The (h, w) that ``resize_image`` produces, without touching pixels."""
    scale = resize_scale(height, width, min_size, max_size)
    # interpolate(recompute_scale_factor=True) floors input_size * scale_factor in double.
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def resize_image(image: Tensor, min_size: float, max_size: float) -> Tensor:
    """Bilinear resize of a (C, H, W) float image, exactly as torchvision's detection models do."""
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def resize_ratios(original_size: tuple[int, int], new_size: tuple[int, int]) -> tuple[float, float]:
    """(h, w) scale factors from one image size to another, as torchvision's ``resize_boxes``
    computes them (a float32 division of the sizes), but on the host: a float32 quotient is
    correctly rounded on every device, so the product with a box is the same to the bit, and no
    scalar is copied to the device (a host sync on a GPU) per image."""
    return tuple(float(np.float32(new) / np.float32(old)) for new, old in zip(new_size, original_size))


def resize_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale (N, 4) x1, y1, x2, y2 boxes from one image size (h, w) to another."""
    ratio_h, ratio_w = resize_ratios(original_size, new_size)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def resize_keypoints(keypoints: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale (..., K, 3) x, y, visibility keypoints from one image size (h, w) to another
    (as torchvision's ``resize_keypoints``, to the bit); the third value is kept."""
    ratio_h, ratio_w = resize_ratios(original_size, new_size)
    resized = keypoints.clone()
    resized[..., 0] *= ratio_w
    resized[..., 1] *= ratio_h
    return resized


def resize_target(target: dict[str, Tensor], original_size: tuple[int, int], new_size: tuple[int, int]) -> dict[str, Tensor]:
    """Boxes and keypoints scaled, masks resized with nearest neighbour to exactly ``new_size``."""
    target = dict(target)
    target["boxes"] = resize_boxes(target["boxes"], original_size, new_size)
    if "keypoints" in target:
        target["keypoints"] = resize_keypoints(target["keypoints"], original_size, new_size)
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:
            target["masks"] = masks.new_zeros((0, *new_size))
        else:
            target["masks"] = F.interpolate(masks[:, None].float(), size=new_size)[:, 0].to(masks.dtype)
    return target


def normalize_image(image: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (image - mean[:, None, None]) / std[:, None, None]


def batch_images(images: list[Tensor], size_divisible: int) -> ImageList:
    """Zero-pad images at the bottom and right into one (N, C, H, W) tensor."""
    image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    channels = images[0].shape[0]
    max_h = max(s[0] for s in image_sizes)
    max_w = max(s[1] for s in image_sizes)
    max_h = int(math.ceil(max_h / size_divisible) * size_divisible)
    max_w = int(math.ceil(max_w / size_divisible) * size_divisible)
    batched = images[0].new_zeros((len(images), channels, max_h, max_w))
    for i, img in enumerate(images):
        batched[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return ImageList(batched, image_sizes)


class ImagePreprocessor(torch.nn.Module):
    """Normalize, (optionally) resize and batch a list of images and their targets."""

    def __init__(self, *, min_size: int, max_size: int, image_mean, image_std, size_divisible: int = 32, train_min_sizes=()):
        super().__init__()
        self.min_size = min_size
        # in training, each image's short side is drawn from these (when given)
        self.train_min_sizes = tuple(train_min_sizes)
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32), persistent=False)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, resized: bool | list[bool] = False
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """``resized``: one flag for all images, or one per image."""
        flags = [resized] * len(images) if isinstance(resized, bool) else list(resized)
        if len(flags) != len(images):
            raise ValueError(f"resized has {len(flags)} flags for {len(images)} images")
        out_images = []
        out_targets = [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images[{i}] must be a (3, H, W) tensor, got shape {tuple(image.shape)}")
            if not image.is_floating_point():
                raise ValueError(f"images[{i}] must be float in [0, 1], got {image.dtype}")
            original_size = (int(image.shape[-2]), int(image.shape[-1]))
            image = normalize_image(image, self.image_mean.to(image.dtype), self.image_std.to(image.dtype))
            if not flags[i]:
                image = resize_image(image, self._min_size(), self.max_size)
            if targets is not None:
                new_size = (int(image.shape[-2]), int(image.shape[-1]))
                out_targets.append(resize_target(targets[i], original_size, new_size) if not flags[i] else targets[i])
            out_images.append(image)
        return batch_images(out_images, self.size_divisible), out_targets

    def padded_size(self, height: int, width: int, resized: bool = False) -> tuple[int, int]:
        """The (H, W) of the batch tensor that an (height, width) image alone is padded to in eval
        mode: resized (unless it already is), then rounded up to ``size_divisible``."""
        if not resized:
            height, width = resized_size(height, width, self.min_size, self.max_size)
        d = self.size_divisible
        return int(math.ceil(height / d) * d), int(math.ceil(width / d) * d)

    def _min_size(self) -> float:
        if self.training and self.train_min_sizes:
            # torchvision's draw (GeneralizedRCNNTransform.torch_choice), from torch's RNG
            return self.train_min_sizes[int(torch.empty(1).uniform_(0.0, float(len(self.train_min_sizes))).item())]
        return self.min_size
