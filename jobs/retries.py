"""A job's count of the S3 requests its Ray workers retried, for its last line ("S3: 41 requests
retried").

``maskrcnn.s3`` counts the retries of one process (and of the processes it forks). Here a
Ray worker hands its count, as it goes, to the job's tally: a named actor in the job's namespace
that the driver makes (``start_s3_retry_tally``) and empties at the end (``s3_retries_line``).
Importing ``jobs`` registers the hand-over, so every worker that runs the project's code does it.
"""

from __future__ import annotations

import sys
import threading

from maskrcnn import s3

RETRY_TALLY_NAME = "maskrcnn-s3-retries"  # in the job's Ray namespace: one per job
# seconds a worker waits for the tally to take its count, and the driver for the tally to start:
# a tally that was found answers in milliseconds, unless the node is busy (tests run two jobs on
# two cores) or the tally's process is still starting
_REPORT_TIMEOUT = 60.0
_REPORT_LOCK = threading.Lock()
_REPORTED = 0  # of this process's count, handed to the tally
_TALLY: list = [None]  # the tally actor's handle (None: not made or found yet)


def _ray_worker():
    """Ray, when this process is a Ray worker (not the driver, not a process it forked)."""
    ray = sys.modules.get("ray")
    if ray is None or s3.in_forked_child():
        return None
    try:
        worker = ray._private.worker.global_worker
        if not worker.connected or worker.mode != ray._private.worker.WORKER_MODE:
            return None
    except AttributeError:
        return None
    return ray


def report_s3_retries() -> None:
    """In a Ray worker: hands the retries counted here (and in processes it forked) since the
    last report to the job's tally, when the job made one. Elsewhere: nothing.

    The hand-over is waited for (a retry costs seconds of back-off already): the task that
    retried finishes only once its retries are in the tally, so the driver, which reads the
    tally after the last task, counts them all. A tally not found, or gone (a worker kept from an
    earlier job), leaves the count to the next report."""
    global _REPORTED
    ray = _ray_worker()
    if ray is None:
        return
    with _REPORT_LOCK:
        delta = s3.s3_retries() - _REPORTED
        if delta <= 0:
            return
        for _ in range(2):  # a cached handle may be an earlier job's tally: then look it up again
            if _TALLY[0] is None:
                try:
                    _TALLY[0] = ray.get_actor(RETRY_TALLY_NAME)
                except Exception:  # no tally: this job does not count its workers' retries
                    return
            try:
                ray.get(_TALLY[0].add.remote(delta), timeout=_REPORT_TIMEOUT)
            except Exception:  # the tally is gone, or did not answer
                _TALLY[0] = None
                continue
            _REPORTED += delta
            return


class _RetryTally:
    """The job's count of its Ray workers' S3 retries (a Ray actor, ``start_s3_retry_tally``)."""

    def __init__(self) -> None:
        self.count = 0

    def ready(self) -> None:
        pass

    def add(self, n: int) -> None:
        self.count += n

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def start_s3_retry_tally() -> None:
    """On the driver, once Ray is up, for a job that reads or writes S3: the actor its workers
    report their retries to, named in the job's namespace (an existing one is kept: its count is
    what ``s3_retries_line`` did not take yet)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or not s3.s3_in_use():
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # lives as long as the driver's node
    actor = ray.remote(num_cpus=0, max_restarts=0)(_RetryTally)
    tally = actor.options(name=RETRY_TALLY_NAME, get_if_exists=True, scheduling_strategy=here).remote()
    # Held here: a (non-detached) actor lives as long as its creator holds the handle it made. An
    # earlier job of this process that made it keeps its handle: the one get_if_exists returns
    # does not keep the actor alive, and dropping the creator's would end it.
    if getattr(_TALLY[0], "_actor_id", None) != tally._actor_id:
        _TALLY[0] = tally
    try:  # started before the job's first task: a worker's first count does not wait for its process
        ray.get(_TALLY[0].ready.remote(), timeout=_REPORT_TIMEOUT)
    except Exception:  # not up yet: the workers wait for it in their turn
        pass


def s3_retries_line(since: int = 0) -> str | None:
    """``"S3: 41 requests retried"``: the retries of this process since ``s3.s3_retries()``
    was ``since``, and those its Ray workers reported to the tally; None when there were none."""
    count = s3.s3_retries() - since
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and _ray_worker() is None and _TALLY[0] is not None:
        try:
            count += ray.get(_TALLY[0].take.remote(), timeout=30)
        except Exception:  # the tally is gone: the driver's own count
            pass
    if count <= 0:
        return None
    return f"S3: {count} request{'s' if count != 1 else ''} retried"


s3.on_s3_retry(report_s3_retries)
