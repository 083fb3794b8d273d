"""Decoded images as the model takes them: float32 (3, H, W) RGB in [0, 1], from any Pillow mode."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb_float(image: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> float32 (3, H, W) RGB in [0, 1].

    8-bit modes go through Pillow's conversions (palette, CMYK, YCbCr, 1-bit, L, LA); alpha is
    dropped as Pillow and torchvision drop it, after resolving a palette's transparency. 16- and
    32-bit grey levels are scaled to their range instead of clipped at 255.
    """
    return as_float(to_rgb_tensor(image))


def as_float(image: torch.Tensor) -> torch.Tensor:
    """A ``to_rgb_tensor`` result as float32 in [0, 1] (on whatever device it is): uint8 / 255."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> (3, H, W) RGB in its most compact exact form: uint8 (0..255) for 8-bit
    sources, float32 in [0, 1] for 16- and 32-bit ones. ``as_float`` finishes the conversion,
    so uint8 can travel (4x smaller than float32) and become float where the model runs."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        grey = np.asarray(image).astype(np.float32)
        if mode in _SIXTEEN_BIT:
            scale = 65535.0
        else:  # 32-bit int or float: the range the values use
            peak = float(grey.max()) if grey.size else 0.0
            scale = 1.0 if (mode == "F" and peak <= 1.0) else 255.0 if peak <= 255.0 else 65535.0 if peak <= 65535.0 else peak
        grey = np.clip(grey / scale, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape))))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    # a copy in (3, H, W) order; always a copy, so never PIL's read-only buffer (a 1-pixel-wide
    # image's transpose is already contiguous, and ascontiguousarray would hand that buffer on)
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
