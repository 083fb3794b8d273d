"""Writes that readers see whole or not at all, on a local disk or an object store, and the
check, before any work, that an output takes them."""

from __future__ import annotations

import os
import tempfile
import uuid

import fsspec

from jobs.common import JobError
from maskrcnn.storage import explain_storage_error, filesystem, is_local, same_file


def probe_write(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Puts a small file in ``folder`` and removes it: an unwritable place (no bucket, no
    credentials, a file in the way) raises here, before the work that would write there."""
    path = f"{folder.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    with fs.open(path, "wb") as f:
        f.write(b"probe")
    fs.rm(path)


def check_output_writable(output_uri: str, storage_options: dict | None, probe_dir: str) -> None:
    """Raises JobError unless the folder or prefix --output ``output_uri`` (with
    ``storage_options``) takes a file: one is written in it (in its folder ``probe_dir``, or
    at its top with "") and removed, with the local folders made for it.
    Before any work, so that a run does not fail at its first write."""
    try:
        fs, root = filesystem(output_uri, storage_options)
        folder = "/".join(part for part in (root.rstrip("/"), probe_dir) if part)
        if fs.exists(root) and fs.isfile(root):
            raise JobError(f"--output {output_uri} is a file; give a folder or prefix")
        made = []  # the local folders the probe needs that do not exist, deepest first: removed after it
        if is_local(fs):
            missing = folder
            while not os.path.exists(missing):
                made.append(missing)
                missing = os.path.dirname(missing)
            fs.makedirs(folder, exist_ok=True)
        probe_write(fs, folder)
        for made_folder in made:
            os.rmdir(made_folder)
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"cannot write to --output {output_uri}: {explain_storage_error(exc)}") from None


def check_not_an_input(output: str, inputs: dict[str, str | None], shown: str, what: str) -> None:
    """Refuses, before any work, an ``output`` that is one of the files a job reads (``inputs``:
    option -> URI): JobError "``shown`` is --option URI: ``what`` would replace it"."""
    for option, uri in inputs.items():
        if uri and same_file(output, uri):
            raise JobError(f"{shown} is {option} {uri}: {what} would replace it; give another --output")


class AtomicOutput:
    """A text file that appears at ``uri`` whole when the ``with`` block ends without an error,
    else not at all: written to a temporary file (locally beside ``uri``, then renamed; for an
    object store in the local temp folder, then uploaded in one put). Entering it fails, as a
    JobError naming the option, where ``uri`` cannot be written: enter it before the work."""

    def __init__(self, uri: str, storage_options: dict | None, option: str = "--output"):
        self.uri, self.storage_options, self.option = uri, storage_options, option

    def _fail(self, exc: BaseException) -> JobError:
        return JobError(f"cannot write {self.option} {self.uri}: {explain_storage_error(exc)}")

    def __enter__(self):
        try:
            self.fs, self.path = filesystem(self.uri, self.storage_options)
            self.local = is_local(self.fs)
            if self.local:
                if os.path.isdir(self.path):
                    raise IsADirectoryError(f"{self.path} is a folder; give a .json file")
                parent = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(parent, exist_ok=True)
                self.temporary = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(self.path)}")
            else:  # no credentials or bucket fails at the start, not after the work
                probe_write(self.fs, self.path.rsplit("/", 1)[0])
                handle, self.temporary = tempfile.mkstemp(suffix=".json")
                os.close(handle)
            self.file = open(self.temporary, "w", encoding="utf-8")
        except Exception as exc:
            raise self._fail(exc) from None
        return self.file

    def __exit__(self, kind, exc, traceback) -> bool:
        try:
            self.file.close()
            if kind is None:
                try:
                    if self.local:
                        os.replace(self.temporary, self.path)
                    else:
                        self.fs.put_file(self.temporary, self.path)
                except Exception as error:
                    raise self._fail(error) from None
        finally:
            if os.path.exists(self.temporary):
                os.remove(self.temporary)
        return False
