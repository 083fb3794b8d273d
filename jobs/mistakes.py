"""Mistakes a retry would meet again: an image whose size is not its COCO file's, one that does
not decode, a diverged loss. ``mistake_in`` tells them from other errors however they arrive, so
that every job ends on one in one line (``jobs.common.run_main``); a Ray Train worker hands its
mistake to the job's driver (``publish_mistake``, ``take_mistake``), which ends the run instead
of letting Ray Train restart the workers (--max-failures) into it again."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

# The errors a retry would meet again, as a traceback names them (module-qualified but builtins).
MISTAKES = ("maskrcnn.data.coco_checks.AnnotationError", "maskrcnn.data.images.ImageDecodeError", "FloatingPointError",
            "jobs.training.spec.RunMismatch")
_MISTAKE_LINE = re.compile(r"^(?:%s): (.+)$" % "|".join(re.escape(name) for name in MISTAKES), re.M)


def mistake_in(exc: BaseException) -> str | None:
    """The one-line message of ``exc`` when it is a mistake in a job's inputs or settings that a
    retry would meet again (``MISTAKES``: a COCO file whose width/height do not fit its image, an
    image that does not decode, a loss that diverged), else None. Such an error may arrive raised
    here, or re-raised from another process with its traceback as text, the chain of exceptions
    lost: by a DataLoader process (torch's ExceptionWrapper) or a Ray task (a RayTaskError, whose
    ``cause`` is Ray Data's UserCodeException when a pipeline's function raised it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        named = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        if named in MISTAKES and text.strip() and "\n" not in text.strip():
            return text.strip()
        found = _MISTAKE_LINE.search(text)  # the first: a chain prints its root cause first
        if found:
            return found.group(1).strip()
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


# What a storage answers a write with when no retry will do: a full disk or quota, a file too large,
# a read-only file system (and, where only writes can meet it, permission denied)
REFUSED_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def refused_write(exc: BaseException, permission: bool = False) -> OSError | None:
    """The OSError behind ``exc`` (in its chain, or a Ray task error's ``cause``) by which a
    storage refused to take bytes for good (``REFUSED_WRITE_ERRNOS``; with ``permission``, also
    a PermissionError or EACCES/EPERM), else None."""
    refused = REFUSED_WRITE_ERRNOS + ((errno.EACCES, errno.EPERM) if permission else ())
    for error in chain(exc):
        if isinstance(error, OSError) and (error.errno in refused or (permission and isinstance(error, PermissionError))):
            return error
    return None


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it, once each: its ``__cause__`` and ``__context__``,
    and a Ray task error's ``cause`` (the exception the task raised)."""
    seen, stack = set(), [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        cause = getattr(error, "cause", None)
        stack.extend([error.__context__, error.__cause__, cause if isinstance(cause, BaseException) else None])


def refusal_reason(refused: OSError, local: bool) -> str:
    """Why a storage refused a write (``refused``, as ``refused_write`` found it), for a person: the
    system's words on a local file system, else what to check (``explain_storage_error``)."""
    from maskrcnn.storage import explain_storage_error

    return os.strerror(refused.errno) if local and refused.errno else explain_storage_error(refused)


class OutputRefused(Exception):
    """A job's --output refused a write for a reason no retry fixes; the message, one line,
    names the output and says why."""


def refused_output(output: str, exc: BaseException) -> str | None:
    """The line saying that --output ``output`` refused a write for good, when ``exc`` is such a
    refusal (``refused_write``, permission included), else None."""
    from maskrcnn.storage import is_local

    refused = refused_write(exc, permission=True)
    return None if refused is None else f"cannot write to --output {output}: {refusal_reason(refused, is_local(output))}"


@contextlib.contextmanager
def writing_output(output: str):
    """Around a job's writes to its --output: an error by which the storage refused them for good
    becomes an OutputRefused naming ``output`` (``refused_output``); other errors pass as they are."""
    try:
        yield
    except Exception as exc:
        message = refused_output(output, exc)
        if message is None:
            raise
        raise OutputRefused(message) from exc


NAMESPACE = "maskrcnn-train"  # of the keys in Ray's key-value store


def publish_mistake(key: str, message: str) -> None:
    """Leaves ``message`` in the cluster's key-value store under ``key`` (a run's own), where
    ``take_mistake`` finds it; the first of the workers' mistakes stays."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, message.encode(), overwrite=False, namespace=NAMESPACE)


def take_mistake(key: str) -> str | None:
    """The mistake a worker left under ``key``, removed from the store; None while there is none."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    message = _internal_kv_get(key, namespace=NAMESPACE)
    if not message:
        return None
    _internal_kv_del(key, namespace=NAMESPACE)
    return message.decode()
