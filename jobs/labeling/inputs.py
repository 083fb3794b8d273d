"""What to label: the image URIs under a folder or prefix, or listed in a manifest, streamed.

Nothing here holds the whole listing: a folder is walked one directory at a time (an ``s3://``
prefix is listed page by page, in S3's key order), a ``.txt`` manifest is read line by line and a
``.parquet`` manifest batch by batch. Memory stays flat however many images there are.
"""

from __future__ import annotations

from collections import Counter

import contextlib
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import JobError
from jobs.labeling.plan import PLAN_DIR
from maskrcnn.storage import explain_storage_error, filesystem, uri_key, within

# The still-image formats Pillow decodes (an animated GIF's first frame); a folder's other files
# are left out and counted (``iter_input_uris``' ``not_images``)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif", ".jp2",
                    ".ppm", ".pgm", ".pbm", ".pnm")
MANIFEST_EXTENSIONS = (".txt", ".parquet")
MANIFEST_COLUMN = "image_uri"


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_skipped_name(name: str) -> bool:
    """A file or folder name that a folder input never takes: hidden (``.``) or bookkeeping
    (``_``: a labeling output's ``_plan/``, ``_pieces/``, ``_preview/``, Spark's ``_SUCCESS``)."""
    return name.startswith((".", "_"))


def iter_input_uris(
    input_uri: str, storage_options: dict | None = None, exclude_uri: str | None = None, not_images: Counter | None = None
) -> Iterator[str]:
    """Every image URI of the input, in a deterministic order.

    A folder/prefix yields its images (by extension, any depth) in sorted path order, skipping
    hidden and bookkeeping names (``is_skipped_name``: a ``.`` or ``_`` start, as Hive, Spark
    and pyarrow skip them) and any folder that holds a labeling plan (another run's output); a
    manifest yields its lines/rows as written. ``exclude_uri``: a folder to skip (the job's
    output, when it lies inside the input). ``not_images``: counts a folder's files left out for
    their names, by extension (``not_images_note``). Raises JobError when the input does not exist.
    """
    fs, path = filesystem(input_uri, storage_options)
    kind = input_kind(input_uri, storage_options)
    if kind == "manifest":
        with _input_errors(input_uri):
            yield from _iter_manifest(fs, path, input_uri)
        return
    if kind == "image":
        yield input_uri
        return
    exclude = None
    if exclude_uri:
        exclude_fs, exclude_path = filesystem(exclude_uri, storage_options)
        if type(exclude_fs) is type(fs):
            exclude = exclude_path.rstrip("/") + "/"
    root = path.rstrip("/")
    for found in _walk_files(fs, root):
        below = found[len(root) + 1 :] if found.startswith(root + "/") else found.rsplit("/", 1)[-1]
        if any(is_skipped_name(part) for part in below.split("/")):
            continue
        if exclude and found.startswith(exclude):
            continue
        if is_image_name(found):
            yield _as_uri(fs, found, input_uri)
        elif not_images is not None:
            name = found.rsplit("/", 1)[-1]
            not_images[name.rsplit(".", 1)[-1].lower() if "." in name else ""] += 1


def not_images_note(input_uri: str, not_images: Counter, flag: str = "--input") -> str | None:
    """A line saying which files of ``flag`` ``input_uri`` were left out as not images (None when
    none were): a folder of phone photos in HEIC would otherwise go unlabelled in silence."""
    if not not_images:
        return None
    total = sum(not_images.values())
    most = sorted(not_images.items(), key=lambda kind: (-kind[1], kind[0]))[:5]
    kinds = ", ".join(f"{count} .{ext}" if ext else f"{count} without an extension" for ext, count in most)
    more = ", ..." if len(not_images) > 5 else ""
    line = f"note: {total} file{'s' if total != 1 else ''} in {flag} {input_uri} left out as not images by name ({kinds}{more})"
    if not_images.keys() & {"heic", "heif"}:
        line += "; HEIC/HEIF photos cannot be decoded here: convert them (to JPEG, say) to label them"
    return line


def no_images(input_uri: str, not_images: Counter | None = None, flag: str = "--input") -> JobError:
    """The error for ``flag`` ``input_uri`` holding no images: the extensions looked for and, when
    files were left out for their names, which (``not_images_note``)."""
    looked_for = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
    message = f"{flag} {input_uri} holds no images (looked for {looked_for})"
    note = not_images_note(input_uri, not_images, flag) if not_images else None
    return JobError(message + (f"; {note.removeprefix('note: ')}" if note else ""))


def input_kind(input_uri: str, storage_options: dict | None = None) -> str:
    """What --input ``input_uri`` is: "manifest", "image" or "folder" (a folder or prefix).
    Raises JobError when it does not exist, cannot be read, or is another kind of file."""
    fs, path = filesystem(input_uri, storage_options)
    with _input_errors(input_uri):
        if path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
            return "manifest"
        if fs.isfile(path):
            if not is_image_name(path):
                raise JobError(
                    f"--input {input_uri} is a file but neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a manifest "
                    "(.txt with one URI per line, or .parquet with an image_uri column)"
                )
            return "image"
        if not fs.isdir(path):
            raise JobError(f"--input {input_uri} does not exist (no such folder, prefix or manifest)")
    return "folder"


@contextlib.contextmanager
def _input_errors(input_uri: str) -> Iterator[None]:
    """Storage errors while reading --input ``input_uri`` as one JobError naming it."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:  # permission, network, credentials (botocore's errors are no OSError); a file that is no Parquet
        if isinstance(exc, FileNotFoundError):
            raise JobError(f"--input {input_uri} does not exist") from None
        raise JobError(f"cannot read --input {input_uri}: {explain_storage_error(exc)}") from None


def check_output_apart(input_uri: str, output_uri: str) -> None:
    """Refuses an --output that is --input's folder or holds it: the labels' bookkeeping would
    sit among the images (an --output inside --input is fine: the listing skips it)."""
    if within(input_uri, output_uri):
        what = "is" if uri_key(input_uri) == uri_key(output_uri) else "contains"
        raise JobError(
            f"--output {output_uri} {what} --input {input_uri}: the labels would be written among the images; "
            "give an --output outside the input (or in a folder of its own inside it)"
        )


def _as_uri(fs: fsspec.AbstractFileSystem, path: str, input_uri: str) -> str:
    """A listed path in the input's own spelling: ``s3://bucket/key`` for S3, a plain path locally."""
    if "://" in input_uri:
        return fs.unstrip_protocol(path)
    return path


def _walk_files(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols and hasattr(fs, "_iterdir"):
        yield from _walk_s3(fs, root)
        return
    # One directory at a time, in the order of the full paths (S3's order): a folder sorts as
    # its name followed by "/", so "a.png" comes before "a/0.png".
    stack = [(root, True)]
    while stack:
        path, is_dir = stack.pop()
        if not is_dir:
            yield path
            continue
        entries = fs.ls(path, detail=True)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)  # fsspec caches listings; a 10M-file walk must not keep them
        keyed = []
        names = {entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        if path != root and PLAN_DIR in names:
            continue  # another labeling run's output: its previews are no input
        for entry in entries:
            name = entry["name"].rstrip("/")
            if name == path.rstrip("/") or is_skipped_name(name.rsplit("/", 1)[-1]):
                continue
            directory = entry.get("type") == "directory"
            keyed.append((name + "/" if directory else name, name, directory))
        keyed.sort(reverse=True)  # popped from the end: smallest first
        stack.extend((name, directory) for _, name, directory in keyed)


def _walk_s3(fs, root: str) -> Iterator[str]:
    """Every key under ``root`` (bucket/prefix), page by page in S3's (lexicographic) order."""
    from fsspec.asyn import sync

    bucket, _, prefix = root.partition("/")
    if prefix:
        prefix += "/"
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)
    while True:
        try:
            info = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        if info.get("type") == "file" and not info["name"].endswith("/"):
            yield info["name"]


def _iter_manifest(fs: fsspec.AbstractFileSystem, path: str, input_uri: str) -> Iterator[str]:
    """A manifest's URIs: a ``.txt`` one's lines (UTF-8, with or without a BOM, any line ends;
    blank and ``#`` lines skipped), a ``.parquet`` one's ``image_uri`` column of strings (null and
    empty values skipped, as blank lines are, and counted in a note). Every line or row is a
    request: one listed twice is labelled twice."""
    if path.lower().endswith(".parquet"):
        skipped = 0
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if MANIFEST_COLUMN not in names:
                shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise JobError(
                    f"--input {input_uri}: the manifest has no '{MANIFEST_COLUMN}' column (its columns: {shown or 'none'}); "
                    f"a .parquet manifest holds one image URI per row in a string column named {MANIFEST_COLUMN}"
                )
            kind = parquet.schema_arrow.field(MANIFEST_COLUMN).type
            if not _is_text(kind):
                raise JobError(
                    f"--input {input_uri}: the manifest's {MANIFEST_COLUMN} column holds {kind}, not strings (one image URI per row)"
                )
            for batch in parquet.iter_batches(batch_size=65536, columns=[MANIFEST_COLUMN]):
                column = batch.column(0)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    try:  # binary (older writers' strings), dictionary-encoded, string views
                        column = column.cast(pa.string())
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise JobError(
                            f"--input {input_uri}: the manifest's {MANIFEST_COLUMN} column ({kind}) holds values that are not "
                            f"UTF-8 text: {str(exc).splitlines()[0]}"
                        ) from None
                for uri in column.to_pylist():
                    if uri:
                        yield uri
                    else:
                        skipped += 1
        if skipped:
            print(
                f"note: --input {input_uri}: {skipped} manifest row{'s' if skipped != 1 else ''} with a null or empty "
                f"{MANIFEST_COLUMN} skipped",
                flush=True,
            )
        return
    with fs.open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()  # a BOM, as Windows editors write
            except UnicodeDecodeError:
                raise JobError(f"manifest {input_uri} line {number} is not UTF-8 text: is it a text list of URIs?") from None
            if line and not line.startswith("#"):
                yield line


def _is_text(kind: pa.DataType) -> bool:
    """A column type whose values are strings (or bytes, read as UTF-8): what a manifest's URIs are."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view")
    return any(getattr(pa.types, name, lambda _: False)(kind) for name in checks)
