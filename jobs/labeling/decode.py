"""Stage 1, in CPU tasks: image URIs -> the images as they travel to the model, whole: fetch,
decode, size (``maskrcnn.inference.prepare_image``, so jobs.label refuses the images training and
evaluation refuse). Every failure becomes the row's ``error``, never a crash.

Columns out (R rows): ``shard``, ``index``, ``image_uri`` as they came; ``height``, ``width``
(int32, the image as decoded, -1 when it did not decode); ``image`` (binary: the (3, h, w)
tensor's bytes, float32 when ``resized`` else uint8), ``image_height``, ``image_width`` (int32,
its h and w), ``resized`` (bool); ``error`` (string, "" when none).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from maskrcnn.data.images import ImageDecodeError
from maskrcnn.inference import PreparedImage, prepare_image
from maskrcnn.storage import filesystem

# Errors that a retry cannot fix; anything else (a timeout, throttling) is retried before it
# becomes the row's error, since a row with an error is final.
_PERMANENT = (FileNotFoundError, IsADirectoryError, PermissionError)


def fetch(uris: list[str], storage_options: dict | None) -> list[bytes | Exception]:
    """The bytes of each URI, or the exception that reading it raised; concurrently on async
    filesystems (s3fs, gcsfs). Paths are never glob-expanded: ``img[1].png`` is a file name."""
    from fsspec.asyn import sync

    results: list[bytes | Exception] = [b""] * len(uris)
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri, storage_options)
        group = groups.setdefault(id(fs), (fs, [], []))
        group[1].append(i)
        group[2].append(path)
    for fs, positions, paths in groups.values():
        if getattr(fs, "async_impl", False):

            async def gather(fs=fs, paths=paths):
                return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)

            fetched = sync(fs.loop, gather)
        else:
            fetched = [None] * len(paths)
        for position, path, data in zip(positions, paths, fetched):
            if data is None:  # local files
                data = _fetch_one(fs, path)
            elif isinstance(data, Exception) and not isinstance(data, _PERMANENT):
                data = _fetch_one(fs, path, failed=True)  # a transient error, retried
            results[position] = data
    return results


def _fetch_one(fs, path: str, attempts: int = 4, failed: bool = False) -> bytes | Exception:
    """The bytes of ``path``, or the exception of its last attempt. ``attempts`` reads at most
    (each with the filesystem's own retries), 0.5, 1, 2 s apart; a permanent error ends them at
    once. ``failed``: a read of it failed already, so the first attempt is a retry too. Every
    retry of an object store's read is counted (``maskrcnn.s3.count_s3_retry``)."""
    from maskrcnn.s3 import count_s3_retry
    from maskrcnn.storage import is_local

    for attempt in range(attempts):
        if (failed or attempt) and not is_local(fs):
            count_s3_retry()
        try:
            return fs.cat_file(path)
        except _PERMANENT as exc:
            return exc
        except Exception as exc:
            if attempt == attempts - 1:
                return exc
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "cannot read: file not found"
    if isinstance(exc, IsADirectoryError):
        return "cannot read: a folder, not a file"
    if isinstance(exc, PermissionError):
        return f"cannot read: permission denied ({exc})"
    return f"cannot read: {type(exc).__name__}: {exc}"


def decode_batch(
    batch: dict[str, np.ndarray], *, storage_options: dict | None, min_size: int, max_size: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """Rows with ``image_uri`` -> rows with the prepared image or the reason it failed."""
    uris = batch["image_uri"].tolist()
    count = len(uris)
    prepared: list[PreparedImage | None] = [None] * count
    errors = [""] * count  # "" = no error: a column of None does not survive Arrow as strings
    for i, data in enumerate(fetch(uris, storage_options)):
        if isinstance(data, Exception):
            errors[i] = _read_error(data)
            continue
        try:
            prepared[i] = prepare_image(data, min_size, max_size, max_pixels)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
    return {
        "shard": batch["shard"],
        "index": batch["index"],
        "image_uri": batch["image_uri"],
        **image_columns(prepared),
        "error": np.asarray(errors, dtype=object),
    }


def image_columns(prepared: list[PreparedImage | None]) -> dict[str, np.ndarray]:
    """The image columns of rows (None: a row without an image)."""
    count = len(prepared)
    sizes = np.full((count, 2), -1, dtype=np.int32)
    shapes = np.zeros((count, 2), dtype=np.int32)
    resized = np.zeros(count, dtype=bool)
    data = [b""] * count
    for i, p in enumerate(prepared):
        if p is None:
            continue
        sizes[i] = p.original_size
        shapes[i] = p.image.shape[-2:]
        resized[i] = p.resized
        data[i] = p.image.contiguous().numpy().tobytes()
    return {
        "height": sizes[:, 0], "width": sizes[:, 1], "image": np.asarray(data, dtype=object),
        "image_height": shapes[:, 0], "image_width": shapes[:, 1], "resized": resized,
    }


def prepared_images(batch: dict[str, np.ndarray], rows: list[int]) -> list[PreparedImage]:
    """The prepared images of ``rows`` of a batch with ``image_columns``, as tensors again."""
    import torch

    images = []
    for i in rows:
        h, w, resized = int(batch["image_height"][i]), int(batch["image_width"][i]), bool(batch["resized"][i])
        array = np.frombuffer(batch["image"][i], dtype=np.float32 if resized else np.uint8).reshape(3, h, w)
        # frombuffer's array is read-only: torch needs its own copy
        size = (int(batch["height"][i]), int(batch["width"][i]))
        images.append(PreparedImage(torch.from_numpy(array.copy()), size, resized))
    return images
