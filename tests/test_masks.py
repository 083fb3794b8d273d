"""maskrcnn.masks: COCO RLE and polygons against hand-made pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.masks import annotation_to_mask, decode_masks, encode_crops, encode_masks, mask_area, mask_boxes


def test_polygon_square_covers_the_pixels_inside_its_edges():
    # The square from (1, 1) to (4, 4) covers the 3 x 3 pixels whose centres lie inside it.
    mask = annotation_to_mask([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 6)
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[1:4, 1:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_polygon_parts_are_merged_and_triangle_is_exact():
    triangle = [0, 0, 3, 0, 0, 3]  # pixel centres with x + y < 3
    square = [3, 3, 5, 3, 5, 5, 3, 5]
    mask = annotation_to_mask([triangle, square], 5, 5)
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(mask, expected)


def test_polygon_of_two_points_is_empty_not_a_box():
    # pycocotools reads a 4-number "polygon" as a box; a line encloses nothing.
    assert annotation_to_mask([[0, 0, 4, 4]], 5, 5).sum() == 0
    assert annotation_to_mask([], 5, 5).sum() == 0


def test_uncompressed_rle_is_column_major_starting_with_zeros():
    mask = annotation_to_mask({"size": [3, 3], "counts": [1, 2, 3, 3]}, 3, 3)
    expected = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(mask, expected)


def test_compressed_rle_str_and_bytes():
    expected = np.zeros((4, 5), dtype=np.uint8)
    expected[1:3, 2:5] = 1
    (rle,) = encode_masks(expected[None])
    assert isinstance(rle["counts"], str) and rle["size"] == [4, 5]
    np.testing.assert_array_equal(annotation_to_mask(rle, 4, 5), expected)
    as_bytes = {"size": [4, 5], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(annotation_to_mask(as_bytes, 4, 5), expected)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([[0, 0, 1, 1, 2]], "even number"),
        ([["a", 1, 2, 3, 4, 5]], "flat list of numbers"),
        ({"size": [4, 4], "counts": [16]}, "does not match"),
        ({"size": [3, 3], "counts": [1, 2]}, "sum to 3"),
        ({"counts": "abc"}, "'size' and 'counts'"),
        ({"size": [3, 3], "counts": 7}, "counts must be"),
        ("polygon", "list of polygons or an RLE"),
    ],
)
def test_bad_segmentations_raise(segmentation, message):
    with pytest.raises(ValueError, match=message):
        annotation_to_mask(segmentation, 3, 3)


def test_encode_decode_round_trip_tensor_and_array():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 13, 7, generator=generator) > 0.5
    rles = encode_masks(masks)
    assert [r["size"] for r in rles] == [[13, 7]] * 4
    assert all(isinstance(r["counts"], str) for r in rles)
    decoded = decode_masks(rles)
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 13, 7)
    np.testing.assert_array_equal(decoded, masks.numpy().astype(np.uint8))
    assert encode_masks(masks.numpy().astype(np.uint8)) == rles
    np.testing.assert_array_equal(mask_area(rles), masks.sum((1, 2)).numpy())
    np.testing.assert_array_equal(mask_area(masks), masks.sum((1, 2)).numpy())


def test_empty_inputs():
    assert encode_masks(torch.zeros(0, 5, 6, dtype=torch.bool)) == []
    assert decode_masks([], 5, 6).shape == (0, 5, 6)
    assert mask_area([]).shape == (0,)
    assert mask_boxes(np.zeros((0, 5, 6))).shape == (0, 4)
    with pytest.raises(ValueError, match="expected \\[2, 2\\]"):
        decode_masks(encode_masks(np.ones((1, 3, 3))), 2, 2)


def test_mask_boxes_are_on_pixel_edges():
    masks = np.zeros((2, 6, 8), dtype=np.uint8)
    masks[0, 2, 3] = 1  # one pixel at row 2, column 3
    masks[1, 1:5, 2:7] = 1
    np.testing.assert_array_equal(mask_boxes(masks), [[3, 2, 4, 3], [2, 1, 7, 5]])
    np.testing.assert_array_equal(mask_boxes(encode_masks(masks)), [[3, 2, 4, 3], [2, 1, 7, 5]])


def test_encode_crops_equals_encoding_the_full_masks():
    """Runs computed from crops alone, against pycocotools on the full masks: random crops of
    random fill, including ones touching every border, full-height and full-image ones, and
    empty ones."""
    rng = np.random.default_rng(0)
    height, width = 23, 31
    cases = [(0, 0, height, width), (0, 5, height, 9), (3, 0, 7, width), (height - 1, width - 1, height, width), (4, 4, 4, 9)]
    for trial in range(200):
        count = int(rng.integers(0, 5))
        extents = [cases[trial % len(cases)]] if trial < 2 * len(cases) else []
        while len(extents) < count:
            y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            extents.append((y0, x0, int(rng.integers(y0, height + 1)), int(rng.integers(x0, width + 1))))
        full = np.zeros((len(extents), height, width), dtype=np.uint8)
        crops = []
        for i, (y0, x0, y1, x1) in enumerate(extents):
            crop = (rng.random((y1 - y0, x1 - x0)) < rng.random()).astype(np.uint8)
            full[i, y0:y1, x0:x1] = crop
            crops.append(crop)
        rles, areas = encode_crops(height, width, np.asarray(extents, dtype=np.int64).reshape(-1, 4), crops)
        assert rles == encode_masks(full), (trial, extents)
        np.testing.assert_array_equal(areas, full.sum(axis=(1, 2)))
