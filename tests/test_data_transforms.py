"""maskrcnn.data.transforms: flips keep boxes and masks consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.data.transforms import Compose, RandomHorizontalFlip, hflip
from maskrcnn.masks import mask_boxes


def _sample():
    height, width = 7, 11
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 1:4, 0:3] = 1  # touches the left edge
    masks[1, 2:7, 6:10] = 1
    masks[1, 3, 5] = 1
    boxes = torch.from_numpy(mask_boxes(masks))
    image = torch.arange(3 * height * width, dtype=torch.float32).reshape(3, height, width)
    target = {"boxes": boxes, "masks": masks, "labels": torch.tensor([1, 2]), "image_id": 5}
    return image, target


def test_flip_keeps_boxes_and_masks_consistent():
    image, target = _sample()
    flipped_image, flipped = hflip(image, target)
    # The box recomputed from the flipped mask is the flipped box.
    np.testing.assert_array_equal(mask_boxes(flipped["masks"]), flipped["boxes"].numpy())
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[8.0, 1, 11, 4], [1, 2, 6, 7]]))
    assert torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    assert torch.equal(flipped["masks"][0, :, -3:], target["masks"][0, :, :3].flip(-1))
    assert flipped["labels"] is target["labels"] and flipped["image_id"] == 5
    # The input target is left alone, and flipping twice is the identity.
    np.testing.assert_array_equal(mask_boxes(target["masks"]), target["boxes"].numpy())
    back_image, back = hflip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    assert torch.equal(back["masks"], target["masks"])


def test_flip_with_no_instances():
    image = torch.rand(3, 4, 5)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 5, dtype=torch.uint8)}
    _, flipped = hflip(image, target)
    assert flipped["boxes"].shape == (0, 4) and flipped["masks"].shape == (0, 4, 5)


def test_random_flip_probability():
    image, target = _sample()
    assert RandomHorizontalFlip(p=0.0)(image, target)[0] is image
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image, target)[0], image.flip(-1))
    torch.manual_seed(0)
    flips = sum(not torch.equal(RandomHorizontalFlip(0.5)(image, target)[0], image) for _ in range(200))
    assert 70 < flips < 130


def test_compose_applies_in_order():
    image, target = _sample()
    calls = []

    def tag(name):
        def transform(image, target):
            calls.append(name)
            return image, target

        return transform

    out_image, _ = Compose([tag("a"), RandomHorizontalFlip(1.0), tag("b")])(image, target)
    assert calls == ["a", "b"] and torch.equal(out_image, image.flip(-1))


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (5, 4)])
def test_decoded_images_own_their_pixels(size):
    """PIL hands numpy a read-only buffer; the (3, H, W) tensor must be a writable copy of it
    at every size, 1-pixel-wide images included (their transpose is already contiguous)."""
    import warnings

    from PIL import Image

    from maskrcnn.data.images import to_rgb_tensor

    image = Image.new("RGB", size, (10, 20, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        tensor = to_rgb_tensor(image)
    assert tuple(tensor.shape) == (3, size[1], size[0]) and tensor[:, 0, 0].tolist() == [10, 20, 30]
    tensor.zero_()
    assert image.getpixel((0, 0)) == (10, 20, 30)
