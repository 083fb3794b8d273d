"""Writes that readers see whole or not at all, on a local disk or an object store."""

from __future__ import annotations

import os
import tempfile
import uuid

import fsspec

from jobs.common import JobError
from maskrcnn.storage import explain_storage_error, filesystem, is_local


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
            else:  # a file put beside it and removed: no credentials or bucket fails at the start, not after the work
                probe = f"{self.path.rsplit('/', 1)[0]}/.write-probe-{uuid.uuid4().hex}"
                with self.fs.open(probe, "wb") as f:
                    f.write(b"probe")
                self.fs.rm(probe)
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
