"""A faulty S3: an HTTP proxy on 127.0.0.1 in front of a real S3 server (the tests' moto server)
that fails a seeded random share of the requests the way S3 and its networks do.

Every request is classified by its kind (``list``, ``get``, ``head``, ``put``, ``delete``,
``multipart_create``, ``upload_part``, ``multipart_complete``, ...) and, with probability
``rate``, answered with one of these faults instead of being forwarded:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body (for HEAD, the status alone, as S3 does);
- ``drop_before_body``: the connection closed before the request's body is read (the client may
  be cut off while still sending it);
- ``drop_after_body``: the body read, then the connection closed without any response.

``conditional_writes`` models S3-compatible stores without AWS's conditional PUT
(``If-None-Match: *``): ``"rejected"`` answers such a PUT ``501 NotImplemented``, as stores that
do not implement a header answer; ``"ignored"`` forwards it without the header, so it overwrites.
``checksum_headers="rejected"`` models stores that refuse botocore's default upload checksums
(``x-amz-sdk-checksum-algorithm``, ``x-amz-checksum-*`` on a PUT: ``400 InvalidArgument``, as
Backblaze B2 answers). ``refuse_writes``: while set, uploads (PUT, multipart) whose path holds
that text are answered ``403 AccessDenied``, as after a bucket policy or the credentials'
permissions changed in the middle of a run (may change while it runs); ``refused`` lists their paths.

A faulted request never reaches the server, so a retry meets the store as it was (this proxy
does not model a request that took effect but whose answer was lost). Everything else is
forwarded as it came (headers, body, query) and the server's answer sent back whole.
``injected`` counts the faults per (kind, fault), ``forwarded`` the requests per kind.

Standard library only: ``http.server.ThreadingHTTPServer`` in, ``http.client`` out.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import threading
import urllib.parse

FAULTS = ("slowdown", "drop_before_body", "drop_after_body")
# Headers that belong to one connection, not to the request: never forwarded either way.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding", "upgrade", "expect",
}
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTYPROXY</RequestId><HostId>faulty</HostId></Error>"
)

_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>FAULTYPROXY</RequestId><HostId>faulty</HostId></Error>"
)

_NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
    b"<Message>A header you provided implies functionality that is not implemented</Message>"
    b"<Header>If-None-Match</Header><RequestId>FAULTYPROXY</RequestId><HostId>faulty</HostId></Error>"
)


def _unsupported_header(name: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument</Code><Message>Unsupported header '
            f"'{name}' received for this API call.</Message><RequestId>FAULTYPROXY</RequestId></Error>").encode()


def request_kind(method: str, target: str, headers) -> str:
    """The S3 operation a request is, from its method, path-style target and headers."""
    parts = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    key = parts.path.lstrip("/").partition("/")[2]
    if method == "HEAD":
        return "head"
    if method == "GET":
        if "uploadId" in query:
            return "list_parts"
        return "list" if not key or "list-type" in query or "uploads" in query else "get"
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "upload_part"
        if not key:
            return "create_bucket"
        return "copy" if headers.get("x-amz-copy-source") else "put"
    if method == "POST":
        if "uploads" in query:
            return "multipart_create"
        if "uploadId" in query:
            return "multipart_complete"
        return "delete" if "delete" in query else "post"
    if method == "DELETE":
        return "multipart_abort" if "uploadId" in query else "delete"
    return method.lower()


class FaultyS3Proxy:
    """``FaultyS3Proxy(upstream, rate=0.15, seed=0)``: start() it, point clients at ``endpoint``,
    stop() it. ``rate`` and ``enabled`` may change while it runs (e.g. faults off while a test
    uploads its inputs)."""

    def __init__(self, upstream: str, rate: float = 0.15, seed: int = 0, faults: tuple[str, ...] = FAULTS,
                 conditional_writes: str = "supported", checksum_headers: str = "accepted", refuse_writes: str | None = None):
        if conditional_writes not in ("supported", "rejected", "ignored"):
            raise ValueError(f"conditional_writes must be supported, rejected or ignored, got {conditional_writes!r}")
        if checksum_headers not in ("accepted", "rejected"):
            raise ValueError(f"checksum_headers must be accepted or rejected, got {checksum_headers!r}")
        self.conditional_writes, self.checksum_headers, self.refuse_writes = conditional_writes, checksum_headers, refuse_writes
        target = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.rate, self.faults, self.enabled = rate, faults, True
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: collections.Counter = collections.Counter()  # (kind, fault) -> count
        self.forwarded: collections.Counter = collections.Counter()  # kind -> count
        self.refused: list[str] = []  # the paths of the uploads refused_writes refused
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FaultyS3Proxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- what happened

    def choose_fault(self, kind: str) -> str | None:
        with self._lock:
            if not self.enabled or self._random.random() >= self.rate:
                return None
            fault = self._random.choice(self.faults)
            self.injected[(kind, fault)] += 1
            return fault

    def count_forwarded(self, kind: str) -> None:
        with self._lock:
            self.forwarded[kind] += 1

    def injected_by_kind(self) -> dict[str, int]:
        with self._lock:
            totals: collections.Counter = collections.Counter()
            for (kind, _), count in self.injected.items():
                totals[kind] += count
            return dict(totals)

    def injected_by_fault(self) -> dict[str, int]:
        with self._lock:
            totals: collections.Counter = collections.Counter()
            for (_, fault), count in self.injected.items():
                totals[fault] += count
            return dict(totals)

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self.forwarded.clear()

    def report(self) -> str:
        """One line: the faults injected per kind and the requests forwarded, for a test's output."""
        with self._lock:
            faults = ", ".join(f"{kind}/{fault} {n}" for (kind, fault), n in sorted(self.injected.items()))
            forwarded = ", ".join(f"{kind} {n}" for kind, n in sorted(self.forwarded.items()))
        return f"faults injected: {faults or 'none'}; forwarded: {forwarded or 'none'}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    owner: FaultyS3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect: a dropped connection is one they reuse
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format, *args):  # quiet: the tests read their own output
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        kind = request_kind(self.command, self.path, self.headers)
        fault = self.owner.choose_fault(kind)
        if fault == "drop_before_body":
            self._drop()
            return
        body = self._read_body()
        conditional = self.command in ("PUT", "POST") and "If-None-Match" in self.headers
        if fault is None and conditional and self.owner.conditional_writes == "rejected":
            self._answer(501, [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTYPROXY")], _NOT_IMPLEMENTED)
            return
        checksummed = [k for k in self.headers if k.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum-"))]
        if fault is None and self.command == "PUT" and checksummed and self.owner.checksum_headers == "rejected":
            refusal = _unsupported_header(checksummed[0])
            self._answer(400, [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTYPROXY")], refusal)
            return
        uploads = ("put", "multipart_create", "upload_part", "multipart_complete")
        if fault is None and kind in uploads and self.owner.refuse_writes and self.owner.refuse_writes in self.path:
            with self.owner._lock:
                self.owner.refused.append(self.path)
            self._answer(403, [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTYPROXY")], _ACCESS_DENIED)
            return
        if conditional and self.owner.conditional_writes == "ignored":
            del self.headers["If-None-Match"]
        if fault == "drop_after_body":
            self._drop()
        elif fault == "slowdown":
            self._answer(503, [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTYPROXY")], _SLOWDOWN)
        else:
            self._forward(kind, body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _drop(self) -> None:
        """Close the connection without a word: no status line, nothing."""
        self.close_connection = True
        try:
            self.connection.shutdown(2)  # socket.SHUT_RDWR: what a crashed front end or a network cut leaves
        except OSError:
            pass

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, head_length: str | None = None) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", head_length if head_length is not None else "0")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, kind: str, body: bytes) -> None:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        for attempt in range(2):  # the upstream may have closed an idle kept-alive connection
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
            try:
                self._upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    self._upstream.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    self._upstream.putheader("Content-Length", str(len(body)))
                self._upstream.endheaders(body or None)
                response = self._upstream.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        if response.will_close:
            self._upstream.close()
            self._upstream = None
        self.owner.count_forwarded(kind)
        out = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        self._answer(response.status, out, data, head_length=response.getheader("Content-Length"))

    def finish(self):
        super().finish()
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
