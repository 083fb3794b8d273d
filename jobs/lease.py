"""One writer per output at a time: a lease kept in the output, renewed while the run lives.
jobs.label holds its output's in ``_plan/``, jobs.train its run folder's in ``_lease/``.

Leases are numbered files ``<output>/<folder>/lease-<n>.json`` (owner, host, pid, expiry); the
current lease is the highest number. A run takes the lease by creating the next number
exclusively, which exactly one run can do: on a local disk as a hard link to a file written
aside (``O_EXCL`` where links are not to be had), on S3 with a conditional put
(``If-None-Match: *``); renewals replace it whole, so no run reads a lease half-written. It
may do so when there is none, or when the current lease has ended: released, expired, or held
by a process of this host that is gone (a killed run on the same machine is taken over at once;
one on another machine when its lease expires). The holder renews its expiry every
``ttl / 4`` seconds and releases it at the end (expiry 0); a holder that finds a higher number
than its own has lost the lease and stops. Stores without a conditional create (where fsspec
offers none, and S3-compatible stores that answer the conditional put "not implemented", with a
warning) fall back to write-then-check, which two runs starting within the same second can both
pass, as they can on a store that ignores the condition; then the run whose lease file is not
its own any more (the other wrote last) stops at its next renewal. Commits stay atomic and per
shard, so even then every image is written once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from jobs.common import JobError
from maskrcnn.storage import filesystem, is_local, put_atomic

LEASE_RE = re.compile(r"^lease-(\d+)\.json$")
DEFAULT_TTL = 60.0


@dataclass
class LeaseRecord:
    number: int
    owner: str  # the run's id
    host: str
    pid: int
    expires: float  # seconds since the epoch; 0 once released

    def ended(self) -> bool:
        """Expired, released, or held by a process of this host that no longer exists."""
        if self.expires < time.time():
            return True
        if self.host == socket.gethostname() and self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
        return False

    def describe(self) -> str:
        left = self.expires - time.time()
        return f"run {self.owner} (host {self.host}, pid {self.pid}), lease expires in {max(left, 0):.0f} s"


def _not_implemented(exc: OSError) -> bool:
    """Whether an S3 error says the store has no conditional put: ``501 NotImplemented`` (s3fs
    raises it as ENOSYS), or a store's 400 naming the header it does not take."""
    text = str(exc)
    return exc.errno == errno.ENOSYS or "NotImplemented" in text or "not implemented" in text.lower() or "If-None-Match" in text


def lease_name(number: int) -> str:
    return f"lease-{number:06d}.json"


class Lease:
    """The lease on the output ``output_uri``, kept in its folder ``lease_dir``, for run ``owner``;
    ``held_by`` says, in the refusal, what another run is doing with the output."""

    def __init__(self, output_uri: str, lease_dir: str, owner: str, storage_options: dict | None = None, ttl: float = DEFAULT_TTL,
                 held_by: str = "is being labelled by"):
        self.fs, root = filesystem(output_uri, storage_options)
        self.folder = f"{root.rstrip('/')}/{lease_dir}"
        self.output_uri, self.owner, self.ttl, self.held_by = output_uri, owner, ttl, held_by
        self.number: int | None = None
        self.conditional = True  # whether the store has a conditional create (False once it said it has not)
        self.lost = threading.Event()
        self._made: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def current(self) -> LeaseRecord | None:
        """The highest-numbered lease, or None when there is none."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(self.folder)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return None
        numbers = sorted(int(m.group(1)) for n in names if (m := LEASE_RE.match(n)))
        for number in reversed(numbers):
            try:
                with self.fs.open(f"{self.folder}/{lease_name(number)}", "rb") as f:
                    return LeaseRecord(**json.load(f))
            except FileNotFoundError:  # cleaned up meanwhile
                continue
            except (ValueError, TypeError):  # half-written by a store without atomic puts: treat as expired
                return LeaseRecord(number, "?", "?", 0, 0.0)
        return None

    # ------------------------------------------------------------------ taking and keeping

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for another run's to end; JobError
        naming the holder when it cannot."""
        deadline = time.monotonic() + wait
        if is_local(self.fs):  # the local folders the lease makes, deepest first: removed with it (release)
            missing = self.folder
            while not os.path.exists(missing):
                self._made.append(missing)
                missing = os.path.dirname(missing)
        while True:
            held = self.current()
            if held is None or held.ended():
                number = (held.number + 1) if held else 1
                if self._create(number):
                    self.number = number
                    self._cleanup(number)
                    self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
                    self._thread.start()
                    return
                continue  # another run took this number first: look again
            if time.monotonic() >= deadline:
                raise JobError(
                    f"--output {self.output_uri} {self.held_by} {held.describe()}; run again after it ends, "
                    "or wait for it with --wait-for-lease SECONDS"
                )
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def release(self, remove: bool = False) -> None:
        """Stop renewing and mark the lease released (expiry 0), so the next run starts at once;
        ``remove``: delete it instead, with the local folders it made when nothing else is in them
        (a run that leaves nothing else in the output)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.number is not None and not self.lost.is_set():
            try:
                if remove:
                    self.fs.rm(f"{self.folder}/{lease_name(self.number)}")
                    for folder in self._made:
                        os.rmdir(folder)  # an OSError when not empty: the rest stays
                else:
                    self._write(self.number, expires=0.0)
            except Exception:  # the lease then expires by itself
                pass
        self.number = None

    def _record(self, number: int, expires: float) -> bytes:
        record = LeaseRecord(number, self.owner, socket.gethostname(), os.getpid(), expires)
        return json.dumps(asdict(record)).encode()

    def _create(self, number: int) -> bool:
        """Create lease ``number`` exclusively; False when it exists already."""
        path = f"{self.folder}/{lease_name(number)}"
        data = self._record(number, time.time() + self.ttl)
        try:
            if is_local(self.fs):  # exclusive, and never seen half-written
                put_atomic(self.fs, path, data, exclusive=True)
            elif self.conditional and hasattr(self.fs, "_pipe_file") and "s3" in self.fs.protocol:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except OSError as exc:
                    if isinstance(exc, FileExistsError) or not _not_implemented(exc):
                        raise
                    self.conditional = False
                    print(f"warning: the store of --output {self.output_uri} does not implement conditional writes "
                          f"(If-None-Match); its lease is written, then read back: two runs started within a second of "
                          f"each other could both start, and the one that wrote first stops at its next renewal",
                          file=sys.stderr, flush=True)
                    return self._create(number)
            else:  # no conditional create: write, then check that ours is the file there
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                with self.fs.open(path, "rb") as f:
                    return json.load(f).get("owner") == self.owner
        except FileExistsError:  # another run's, or ours when the answer to our create was lost and retried
            try:
                with self.fs.open(path, "rb") as f:
                    return json.load(f).get("owner") == self.owner
            except (FileNotFoundError, ValueError):
                return False
        return True

    def _write(self, number: int, expires: float) -> None:
        # whole or not at all: a run reading a half-written renewal would take it for expired
        put_atomic(self.fs, f"{self.folder}/{lease_name(number)}", self._record(number, expires))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                held = self.current()
                if held is not None and (held.number != self.number or held.owner != self.owner):
                    # another run took over: our lease had expired (a long pause, a partition), or a
                    # store without a conditional create let it write the same lease after us
                    self.lost.set()
                    import _thread

                    _thread.interrupt_main()  # stop this run: the job reports it and exits
                    return
                self._write(self.number, time.time() + self.ttl)
            except Exception:  # storage hiccup: try again at the next beat, before expiry
                continue

    def _cleanup(self, number: int) -> None:
        """Remove leases older than the previous one (the folder keeps two)."""
        try:
            for path in self.fs.ls(self.folder, detail=False):
                match = LEASE_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
                if match and int(match.group(1)) < number - 1:
                    self.fs.rm(path)
        except Exception:
            pass
