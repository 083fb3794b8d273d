"""``--preview N``: N labelled images with their masks (or keypoints), boxes and classes drawn, as PNG files in
``<output>/_preview/``, for a person to check the labels by eye: only the detections scoring at
least ``--preview-min-score`` (0.5), one colour per category, named in a legend strip below the
image, text scaled to the image. Runs on the driver after the run (N is small); reads the
committed part files, never the pipeline's data."""

from __future__ import annotations

import colorsys
import io
import posixpath

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.storage import put_atomic
from jobs.labeling.shards import PREVIEW_DIR, part_files
from maskrcnn.data.images import ImageDecodeError, decode_image
from maskrcnn.storage import filesystem, open_uri

_ALPHA = 0.45
DEFAULT_MIN_SCORE = 0.5


def _colour(category_id: int) -> tuple[int, int, int]:
    """One colour per category (golden-ratio hues: neighbouring ids far apart)."""
    r, g, b = colorsys.hsv_to_rgb((category_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def font_size_for(width: int, height: int) -> int:
    """Text scaled to the image: a 40th of its short side, at least 12 pixels."""
    return max(12, min(width, height) // 40)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font: Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font, pad: int) -> tuple[int, int, int, int]:
    """``text`` on a filled box of colour ``fill`` with its top-left corner at ``xy``; the box."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = xy
    box = (int(x), int(y), int(x + right - left + 2 * pad), int(y + bottom - top + 2 * pad))
    draw.rectangle(box, fill=fill)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(fill), font=font)
    return box


def draw_instances(image: Image.Image, instances: list[dict], min_score: float = 0.0) -> Image.Image:
    """The image with each instance scoring at least ``min_score`` drawn in its category's
    colour: its mask tinted, its keypoints dotted, its box outlined and labelled (category and
    score on a filled background), and below the image a legend strip: a swatch and the name
    of every category drawn. Text is scaled to the image (``font_size_for``)."""
    from maskrcnn.masks import decode_masks

    instances = [inst for inst in instances if inst["score"] >= min_score]
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for inst in instances:
        if inst.get("mask") is not None:  # null for a model without a mask head
            mask = decode_masks([inst["mask"]])[0].astype(bool)
            if mask.shape != canvas.shape[:2]:
                continue
            colour = np.asarray(_colour(inst["category_id"]), dtype=np.float32)
            canvas[mask] = canvas[mask] * (1 - _ALPHA) + colour * _ALPHA
    width, height = image.size
    size = font_size_for(width, height)
    font, pad, line = _font(size), max(2, size // 5), max(2, min(width, height) // 300)
    categories = {inst["category_id"]: inst["category"] for inst in instances}

    # the legend strip's rows, laid out first to know its height
    swatch, gap = size, size
    rows: list[list[tuple[int, str]]] = [[]]
    x = gap
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for category_id, name in sorted(categories.items()):
        entry = swatch + pad + (probe.textbbox((0, 0), name, font=font)[2]) + gap
        if rows[-1] and x + entry > width:
            rows.append([])
            x = gap
        rows[-1].append((category_id, name))
        x += entry
    row_height = size + 2 * pad
    legend_height = (len(rows) * row_height + pad * 2) if categories else 0

    out = Image.new("RGB", (width, height + legend_height), (255, 255, 255))
    out.paste(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(out)
    # best score drawn last, on top
    for inst in sorted(instances, key=lambda i: i["score"]):
        colour = _colour(inst["category_id"])
        x0, y0, w, h = inst["bbox"]
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=colour, width=line)
        for px, py, _ in inst.get("keypoints") or []:
            r = max(2, line + 1)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour, outline=(255, 255, 255))
        text = f"{inst['category']} {inst['score']:.2f}"
        text_height = size + 2 * pad
        y = y0 - text_height if y0 - text_height >= 0 else y0  # above the box when it fits, else inside
        _label(draw, (max(0, x0), max(0, y)), text, colour, font, pad)
    if categories:
        draw.line([(0, height), (width, height)], fill=(160, 160, 160), width=1)
        for number, entries in enumerate(rows):
            y = height + pad + number * row_height
            x = gap
            for category_id, name in entries:
                draw.rectangle([x, y + pad, x + swatch, y + pad + swatch], fill=_colour(category_id), outline=(0, 0, 0))
                left, top, right, _ = draw.textbbox((0, 0), name, font=font)
                draw.text((x + swatch + pad - left, y + pad - top), name, fill=(0, 0, 0), font=font)
                x += swatch + pad + right + gap
    return out


def write_previews(output_uri: str, count: int, storage_options: dict | None = None, min_score: float = DEFAULT_MIN_SCORE) -> int:
    """Draw the first ``count`` labelled images (those with detections first) of the output, each
    with its detections scoring at least ``min_score``."""
    fs, root = filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    parts = part_files(fs, root)
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
        drawn = draw_instances(image, row["instances"], min_score)
        buffer = io.BytesIO()
        drawn.save(buffer, format="PNG")
        stem = posixpath.splitext(posixpath.basename(row["image_uri"]))[0]
        put_atomic(fs, f"{preview_dir}/{number:04d}-{stem}.png", buffer.getvalue())
        written += 1
    return written
