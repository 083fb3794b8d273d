"""Image bytes -> the model's input, in CPU tasks; every failure becomes a message, never a crash.
Decoding is the library's (``maskrcnn.data.images.decode_compact``), so jobs.label refuses the
images that training and evaluation refuse.

H x W: the image as decoded (EXIF orientation applied); h x w: resized to the model's input
size with ``maskrcnn.modeling.preprocessing.resize_image``, exactly as the model would resize it.
"""

from __future__ import annotations

import torch

from maskrcnn.data.images import ImageDecodeError, as_float, decode_compact
from maskrcnn.modeling.preprocessing import resize_image, resized_size


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
