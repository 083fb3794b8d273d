"""``--preview N``: N labelled images with their masks (or keypoints), boxes and classes drawn, as PNG files in
``<output>/_preview/``, for a person to check the labels by eye. Runs on the driver after the
run (N is small); reads the committed part files, never the pipeline's data."""

from __future__ import annotations

import colorsys
import io
import posixpath

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from jobs.labeling.decode import ImageDecodeError, decode_image
from jobs.labeling.plan import PART_RE, PREVIEW_DIR, put_atomic
from maskrcnn.storage import filesystem, open_uri

_ALPHA = 0.45


def _colour(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: Image.Image, instances: list[dict]) -> Image.Image:
    """The image with each instance's mask tinted, its keypoints dotted, its box outlined and its
    class and score written."""
    from maskrcnn.masks import decode_masks

    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    boxes = []
    for k, inst in enumerate(instances):
        if inst.get("mask") is not None:  # null for a model without a mask head
            mask = decode_masks([inst["mask"]])[0].astype(bool)
            if mask.shape != canvas.shape[:2]:
                continue
            colour = np.asarray(_colour(k), dtype=np.float32)
            canvas[mask] = canvas[mask] * (1 - _ALPHA) + colour * _ALPHA
        boxes.append((k, inst))
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, inst in boxes:
        x, y, w, h = inst["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=_colour(k), width=2)
        draw.text((x + 2, y + 1), f"{inst['category']} {inst['score']:.2f}", fill=_colour(k))
        for px, py, _ in inst.get("keypoints") or []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_colour(k), outline=(255, 255, 255))
    return out


def write_previews(output_uri: str, count: int, storage_options: dict | None = None) -> int:
    """Draw the first ``count`` labelled images (those with detections first) of the output."""
    fs, root = filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    parts = sorted(p for p in fs.ls(root, detail=False) if PART_RE.match(p.rsplit("/", 1)[-1]))
    chosen, fallback = [], []
    for part in parts:
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["image_uri", "instances", "error"])
        for row in table.to_pylist():
            if row["error"] is not None:
                continue
            (chosen if row["instances"] else fallback).append(row)
            if len(chosen) >= count:
                break
        if len(chosen) >= count:
            break
    rows = (chosen + fallback)[:count]
    preview_dir = f"{root}/{PREVIEW_DIR}"
    written = 0
    for number, row in enumerate(rows):
        try:
            with open_uri(row["image_uri"], "rb", storage_options) as f:
                tensor = decode_image(f.read(), max_pixels=10**9)
        except (OSError, ImageDecodeError):
            continue
        image = Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        drawn = draw_instances(image, row["instances"])
        buffer = io.BytesIO()
        drawn.save(buffer, format="PNG")
        stem = posixpath.splitext(posixpath.basename(row["image_uri"]))[0]
        put_atomic(fs, f"{preview_dir}/{number:04d}-{stem}.png", buffer.getvalue())
        written += 1
    return written
