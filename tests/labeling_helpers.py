"""Shared by the labeling tests: a small checkpoint, awkward image files, and reading an output."""

from __future__ import annotations

import os

import glob
import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.config import get_preset
from maskrcnn.modeling import build_model


def make_checkpoint(uri: str, seed: int = 0, storage_options: dict | None = None) -> None:
    """The ``small`` preset with random weights: its near-uniform class scores pass the 0.05
    threshold, so it detects (50 instances an image), which is all these tests need."""
    from maskrcnn.data.synthetic import CATEGORIES

    torch.manual_seed(seed)
    config = get_preset("small")
    save_checkpoint(uri, build_model(config).eval(), config, CATEGORIES, storage_options=storage_options)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def rgb_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def awkward_images() -> dict[str, tuple[bytes, str | None, tuple[int, int] | None]]:
    """name -> (file bytes, a word the row's error must contain or None if it must label, (W, H))."""
    base = rgb_noise(64, 48)
    png = encode(base, "PNG")
    jpeg = encode(base, "JPEG", quality=90)
    grey16 = Image.fromarray((np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "good/plain.png": (png, None, (64, 48)),
        "good/plain.jpg": (jpeg, None, (64, 48)),
        "good/one_pixel.png": (encode(rgb_noise(1, 1), "PNG"), None, (1, 1)),
        "modes/grey16.png": (encode(grey16, "PNG"), None, (64, 48)),
        "modes/grey16.tif": (encode(grey16, "TIFF"), None, (64, 48)),
        "modes/cmyk.jpg": (encode(base.convert("CMYK"), "JPEG"), None, (64, 48)),
        "modes/palette_transparent.png": (encode(palette, "PNG"), None, (64, 48)),
        "modes/la.png": (encode(base.convert("LA"), "PNG"), None, (64, 48)),
        "modes/bilevel.png": (encode(base.convert("1"), "PNG"), None, (64, 48)),
        "modes/rgba.webp": (encode(base.convert("RGBA"), "WEBP"), None, (64, 48)),
        "modes/plain.bmp": (encode(base, "BMP"), None, (64, 48)),
        "modes/exif_rotated.jpg": (encode(base, "JPEG", exif=exif), None, (48, 64)),
        "bad/truncated.png": (png[: len(png) // 2], "truncated", None),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated", None),
        "bad/zero_bytes.jpg": (b"", "empty", None),
        "bad/not_an_image.png": (b"name,score\nthis is a csv file,1\n", "not an image", None),
        "bad/bomb_refused.png": (png_header_only(30_000, 30_000), "too many pixels", None),
        "bad/bomb_warned.png": (png_header_only(11_000, 11_000), "too many pixels", None),
        "bad/too_thin.png": (encode(rgb_noise(3000, 1), "PNG"), "too thin", None),
    }


def read_output(output_uri: str, storage_options: dict | None = None) -> pa.Table:
    """Every committed part file of a labeling output, in shard order."""
    from maskrcnn.storage import filesystem

    fs, root = filesystem(output_uri, storage_options)
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else None


def local_parts(output_dir: str) -> list[str]:
    return sorted(glob.glob(f"{output_dir}/part-*.parquet"))


def process_table() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, command line with NULs as read from /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, cmdline)
    return table
