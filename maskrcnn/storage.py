"""Every URI the project reads or writes goes through here, so local paths, ``file://`` and
``s3://`` (or any other fsspec protocol) behave the same.

Credentials and the endpoint of an S3-compatible store come from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``) or from
``storage_options``, the fsspec convention (for s3fs: ``key``, ``secret``, ``endpoint_url``,
``client_kwargs``, ...). Nothing here logs or prints the options: they may hold secrets.
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, Any

import fsspec
from fsspec.utils import get_protocol

__all__ = ["filesystem", "open_uri", "join_uri", "absolute_uri", "is_local", "explain_storage_error"]

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
# mode (3 attempts, also on throttling) with a 10 s connect timeout fails in seconds; a store
# that answers is unaffected. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE or --storage-options' config_kwargs win.
S3_CONNECT_TIMEOUT_S = 10
S3_RETRIES = {"max_attempts": 3, "mode": "standard"}


def _s3_client_defaults(options: dict[str, Any]) -> dict[str, Any]:
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    if "retries" not in config_kwargs and not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        config_kwargs["retries"] = dict(S3_RETRIES)
    return {**options, "config_kwargs": config_kwargs}


def _options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    if get_protocol(uri) in _S3_PROTOCOLS:
        options = _s3_client_defaults(_s3_options(options))
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
    if isinstance(exc, PermissionError):
        return (
            f"access denied ({first_line}): check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) "
            "and their permissions on this bucket and prefix"
        )
    if isinstance(exc, FileNotFoundError):
        return f"it does not exist ({first_line})"
    return f"{type(exc).__name__}: {first_line}"


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem that serves ``uri`` and the path of ``uri`` on it (no protocol).

    >>> fs, path = filesystem("/tmp/data")   # (LocalFileSystem, "/tmp/data")
    """
    return fsspec.core.url_to_fs(uri, **_options_for(uri, storage_options))


def open_uri(uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO:
    """Open ``uri`` (a local path, ``file://``, ``s3://``, ...); use it as a context manager.

    Writing to a local path creates its missing parent folders, as writing to S3 needs none.
    Text modes (``"r"``, ``"w"``) read and write UTF-8.
    """
    fs, path = filesystem(uri, storage_options)
    if any(flag in mode for flag in "wax") and is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    if "b" in mode:
        return fs.open(path, mode)
    return fs.open(path, mode, encoding="utf-8")


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
