"""Every URI the project reads or writes goes through here, so local paths, ``file://`` and
``s3://`` (or any other fsspec protocol) behave the same.

Credentials and the endpoint of an S3-compatible store come from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``) or from
``storage_options``, the fsspec convention (for s3fs: ``key``, ``secret``, ``endpoint_url``,
``client_kwargs``, ...). Nothing here logs or prints the options: they may hold secrets.

S3 requests that fail for a passing reason (``503 SlowDown``, a dropped connection, a 5xx) are
retried with backoff, a bounded number of times, and counted (``maskrcnn.s3``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO, Any

import fsspec
from fsspec.utils import get_protocol

from maskrcnn import s3

__all__ = [
    "filesystem", "check_protocol", "open_uri", "join_uri", "absolute_uri", "uri_key", "same_file", "within", "is_local",
    "explain_storage_error", "put_atomic",
]

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")


def _options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    if get_protocol(uri) in _S3_PROTOCOLS:
        options = s3.client_options(options)
    return options


def explain_storage_error(exc: BaseException) -> str:
    """Why a read or write failed, in one line that says what to check (for ``error: ...``).

    Knows botocore's and s3fs's failures by name (no import of either): no credentials, an
    endpoint that does not answer, credentials refused or without permission; else the
    exception's type and first line. Never shows credentials (the messages hold none)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "CredentialRetrievalError"}:
        return (
            f"no usable S3 credentials ({first_line}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or give key and secret in --storage-options"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError"} or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        return (
            f"cannot reach the storage endpoint ({first_line}): "
            "check AWS_ENDPOINT_URL (or endpoint_url in --storage-options) and the network"
        )
    if isinstance(exc, TypeError) and "unexpected keyword argument" in first_line:
        return f"an option the storage does not take ({first_line}): check --storage-options"
    if isinstance(exc, PermissionError):
        return (
            f"access denied ({first_line}): check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) "
            "and their permissions on this bucket and prefix"
        )
    if isinstance(exc, FileNotFoundError):
        return f"it does not exist ({first_line})"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder; give the file"
    return f"{type(exc).__name__}: {first_line}"


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem that serves ``uri`` and the path of ``uri`` on it (no protocol).

    >>> fs, path = filesystem("/tmp/data")   # (LocalFileSystem, "/tmp/data")

    A protocol fsspec does not know, or one whose package is not installed, is a ValueError
    naming ``uri`` (``check_protocol``).
    """
    check_protocol(uri)
    return fsspec.core.url_to_fs(uri, **_options_for(uri, storage_options))


def check_protocol(uri: str) -> None:
    """A ValueError naming ``uri`` when its protocol is not one fsspec knows, or its package is
    not installed here (gcsfs for gs://, adlfs for az://)."""
    protocol = get_protocol(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ValueError(f"{uri}: {protocol}:// needs a package that is not installed here: {exc}") from None
    except ValueError:
        raise ValueError(f"{uri}: unknown storage protocol {protocol}:// (a local path, s3://, or another fsspec protocol)") from None


def open_uri(uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO:
    """Open ``uri`` (a local path, ``file://``, ``s3://``, ...); use it as a context manager.

    Writing to a local path creates its missing parent folders, as writing to S3 needs none.
    Text modes (``"r"``, ``"w"``) read and write UTF-8.
    An object store's prefix opened for reading is an IsADirectoryError, as a local folder is
    (s3fs opens it as an empty file).
    """
    fs, path = filesystem(uri, storage_options)
    if any(flag in mode for flag in "wax") and is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    opened = fs.open(path, mode) if "b" in mode else fs.open(path, mode, encoding="utf-8")
    if "r" in mode and not is_local(fs) and getattr(getattr(opened, "buffer", opened), "size", None) == 0 and fs.isdir(path):
        opened.close()
        raise IsADirectoryError(f"{uri} is a folder (a prefix), not a file")
    return opened


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` so that readers see the whole file or none of it.

    Locally: a temporary name in the same folder, then a rename (atomic on POSIX); with
    ``exclusive``, a hard link instead, which raises FileExistsError when ``path`` exists
    (``O_EXCL`` on a file system without hard links). On object stores a single PUT (or a
    completed multipart upload) is atomic by itself; ``exclusive`` is for local files only.
    """
    if is_local(fs):
        parent = fs._parent(path)
        fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        try:
            with fs.open(temporary, "wb") as f:
                f.write(data)
            if not exclusive:
                fs.mv(temporary, path)
                return
        except BaseException:  # a full disk, a signal: no partial file left behind
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            with open(path, "xb") as f:
                f.write(data)
        finally:
            os.unlink(temporary)
    else:
        if exclusive:
            raise ValueError("put_atomic(exclusive=True) is for local files; object stores have their own conditional writes")
        with fs.open(path, "wb") as f:
            f.write(data)


def join_uri(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended, separated by ``/``, for local paths and URIs alike.

    Leading and trailing slashes of the parts are dropped, so a part never replaces the base
    (unlike ``os.path.join`` with an absolute part): ``join_uri("s3://b/x/", "/y", "z.png")``
    is ``"s3://b/x/y/z.png"``.
    """
    cleaned = [part.strip("/") for part in parts if part and part.strip("/")]
    if not cleaned:
        return base
    if not base:
        return posixpath.join(*cleaned)
    if base.endswith("://"):  # a bare protocol, e.g. "s3://"
        return base + "/".join(cleaned)
    return "/".join([base.rstrip("/")] + cleaned)


def absolute_uri(uri: str | None) -> str | None:
    """A local path made absolute (``file://`` dropped, ``~`` expanded as a shell would have
    before ``--opt=~/x``); other URIs as they are. For what a job hands to Ray's workers, which
    run in another working directory."""
    if uri is None or not is_local(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def uri_key(uri: str) -> str:
    """``uri`` as URIs of one file compare: a local path absolute, its symlinks resolved; another
    URI as written, less a trailing slash."""
    return os.path.realpath(absolute_uri(uri)) if is_local(uri) else uri.rstrip("/")


def same_file(a: str, b: str) -> bool:
    """Whether the URIs ``a`` and ``b`` name one file (locally also through a hard link): a job
    refuses to write its output over one of its inputs."""
    if uri_key(a) == uri_key(b):
        return True
    if not (is_local(a) and is_local(b)):
        return False
    paths = absolute_uri(a), absolute_uri(b)
    return all(os.path.exists(path) for path in paths) and os.path.samefile(*paths)


def within(inner: str, outer: str) -> bool:
    """Whether the URI ``inner`` is ``outer`` or lies under it (compared as ``uri_key`` gives them)."""
    inner, outer = uri_key(inner), uri_key(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def is_local(where: str | fsspec.AbstractFileSystem) -> bool:
    """Whether a URI (by its protocol: a plain path, ``file://``) or an fsspec filesystem is
    this machine's own disk, where files are renamed and folders made, unlike object stores."""
    if isinstance(where, str):
        return get_protocol(where) in _LOCAL_PROTOCOLS
    protocols = where.protocol if isinstance(where.protocol, (tuple, list)) else (where.protocol,)
    return any(protocol in _LOCAL_PROTOCOLS for protocol in protocols)
