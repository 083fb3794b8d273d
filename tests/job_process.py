"""A job run the way a user runs it: ``python -m jobs.X`` in a subprocess, its output collected
line by line, in its own session so that it, the local Ray it started and that Ray's workers can
be killed together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Job:
    """``python -m <module> <args>``. ``env``: variables added to this process's environment and
    to the defaults (a private local Ray, unbuffered output); ``environ``: the whole environment
    instead. ``on_line(job, line)`` is called for each line as it arrives."""

    def __init__(self, module: str, args: list, *, on_line=None, env: dict | None = None, environ: dict | None = None):
        self.module = module
        self.lines: list[str] = []
        self.on_line = on_line
        if environ is None:
            environ = dict(os.environ, RAY_ADDRESS="local", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=environ, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            # Ctrl-C as at a terminal: pytest started in the background (``make test &`` in a
            # script) passes SIGINT on ignored, and Python then keeps it ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.on_line is not None:
                self.on_line(self, line)

    def kill(self) -> None:
        """SIGKILL the job's whole process group: the driver and the local Ray it started."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_for(self, predicate, timeout: float) -> bool:
        """Whether ``predicate()`` came true within ``timeout`` s while the job ran (or once it ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def wait(self, timeout: float) -> int:
        """The exit code; kills the job and fails when it runs past ``timeout`` s."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            raise AssertionError(f"python -m {self.module} did not end in {timeout} s; its output:\n{self.output[-6000:]}") from None
        finally:
            self.reader.join(10)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def run_job(module: str, args: list, timeout: float = 240, **kwargs) -> Job:
    """A job run to its end, which must exit 0."""
    job = Job(module, args, **kwargs)
    code = job.wait(timeout)
    assert code == 0, f"python -m {module} exited {code}:\n{job.output[-6000:]}"
    return job
