"""The plan of a labeling run: the input cut into fixed shards, kept beside the output.

Exactly-once rests on three rules:

1. The first run writes the plan: the input's URIs in listing order, cut into shards of
   ``shard_size`` images, stored as Parquet under ``<output>/_plan/`` (one row group per shard,
   ``SHARDS_PER_PLAN_FILE`` shards per file), then ``_plan/plan.json`` last, which says the plan
   is whole. Reruns read this plan and never list the input again, so what a shard holds never
   changes, even if files are added to the input meanwhile.
2. Shard k's rows are committed as one file, ``<output>/part-<k>.parquet``, written atomically
   (a temporary name then a rename on local disks; one PUT, which S3 makes visible whole).
3. A shard is finished iff its part file exists: a rerun lists the output folder (file names
   only) and labels the other shards.

The driver holds one bit of state per shard, never per image; planning streams the listing
through a buffer of one plan file.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import JobError
from maskrcnn.storage import filesystem, is_local

PLAN_FORMAT = "maskrcnn-ray-label-plan/1"
PLAN_DIR = "_plan"
PIECES_DIR = "_pieces"  # rows of shards in flight, merged into part files as shards complete
PREVIEW_DIR = "_preview"  # Parquet readers skip names starting with "_"
SHARDS_PER_PLAN_FILE = 64
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
PLAN_FILE_SCHEMA = pa.schema([("shard", pa.int32()), ("image_uri", pa.string())])


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def plan_file_name(number: int) -> str:
    return f"shards-{number:06d}.parquet"


@dataclass
class Plan:
    input: str
    num_images: int
    shard_size: int
    num_shards: int
    settings: dict = field(default_factory=dict)  # what must not change between runs of one output
    shards_per_file: int = SHARDS_PER_PLAN_FILE
    created: str = ""
    format: str = PLAN_FORMAT

    def shard_length(self, shard: int) -> int:
        return min(self.shard_size, self.num_images - shard * self.shard_size)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole file or none of it.

    Locally: a temporary name in the same folder, then a rename (atomic on POSIX). On object
    stores a single PUT (or a completed multipart upload) is atomic by itself.
    """
    if is_local(fs):
        parent = fs._parent(path)
        fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        with fs.open(temporary, "wb") as f:
            f.write(data)
        fs.mv(temporary, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def table_bytes(table: pa.Table, **write_options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **write_options)
    return buffer.getvalue()


def read_plan(output_uri: str, storage_options: dict | None = None) -> Plan | None:
    """The output's plan, or None when no run has made one yet."""
    fs, root = filesystem(output_uri, storage_options)
    path = f"{root.rstrip('/')}/{PLAN_DIR}/plan.json"
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if data.get("format") != PLAN_FORMAT:
        raise JobError(f"{output_uri}/{PLAN_DIR}/plan.json is not a labeling plan ({PLAN_FORMAT}); is --output another job's folder?")
    return Plan(**data)


def write_plan(
    uris: Iterable[str], output_uri: str, input_uri: str, shard_size: int, settings: dict, storage_options: dict | None = None
) -> Plan:
    """Cut the URIs into shards and store them under ``<output>/_plan/``; returns the plan.

    Streams: holds at most one plan file's worth of URIs (``shard_size * SHARDS_PER_PLAN_FILE``).
    """
    fs, root = filesystem(output_uri, storage_options)
    plan_dir = f"{root.rstrip('/')}/{PLAN_DIR}"
    per_file = shard_size * SHARDS_PER_PLAN_FILE
    buffer: list[str] = []
    num_images = 0
    file_number = 0

    def flush() -> None:
        nonlocal file_number
        first_shard = file_number * SHARDS_PER_PLAN_FILE
        shard_ids = pa.array(first_shard + np.arange(len(buffer), dtype=np.int32) // shard_size)
        table = pa.table([shard_ids, pa.array(buffer, pa.string())], schema=PLAN_FILE_SCHEMA)
        sink = io.BytesIO()
        with pq.ParquetWriter(sink, PLAN_FILE_SCHEMA) as writer:
            for start in range(0, len(buffer), shard_size):  # one row group per shard
                writer.write_table(table.slice(start, shard_size), row_group_size=shard_size)
        put_atomic(fs, f"{plan_dir}/{plan_file_name(file_number)}", sink.getvalue())
        file_number += 1
        buffer.clear()

    for uri in uris:
        buffer.append(uri)
        num_images += 1
        if len(buffer) == per_file:
            flush()
    if buffer:
        flush()
    if num_images == 0:
        raise JobError(f"--input {input_uri} holds no images (looked for {', '.join(('jpg', 'jpeg', 'png', 'webp', 'bmp', 'tif', 'tiff'))})")
    plan = Plan(
        input=input_uri,
        num_images=num_images,
        shard_size=shard_size,
        num_shards=-(-num_images // shard_size),
        settings=settings,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    put_atomic(fs, f"{plan_dir}/plan.json", json.dumps(asdict(plan), indent=1).encode())
    return plan


def read_shard_uris(output_uri: str, shard: int, storage_options: dict | None = None) -> list[str]:
    """The image URIs of one shard, in plan order."""
    fs, root = filesystem(output_uri, storage_options)
    path = f"{root.rstrip('/')}/{PLAN_DIR}/{plan_file_name(shard // SHARDS_PER_PLAN_FILE)}"
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(shard % SHARDS_PER_PLAN_FILE, columns=["shard", "image_uri"])
    if table.num_rows == 0 or table.column("shard")[0].as_py() != shard:
        raise RuntimeError(f"plan file {path} does not hold shard {shard} at row group {shard % SHARDS_PER_PLAN_FILE}: damaged plan")
    return table.column("image_uri").to_pylist()


def part_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The part files in the output folder ``root`` on ``fs`` (paths on ``fs``), in shard order;
    listed afresh, never from fsspec's cache. FileNotFoundError when the folder does not exist."""
    root = root.rstrip("/")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(root)
    found = [(shard, path.rstrip("/")) for path in fs.ls(root, detail=False) if (shard := _shard_of(path)) is not None]
    return [path for _, path in sorted(found)]


def _shard_of(path: str) -> int | None:
    """The shard of a part file's path (``.../part-000012.parquet`` -> 12); None for another file."""
    match = PART_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def finished_shards(output_uri: str, storage_options: dict | None = None) -> set[int]:
    """The shards whose part file exists, from the output folder's file names alone."""
    fs, root = filesystem(output_uri, storage_options)
    try:
        return {_shard_of(path) for path in part_files(fs, root)}
    except FileNotFoundError:
        return set()
