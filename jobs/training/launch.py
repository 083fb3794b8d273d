"""The driver's side of ``jobs.train`` on Ray: the cluster check, Ray Train's ``TorchTrainer``
over ``--output``, and waiting for it while Ctrl-C and SIGTERM still reach the job."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import asdict

from jobs.autoscaling import wait_for_gpus
from jobs.common import JobError, init_ray, ray_is_fixed, shutdown_ray
from jobs.mistakes import refused_output, refused_write
from jobs.options import warn_slow_cpu_precision
from jobs.training.metrics import log, summarize_run
from jobs.training.spec import MODEL_FILE, RUN_NAME, Hidden, TrainPlan
from jobs.training.worker import RESUMES_ONCE_WRITABLE, train_loop_per_worker


def train_on_ray(args: argparse.Namespace, plan: TrainPlan, storage_options: dict | None) -> int:
    """Runs ``plan`` on the Ray cluster that ``args`` (the command line: --address, the workers'
    resources, the checkpoint and failure settings) name, with ``storage_options`` for
    ``--output``; then draws the curves. Returns 0 when the run is done, 1 when training failed
    (the workers' error printed); a cluster unfit for the run is a JobError."""
    from maskrcnn.storage import join_uri

    # Workers print to their stdout as is (one copy, in order), and pycocotools' printout
    # stays inside evaluate_coco's redirect; Ray Train propagates this variable to them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's controller polls the workers every 2 s by default: it notices a finished run,
    # and registers a reported checkpoint, only then (a run's end took ~3 s more, and a job
    # killed right after a checkpoint lost it more often). A poll is one small actor call per
    # worker; a missed one counts only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray = init_ray(args.address)
    check_cluster(ray, args)
    if ray_is_fixed(ray):
        # One machine that no cloud takes back: Ray Train's preemption watcher (an actor of its
        # own, polling every 5 s) has nothing to watch, and its start logs a core-worker error
        # line about its restarts on every run. Ray Train propagates this variable to its actors.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    start_autoscaling_coordinator()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = _ray_storage(plan.output, storage_options)
    mistake_key = f"mistake-{uuid.uuid4().hex}"  # where a worker leaves a mistake no retry can fix (jobs.mistakes)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": asdict(plan), "storage_options": Hidden(storage_options), "mistake_key": mistake_key},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints),
            failure_config=FailureConfig(max_failures=args.max_failures),
            # Ray Train logs every report's metrics at INFO; the workers print their own lines.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[quiet_refusals()],
        ),
    )
    started = time.perf_counter()
    try:
        _fit(trainer, mistake_key)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (jobs.common.run_main)
        shutdown_ray()
        exc.args = (f"a rerun of the same command resumes from the last checkpoint in {plan.output}",)
        raise
    except JobError:  # a worker's mistake (_fit)
        raise
    except Exception as exc:  # ray.train.TrainingFailedError: the workers' errors, retries spent, or the controller's
        # Ray Train's controller writes its record of the checkpoints to --output after each one
        # (the workers say their own refusals, as mistakes); a worker's error is not the output's
        failure = getattr(exc, "controller_failure", None)
        refused = refused_output(plan.output, failure) if isinstance(failure, BaseException) else None
        if refused is not None:
            raise JobError(f"training stopped: {refused}{RESUMES_ONCE_WRITABLE}") from None
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    summarize_run(plan.output, storage_options)
    log(f"done in {time.perf_counter() - started:.0f} s: {join_uri(plan.output, MODEL_FILE)}")
    return 0


def quiet_refusals():
    """A Ray Train callback whose only work is done where it is unpickled, in Ray Train's
    controller: there it keeps the controller's log of an error by which --output refused a write
    for good (the traceback of its record of the checkpoints refused, say) out of the job's
    output, where the job says it in one line (``train_on_ray``). Its other errors are logged as
    before."""
    import logging

    from ray.train import UserCallback

    class QuietRefusals(UserCallback):
        def __reduce__(self):
            return (quiet_refusals, ())

    logger = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    if not any(getattr(f, "quiet_refusals", False) for f in logger.filters):
        def not_a_refusal(record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            return error is None or refused_write(error, permission=True) is None

        not_a_refusal.quiet_refusals = True
        logger.addFilter(not_a_refusal)
    return QuietRefusals()


def start_autoscaling_coordinator(timeout: float = 60.0) -> None:
    """Starts Ray's AutoscalingCoordinator (the detached actor through which Ray Train's
    controller and Ray Data ask the autoscaler for resources) and waits up to ``timeout`` s for
    it to answer. Ray Train's controller would create it itself, but waits only 5 s for its first
    answer: on a fresh Ray on a busy small machine the actor's process takes longer to start, and
    the controller logs a warning with a traceback ("safe to ignore") in the job's output.
    Without that actor in this Ray version, nothing happens."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
    except ImportError:
        return
    import ray

    try:
        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=timeout)
    except Exception:  # slow to start or gone: the controller's own request says so, as it did
        pass


def check_cluster(ray, args: argparse.Namespace) -> None:
    """Raises JobError when the cluster of ``ray`` cannot give ``args.num_workers`` workers
    their CPUs or GPUs (after --wait-for-gpus), and with --ingest ray-data their loader actors
    their CPUs; warns when an autoscaler must add them first."""
    warn_slow_cpu_precision(args.precision, on_cpu=not args.use_gpu)
    loaders = args.num_workers * args.loader_workers if args.ingest == "ray-data" else 0
    if args.use_gpu:
        resources = _check_gpus(ray, args)
        if not loaders:  # the GPU bundles hold the workers' CPUs
            return
        cpus = resources.get("CPU", 0)
    else:
        cpus = ray.cluster_resources().get("CPU", 0)
    needed = args.num_workers * args.cpus_per_worker + loaders
    what = f"--num-workers {args.num_workers} x --cpus-per-worker {args.cpus_per_worker:g} CPUs"
    if loaders:
        what += f" plus {args.num_workers} x --loader-workers {args.loader_workers} CPUs for --ingest ray-data"
    if cpus < needed and ray_is_fixed(ray):
        raise JobError(
            f"{what} cannot start on this private local Ray of {cpus:g} CPUs; lower them, or run on a larger cluster "
            "(--address, RAY_ADDRESS)"
        )
    if cpus < needed:
        print(f"warning: {what}; the cluster has {cpus:g} CPUs now (the job waits for an autoscaler to add them)", file=sys.stderr)


def _check_gpus(ray, args: argparse.Namespace) -> dict:
    """The cluster's resources once it has the GPUs of ``args.num_workers`` workers (after
    --wait-for-gpus); JobError when it has none, or too few on a private local Ray."""
    bundles = [{"GPU": 1, "CPU": args.cpus_per_worker}] * args.num_workers
    resources = wait_for_gpus(ray, args.num_workers, bundles, args.wait_for_gpus, f"--use-gpu --num-workers {args.num_workers}")
    gpus = resources.get("GPU", 0)
    if gpus < 1:
        raise JobError(
            f"--use-gpu, but the Ray cluster has no GPUs (its resources: {int(resources.get('CPU', 0))} CPUs, 0 GPUs); "
            "drop --use-gpu to train on CPUs, submit to a cluster with GPU nodes, "
            "or give --wait-for-gpus SECONDS where the cluster adds GPU nodes on demand"
        )
    if gpus < args.num_workers and ray_is_fixed(ray):
        raise JobError(f"--use-gpu --num-workers {args.num_workers} needs {args.num_workers} GPUs; this private local Ray has {gpus:g}")
    if gpus < args.num_workers:
        print(f"warning: --num-workers {args.num_workers} with --use-gpu needs {args.num_workers} GPUs; the cluster has {gpus:g} now "
              "(the job waits for an autoscaler to add them)", file=sys.stderr)
    return resources


def _ray_storage(output: str, storage_options: dict | None):
    """``RunConfig``'s storage path and filesystem for ``output`` (--output): a local folder as
    is; any other URI through the same fsspec filesystem (``storage_options``: credentials,
    endpoint) the rest of the job uses."""
    from maskrcnn.storage import absolute_uri, filesystem, is_local

    if is_local(output):
        return absolute_uri(output), None
    import pyarrow.fs

    fs, path = filesystem(output, storage_options)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _fit(trainer, mistake_key: str) -> None:
    """``trainer.fit()`` in a thread, so that Ctrl-C and SIGTERM reach this (main) thread as
    KeyboardInterrupt (jobs.common.run_main: one line, exit 130 or 143) instead of Ray Train's
    own SIGINT handler, which it installs only on the main thread. A mistake a worker left under
    ``mistake_key`` (``jobs.mistakes.publish_mistake``: bad annotations or images, a
    diverged loss) ends the run as a JobError with its line, before Ray Train restarts the
    workers into it again."""
    import threading

    from jobs.mistakes import take_mistake

    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the main thread; a stopped run's errors go unseen
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    while True:
        thread.join(timeout=0.5)
        mistake = take_mistake(mistake_key)  # a worker leaves it before it fails
        if mistake:
            shutdown_ray()  # ends the run's workers (a cluster's: the driver's actors go with it)
            raise JobError(f"training stopped: {mistake}")
        if not thread.is_alive():
            break
    if "error" in outcome:
        raise outcome["error"]
