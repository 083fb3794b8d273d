"""A small synthetic COCO instance-segmentation dataset of shapes, for demos and tests.

Each image (sides 160-320 px, any aspect ratio) has a textured background (noise, a gradient or
stripes) and 2-6 shapes of three categories, 1 "circle", 2 "square", 3 "triangle", 24-100 px
across, in saturated colours that stand out from the muted background. The hue is random within
a band per category (reds, greens, blues), so both shape and colour say the class and a small
Mask R-CNN learns it in minutes on a CPU.

Shapes overlap: a later shape hides part of an earlier one, and each annotation's mask is the
visible part. A shape left with fewer than ``MIN_VISIBLE_PIXELS`` visible pixels, or less than
``MIN_VISIBLE_FRACTION`` of itself, is not drawn at all (so no unlabelled fragment is left).
Every mask is rasterized by pycocotools from the shape's polygon, so a polygon annotation decodes
to exactly the pixels painted. Segmentations mix the three COCO forms: polygons (for shapes
nobody covers), compressed RLE (str counts) for the others, and, on one image in 16, one
``iscrowd=1`` annotation as uncompressed RLE. ``bbox`` is the tight box of the visible mask and
``area`` its pixel count. Images are PNG (lossless). The same seed gives the same bytes.

With ``keypoints=True`` (``--keypoints``) the squares also carry COCO keypoints, their four
corners ``top_left``, ``top_right``, ``bottom_right``, ``bottom_left`` (a square turns by at most
30 degrees, so each corner keeps its name; a mirror image swaps left and right, as for a person),
at the polygon's vertices, visibility 2 where no later shape covers the corner and 1 where one
does; the square category names them and their skeleton, the other shapes have none. The images
and every other field are the same as without keypoints.

Layout: ``<output>/<split>/annotations.json`` and ``<output>/<split>/images/000001.png``, ...

    python -m maskrcnn.data.synthetic --output data/shapes [--train 48] [--val 16] [--seed 0] [--keypoints]
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import sys
import zlib
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.config import SQUARE_CORNER_NAMES, SQUARE_SKELETON
from maskrcnn.masks import annotation_to_rle
from maskrcnn.storage import join_uri, open_uri

__all__ = ["CATEGORIES", "make_sample_dataset", "make_split", "main"]

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# --keypoints: the square's corners, as polygon vertex indices (the vertices run clockwise on
# screen from the bottom right one: bottom right, bottom left, top left, top right)
SQUARE_KEYPOINTS = list(SQUARE_CORNER_NAMES)  # top_left, top_right, bottom_right, bottom_left
SQUARE_SKELETON = [list(pair) for pair in SQUARE_SKELETON]
_SQUARE_CORNER_VERTEX = [2, 3, 0, 1]
_HUE_CENTRE = {1: 0.0, 2: 1.0 / 3.0, 3: 2.0 / 3.0}  # red, green, blue
_HUE_JITTER = 40.0 / 360.0

MIN_SIDE, MAX_SIDE = 160, 320
MIN_SHAPE, MAX_SHAPE = 24, 100
MIN_SHAPES, MAX_SHAPES = 2, 6
MIN_VISIBLE_PIXELS = 80
MIN_VISIBLE_FRACTION = 0.3
CROWD_EVERY = 16  # image i with i % 16 == 7 has one crowd annotation
POLYGON_PROBABILITY = 0.6  # of an uncovered shape being written as a polygon, else RLE


def _shape_polygon(category_id: int, cx: float, cy: float, size: float, angle: float) -> list[float]:
    """The shape's outline as a flat [x1, y1, x2, y2, ...], rounded to 0.01 px."""
    if category_id == 1:  # circle: a 48-gon
        radius, angles = size / 2.0, np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    elif category_id == 2:  # square, rotated by up to +-30 degrees
        radius = size / 2.0 * math.sqrt(2.0) * 0.85
        angles = angle + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
    else:  # equilateral triangle, any rotation
        radius = size / 2.0 * 1.1
        angles = angle + np.array([0.0, 2.0 / 3.0, 4.0 / 3.0]) * math.pi - math.pi / 2.0
    xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted, textured background, float (H, W, 3) in 0..255."""
    gray = rng.uniform(70.0, 190.0)
    base = gray * 0.7 + rng.uniform(60.0, 200.0, size=3) * 0.3
    kind = rng.integers(3)
    if kind == 0:  # noise
        image = base + rng.normal(0.0, 14.0, size=(height, width, 3))
    elif kind == 1:  # linear gradient in a random direction
        other = gray * 0.7 + rng.uniform(60.0, 200.0, size=3) * 0.3 + rng.uniform(-40, 40)
        theta = rng.uniform(0.0, 2.0 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(t.max() - t.min(), 1.0)
        image = base * (1.0 - t[..., None]) + other * t[..., None] + rng.normal(0.0, 4.0, size=(height, width, 3))
    else:  # stripes
        period = rng.uniform(6.0, 24.0)
        theta = rng.uniform(0.0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        wave = np.sin(2.0 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        amplitude = rng.uniform(10.0, 25.0, size=3)
        image = base + wave[..., None] * amplitude + rng.normal(0.0, 4.0, size=(height, width, 3))
    return image


def _object_colour(rng: np.random.Generator, category_id: int, others: list[np.ndarray]) -> np.ndarray:
    """A saturated colour in the category's hue band, unlike the image's other shapes' colours
    (so two overlapping shapes of one class still show an edge between them)."""
    for _ in range(20):
        hue = (_HUE_CENTRE[category_id] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
        saturation = rng.uniform(0.75, 1.0)
        value = rng.uniform(0.8, 1.0) if rng.random() < 0.7 else rng.uniform(0.35, 0.5)
        colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0
        if all(np.linalg.norm(colour - other) >= 90.0 for other in others):
            break
    return colour


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """A binary (H, W) mask as COCO's uncompressed RLE: column-major runs, starting with 0s."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _corner_keypoints(polygon: list[float], covered: np.ndarray) -> list[float]:
    """A square's corners as COCO keypoints [x, y, v, ...]: v 2 where visible, 1 where covered."""
    height, width = covered.shape
    out: list[float] = []
    for vertex in _SQUARE_CORNER_VERTEX:
        x, y = polygon[2 * vertex], polygon[2 * vertex + 1]
        px, py = min(max(int(math.floor(x)), 0), width - 1), min(max(int(math.floor(y)), 0), height - 1)
        out += [x, y, 1 if covered[py, px] else 2]
    return out


def _make_image(rng: np.random.Generator, index: int, keypoints: bool = False) -> tuple[np.ndarray, list[dict]]:
    """One image, uint8 (H, W, 3), and its annotations (without ids)."""
    height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    max_shape = min(MAX_SHAPE, int(0.55 * min(height, width)))
    shapes = []
    for _ in range(int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))):
        category_id = int(rng.integers(1, 4))
        size = float(rng.uniform(MIN_SHAPE, max_shape))
        margin = size * 0.65 + 1.0  # keeps every vertex inside the image
        cx = float(rng.uniform(margin, width - margin))
        cy = float(rng.uniform(margin, height - margin))
        angle = float(rng.uniform(-math.pi / 6, math.pi / 6) if category_id == 2 else rng.uniform(0, 2 * math.pi))
        polygon = _shape_polygon(category_id, cx, cy, size, angle)
        full = mask_utils.decode(annotation_to_rle([polygon], height, width)).astype(bool)
        colour = _object_colour(rng, category_id, [s["colour"] for s in shapes])
        shapes.append({"category_id": category_id, "polygon": polygon, "full": full, "colour": colour})

    # Back to front: a shape is kept only if enough of it shows above the shapes kept after it.
    covered = np.zeros((height, width), dtype=bool)
    kept = []
    for shape in reversed(shapes):
        visible = shape["full"] & ~covered
        pixels = int(visible.sum())
        if pixels < MIN_VISIBLE_PIXELS or pixels < MIN_VISIBLE_FRACTION * shape["full"].sum():
            continue
        shape["visible"] = visible
        if keypoints and shape["category_id"] == 2:
            shape["keypoints"] = _corner_keypoints(shape["polygon"], covered)  # covered: by the shapes above it
        covered |= shape["full"]
        kept.append(shape)
    kept.reverse()  # drawing order, bottom first

    image = _background(rng, height, width)
    for shape in kept:
        shade = shape["colour"] + rng.normal(0.0, 6.0, size=(height, width, 3))
        image[shape["full"]] = shade[shape["full"]]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    crowd_index = 0 if (index % CROWD_EVERY == 7 and kept) else None
    annotations = []
    for k, shape in enumerate(kept):
        visible = shape["visible"]
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        uncovered = bool((visible == shape["full"]).all())
        if k == crowd_index:
            segmentation: Any = _uncompressed_rle(visible)
        elif uncovered and rng.random() < POLYGON_PROBABILITY:
            segmentation = [shape["polygon"]]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": shape["category_id"],
                "segmentation": segmentation,
                "area": int(visible.sum()),
                "bbox": [x, y, w, h],
                "iscrowd": int(k == crowd_index),
            }
        )
        if "keypoints" in shape:
            points = [0.0] * len(shape["keypoints"]) if k == crowd_index else shape["keypoints"]
            annotations[-1]["keypoints"] = points
            annotations[-1]["num_keypoints"] = sum(1 for v in points[2::3] if v > 0)
    return image, annotations


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def make_split(
    output_uri: str, split: str, num_images: int, seed: int = 0, storage_options: dict[str, Any] | None = None,
    keypoints: bool = False,
) -> tuple[str, str]:
    """Write one split; returns ``(annotations_uri, images_uri)``. ``keypoints``: the squares'
    corners as COCO keypoints (see the module's doc)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    split_uri = join_uri(output_uri, split)
    images_uri = join_uri(split_uri, "images")
    annotations_uri = join_uri(split_uri, "annotations.json")
    images, annotations = [], []
    for index in range(num_images):
        image, image_annotations = _make_image(rng, index, keypoints)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        with open_uri(join_uri(images_uri, file_name), "wb", storage_options) as f:
            f.write(_png_bytes(image))
        images.append({"id": image_id, "file_name": file_name, "height": int(image.shape[0]), "width": int(image.shape[1])})
        for ann in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    document = {
        "info": {"description": "synthetic shapes (maskrcnn.data.synthetic)", "split": split, "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES if not keypoints else [
            dict(c, keypoints=SQUARE_KEYPOINTS, skeleton=SQUARE_SKELETON) if c["id"] == 2 else dict(c) for c in CATEGORIES
        ],
    }
    with open_uri(annotations_uri, "w", storage_options) as f:
        json.dump(document, f)
    return annotations_uri, images_uri


def make_sample_dataset(
    output_uri: str,
    splits: dict[str, int] | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    keypoints: bool = False,
) -> dict[str, tuple[str, str]]:
    """Write the synthetic dataset under ``output_uri`` (any fsspec URI).

    ``splits`` maps a split name to its number of images (default ``{"train": 48, "val": 16}``).
    Returns ``{split: (annotations_uri, images_uri)}``, ready for ``CocoDataset(*uris)``.
    Deterministic: the same seed gives the same files; each split draws from its own stream.
    ``keypoints``: the squares also carry their corners as COCO keypoints.
    """
    if splits is None:
        splits = {"train": 48, "val": 16}
    return {split: make_split(output_uri, split, count, seed, storage_options, keypoints) for split, count in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskrcnn.data.synthetic", description="Write a small synthetic COCO dataset of shapes."
    )
    parser.add_argument("--output", required=True, help="folder or prefix (local path, s3://...)")
    parser.add_argument("--train", type=int, default=48, help="images in the train split (default 48)")
    parser.add_argument("--val", type=int, default=16, help="images in the val split (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options as JSON")
    parser.add_argument("--keypoints", action="store_true", help="also give the squares their 4 corners as COCO keypoints")
    args = parser.parse_args(argv)
    splits = {name: count for name, count in (("train", args.train), ("val", args.val)) if count > 0}
    written = make_sample_dataset(args.output, splits, args.seed, args.storage_options, keypoints=args.keypoints)
    for split, (annotations_uri, images_uri) in written.items():
        print(f"{split}: --annotations {annotations_uri} --images {images_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
