"""How jobs.train's workers put a checkpoint into the run's storage: Ray Train's upload, with
every error raised (``upload_checkpoint``)."""

from __future__ import annotations

import os


def checkpoint_upload() -> dict:
    """``ray.train.report``'s arguments that upload a checkpoint with ``upload_checkpoint``, where
    this Ray has them (``checkpoint_upload_fn``); else none (its own upload)."""
    import inspect

    import ray.train

    return {"checkpoint_upload_fn": upload_checkpoint} if "checkpoint_upload_fn" in inspect.signature(ray.train.report).parameters else {}


def upload_checkpoint(checkpoint, name: str):
    """Ray Train's upload of a checkpoint folder into the run's storage, as its own but raising
    every error: each file goes through the storage filesystem's output stream, whose close is
    the write on S3. Ray Train's default (``pyarrow.fs.copy_files``, pyarrow 26) ignores an error
    in that close on a filesystem implemented in Python (fsspec's, which --output on S3 uses): a
    refused upload (permission withdrawn, retries spent) left the checkpoint recorded and
    missing, and the run went on to fail later on, or to resume from a checkpoint that is not
    there."""
    import shutil

    import ray.train

    storage = ray.train.get_context().get_storage()
    if hasattr(storage, "_check_validation_file"):  # as Ray's upload: a local --output the worker's node does not share
        storage._check_validation_file()
    fs, destination = storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)
    fs.create_dir(destination)
    for folder, _, files in os.walk(checkpoint.path):
        relative = os.path.relpath(folder, checkpoint.path)
        target = destination if relative == "." else f"{destination}/{relative}"
        if relative != ".":
            fs.create_dir(target)
        for file in files:
            with open(os.path.join(folder, file), "rb") as source, fs.open_output_stream(f"{target}/{file}") as out:
                shutil.copyfileobj(source, out, 64 * 2**20)
    return ray.train.Checkpoint(destination, filesystem=fs)
