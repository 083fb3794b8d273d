"""What every job shares: Ray start-up, waiting for GPUs, and failing with a clear reason (its options: jobs/options.py)."""

from __future__ import annotations

import argparse
import contextlib
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


def add_ray_options(parser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        metavar="ADDRESS",
        help="the Ray cluster to run on: its GCS address host:port (what `ray start --head` prints) or ray://host:10001; "
        "default: RAY_ADDRESS (set by `ray job submit`), else a `ray start` head on this machine that answers, "
        "else a private local Ray for this job alone",
    )


# Whether this process started the Ray it runs on: a private local Ray has no autoscaler.
_STARTED_PRIVATE_RAY = False
# Whether init_ray connected this process (then shutdown_ray may disconnect it).
_CONNECTED = False
# The address of the private Ray this process started, while RAY_ADDRESS names it.
_PRIVATE_ADDRESS: str | None = None


def ray_is_fixed(ray) -> bool:
    """True when the job runs on a private local Ray (its own, or its process's ``ray.init()``):
    no autoscaler adds nodes to it, so what it has now is all it will ever have."""
    if _STARTED_PRIVATE_RAY:
        return True
    try:  # Ray's record of a cluster started by this process's ray.init()
        return bool(getattr(ray._private.worker._global_node, "ray_init_cluster", False))
    except AttributeError:
        return False


def _ray_address_file() -> str:
    """Where ``ray start --head`` records its address (``ray_current_cluster`` in Ray's default
    temp dir: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray). A private ``ray.init()`` writes
    none."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # older Ray
        from ray._private.utils import get_ray_address_file
    return get_ray_address_file(None)


def _unreachable(address: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to ``address`` (host:port, or ray://host:port) opens within
    ``timeout`` seconds, else why not. A GCS that is gone refuses at once; ``ray.init`` would
    instead retry it for ever."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return "not a host:port address"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def init_ray(address: str | None = None, **kwargs):
    """Connects this job to Ray, the way Ray users expect, and says in one line where it runs.

    1. ``address`` (the job's --address) or RAY_ADDRESS (set by ``ray job submit``): that
       cluster; one that does not answer is a JobError within seconds, never a hang.
    2. Else a ``ray start`` head on this machine (the one its ``ray_current_cluster`` file
       names) when it answers; a stale record is warned about and skipped.
    3. Else a private local Ray for this job alone (the embedded default), never another
       program's private Ray. ``RAY_ADDRESS=local`` asks for this one directly.

    Keeps using a Ray this process already initialized (tests).
    """
    global _STARTED_PRIVATE_RAY, _CONNECTED
    import logging

    import ray

    if ray.is_initialized():
        _start_s3_retry_tally()
        return ray
    _forget_private_ray()  # a private Ray this process started before is gone (ray.shutdown)
    source = "--address" if address else "RAY_ADDRESS"
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    # Ray's own INFO lines ("Started a local Ray instance ...") are replaced by the line below.
    kwargs.setdefault("logging_level", logging.WARNING)
    if address is not None and address != "local":
        if address == "auto":
            address = _read_head_address()
            if address is None or _unreachable(address):
                raise JobError(f"{source}=auto: no `ray start` head on this machine answers; start one, or give its address")
        if address.startswith(("http://", "https://")):
            raise JobError(
                f"{source} {address} is a dashboard (job submission) address; to run here on that cluster give its "
                "GCS address host:6379 or ray://host:10001, or submit with `ray job submit --address ...`"
            )
        why = _unreachable(address)
        if why:
            raise JobError(f"cannot reach the Ray cluster at {address} (from {source}): {why}; is the cluster up and the address right?")
        context = _join(ray, address, source, kwargs)
        where = f"joined cluster at {address}"
    else:
        head = _read_head_address() if address is None else None
        if head and not _unreachable(head):
            context = _join(ray, head, f"`ray start` head recorded in {_ray_address_file()}", kwargs)
            where = f"joined the `ray start` head at {head}"
        else:
            if head:
                print(
                    f"warning: the `ray start` head recorded in {_ray_address_file()} ({head}) does not answer; "
                    "starting a private local Ray (`ray stop` clears the stale record)",
                    file=sys.stderr,
                    flush=True,
                )
            # "Token authentication is enabled for this Ray cluster": news to nobody on a Ray
            # that serves this job alone
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            context = _start_private_ray(ray, kwargs)
            _STARTED_PRIVATE_RAY = True
            where = "private local Ray"
    _CONNECTED = True
    install_sigterm_handler()  # ray.init installs its own
    resources = ray.cluster_resources()
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    print(f"ray: {where} ({resources.get('CPU', 0):g} CPUs{gpus})" + (f"; dashboard {dashboard}" if dashboard else ""), flush=True)
    _start_s3_retry_tally()
    return ray


def _start_s3_retry_tally() -> None:
    """Where the job's Ray workers count their S3 retries, for run_main's last line."""
    from jobs.retries import start_s3_retry_tally

    start_s3_retry_tally()


# Ray gives a local node 30 s (a constant in ray._private.node) to register its raylet; on a
# machine busy with other work its Python agents can take longer to start, and ray.init raises.
_PRIVATE_RAY_STARTS = 3


def _start_private_ray(ray, kwargs: dict):
    """``ray.init(address="local")``, tried again (``_PRIVATE_RAY_STARTS`` times in all) when the
    node times out during its start, the processes of the attempt that failed killed first."""
    import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported

    for attempt in range(1, _PRIVATE_RAY_STARTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        _name_private_ray_for_its_workers(ray)
        try:
            return ray.init(address="local", **kwargs)
        except Exception as exc:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(exc):
                raise
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for process in started:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(started, timeout=10)
            _forget_private_ray()
            if attempt == _PRIVATE_RAY_STARTS:
                raise JobError(f"the private local Ray did not start, {attempt} times in a row: {exc} Is the machine overloaded?") from None
            print(f"warning: the private local Ray did not start in time (attempt {attempt} of {_PRIVATE_RAY_STARTS}); starting it again",
                  file=sys.stderr, flush=True)


def _name_private_ray_for_its_workers(ray) -> None:
    """Gives the private Ray about to start a GCS port chosen here and names it in RAY_ADDRESS,
    which its raylet and workers inherit. Ray's own code that looks a cluster up from inside a
    worker (Ray Train's PlacementGroupCleaner, the state API) otherwise scans the machine's
    processes and, with another program's Ray running, fails ("Found multiple active Ray
    instances")."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    global _PRIVATE_ADDRESS
    _PRIVATE_ADDRESS = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = _PRIVATE_ADDRESS


def _forget_private_ray() -> None:
    """Undoes ``_name_private_ray_for_its_workers`` once that Ray is gone."""
    global _PRIVATE_ADDRESS
    if _PRIVATE_ADDRESS is not None and os.environ.get("RAY_ADDRESS") == _PRIVATE_ADDRESS:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    _PRIVATE_ADDRESS = None


def _read_head_address() -> str | None:
    try:
        with open(_ray_address_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _join(ray, address: str, source: str, kwargs: dict):
    try:
        return ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        why = (str(exc) or type(exc).__name__).splitlines()[0]
        cause = exc
        while cause.__cause__ is not None:  # the reason is at the bottom, e.g. a missing auth token
            cause = cause.__cause__
        if cause is not exc and str(cause).strip():
            why += f" ({str(cause).strip().splitlines()[-1].strip()})"
        raise JobError(f"cannot join the Ray cluster at {address} (from {source}): {why}") from None


def shutdown_ray() -> None:
    """Stops this job's use of Ray (and its private local Ray with it), when init_ray connected
    it; a Ray the caller had initialized before is left alone. Safe to call twice."""
    global _CONNECTED
    ray = sys.modules.get("ray")
    if _CONNECTED and ray is not None and ray.is_initialized():
        ray.shutdown()
    _CONNECTED = False
    _forget_private_ray()


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, KubeRay, ``ray job stop``), taken down the path of Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_sigterm_handler() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


# glibc's malloc, for processes that run a model on the CPU. By default it hands every block over
# 32 MB (an 800 px image's feature maps are 55 MB) back to the kernel when freed and faults it in
# again on the next image, and a Ray actor runs its tasks on a thread other than its main one,
# whose own arena is trimmed the same way: 13% of the actor's time went to the kernel. One arena,
# no mmap'd blocks and no trimming: the heap stays at the size of the largest image seen
# (docs/performance.md, "glibc's malloc on CPUs").
CPU_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}

# Ray starts its workers at nice 15 (its worker_niceness), below its own processes and the driver
# (nice 0). A CPU model actor whose torch threads hold all of a node's CPUs then yields to each of
# them, and one of its threads descheduled stalls the others at the next barrier. Started at nice
# 0 (as Ray's job supervisor starts itself), the model runs first and the job's other tasks (decode,
# encode, write: nice 15) fill the gaps where it runs one thread (docs/performance.md, "Priorities
# on a CPU node").
CPU_MODEL_NICENESS = {"RAY_worker_niceness": "0"}


def cpu_model_runtime_env() -> dict:
    """A Ray ``runtime_env`` (merged with the job's) for an actor that runs a model on the CPU:
    ``CPU_MALLOC_ENV`` and ``CPU_MODEL_NICENESS``. Where the job runs with a variable of either
    set (any ``MALLOC_`` one for the first), the user's settings stand and that part is left out."""
    env = {}
    if not any(name.startswith("MALLOC_") for name in os.environ):
        env.update(CPU_MALLOC_ENV)
    if not any(name in os.environ for name in CPU_MODEL_NICENESS):
        env.update(CPU_MODEL_NICENESS)
    return {"env_vars": env} if env else {}


def format_duration(seconds: float) -> str:
    """42s, 13m20s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def run_main(main, argv=None) -> None:
    """Runs ``main(argv)`` so that every way it ends is one clear line, never a traceback:
    a JobError, a ValueError or a mistake in the data (``jobs.mistakes.mistake_in``: bad input)
    exits 2 with ``error: ...`` on stderr, so schedulers and ``ray job logs`` show the reason;
    Ctrl-C exits 130 and SIGTERM 143 with ``interrupted: ...`` (the exception's message, when
    ``main`` gave it one), after Ray is shut down cleanly. A job whose S3 requests were retried
    says how many in its last line (``S3: 41 requests retried``)."""
    import signal

    from jobs.retries import s3_retries_line
    from maskrcnn.s3 import s3_retries

    install_sigterm_handler()
    # Ray blocks SIGINT in its own processes, and a child inherits the mask: a job started from one
    # (or from any parent that blocks them) would never see Ctrl-C or SIGTERM
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    retries_before = s3_retries()
    try:
        code = main(argv)
    except Exception as exc:
        from jobs.mistakes import mistake_in

        mistake = mistake_in(exc) if not isinstance(exc, JobError) else None
        if mistake is None and not isinstance(exc, (JobError, ValueError)):
            raise
        print(f"error: {mistake or exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        # A second signal while shutting down ends the process at once, still without a traceback.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: os._exit(code))
        with contextlib.suppress(Exception):
            shutdown_ray()
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr, flush=True)
        sys.exit(code)
    try:
        line = s3_retries_line(since=retries_before)
    except Exception:  # a count is no reason to fail a job that is done
        line = None
    if line:
        print(line, flush=True)
    sys.exit(code or 0)


def configure_data_context(ctx) -> None:
    """What Ray Data (its ``DataContext`` ``ctx``) shows of a job's pipeline: its bars on a
    terminal; in logs (not a terminal), the job's own lines (jobs.label's per shard, jobs.train's
    per step) instead of Ray Data's dump of every operator each 10 s. Without
    its high-memory detector, whose advice every CPU run of over 30 s got ("consider setting
    memory=3715788800"): an option the jobs do not have, for actors they size themselves
    (jobs.label: one per node on CPUs, --num-actors; jobs.train: --loader-workers of 1 CPU)."""
    import logging

    ctx.enable_progress_bars = sys.stdout.isatty()
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if ctx.enable_progress_bars else logging.ERROR)
    if not ctx.enable_progress_bars:  # "Starting execution of Dataset ...", the plan, "finished": the shard lines say it
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    detectors = getattr(ctx, "issue_detectors_config", None)
    if detectors is not None:
        detectors.detectors = [d for d in detectors.detectors if d.__name__ != "HighMemoryIssueDetector"]
