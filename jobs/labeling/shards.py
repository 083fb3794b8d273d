"""Stage 4 and exactly-once, all of it: the plan (the input cut into fixed shards, kept beside the
output), the pieces of shards in flight, and each shard's atomic commit.

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
through a buffer of one plan file. While a shard is in flight, write tasks (``ShardSink``) write its
rows as pieces under ``<output>/_pieces/<run>/``, report them to the ``ShardCommitter`` actor, and
the task that completes a shard merges its pieces into the part file (deduplicated by index, so a
retried task's rows are never written twice).
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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from jobs.common import JobError
from jobs.labeling.rows import OUTPUT_SCHEMA, PIECE_SCHEMA
from maskrcnn.storage import filesystem, is_local

PLAN_FORMAT = "maskrcnn-ray-label-plan/1"
PLAN_DIR = "_plan"
PIECES_DIR = "_pieces"  # rows of shards in flight, merged into part files as shards complete
PREVIEW_DIR = "_preview"  # Parquet readers skip names starting with "_"
SHARDS_PER_PLAN_FILE = 64
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
PLAN_FILE_SCHEMA = pa.schema([("shard", pa.int32()), ("image_uri", pa.string())])
# Committed part files: zstd and row groups of a few hundred rows keep readers' memory small.
PART_WRITE_OPTIONS = {"compression": "zstd", "row_group_size": 256}


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
        looked_for = ", ".join(("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"))
        raise JobError(f"--input {input_uri} holds no images (looked for {looked_for})")
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


# ---------------------------------------------------------------- shards in flight: pieces and commits


@ray.remote(num_cpus=0, max_restarts=0)
class ShardCommitter:
    """Knows which images of each in-flight shard have been written, and which shards are
    committed. State per in-flight shard: a bitmap of its images and its piece files."""

    def __init__(self, plan_num_images: int, shard_size: int):
        self.num_images = plan_num_images
        self.shard_size = shard_size
        self.seen: dict[int, np.ndarray] = {}
        self.pieces: dict[int, list[str]] = {}
        self.committed: set[int] = set()
        self.totals = {"images": 0, "detections": 0, "errors": 0, "shards": 0}

    def add_piece(self, shard: int, indices: np.ndarray, piece: str) -> list[str] | None:
        """Record a written piece; returns the shard's pieces when it is now complete (the
        caller then commits it), an empty list when it was committed already (the piece is
        redundant: a retried task's), else None."""
        if shard in self.committed:
            return []
        length = min(self.shard_size, self.num_images - shard * self.shard_size)
        seen = self.seen.setdefault(shard, np.zeros(length, dtype=bool))
        seen[indices] = True
        self.pieces.setdefault(shard, []).append(piece)
        return list(self.pieces[shard]) if seen.all() else None

    def commit(self, shard: int, images: int, detections: int, errors: int) -> None:
        if shard in self.committed:
            return
        self.committed.add(shard)
        self.seen.pop(shard, None)
        self.pieces.pop(shard, None)
        self.totals["images"] += images
        self.totals["detections"] += detections
        self.totals["errors"] += errors
        self.totals["shards"] += 1

    def summary(self) -> dict:
        return dict(self.totals, in_flight=len(self.seen))


class ShardSink(ray.data.Datasink):
    """Writes rows into per-shard pieces and commits each shard once all its images are in."""

    def __init__(self, *, output_uri: str, storage_options: dict | None, run_id: str, committer, plan: Plan):
        self.output_uri, self.storage_options, self.run_id = output_uri, storage_options, run_id
        self.committer = committer
        self.shard_size = plan.shard_size
        self.num_images = plan.num_images

    def get_name(self) -> str:
        return "WriteShards"

    @property
    def min_rows_per_write(self) -> int:
        # About a shard per write task: fewer, larger pieces, and Ray Data's bookkeeping of
        # write tasks on the driver grows with shards, not with images.
        return self.shard_size

    def write(self, blocks: Iterable, ctx) -> None:
        fs, root = filesystem(self.output_uri, self.storage_options)
        root = root.rstrip("/")
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            for shard in pc.unique(table.column("shard")).to_pylist():
                rows = table.filter(pc.equal(table.column("shard"), shard))
                piece = f"{root}/{PIECES_DIR}/{self.run_id}/{shard:06d}/{uuid.uuid4().hex}.parquet"
                put_atomic(fs, piece, table_bytes(rows.cast(PIECE_SCHEMA)))
                pieces = ray.get(self.committer.add_piece.remote(shard, rows.column("index").to_numpy(), piece))
                if pieces == []:
                    _remove(fs, [piece])
                elif pieces:
                    self._commit(fs, root, shard, pieces)

    def _commit(self, fs, root: str, shard: int, pieces: list[str]) -> None:
        final = f"{root}/{part_name(shard)}"
        try:
            tables = []
            for piece in pieces:
                with fs.open(piece, "rb") as f:
                    tables.append(pq.read_table(f))
        except FileNotFoundError:
            if fs.exists(final):  # another task committed it meanwhile (a retry raced us)
                return
            raise
        merged = pa.concat_tables(tables).cast(PIECE_SCHEMA)
        # Keep the first row of each index: a retried task may have written some rows twice.
        order = pc.sort_indices(merged, sort_keys=[("index", "ascending")])
        merged = merged.take(order)
        index = merged.column("index").to_numpy()
        keep = np.ones(len(index), dtype=bool)
        keep[1:] = index[1:] != index[:-1]
        merged = merged.filter(pa.array(keep))
        out = merged.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        expected = min(self.shard_size, self.num_images - shard * self.shard_size)
        if out.num_rows != expected:  # the committer said complete: this would be a bug, never commit it
            raise RuntimeError(f"shard {shard}: {out.num_rows} rows merged from {len(pieces)} pieces, expected {expected}")
        put_atomic(fs, final, table_bytes(out, **PART_WRITE_OPTIONS))
        detections = int(pc.sum(pc.list_value_length(out.column("instances"))).as_py() or 0)
        errors = int(pc.sum(pc.is_valid(out.column("error"))).as_py() or 0)
        ray.get(self.committer.commit.remote(shard, out.num_rows, detections, errors))
        _remove(fs, pieces)


def _remove(fs, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
