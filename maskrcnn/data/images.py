"""Decoded images as the model takes them: float32 (3, H, W) RGB in [0, 1], from encoded bytes
or any Pillow mode. The one decoder of the project: training, evaluation and labeling read an
image the same way, and refuse the same images.

H x W: the image as decoded, EXIF orientation applied (the size a person sees).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_image", "decode_compact", "to_rgb_float", "to_rgb_tensor", "as_float"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")

# Larger images are refused as decompression bombs (a 100-megapixel photo is 300 MB as uint8).
DEFAULT_MAX_PIXELS = 100_000_000


class ImageDecodeError(Exception):
    """Bytes that are not a usable image: empty, truncated, corrupt, of an unknown format, or of
    more pixels than allowed. The message says which, for a person to read."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded bytes (JPEG, PNG, ...) -> float32 (3, H, W) RGB in [0, 1]; see ``decode_compact``."""
    return as_float(decode_compact(data, max_pixels))


def decode_compact(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded bytes -> (3, H, W), EXIF orientation applied: uint8 for 8-bit images, float32 in
    [0, 1] for deeper ones (``to_rgb_tensor``; 16-bit and float images are scaled, not clipped).

    Raises ImageDecodeError for an empty, truncated, corrupt or unknown file, and for an image
    of more than ``max_pixels`` pixels (a decompression bomb: refused before decoding).
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    # Pillow's own guard (a process-wide setting: warns above it, refuses above twice it) must not
    # refuse what max_pixels allows; it is raised, never lowered, and the limit checked here.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:  # reads the header only
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"refused: too many pixels, {width}x{height} is over the limit of {max_pixels} (a decompression bomb?)"
                    )
                image = ImageOps.exif_transpose(opened)  # loads the pixels
                if image is opened:
                    image.load()
                return to_rgb_tensor(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused: too many pixels, over the limit of {max_pixels} (a decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image, or a format Pillow cannot read ({len(data)} bytes, starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's truncated / corrupt data
        raise ImageDecodeError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise ImageDecodeError("out of memory decoding the image") from None
    except Exception as exc:  # a Pillow plugin's own bug must not stop a 10M-image job
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from None


def to_rgb_float(image: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> float32 (3, H, W) RGB in [0, 1].

    8-bit modes go through Pillow's conversions (palette, CMYK, YCbCr, 1-bit, L, LA); alpha is
    dropped as Pillow and torchvision drop it, after resolving a palette's transparency. 16- and
    32-bit grey levels are scaled to their range instead of clipped at 255; a float image's NaN
    pixels are black, its infinities 0 and 1.
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
        else:  # 32-bit int or float: the range the (finite) values use
            finite = grey[np.isfinite(grey)]
            peak = float(finite.max()) if finite.size else 0.0
            scale = 1.0 if (mode == "F" and peak <= 1.0) else 255.0 if peak <= 255.0 else 65535.0 if peak <= 65535.0 else peak
        # a float image's NaN (often "no data") is black and its infinities the range's ends: one
        # NaN pixel would otherwise spread through every convolution, and the image find nothing
        grey = np.clip(np.nan_to_num(grey / scale, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape))))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    # a copy in (3, H, W) order; always a copy, so never PIL's read-only buffer (a 1-pixel-wide
    # image's transpose is already contiguous, and ascontiguousarray would hand that buffer on)
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
