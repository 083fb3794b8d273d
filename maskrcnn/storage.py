"""Every URI the project reads or writes goes through here, so local paths, ``file://`` and
``s3://`` (or any other fsspec protocol) behave the same.

Credentials and the endpoint of an S3-compatible store come from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``) or from
``storage_options``, the fsspec convention (for s3fs: ``key``, ``secret``, ``endpoint_url``,
``client_kwargs``, ...). Nothing here logs or prints the options: they may hold secrets.

S3 requests that fail for a passing reason (``503 SlowDown``, a dropped connection, a 5xx) are
retried with backoff, a bounded number of times (``S3_RETRIES``, then s3fs's own few tries), and
counted: ``s3_retries()`` in this process and the processes it forked (a job adds its Ray
workers' counts: jobs/retries.py).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import posixpath
import selectors
import sys
import threading
import uuid
from typing import IO, Any

import fsspec
from fsspec.utils import get_protocol

__all__ = [
    "filesystem", "check_protocol", "open_uri", "join_uri", "absolute_uri", "is_local", "explain_storage_error",
    "count_s3_retry", "s3_retries", "on_s3_retry", "s3_in_use", "in_forked_child", "put_atomic",
]

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")


def _s3_options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """Fill the endpoint and region of ``s3://`` from the standard AWS variables.

    botocore >= 1.31 reads ``AWS_ENDPOINT_URL`` by itself (the installed s3fs honours it), but
    older ones do not, and no botocore reads ``AWS_REGION`` (only ``AWS_DEFAULT_REGION``). Naming
    them explicitly also keys fsspec's instance cache on the endpoint, so a process that talks to
    two endpoints one after the other never reuses a client made for the other.
    """
    options = dict(storage_options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
    if "region_name" not in client_kwargs and not os.environ.get("AWS_DEFAULT_REGION"):
        region = os.environ.get("AWS_REGION")
        if region:
            client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


# botocore's defaults wait 60 s to connect and retry a refused connection 4 times with
# backoff ("legacy" mode): a wrong AWS_ENDPOINT_URL took minutes to fail. The AWS SDKs' "standard"
# mode (3 attempts) with a 10 s connect timeout fails in seconds; a store that answers is
# unaffected. It retries throttling (503 SlowDown), 5xx and dropped connections after a jittered
# 0-1 s, then 0-2 s, within a retry budget per client. s3fs then makes the whole call again, 5
# times at most (``_retry_in_s3fs``): 15 attempts for a passing fault, 3 for a refused connection
# (more attempts made a wrong endpoint take a minute to report: one backoff per call of the job).
# AWS_MAX_ATTEMPTS / AWS_RETRY_MODE or --storage-options' config_kwargs win.
S3_CONNECT_TIMEOUT_S = 10
S3_RETRIES = {"max_attempts": 3, "mode": "standard"}


# botocore >= 1.36 adds CRC32 checksum headers to every upload ("when_supported"), which many
# S3-compatible stores refuse (Backblaze B2: "Unsupported header 'x-amz-sdk-checksum-algorithm'",
# Ceph, GCS and older MinIO: signature errors). For an endpoint that is not AWS's, uploads carry
# them only where the operation requires one, as before botocore 1.36.
# AWS_REQUEST_CHECKSUM_CALCULATION / AWS_RESPONSE_CHECKSUM_VALIDATION or config_kwargs win.
_CHECKSUM_SETTINGS = {"request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION",
                      "response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION"}


def _s3_client_defaults(options: dict[str, Any]) -> dict[str, Any]:
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    if "retries" not in config_kwargs and not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        config_kwargs["retries"] = _RetrySettings(S3_RETRIES)
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if endpoint and not _is_aws_endpoint(endpoint):
        from botocore.config import Config

        for name, variable in _CHECKSUM_SETTINGS.items():
            if name in Config.OPTION_DEFAULTS and not os.environ.get(variable):  # botocore < 1.36 has neither
                config_kwargs.setdefault(name, "when_required")
    return {**options, "config_kwargs": config_kwargs}


def _is_aws_endpoint(endpoint: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


class _RetrySettings(dict):
    """``S3_RETRIES`` as botocore takes it. A filesystem made here keeps it in its options, so a
    process that unpickles the filesystem (Ray Train ships --output's to its controller) runs
    ``_install_s3_hooks`` before it makes the filesystem again, without importing this module itself."""

    def __reduce__(self):
        return (_unpickle_retry_settings, (dict(self),))


def _unpickle_retry_settings(settings: dict) -> dict:
    _install_s3_hooks()
    return _RetrySettings(settings)


def _options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    if get_protocol(uri) in _S3_PROTOCOLS:
        _install_s3_hooks()
        options = _s3_client_defaults(_s3_options(options))
    return options


# ---------------------------------------------------------------- S3 retries: bounded, and counted
#
# Three layers retry, each a bounded number of times, and each counts what it sends again:
# botocore (S3_RETRIES; the "request-created" hook counts an attempt after the first), s3fs
# around each call (5 tries, its own for SlowDown and cut connections, ``_retry_in_s3fs``'s for
# the rest; ``_count_s3fs_calls`` counts a call made again) and jobs.labeling.decode.fetch around
# an image read (``count_s3_retry``).
#
# The count of this process lives in shared memory, so DataLoader processes forked from it add to
# it. Ray workers hand theirs to their job (jobs/retries.py, through ``on_s3_retry``).

_SHARED = mmap.mmap(-1, 8)  # anonymous and shared: forked children write to the same 8 bytes
_COUNT = ctypes.c_int64.from_buffer(_SHARED)
_COUNT_LOCK = threading.Lock()
_LISTENERS: list = []
_HOOKS_INSTALLED = False
_IN_FORKED_CHILD = False


def count_s3_retry(n: int = 1) -> None:
    """Counts ``n`` S3 requests sent again after a failure, then calls the listeners
    (``on_s3_retry``)."""
    with _COUNT_LOCK:
        _COUNT.value += n
    for listener in _LISTENERS:
        listener()


def on_s3_retry(listener) -> None:
    """Calls ``listener()`` after each retry this process counts (jobs.retries hands the count of
    a Ray worker to its job this way)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def s3_in_use() -> bool:
    """Whether this process made an S3 filesystem (and so counts its retries)."""
    return _HOOKS_INSTALLED


def in_forked_child() -> bool:
    """Whether this process was forked from the one that imported this module (a DataLoader
    worker): its count lands in its parent's, through the shared memory."""
    return _IN_FORKED_CHILD


def s3_retries() -> int:
    """The S3 requests retried by this process and the processes it forked, so far."""
    return int(_COUNT.value)


def _on_request_created(request=None, **_) -> None:
    """botocore's "request-created" event: an attempt after the first is a retry."""
    retries = (getattr(request, "context", None) or {}).get("retries") or {}
    if retries.get("attempt", 1) > 1:
        count_s3_retry()


def _retry_in_s3fs(exc: BaseException) -> bool:
    """s3fs's custom error handler: whether to call again after botocore's attempts failed.

    s3fs itself retries SlowDown and cut connections (HTTPClientError); this adds the rest of
    what a retry can fix: a 5xx without SlowDown (a HEAD's "503" has no body to name it) and a
    connection broken while the request was sent (EndpointConnectionError around aiohttp's
    ClientOSError). Not a connection that could not be made: that is a wrong endpoint, and
    fails after botocore's attempts."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    retry = False
    if "ClientError" in names:
        response = getattr(exc, "response", None) or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str((response.get("Error") or {}).get("Code", ""))
        retry = status in (500, 502, 503, 504) or code in ("InternalError", "ServiceUnavailable", "RequestTimeout")
    elif "EndpointConnectionError" in names:
        cause = (getattr(exc, "kwargs", None) or {}).get("error")
        retry = cause is not None and "ClientConnectorError" not in {cls.__name__ for cls in type(cause).__mro__}
    return retry


def _count_s3fs_calls(error_wrapper):
    """s3fs's ``_error_wrapper`` (the loop that calls S3 again after an error it deems passing),
    counting each call after the first: s3fs retries SlowDown and cut connections before any
    handler of ours is asked."""

    @functools.wraps(error_wrapper)  # its __wrapped__ marks s3fs's loop as counted already
    async def counting(func, *, args=(), kwargs=None, retries):
        calls = 0

        async def call(*a, **k):
            nonlocal calls
            calls += 1
            if calls > 1:
                count_s3_retry()
            return await func(*a, **k)

        return await error_wrapper(call, args=args, kwargs=kwargs, retries=retries)

    return counting


def _install_s3_hooks() -> None:
    """Once per process, before its first S3 client: the retry counter in every botocore session
    made from now on, and ``_retry_in_s3fs`` (after any handler set before it)."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    from botocore import handlers

    if all(spec[1] is not _on_request_created for spec in handlers.BUILTIN_HANDLERS):
        handlers.BUILTIN_HANDLERS.append(("request-created.s3", _on_request_created))
    try:
        import s3fs.core
    except ImportError:
        return
    previous = s3fs.core.CUSTOM_ERROR_HANDLER
    s3fs.core.set_custom_error_handler(lambda exc: bool(previous(exc)) or _retry_in_s3fs(exc))
    wrapper = getattr(s3fs.core, "_error_wrapper", None)  # s3fs's retry loop, by this name since 2023
    if wrapper is not None and not hasattr(wrapper, "__wrapped__"):
        s3fs.core._error_wrapper = _count_s3fs_calls(wrapper)


# ---------------------------------------------------------------- fork: leave the parent's connections alone
#
# A forked child (a DataLoader worker) inherits the parent's event loop, whose epoll instance it
# shares with the parent, and fsspec then drops the parent's S3 filesystems from its instance
# cache. Collected, they close their pooled connections, and closing unregisters each socket
# from that shared epoll: the parent's next request on one of them never hears its answer (a
# PUT waiting for "100 Continue" hangs for ever). So the child keeps them, never collected, and
# its copies of their loops get an epoll of their own.

_INHERITED: list = []  # the parent's S3 filesystems, and the loops they run on


def _before_fork() -> None:
    s3fs, asyn = sys.modules.get("s3fs"), sys.modules.get("fsspec.asyn")
    if s3fs is None:
        return
    try:
        filesystems = list(s3fs.S3FileSystem._cache.values())
    except RuntimeError:  # another thread made one just now
        filesystems = []
    loops = [getattr(fs, "_loop", None) for fs in filesystems] + [asyn.loop[0] if asyn is not None else None]
    _INHERITED[:] = [filesystems, [loop for loop in loops if loop is not None]]


def _after_fork_in_parent() -> None:
    _INHERITED.clear()


def _after_fork_in_child() -> None:
    global _IN_FORKED_CHILD
    _IN_FORKED_CHILD = True
    for loop in {id(loop): loop for loop in (_INHERITED[1] if _INHERITED else [])}.values():
        if isinstance(getattr(loop, "_selector", None), selectors.BaseSelector):
            loop._selector = selectors.DefaultSelector()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


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
    """A local path made absolute (``file://`` dropped); other URIs as they are. For what a job
    hands to Ray's workers, which run in another working directory."""
    if uri is None or not is_local(uri):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def is_local(where: str | fsspec.AbstractFileSystem) -> bool:
    """Whether a URI (by its protocol: a plain path, ``file://``) or an fsspec filesystem is
    this machine's own disk, where files are renamed and folders made, unlike object stores."""
    if isinstance(where, str):
        return get_protocol(where) in _LOCAL_PROTOCOLS
    protocols = where.protocol if isinstance(where.protocol, (tuple, list)) else (where.protocol,)
    return any(protocol in _LOCAL_PROTOCOLS for protocol in protocols)
