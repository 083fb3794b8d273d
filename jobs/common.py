"""What every job shares: storage options, Ray start-up, and failing with a clear reason."""

from __future__ import annotations

import argparse
import json
import os
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a default worth showing and do not state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class JobError(Exception):
    """A problem with the job's input or environment, reported to the user without a traceback."""


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec storage options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}' "
        "(default: none; S3 credentials and endpoint come from the standard AWS_* variables)",
    )


def parse_storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JobError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def init_ray(**kwargs):
    """Joins the Ray cluster this job was submitted to (``ray job submit`` sets RAY_ADDRESS) or
    one started with ``ray start`` on this machine; with none, starts a local Ray (the embedded
    default)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        try:
            ray.init(address="auto", **kwargs)
        except (ConnectionError, RuntimeError):
            ray.init(**kwargs)
    return ray


def run_main(main, argv=None) -> None:
    """Runs ``main(argv)``; a JobError (or a ValueError raised on bad input) exits 2 with its
    message on stderr, so schedulers and ``ray job logs`` show the reason."""
    try:
        code = main(argv)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
