"""Image bytes -> the model's input, in CPU tasks; every failure becomes a message, never a crash.

H x W: the image as decoded (EXIF orientation applied); h x w: resized to the model's input
size with ``maskrcnn.modeling.preprocessing.resize_image``, exactly as the model would resize it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from maskrcnn.data.images import as_float, to_rgb_float, to_rgb_tensor  # noqa: F401 (to_rgb_float: re-exported)
from maskrcnn.modeling.preprocessing import resize_image, resized_size

# 16-bit single-channel modes: scaled by 65535 to [0, 1] (Pillow's convert("RGB") would clip them).
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageDecodeError(Exception):
    """An image that cannot be labelled; the message is for the output's ``error`` column."""


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Encoded bytes -> float32 (3, H, W) in [0, 1], EXIF orientation applied; see ``decode_compact``."""
    return as_float(decode_compact(data, max_pixels))


def decode_compact(data: bytes, max_pixels: int) -> torch.Tensor:
    """Encoded bytes -> (3, H, W), EXIF orientation applied: uint8 for 8-bit images, float32 in
    [0, 1] for deeper ones (``maskrcnn.data.images.to_rgb_tensor``).

    Raises ImageDecodeError for an empty, truncated, corrupt or unknown file, and for an image
    of more than ``max_pixels`` pixels (a decompression bomb: refused before decoding).
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow warns above this and refuses above twice this
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                image = ImageOps.exif_transpose(opened)  # loads the pixels
                if image is opened:
                    image.load()
                return to_rgb_tensor(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused: too many pixels for --max-pixels {max_pixels} (a decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image, or a format Pillow cannot read ({len(data)} bytes, starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's truncated / corrupt data
        raise ImageDecodeError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise ImageDecodeError("out of memory decoding the image") from None
    except Exception as exc:  # a Pillow plugin's own bug must not stop a 10M-image job
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from None


def prepare_image(data: bytes, min_size: int, max_size: int, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """Encoded bytes -> (the image as it travels to the model, decoded (H, W), resized?);
    raises ImageDecodeError.

    The smaller of two exact forms travels: the decoded uint8 image, which the model converts,
    normalizes and resizes on its own device exactly as ``model([image])`` would (4x fewer
    bytes than float32, and the resize runs on the GPU); or, when the decoded image is larger
    than the model's input (a 12-megapixel photo for an 800-pixel model), the float32 image
    resized here with the model's own resize.
    """
    image = decode_compact(data, max_pixels)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    new_height, new_width = resized_size(height, width, min_size, max_size)
    if new_height < 1 or new_width < 1:
        raise ImageDecodeError(
            f"image of {width}x{height} is too thin: resized for the model (--min-size {min_size}, --max-size {max_size}) "
            f"a side would be 0 pixels"
        )
    if image.dtype == torch.uint8 and height * width <= 4 * new_height * new_width:
        return image, (height, width), False
    return resize_image(as_float(image), min_size, max_size), (height, width), True
