"""S3 as the project uses it: client settings that fail fast on a wrong endpoint and work with
S3-compatible stores, retries of passing faults that are bounded and counted, and forked
children (DataLoader workers) that leave their parent's connections alone.

``maskrcnn.storage`` makes every S3 filesystem through ``client_options``; nothing here is
needed by a caller of ``maskrcnn.storage`` except the retry count: ``s3_retries()`` in this
process and the processes it forked (a job adds its Ray workers' counts: jobs/retries.py).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import selectors
import sys
import threading
from typing import Any

__all__ = ["client_options", "count_s3_retry", "s3_retries", "on_s3_retry", "s3_in_use", "in_forked_child", "install_hooks"]


def client_options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` for an s3fs filesystem, with the endpoint and region of the standard
    AWS variables and the client defaults below; installs the retry hooks first."""
    install_hooks()
    return _s3_client_defaults(_s3_options(storage_options))


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
    ``install_hooks`` before it makes the filesystem again, without importing this module itself."""

    def __reduce__(self):
        return (_unpickle_retry_settings, (dict(self),))


def _unpickle_retry_settings(settings: dict) -> dict:
    install_hooks()
    return _RetrySettings(settings)


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


def install_hooks() -> None:
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
