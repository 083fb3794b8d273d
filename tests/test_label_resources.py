"""jobs.label's model actors on a Ray cluster that may grow (not a private local Ray): actors that
would leave no CPU to decode with ask the autoscaler for one more and wait for it, then stop the
job with one line naming the options, never a silent wait for ever. A real multi-node cluster on
this machine (``ray.cluster_utils.Cluster``), in a process of its own: the session's ``ray_local``
stays untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, threading, time

import ray
from ray.cluster_utils import Cluster

from jobs.common import JobError, ray_is_fixed
from jobs.label import build_parser
from jobs.labeling import resources

resources.DECODE_CPU_WAIT_S = 3.0
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
ray.init(address=cluster.address, log_to_driver=False)
result = {"fixed": ray_is_fixed(ray)}
try:
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    readable = not is_autoscaler_v2()
except ImportError:
    readable = False
seen, done = [], threading.Event()

def watch():
    while readable and not done.is_set():
        seen.append(json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"null"))
        time.sleep(0.1)

watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
base = ["--input", "in", "--output", "out", "--checkpoint", "m.pt", "--gpus-per-actor", "0", "--cpus-per-actor", "1"]
args = build_parser().parse_args([*base, "--num-actors", "2"])  # 2 CPUs for the actors + 1 to decode, of 2
started = time.monotonic()
try:
    resources.actor_resources(ray, args)
    result["error"] = None
except JobError as exc:
    result["error"] = str(exc)
result["seconds"] = time.monotonic() - started
done.set()
watcher.join(5)
result["readable"] = readable
result["asked"] = [request for request in seen if request]
result["withdrawn"] = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"null") if readable else None
# the cluster grows while the job waits (as an autoscaler adds a node): the job goes on
resources.DECODE_CPU_WAIT_S = 120.0
started = time.monotonic()
waiting = threading.Thread(target=lambda: result.update(grown=list(resources.actor_resources(ray, args))))
waiting.start()
time.sleep(1.0)
cluster.add_node(num_cpus=1)  # in the main thread: Ray's node start sets signal handlers
waiting.join(150)
result["grown_seconds"] = time.monotonic() - started
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_actors_leaving_no_cpu_to_decode_ask_the_autoscaler_then_stop_naming_the_options():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["fixed"] is False
    assert result["error"] == (
        "--num-actors 2 cannot start on this Ray cluster after 3 s of asking its autoscaler for CPUs: the job needs 2 x "
        "--cpus-per-actor 1 CPUs for the actors plus 1 CPU to decode, it has 2 CPUs; lower --num-actors or --cpus-per-actor, "
        "or add CPU nodes"
    )
    assert 3 <= result["seconds"] < 60, result["seconds"]
    assert "asked its autoscaler for 3 CPUs, waiting up to 3 s" in proc.stdout
    if result["readable"]:  # autoscaler v1 reads requests from the KV store
        assert [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}] in result["asked"], result["asked"][:5]
        assert result["withdrawn"] == [], "the request must be withdrawn when the wait ends"
    assert result.get("grown") == [2, 0.0, 1.0, 1], proc.stderr[-3000:]
    assert result["grown_seconds"] < 60
    assert "the Ray cluster has 3 CPUs after" in proc.stdout


def test_cpu_model_actors_get_the_malloc_settings_and_niceness_unless_the_job_sets_its_own(monkeypatch):
    """The CPU model actors start with one arena, no mmap'd blocks and no trimming
    (jobs.common.CPU_MALLOC_ENV) and at nice 0; a MALLOC_ variable where the job runs keeps every
    malloc setting out, a RAY_worker_niceness the niceness."""
    from jobs.common import CPU_MALLOC_ENV, CPU_MODEL_NICENESS, cpu_model_runtime_env

    for name in [n for n in os.environ if n.startswith("MALLOC_") or n in CPU_MODEL_NICENESS]:
        monkeypatch.delenv(name)
    assert cpu_model_runtime_env() == {"env_vars": {**CPU_MALLOC_ENV, "RAY_worker_niceness": "0"}}
    assert CPU_MALLOC_ENV["MALLOC_ARENA_MAX"] == "1" and CPU_MALLOC_ENV["MALLOC_MMAP_MAX_"] == "0"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cpu_model_runtime_env() == {"env_vars": {"RAY_worker_niceness": "0"}}
    monkeypatch.setenv("RAY_worker_niceness", "5")
    assert cpu_model_runtime_env() == {}


def test_a_cpu_model_actor_runs_ahead_of_the_jobs_other_workers(ray_local, monkeypatch):
    """On a real local Ray: the actor started with jobs.label's CPU runtime env runs at nice 0 and
    with the malloc settings, a task beside it at Ray's worker niceness (lower priority), as the
    decoding, encoding and writing tasks do."""
    from jobs.common import CPU_MALLOC_ENV, CPU_MODEL_NICENESS, cpu_model_runtime_env

    for name in [n for n in os.environ if n.startswith("MALLOC_") or n in CPU_MODEL_NICENESS]:
        monkeypatch.delenv(name)

    def seen() -> tuple[int, dict]:
        return os.getpriority(os.PRIO_PROCESS, 0), {name: os.environ.get(name) for name in CPU_MALLOC_ENV}

    model = ray_local.remote(num_cpus=0)(type("Model", (), {"seen": lambda self: seen()})).options(runtime_env=cpu_model_runtime_env())
    actor = model.remote()
    model_nice, model_env = ray_local.get(actor.seen.remote(), timeout=120)
    task_nice, _ = ray_local.get(ray_local.remote(num_cpus=0)(seen).remote(), timeout=120)
    ray_local.kill(actor)
    assert model_nice == 0, f"the CPU model actor runs at nice {model_nice}"
    assert model_env == CPU_MALLOC_ENV
    assert task_nice > model_nice, f"the job's other tasks run at nice {task_nice}, not below the model"


ONE_TEAM = r"""
import json, os, sys, threading

import numpy as np
import torch
from PIL import Image

from jobs.labeling.decode import decode_batch
from jobs.labeling.predict import LabelActor
from tests.labeling_helpers import make_checkpoint

work = sys.argv[1]
make_checkpoint(os.path.join(work, "model.pt"))
Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(os.path.join(work, "a.png"))
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
actor = LabelActor(checkpoint_uri=os.path.join(work, "model.pt"), load_kwargs={}, storage_options=None, use_gpu=False, threads=2)
built = threads()
uris = np.asarray([os.path.join(work, "a.png")], dtype=object)
rows = {"shard": np.zeros(1, np.int64), "index": np.zeros(1, np.int64), "image_uri": uris}
batch = decode_batch(rows, storage_options=None, min_size=800, max_size=1333, max_pixels=10**9)
seen = {}
def run():  # as Ray runs an actor's batches: on another thread than its constructor
    table = actor(batch)
    # counted here: libgomp ends a thread's team when that thread exits
    seen.update(running=threads(), torch_threads=torch.get_num_threads())
    seen.update(detections=len(table["scores"][0]), error=table["error"][0].as_py())
worker = threading.Thread(target=run)
worker.start()
worker.join()
print(json.dumps({"before": before, "built": built, **seen}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_cpu_model_actor_starts_its_threads_only_where_it_runs_the_batches(tmp_path):
    """The constructor (built on one torch thread) starts no OpenMP team: the batches, run on
    another thread as Ray runs them, get the one team, of the actor's thread count. A team left
    by the constructor made libgomp sleep at every barrier (and spin a core away with
    OMP_WAIT_POLICY=active)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    proc = subprocess.run([sys.executable, "-c", ONE_TEAM, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["error"] is None and seen["detections"] > 0
    assert seen["built"] == seen["before"], seen  # no team of the constructor's thread
    # the batches' thread and its team's one other thread
    assert seen["torch_threads"] == 2 and seen["running"] >= seen["before"] + 2, seen


def test_a_labeling_run_gets_no_advice_naming_options_it_does_not_have():
    """Ray Data's high-memory detector told every CPU run of over 30 s to set ``memory=`` on its
    actors, which jobs.label sizes itself; its other detectors stay."""
    import ray.data

    from jobs.common import configure_data_context

    ctx = ray.data.DataContext()  # Ray Data's defaults (a labeling run in this process changed the current one)
    before = [d.__name__ for d in ctx.issue_detectors_config.detectors]
    assert "HighMemoryIssueDetector" in before
    configure_data_context(ctx)
    assert [d.__name__ for d in ctx.issue_detectors_config.detectors] == [d for d in before if d != "HighMemoryIssueDetector"]
