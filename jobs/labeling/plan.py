"""The plan of a labeling output: its input's images cut into fixed shards, kept beside the output
in ``<output>/_plan/``, grown by one generation per run that finds new images.

Exactly-once rests on four rules:

1. A run lists the input and plans what the plan does not hold yet: the first run every image,
   a later run the images added since (a new *generation* of shards, numbered after the last
   one). URIs are stored in listing order, one row group per shard, ``SHARDS_PER_PLAN_FILE``
   shards per file (``gen-<g>/shards-<n>.plan``: Parquet, named so that readers globbing
   ``*.parquet`` never take it for labels); ``plan.json`` is rewritten last, atomically, and is
   what says a generation exists. What a shard holds never changes once planned.
2. Shard k's rows are committed as one file, ``<output>/part-<k>.parquet``, atomically
   (``shards.py``).
3. A shard is finished iff its part file exists: a rerun labels the other shards.
4. One run at a time holds the output's lease (``lease.py``); only it plans and commits.

Images that left the input keep their rows. Re-planning streams the listing and compares it with
the plan through 64-bit hashes of the planned URIs (8 bytes an image, never the URIs
themselves); two different URIs would have to share a hash for a new image to be missed (for a
million planned and a million listed images, a chance of about 5e-8). The driver holds one bit of
state per shard, never per image.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import JobError
from maskrcnn.storage import put_atomic
from maskrcnn.storage import filesystem

PLAN_FORMAT = "maskrcnn-ray-label-plan/2"
OLD_PLAN_FORMAT = "maskrcnn-ray-label-plan/1"  # one generation, files _plan/shards-<n>.parquet
PLAN_DIR = "_plan"
SHARDS_PER_PLAN_FILE = 64
DEFAULT_SHARD_SIZE = 1000
PLAN_FILE_SCHEMA = pa.schema([("shard", pa.int32()), ("image_uri", pa.string())])
HASH_CHUNK = 65536  # listed URIs compared with the plan at a time


@dataclass
class Generation:
    """Shards ``first_shard`` ... ``first_shard + num_shards - 1``, planned by one run."""

    first_shard: int
    num_shards: int
    num_images: int
    created: str
    folder: str  # under _plan/: "gen-000001" ("" for a plan of format 1)
    extension: str = ".plan"

    def file_path(self, plan_dir: str, number: int) -> str:
        folder = f"{plan_dir}/{self.folder}" if self.folder else plan_dir
        return f"{folder}/shards-{number:06d}{self.extension}"


@dataclass
class Plan:
    input: str
    shard_size: int
    settings: dict = field(default_factory=dict)  # what must not change between runs of one output
    generations: list[Generation] = field(default_factory=list)
    created: str = ""
    format: str = PLAN_FORMAT

    @property
    def num_images(self) -> int:
        return sum(g.num_images for g in self.generations)

    @property
    def num_shards(self) -> int:
        return sum(g.num_shards for g in self.generations)

    def generation_of(self, shard: int) -> Generation:
        for generation in self.generations:
            if generation.first_shard <= shard < generation.first_shard + generation.num_shards:
                return generation
        raise IndexError(f"shard {shard} is not in the plan ({self.num_shards} shards)")

    def shard_length(self, shard: int) -> int:
        generation = self.generation_of(shard)
        return min(self.shard_size, generation.num_images - (shard - generation.first_shard) * self.shard_size)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["num_images"], data["num_shards"] = self.num_images, self.num_shards  # for people reading it
        return json.dumps(data, indent=1).encode()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def table_bytes(table: pa.Table, **write_options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **write_options)
    return buffer.getvalue()


def _plan_dir(output_uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = filesystem(output_uri, storage_options)
    return fs, f"{root.rstrip('/')}/{PLAN_DIR}"


def read_plan(output_uri: str, storage_options: dict | None = None) -> Plan | None:
    """The output's plan, or None when no run has made one yet."""
    fs, plan_dir = _plan_dir(output_uri, storage_options)
    try:
        with fs.open(f"{plan_dir}/plan.json", "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if data.get("format") == OLD_PLAN_FORMAT:
        first = Generation(0, data["num_shards"], data["num_images"], data.get("created", ""), "", ".parquet")
        return Plan(data["input"], data["shard_size"], data.get("settings", {}), [first], data.get("created", ""))
    if data.get("format") != PLAN_FORMAT:
        raise JobError(f"{output_uri}/{PLAN_DIR}/plan.json is not a labeling plan ({PLAN_FORMAT}); is --output another job's folder?")
    data.pop("num_images", None), data.pop("num_shards", None)
    data["generations"] = [Generation(**g) for g in data["generations"]]
    return Plan(**data)


def _write_generation(fs, plan_dir: str, uris: Iterable[str], first_shard: int, shard_size: int, folder: str) -> Generation:
    """Cut ``uris`` into shards from ``first_shard`` on and store them; holds at most one plan
    file's worth of URIs (``shard_size * SHARDS_PER_PLAN_FILE``)."""
    generation = Generation(first_shard, 0, 0, now(), folder)
    per_file = shard_size * SHARDS_PER_PLAN_FILE
    buffer: list[str] = []
    file_number = 0

    def flush() -> None:
        nonlocal file_number
        shard_ids = pa.array(first_shard + file_number * SHARDS_PER_PLAN_FILE + np.arange(len(buffer), dtype=np.int32) // shard_size)
        table = pa.table([shard_ids, pa.array(buffer, pa.string())], schema=PLAN_FILE_SCHEMA)
        sink = io.BytesIO()
        with pq.ParquetWriter(sink, PLAN_FILE_SCHEMA) as writer:
            for start in range(0, len(buffer), shard_size):  # one row group per shard
                writer.write_table(table.slice(start, shard_size), row_group_size=shard_size)
        put_atomic(fs, generation.file_path(plan_dir, file_number), sink.getvalue())
        file_number += 1
        buffer.clear()

    for uri in uris:
        buffer.append(uri)
        generation.num_images += 1
        if len(buffer) == per_file:
            flush()
    if buffer:
        flush()
    generation.num_shards = -(-generation.num_images // shard_size)
    return generation


def write_plan(
    uris: Iterable[str],
    output_uri: str,
    input_uri: str,
    shard_size: int,
    settings: dict,
    storage_options: dict | None = None,
    not_images: Counter | None = None,
) -> Plan:
    """The first run's plan: every URI, cut into shards, stored under ``<output>/_plan/``.
    JobError when there are none (naming the files ``iter_input_uris`` counted in ``not_images``)."""
    fs, plan_dir = _plan_dir(output_uri, storage_options)
    first = _write_generation(fs, plan_dir, uris, 0, shard_size, "gen-000001")
    if first.num_images == 0:
        from jobs.labeling.inputs import no_images

        raise no_images(input_uri, not_images)
    plan = Plan(input=input_uri, shard_size=shard_size, settings=settings, generations=[first], created=first.created)
    put_atomic(fs, f"{plan_dir}/plan.json", plan.to_json())
    return plan


def uri_hashes(uris: list[str]) -> np.ndarray:
    """64-bit hashes of URIs (pandas' vectorized SipHash), uint64."""
    from pandas.util import hash_array

    return hash_array(np.asarray(uris, dtype=object), categorize=False)


def extend_plan(
    plan: Plan, uris: Iterable[str], output_uri: str, storage_options: dict | None = None
) -> tuple[Plan, int, int]:
    """Plan the listed URIs that ``plan`` does not hold as a new generation; returns the plan
    (the same object when nothing is new), the number of images added, and the number of planned
    images no longer listed (they keep their rows)."""
    fs, plan_dir = _plan_dir(output_uri, storage_options)
    planned = np.unique(np.concatenate([uri_hashes(chunk) for chunk in iter_planned(plan, fs, plan_dir)] or [np.zeros(0, np.uint64)]))
    seen = np.zeros(len(planned), dtype=bool)

    def new_uris() -> Iterator[str]:
        for chunk in _chunked(uris, HASH_CHUNK):
            hashes = uri_hashes(chunk)
            where = np.searchsorted(planned, hashes).clip(max=max(len(planned) - 1, 0))
            known = (planned[where] == hashes) if len(planned) else np.zeros(len(hashes), dtype=bool)
            seen[where[known]] = True
            yield from (u for u, k in zip(chunk, known.tolist()) if not k)

    folder = f"gen-{len(plan.generations) + 1:06d}"
    generation = _write_generation(fs, plan_dir, new_uris(), plan.num_shards, plan.shard_size, folder)
    vanished = int((~seen).sum())
    if generation.num_images == 0:
        return plan, 0, vanished
    extended = Plan(plan.input, plan.shard_size, plan.settings, [*plan.generations, generation], plan.created)
    put_atomic(fs, f"{plan_dir}/plan.json", extended.to_json())
    return extended, generation.num_images, vanished


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_planned(plan: Plan, fs, plan_dir: str) -> Iterator[list[str]]:
    """The planned URIs, one plan file at a time."""
    for generation in plan.generations:
        files = -(-generation.num_shards // SHARDS_PER_PLAN_FILE)
        for number in range(files):
            with fs.open(generation.file_path(plan_dir, number), "rb") as f:
                yield pq.read_table(f, columns=["image_uri"]).column("image_uri").to_pylist()


def read_shard_uris(output_uri: str, shard: int, storage_options: dict | None = None, plan: Plan | None = None) -> list[str]:
    """The image URIs of one shard, in plan order (``plan``: the output's, read when not given)."""
    fs, plan_dir = _plan_dir(output_uri, storage_options)
    plan = plan or read_plan(output_uri, storage_options)
    generation = plan.generation_of(shard)
    local = shard - generation.first_shard
    path = generation.file_path(plan_dir, local // SHARDS_PER_PLAN_FILE)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(local % SHARDS_PER_PLAN_FILE, columns=["shard", "image_uri"])
    if table.num_rows == 0 or table.column("shard")[0].as_py() != shard:
        raise RuntimeError(f"plan file {path} does not hold shard {shard} at row group {local % SHARDS_PER_PLAN_FILE}: damaged plan")
    return table.column("image_uri").to_pylist()


def plan_for_run(
    input_uri: str, output_uri: str, shard_size: int | None, settings: dict, storage_options: dict | None, *, new_inputs: bool = True
) -> Plan:
    """The plan this run labels: the first run's (shards of ``shard_size``, default
    ``DEFAULT_SHARD_SIZE``), or the output's own (same input and settings, else JobError) grown
    by the images listed since when ``new_inputs``. Says what it did."""
    from jobs.labeling.inputs import iter_input_uris, not_images_note

    started = time.perf_counter()
    plan = read_plan(output_uri, storage_options)
    not_images: Counter = Counter()

    def say_not_images() -> None:
        note = not_images_note(input_uri, not_images)
        if note:
            print(note, flush=True)

    if plan is None:
        print(f"planning: listing {input_uri} ...", flush=True)
        uris = iter_input_uris(input_uri, storage_options, exclude_uri=output_uri, not_images=not_images)
        plan = write_plan(uris, output_uri, input_uri, shard_size or DEFAULT_SHARD_SIZE, settings, storage_options, not_images)
        seconds = time.perf_counter() - started
        print(f"planned {plan.num_images} images in {plan.num_shards} shards of {plan.shard_size} ({seconds:.1f} s)", flush=True)
        say_not_images()
        return plan
    if plan.input != input_uri:
        raise JobError(
            f"--output {output_uri} holds the labels of --input {plan.input}, not {input_uri}; "
            "give another --output, or the same --input to resume"
        )
    changed = {k: (plan.settings.get(k), v) for k, v in settings.items() if plan.settings.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise JobError(f"--output {output_uri} was labelled with other settings ({what}); give another --output to label with these")
    if shard_size is not None and shard_size != plan.shard_size:
        print(f"note: --shard-size {shard_size} ignored: the plan of {output_uri} has shards of {plan.shard_size}", flush=True)
    print(f"the plan of {plan.created}: {plan.num_images} images in {plan.num_shards} shards", flush=True)
    if not new_inputs:
        return plan
    print(f"planning: listing {input_uri} for images added since ...", flush=True)
    uris = iter_input_uris(input_uri, storage_options, exclude_uri=output_uri, not_images=not_images)
    plan, added, vanished = extend_plan(plan, uris, output_uri, storage_options)
    seconds = time.perf_counter() - started
    if added:
        shards = plan.generations[-1].num_shards
        print(f"{added} new images planned in {shards} new shards ({seconds:.1f} s)", flush=True)
    else:
        print(f"no new images ({seconds:.1f} s)", flush=True)
    say_not_images()
    if vanished:
        print(f"{vanished} planned image{' is' if vanished == 1 else 's are'} no longer in the input; "
              f"{'its row is' if vanished == 1 else 'their rows are'} kept", flush=True)
    return plan
