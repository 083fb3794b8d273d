"""Stage 5 and the commit half of exactly-once: the pieces of shards in flight and each shard's
atomic commit (the plan, the other half, is ``plan.py``).

While a shard is in flight, write tasks (``ShardSink``) write its rows as pieces under
``<output>/_pieces/<run>/`` (``.piece`` files: Parquet that no reader's ``*.parquet`` glob takes
for labels), report them to the ``ShardCommitter`` actor, and the task that completes a shard
merges its pieces into ``<output>/part-<k>.parquet`` (deduplicated by index, so a retried task's
rows are never written twice), written atomically: a temporary name then a rename on local disks,
one PUT, which S3 makes visible whole. A shard is finished iff its part file exists.
"""

from __future__ import annotations

import re
import uuid
from typing import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from jobs.labeling.plan import Plan, table_bytes
from jobs.labeling.rows import OUTPUT_SCHEMA, PIECE_SCHEMA
from jobs.mistakes import chain, refusal_reason, refused_write
from maskrcnn.storage import filesystem, is_local, put_atomic

PIECES_DIR = "_pieces"  # rows of shards in flight, merged into part files as shards complete
PREVIEW_DIR = "_preview"  # Parquet readers skip names starting with "_"
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
# Committed part files: zstd and row groups of a few hundred rows keep readers' memory small.
PART_WRITE_OPTIONS = {"compression": "zstd", "row_group_size": 256}


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


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

    def __init__(self, plan: Plan):
        self.plan = plan
        self.seen: dict[int, np.ndarray] = {}
        self.pieces: dict[int, list[str]] = {}
        self.committed: set[int] = set()
        self.totals = {"images": 0, "detections": 0, "errors": 0, "shards": 0}
        self.model_actors: list | None = []  # None once the run has ended (``end_run``)

    def add_piece(self, shard: int, indices: np.ndarray, piece: str) -> list[str] | None:
        """Record a written piece; returns the shard's pieces when it is now complete (the
        caller then commits it), an empty list when it was committed already (the piece is
        redundant: a retried task's), else None."""
        if shard in self.committed:
            return []
        seen = self.seen.setdefault(shard, np.zeros(self.plan.shard_length(shard), dtype=bool))
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

    def join_run(self, actor) -> bool:
        """A model actor of this run (its own handle) starts; False once the run has ended."""
        if self.model_actors is None:
            return False
        self.model_actors.append(actor)
        return True

    def end_run(self) -> list:
        """The run's model actors, for the driver to stop; none joins after this."""
        actors, self.model_actors = self.model_actors or [], None
        return actors


class OutputWriteError(Exception):
    """The output refuses the run's writes for a reason no retry fixes (a full disk, a quota, a
    read-only file system, permission withdrawn): the message says which, for a person to read."""


def output_refused(exc: BaseException) -> str | None:
    """The message of the OutputWriteError behind ``exc`` (as Ray delivers a task's error: a
    RayTaskError that is also an OutputWriteError, wrapped by Ray Data), or None."""
    for error in chain(exc):
        if isinstance(error, OutputWriteError) and not isinstance(error, ray.exceptions.RayTaskError):  # not its traceback's text
            return (str(error).splitlines() or [""])[0]  # Ray Data appends its retry advice
    return None


class ShardSink(ray.data.Datasink):
    """Writes rows into per-shard pieces and commits each shard once all its images are in."""

    def __init__(self, *, output_uri: str, storage_options: dict | None, run_id: str, committer, plan: Plan):
        self.output_uri, self.storage_options, self.run_id = output_uri, storage_options, run_id
        self.committer = committer
        self.plan = plan

    def get_name(self) -> str:
        return "WriteShards"

    @property
    def min_rows_per_write(self) -> int:
        # About a shard per write task: fewer, larger pieces, and Ray Data's bookkeeping of
        # write tasks on the driver grows with shards, not with images.
        return self.plan.shard_size

    def write(self, blocks: Iterable, ctx) -> None:
        fs, root = filesystem(self.output_uri, self.storage_options)
        try:
            self._write(fs, root.rstrip("/"), blocks)
        except OSError as exc:
            refused = refused_write(exc, permission=True)  # the sink only writes: a permission refused is a write's
            if refused is None:
                raise
            raise OutputWriteError(refusal_reason(refused, is_local(fs))) from None

    def _write(self, fs, root: str, blocks: Iterable) -> None:
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            for shard in pc.unique(table.column("shard")).to_pylist():
                rows = table.filter(pc.equal(table.column("shard"), shard))
                piece = f"{root}/{PIECES_DIR}/{self.run_id}/{shard:06d}/{uuid.uuid4().hex}.piece"
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
        expected = self.plan.shard_length(shard)
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
