"""maskrcnn.masks: COCO RLE and polygons against hand-made pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.masks import (annotation_to_mask, compress_runs, crop_runs, decode_masks, encode_crops, encode_masks, mask_area,
                            mask_boxes)


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


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]  # run lengths counted on the CPU in CI, on the GPU where there is one


def _crop_runs_rles(crops, extents, image_sizes):
    """``crop_runs`` of a batch of images, written as each image's RLEs and areas."""
    runs, lengths = crop_runs(crops, extents, image_sizes)
    out, first_mask, first_run = [], 0, 0
    for image_crops, size in zip(crops, image_sizes):
        image_lengths = lengths[first_mask: first_mask + len(image_crops)]
        image_runs = runs[first_run: first_run + int(image_lengths.sum())]
        out.append(compress_runs(*size, image_runs, image_lengths))
        first_mask, first_run = first_mask + len(image_crops), first_run + int(image_lengths.sum())
    assert first_mask == len(lengths) and first_run == len(runs)
    return out


def _paste(crops: torch.Tensor, extents: np.ndarray, height: int, width: int) -> np.ndarray:
    full = np.zeros((len(crops), height, width), dtype=np.uint8)
    for d, (y0, x0, y1, x1) in enumerate(np.asarray(extents).tolist()):
        full[d, y0:y1, x0:x1] = crops[d, : y1 - y0, : x1 - x0].numpy()
    return full


@pytest.mark.parametrize("device", DEVICES)
def test_crop_runs_equal_pycocotools_on_random_masks(device):
    """Run lengths counted on the device (here the CPU) for a whole batch, against pycocotools on
    the full masks, byte for byte: images of their own sizes in one call, crops padded beyond
    their extents with pixels that must be ignored (a box cut by the image's border leaves them),
    extents at every border, full-height and full-image ones, empty ones."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        crops, extents, sizes, expected = [], [], [], []
        for _ in range(int(rng.integers(1, 4))):
            height, width = int(rng.integers(1, 14)), int(rng.integers(1, 14))
            boxes = []
            for _ in range(int(rng.integers(0, 6))):
                y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
                boxes.append((y0, x0, int(rng.integers(y0, height + 1)), int(rng.integers(x0, width + 1))))
            if boxes and trial % 3 == 0:
                boxes[0] = (0, int(rng.integers(0, width)), height, width)  # full height, to the right border
            if boxes and trial % 5 == 0:
                boxes[-1] = (0, 0, height, width)
            box_array = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
            crop_h = int((box_array[:, 2] - box_array[:, 0]).max(initial=0)) + int(rng.integers(0, 3))
            crop_w = int((box_array[:, 3] - box_array[:, 1]).max(initial=0)) + int(rng.integers(0, 3))
            image_crops = torch.from_numpy(rng.random((len(boxes), crop_h, crop_w)) < rng.random())
            full = _paste(image_crops, box_array, height, width)
            crops.append(image_crops.to(device))
            extents.append(torch.from_numpy(box_array).to(device))
            sizes.append((height, width))
            expected.append((encode_masks(full), full.sum(axis=(1, 2))))
        for (rles, areas), (want_rles, want_areas) in zip(_crop_runs_rles(crops, extents, sizes), expected):
            assert rles == want_rles, (trial, sizes, [e.tolist() for e in extents])
            np.testing.assert_array_equal(areas, want_areas)


def _adversarial_masks() -> list[tuple[str, int, int, list[tuple[int, int, int, int]], list[np.ndarray]]]:
    """(name, H, W, extents, crops): the masks where run-length counting goes wrong first."""
    height, width = 7, 9
    one = np.ones((1, 1), dtype=bool)
    alternate_columns = np.zeros((height, width), dtype=bool)
    alternate_columns[:, ::2] = True
    alternate_rows = np.zeros((height, width), dtype=bool)
    alternate_rows[::2] = True
    checker = (np.add.outer(np.arange(height), np.arange(width)) % 2).astype(bool)
    return [
        ("empty crop", height, width, [(2, 3, 5, 6)], [np.zeros((3, 3), dtype=bool)]),
        ("empty extent", height, width, [(0, 0, 0, 0)], [np.zeros((0, 0), dtype=bool)]),
        ("full mask", height, width, [(0, 0, height, width)], [np.ones((height, width), dtype=bool)]),
        ("full columns", height, width, [(0, 2, height, 5)], [np.ones((height, 3), dtype=bool)]),
        ("full rows", height, width, [(2, 0, 4, width)], [np.ones((2, width), dtype=bool)]),
        ("first pixel", height, width, [(0, 0, 1, 1)], [one]),
        ("last pixel", height, width, [(height - 1, width - 1, height, width)], [one]),
        ("one pixel inside", height, width, [(3, 4, 4, 5)], [one]),
        ("top-right pixel", height, width, [(0, width - 1, 1, width)], [one]),
        ("bottom-left pixel", height, width, [(height - 1, 0, height, 1)], [one]),
        ("alternating columns", height, width, [(0, 0, height, width)], [alternate_columns]),
        ("alternating rows", height, width, [(0, 0, height, width)], [alternate_rows]),
        ("checkerboard", height, width, [(0, 0, height, width)], [checker]),
        ("inverse checkerboard", height, width, [(0, 0, height, width)], [~checker]),
        ("touching the top", height, width, [(0, 2, 3, 6)], [np.ones((3, 4), dtype=bool)]),
        ("touching the bottom", height, width, [(4, 2, height, 6)], [np.ones((3, 4), dtype=bool)]),
        ("touching the left", height, width, [(2, 0, 5, 3)], [np.ones((3, 3), dtype=bool)]),
        ("touching the right", height, width, [(2, width - 3, 5, width)], [np.ones((3, 3), dtype=bool)]),
        ("bottom-right corner", height, width, [(3, 4, height, width)], [np.ones((4, 5), dtype=bool)]),
        ("full height at the right border", height, width, [(0, 6, height, width)], [alternate_columns[:, :3]]),
        ("width 1", height, width, [(1, 4, 6, 5)], [np.ones((5, 1), dtype=bool)]),
        ("height 1", height, width, [(3, 1, 4, 8)], [np.array([[1, 0, 1, 1, 0, 1, 1]], dtype=bool)]),
        ("full-height column", height, width, [(0, width - 1, height, width)], [np.ones((height, 1), dtype=bool)]),
        ("full-width row", height, width, [(height - 1, 0, height, width)], [np.ones((1, width), dtype=bool)]),
        ("image 1x1 set", 1, 1, [(0, 0, 1, 1)], [one]),
        ("image 1x1 empty", 1, 1, [(0, 0, 1, 1)], [~one]),
        ("image 1x5", 1, 5, [(0, 1, 1, 5)], [np.array([[1, 1, 0, 1]], dtype=bool)]),
        ("image 5x1", 5, 1, [(1, 0, 5, 1)], [np.array([[1], [0], [1], [1]], dtype=bool)]),
        ("all of them in one image", height, width,
         [(0, 0, height, width), (0, 0, 0, 0), (height - 1, width - 1, height, width), (0, 0, height, width), (1, 4, 6, 5)],
         [np.ones((height, width), dtype=bool), np.zeros((0, 0), dtype=bool), one, alternate_columns, np.ones((5, 1), dtype=bool)]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, height, width, extents, crops", _adversarial_masks(), ids=[case[0] for case in _adversarial_masks()])
def test_crop_runs_on_adversarial_masks(name, height, width, extents, crops, device):
    crop_h, crop_w = max(c.shape[0] for c in crops), max(c.shape[1] for c in crops)
    padded = torch.ones((len(crops), crop_h + 1, crop_w + 1), dtype=torch.bool)  # set beyond every extent
    for d, crop in enumerate(crops):
        padded[d, : crop.shape[0], : crop.shape[1]] = torch.from_numpy(crop)
    extent_array = np.asarray(extents, dtype=np.int64)
    full = _paste(padded, extent_array, height, width)
    ((rles, areas),) = _crop_runs_rles([padded.to(device)], [torch.from_numpy(extent_array).to(device)], [(height, width)])
    assert rles == encode_masks(full)
    np.testing.assert_array_equal(areas, full.sum(axis=(1, 2)))
    assert rles == encode_crops(height, width, extent_array, crops)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_crop_runs_of_nothing(device):
    assert [len(a) for a in crop_runs([], [], [])] == [0, 0]
    no_masks = crop_runs([torch.zeros((0, 5, 5), dtype=torch.bool, device=device)], [torch.zeros((0, 4), dtype=torch.int64, device=device)],
                         [(8, 8)])
    assert [len(a) for a in no_masks] == [0, 0]
    rles, areas = compress_runs(8, 8, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert rles == [] and areas.shape == (0,)
    # crops of no pixels at all: each mask is one run of zeros
    runs, lengths = crop_runs([torch.zeros((2, 0, 0), dtype=torch.bool, device=device)],
                              [torch.zeros((2, 4), dtype=torch.int64, device=device)], [(3, 4)])
    assert runs.tolist() == [12, 12] and lengths.tolist() == [1, 1]
