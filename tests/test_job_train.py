"""jobs.train and jobs.evaluate, run as users run them: ``python -m jobs.train ...`` subprocesses,
each with its own local Ray (``RAY_ADDRESS=local``), on the ``small`` preset with small images.

The slow tests train for real with 2 CPU workers (DDP over gloo): on the moto S3 server, through
a killed worker and then a killed job, and from a torchvision-layout state dict. The fast ones
pin the schedule, the sharding and the input checks that stop a job before it trains.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.common import JobError
from jobs.train import build_parser, main
from jobs.training.spec import resolve_lr_steps, steps_per_epoch
from jobs.training.worker import shard_indices
from maskrcnn.data.synthetic import make_sample_dataset
from tests.job_process import Job, run_job

REPO = Path(__file__).resolve().parents[1]
# Small images keep a 2-worker step near half a second on a 2-core CPU.
SMALL = ["--arch", "small", "--min-size", "160", "--max-size", "240", "--loader-workers", "1"]


# --------------------------------------------------------------------------------------------
# Helpers


def read_metrics(uri: str) -> list[dict]:
    from maskrcnn.storage import join_uri, open_uri

    with open_uri(join_uri(uri, "metrics.jsonl"), "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def start_steps(output: str) -> list[int]:
    """The step every training worker said it started at, in the order they said it."""
    import re

    return [int(m) for m in re.findall(r"rank \d+/\d+ pid \d+ on \w+: starts at step (\d+)", output)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """24 training and 8 validation images of the synthetic shapes, on local disk."""
    return make_sample_dataset(str(tmp_path_factory.mktemp("shapes")), {"train": 24, "val": 8}, seed=3)


def train_args(shapes, output, *extra) -> list[str]:
    (train_ann, train_img) = shapes["train"]
    return ["--annotations", train_ann, "--images", train_img, "--output", str(output), "--num-workers", "2", *SMALL, *extra]


# --------------------------------------------------------------------------------------------
# Fast: schedule, sharding, command line


def test_lr_schedule_warms_up_then_steps_down():
    """The job's --lr-steps drive the library's scheduler (maskrcnn.engine), stepped once per step."""
    from maskrcnn.engine import make_scheduler

    steps = resolve_lr_steps("0.667,0.889", 90)
    assert steps == [60, 80]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, 90, warmup_steps=10, milestones=steps, warmup_factor=0.001, gamma=0.1)
    factors = []
    for _ in range(90):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.001)
    assert factors[5] == pytest.approx(0.001 * 0.5 + 0.5)
    assert factors[10:60] == [1.0] * 50
    assert factors[60] == pytest.approx(0.1) and factors[79] == pytest.approx(0.1)
    assert factors[80] == pytest.approx(0.01)
    assert resolve_lr_steps("120000,0.5", 160000) == [80000, 120000]  # absolute steps and fractions mix
    with pytest.raises(JobError, match="--lr-steps"):
        resolve_lr_steps("2/3", 90)


def test_default_lr_scales_with_the_batch_and_floors_the_groupnorm_presets():
    """The linear rule (0.02 at 16 images) for the R50 presets, at any batch; the small presets'
    GroupNorm trunk trains from scratch at no less than the floor at a CPU's few images a step."""
    from maskrcnn.config import get_preset
    from maskrcnn.engine import GROUPNORM_LR_FLOOR, default_lr

    r50, small = get_preset("r50_fpn").backbone.norm, get_preset("small").backbone.norm
    assert default_lr(16, r50) == pytest.approx(0.02) and default_lr(4, r50) == pytest.approx(0.005)
    assert default_lr(64, r50) == pytest.approx(0.08)
    assert default_lr(4, small) == pytest.approx(GROUPNORM_LR_FLOOR) and GROUPNORM_LR_FLOOR > default_lr(4, r50)
    assert default_lr(64, small) == pytest.approx(0.08)


def test_the_optimizer_decays_weights_but_not_norms_and_biases():
    from maskrcnn.config import get_preset
    from maskrcnn.engine import make_optimizer
    from maskrcnn.modeling import build_model

    model = build_model(get_preset("small", num_classes=3))
    decay, no_decay = make_optimizer(model, 0.02, weight_decay=1e-4).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".weight") and p.ndim > 1 for p in decay["params"])
    # the trunk's GroupNorm (named bn1 as torchvision's BatchNorm) and the layers' biases
    expected = {"backbone.body.bn1.weight", "backbone.body.bn1.bias", "roi_heads.box_predictor.cls_score.bias"}
    assert {names[id(p)] for p in no_decay["params"]} >= expected
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


@pytest.mark.parametrize("num_items,world_size", [(24, 2), (25, 2), (7, 3), (1, 4)])
def test_shards_are_disjoint_equal_and_cover_the_dataset(num_items, world_size):
    for epoch in (0, 1):
        shards = [shard_indices(num_items, world_size, rank, epoch, seed=0) for rank in range(world_size)]
        assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
        assert set().union(*map(set, shards)) == set(range(num_items))
        if num_items % world_size == 0:
            assert sum(map(len, shards)) == num_items  # no padding: no image twice
    assert shard_indices(24, 2, 0, 0, 0) != shard_indices(24, 2, 0, 1, 0)  # reshuffled per epoch
    assert steps_per_epoch(25, 2, 2) == 7  # ceil(ceil(25 / 2) / 2)


def test_a_run_record_cut_short_or_edited_keeps_its_records(tmp_path, capsys):
    """A metrics.jsonl with a line that is not a record (cut short by a kill while an older
    version wrote it in place; an edit) is read without it, with a warning naming the file: the
    resume of that run must not stop on it."""
    from jobs.training.metrics import MetricsLog

    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"event": "eval", "step": 2, "segm_AP": 0.1}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "[1, 2]\n\n" + '{"step": 3, "lo')
    log = MetricsLog(str(tmp_path), None, start_step=2)
    assert log.records == good
    assert f"warning: 2 lines are not a record of the run in {path} (cut short or edited); left out" in capsys.readouterr().err
    log.flush()
    assert [json.loads(line) for line in path.read_text().splitlines()] == good


def test_the_run_record_is_never_read_half_written(tmp_path):
    """metrics.jsonl is rewritten whole at each checkpoint (object stores cannot append): a kill
    in the middle, or a reader at that moment (a resume, a dashboard), must find the whole file
    or the one before, never a truncated record."""
    import threading

    from jobs.training.metrics import MetricsLog
    from jobs.training.metrics import read_metrics as read_records

    log = MetricsLog(str(tmp_path), None, start_step=0)
    for step in range(1, 2001):
        log.add({"step": step, "loss": 1.0 / step, "lr": 0.02, "images_per_s": 5.0, "time": 1e9 + step})
    log.flush()
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                records = read_records(str(tmp_path), None)
                assert len(records) >= 2000, len(records)
                reads[0] += 1
            except Exception as exc:  # a truncated last line, or a short file
                failures.append(repr(exc))
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(2001, 2051):
            log.add({"step": step, "loss": 1.0 / step, "lr": 0.02, "images_per_s": 5.0, "time": 1e9 + step})
            log.flush()
    finally:
        stop.set()
        thread.join()
    assert not failures and reads[0] > 0, (failures[:1], reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_help_documents_every_option():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, f"{action.option_strings} has no help"
    for name in (
        "--annotations",
        "--images",
        "--output",
        "--val-annotations",
        "--val-images",
        "--arch",
        "--weights",
        "--num-workers",
        "--use-gpu",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--min-size",
        "--max-size",
    ):
        assert name in text  # DESIGN.md's command line
    from jobs.evaluate import build_parser as evaluate_parser

    text = evaluate_parser().format_help()
    for name in ("--checkpoint", "--annotations", "--images", "--output", "--min-size", "--max-size"):
        assert name in text


def test_a_run_resumes_under_a_config_that_only_adds_defaulted_fields():
    """A checkpoint's saved model config is compared field by field with the command's: one
    saved before fields were added (they are missing, so they take their defaults) is the same
    config; a changed field, an unreadable config or other categories stop the resume, naming
    what differs."""
    from types import SimpleNamespace

    from jobs.mistakes import mistake_in
    from jobs.training.spec import RunMismatch, check_same_run
    from maskrcnn.config import get_preset

    config = get_preset("small", num_classes=3).to_dict()
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    plan = SimpleNamespace(output="/runs/x", categories=categories, model_config=config)
    older = json.loads(json.dumps(config))
    del older["keypoint_head"], older["roi_heads"]["aligned"], older["input"]["train_min_sizes"]
    check_same_run(plan, {"categories": categories, "config": older})

    changed = json.loads(json.dumps(older))
    changed["rpn"]["nms_thresh"] = 0.5
    with pytest.raises(RunMismatch, match=r"another model config.*rpn\.nms_thresh: 0\.5 -> 0\.7.*new --output"):
        check_same_run(plan, {"categories": categories, "config": changed})
    with pytest.raises(RunMismatch, match=r"cannot read.*nms_treshold"):
        check_same_run(plan, {"categories": categories, "config": {**older, "rpn": {"nms_treshold": 0.5}}})
    with pytest.raises(RunMismatch, match="other categories") as mismatch:
        check_same_run(plan, {"categories": categories[:1], "config": config})
    # a mistake no restart of the workers fixes: the job stops on its line
    assert mistake_in(mismatch.value) == str(mismatch.value)


def test_train_step_runs_under_bf16_autocast():
    """--precision bf16 (the GPU default) runs the model's forward under autocast; on a CPU here."""
    from maskrcnn.engine import train_step
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("small", num_classes=3)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = [torch.rand(3, 120, 160), torch.rand(3, 100, 140)]
    masks = [torch.zeros(1, 120, 160, dtype=torch.uint8), torch.zeros(1, 100, 140, dtype=torch.uint8)]
    masks[0][:, 20:60, 30:90] = 1
    masks[1][:, 10:50, 10:40] = 1
    targets = [
        {"boxes": torch.tensor([[30.0, 20, 90, 60]]), "labels": torch.tensor([1]), "masks": masks[0]},
        {"boxes": torch.tensor([[10.0, 10, 40, 50]]), "labels": torch.tensor([2]), "masks": masks[1]},
    ]
    losses = train_step(model, optimizer, images, targets, autocast_dtype=torch.bfloat16)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from maskrcnn.storage import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("runs/r1") == str(tmp_path / "runs" / "r1")
    assert absolute_uri("file:///data/x.json") == "/data/x.json"
    assert absolute_uri("s3://bucket/runs/r1") == "s3://bucket/runs/r1"
    assert absolute_uri(None) is None
    # --output=~/runs/r1 reaches the job with its ~ (no shell expands it there): the home folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_uri("~/runs/r1") == str(tmp_path / "home" / "runs" / "r1")


# --------------------------------------------------------------------------------------------
# Fast: bad input stops the job before training, naming the problem


def _write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_annotations_naming_missing_images_stop_the_job(shapes, tmp_path):
    ann, images = shapes["train"]
    data = json.loads(Path(ann).read_text())
    data["images"][3]["file_name"] = "not-there.png"
    bad = _write_json(tmp_path / "bad.json", data)
    # As users see it: exit status 2, the reason on stderr, no traceback, no Ray started.
    result = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--annotations", bad, "--images", images, "--output", str(tmp_path / "run"), *SMALL],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "1 of the 24 images" in result.stderr and "not-there.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Started a local Ray" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_folder_another_run_trains_into_is_refused_in_one_line(shapes, tmp_path):
    """Two jobs.train runs into one --output would write each other's checkpoints and record and
    resume from them: while another run (here on another host) holds the folder's lease, a
    second stops before it starts Ray, naming the holder, and writes nothing."""
    from jobs.lease import lease_name

    output = tmp_path / "run"
    (output / "_lease").mkdir(parents=True)
    record = {"number": 3, "owner": "elsewhere-run", "host": "another-host", "pid": 12345, "expires": time.time() + 600}
    (output / "_lease" / lease_name(3)).write_text(json.dumps(record))
    with pytest.raises(JobError, match=(
        rf"^--output {output} is being trained into by run elsewhere-run \(host another-host, pid 12345\), lease expires in "
        r"\d+ s; run again after it ends, or wait for it with --wait-for-lease SECONDS$"
    )):
        main(train_args(shapes, output, "--max-steps", "1"))
    assert sorted(p.name for p in output.rglob("*")) == ["_lease", lease_name(3)]
    with pytest.raises(JobError, match="^--wait-for-lease must be 0 or more seconds, got -1$"):
        main(train_args(shapes, output, "--wait-for-lease", "-1"))


def test_empty_dataset_stops_the_job(shapes, tmp_path):
    ann, images = shapes["train"]
    data = json.loads(Path(ann).read_text())
    no_images = _write_json(tmp_path / "none.json", {**data, "images": [], "annotations": []})
    with pytest.raises(JobError, match="lists no images: the dataset is empty"):
        main(["--annotations", no_images, "--images", images, "--output", str(tmp_path / "run"), *SMALL])
    no_instances = _write_json(tmp_path / "unlabelled.json", {**data, "annotations": []})
    with pytest.raises(JobError, match="no \\(non-crowd\\) annotations"):
        main(["--annotations", no_instances, "--images", images, "--output", str(tmp_path / "run"), *SMALL])
    val_ann, val_images = shapes["val"]
    with pytest.raises(JobError, match="--val-annotations .* does not exist"):
        main(
            [
                "--annotations",
                ann,
                "--images",
                images,
                "--val-annotations",
                str(tmp_path / "missing.json"),
                "--val-images",
                val_images,
                "--output",
                str(tmp_path / "run"),
                *SMALL,
            ]
        )


def test_unreadable_weights_stop_the_job(shapes, tmp_path):
    ann, images = shapes["train"]
    base = ["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), *SMALL]
    with pytest.raises(JobError, match="--weights: checkpoint .*nowhere.pt does not exist"):
        main([*base, "--weights", str(tmp_path / "nowhere.pt")])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(JobError, match="not a readable PyTorch file"):
        main([*base, "--weights", str(garbage)])
    torch.save({"some": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(JobError, match="neither a jobs.train checkpoint .*nor a torchvision"):
        main([*base, "--weights", str(tmp_path / "other.pt")])
    # A torchvision state dict of another architecture: r50 weights into the small preset.
    from maskrcnn.checkpoint import to_torchvision_state_dict
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    small_state = to_torchvision_state_dict(build_model(get_preset("small")))
    small_state["backbone.body.extra.weight"] = torch.zeros(1)
    torch.save(small_state, tmp_path / "mismatch.pt")
    with pytest.raises(JobError, match="does not fit the model"):
        main([*base, "--weights", str(tmp_path / "mismatch.pt")])


def test_a_negative_gradient_clip_stops_the_job(shapes, tmp_path):
    ann, images = shapes["train"]
    with pytest.raises(JobError, match=r"--clip-grad-norm must be 0 \(no clipping\) or more, got -1"):
        main(["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), "--clip-grad-norm", "-1", *SMALL])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--warmup-factor", "-5", r"--warmup-factor must be in \(0, 1\]"),
    ("--warmup-factor", "0", r"--warmup-factor must be in \(0, 1\]"),
    ("--lr-gamma", "-1", "--lr-gamma must be positive"),
    ("--momentum", "-1", r"--momentum must be in \[0, 1\), got -1"),
    ("--weight-decay", "-1", "--weight-decay must be 0 or more, got -1"),
    ("--lr-steps", "inf", "--lr-steps must be positive numbers, got 'inf'"),
    ("--lr-steps", "0.5,nan", "--lr-steps must be positive numbers"),
])
def test_schedule_values_out_of_range_stop_the_job(option, value, message, shapes, tmp_path):
    """Values the optimizer or the schedule would take, training backwards (a negative learning
    rate at warmup, a growing weight) or failing in the workers: refused before Ray starts."""
    ann, images = shapes["train"]
    with pytest.raises(JobError, match=message):
        main(["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), option, value, *SMALL])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x"])
def test_number_options_take_finite_numbers_only(value, capsys):
    """nan passes every comparison a range check makes: argparse refuses it, naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--annotations", "a.json", "--images", "i", "--output", "o", f"--lr={value}"])
    assert exit_info.value.code == 2
    what = "not a number" if value == "x" else "not a finite number"
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument --lr: {what}: {value!r}")


def test_waiting_times_may_be_for_ever_but_not_nan(capsys):
    """--wait-for-lease inf waits for ever (a scheduler's run behind a long one); nan is refused."""
    from jobs.training.options import build_parser

    args = build_parser().parse_args(["--annotations", "a.json", "--images", "i", "--output", "o", "--wait-for-lease", "inf"])
    assert args.wait_for_lease == float("inf")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--annotations", "a.json", "--images", "i", "--output", "o", "--wait-for-lease", "nan"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("argument --wait-for-lease: not a number of seconds (inf: for ever): 'nan'"), error


def test_evaluations_come_at_epoch_ends_at_most_twenty_times_a_run_unless_eval_every_says(shapes, tmp_path):
    from jobs.training.spec import MAX_EPOCH_END_EVALS, eval_interval

    assert eval_interval(0, 12, 60) == 12  # 5 epochs: each one's end
    assert eval_interval(0, 12, 12 * MAX_EPOCH_END_EVALS) == 12
    assert eval_interval(0, 12, 12 * MAX_EPOCH_END_EVALS + 1) == 24  # 21 epochs: every 2nd end
    assert eval_interval(0, 3, 400) == 21  # 12 images on 2 workers x 2, 400 steps: 19 evaluations, not 133
    for per_epoch, total in ((3, 400), (12, 400), (1000, 90_000), (7, 7), (5, 3)):
        every = eval_interval(0, per_epoch, total)
        assert every % per_epoch == 0 and total // every <= MAX_EPOCH_END_EVALS, (per_epoch, total, every)
    assert eval_interval(50, 12, 400) == 50  # --eval-every N: every N steps, epoch ends or not
    ann, images = shapes["train"]
    with pytest.raises(JobError, match="--eval-every must be 0 or more, got -5"):
        main(["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), "--eval-every", "-5", *SMALL])
    assert not (tmp_path / "run").exists()


def test_use_gpu_without_gpus_stops_the_job(shapes, tmp_path, ray_local, monkeypatch):
    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ann, images = shapes["train"]
    with pytest.raises(JobError, match="--use-gpu, but the Ray cluster has no GPUs"):
        main(["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), "--use-gpu", *SMALL])


def test_wait_for_gpus_gives_up_after_its_seconds_naming_the_option(shapes, tmp_path, ray_local, monkeypatch):
    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ann, images = shapes["train"]
    base = ["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), *SMALL]
    started = time.monotonic()
    with pytest.raises(JobError, match=r"--use-gpu --num-workers 2 needs 2 GPUs, but the Ray cluster has 0 after --wait-for-gpus 2 s"):
        main([*base, "--use-gpu", "--num-workers", "2", "--wait-for-gpus", "2"])
    assert 2 <= time.monotonic() - started < 60
    with pytest.raises(JobError, match="--wait-for-gpus waits for the GPUs of --use-gpu"):
        main([*base, "--wait-for-gpus", "600"])
    with pytest.raises(JobError, match="--wait-for-gpus must be 0 or more seconds, got -1"):
        main([*base, "--use-gpu", "--wait-for-gpus", "-1"])
    assert not (tmp_path / "run").exists()


def test_ray_data_ingestion_needs_its_loaders_and_their_cpus(shapes, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ann, images = shapes["train"]
    base = ["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), *SMALL, "--ingest", "ray-data"]
    with pytest.raises(JobError, match=r"^--ingest ray-data needs --loader-workers 1 or more"):
        main([*base, "--loader-workers", "0"])
    cpus = ray_local.cluster_resources()["CPU"]
    with pytest.raises(JobError, match=(
        rf"^--num-workers 2 x --cpus-per-worker 1 CPUs plus 2 x --loader-workers {cpus:g} CPUs for --ingest ray-data cannot start "
        rf"on this private local Ray of {cpus:g} CPUs"
    )):
        main([*base, "--num-workers", "2", "--loader-workers", f"{cpus:g}"])
    assert not (tmp_path / "run").exists()


def test_loader_workers_default_to_four_at_most_the_cpus_of_the_worker(shapes, tmp_path, ray_local, monkeypatch):
    """By default a worker reads with 4 DataLoader processes, at most the CPUs its process may run
    on: torch's DataLoader then has no warning that they may run slow or freeze (on a 2-CPU
    machine 4 gave it, once per worker). A given --loader-workers is kept; with --ingest ray-data
    the default is 4 actors a worker, which the driver counts."""
    import types
    import warnings

    from jobs.training.worker import dataloader_processes

    cpus = len(os.sched_getaffinity(0))
    default = dataloader_processes(types.SimpleNamespace(loader_workers=None))
    assert default == min(4, cpus)
    assert dataloader_processes(types.SimpleNamespace(loader_workers=7)) == 7
    assert build_parser().parse_args(["--annotations", "a", "--images", "i", "--output", "o"]).loader_workers is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns (UserWarning) when the processes outnumber the CPUs
        assert sorted(torch.utils.data.DataLoader(range(8), num_workers=default, batch_size=None)) == list(range(8))

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ann, images = shapes["train"]
    base = ["--annotations", ann, "--images", images, "--output", str(tmp_path / "run"), "--arch", "small", "--ingest", "ray-data"]
    workers = int(ray_local.cluster_resources()["CPU"]) // 5 + 1  # 1 + 4 CPUs each: more than the local Ray has
    with pytest.raises(JobError, match=rf"^--num-workers {workers} x --cpus-per-worker 1 CPUs plus {workers} x --loader-workers 4 CPUs"):
        main([*base, "--num-workers", str(workers)])
    assert not (tmp_path / "run").exists()


def test_evaluate_rejects_bad_input(shapes, tmp_path):
    from jobs.evaluate import main as evaluate_main
    from maskrcnn.checkpoint import save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    ann, images = shapes["val"]
    with pytest.raises(JobError, match="nowhere.pt does not exist"):
        evaluate_main(["--checkpoint", str(tmp_path / "nowhere.pt"), "--annotations", ann, "--images", images])
    with pytest.raises(JobError, match="missing under --images"):
        evaluate_main(["--checkpoint", str(tmp_path / "nowhere.pt"), "--annotations", ann, "--images", str(tmp_path)])
    config = get_preset("small", num_classes=2)
    save_checkpoint(str(tmp_path / "dogs.pt"), build_model(config), config, [{"id": 77, "name": "dog"}])
    with pytest.raises(JobError, match="share no id"):
        evaluate_main(["--checkpoint", str(tmp_path / "dogs.pt"), "--annotations", ann, "--images", images])
    # the same ids under other names: another dataset's categories, AP a silent 0
    data = json.loads(Path(ann).read_text())
    config = get_preset("small", num_classes=len(data["categories"]) + 1)
    save_checkpoint(str(tmp_path / "others.pt"), build_model(config), config,
                    [{"id": c["id"], "name": f"not {c['name']}"} for c in data["categories"]])
    with pytest.raises(JobError, match=r"share ids but none of their names \(\d+: 'not .*' vs '.*'"):
        evaluate_main(["--checkpoint", str(tmp_path / "others.pt"), "--annotations", ann, "--images", images])
    unlabelled = _write_json(tmp_path / "unlabelled.json", {**data, "annotations": []})
    with pytest.raises(JobError, match=r"has no \(non-crowd\) annotations"):
        evaluate_main(["--checkpoint", str(tmp_path / "others.pt"), "--annotations", unlabelled, "--images", images])
    for device in ("gpu", "cuda:x", "meta"):  # torch's RuntimeError, or a device no model runs on
        with pytest.raises(JobError, match=rf"^--device {device} is not a device this job runs on: give auto, cpu, cuda or cuda:N$"):
            evaluate_main(["--checkpoint", str(tmp_path / "others.pt"), "--annotations", ann, "--images", images, "--device", device])


def test_evaluate_with_tta_scores_what_the_predictor_predicts_from_the_views(shapes, tmp_path, capsys):
    """jobs.evaluate --tta flip,vote: the same metrics as evaluate_model with that TTA (the one
    loop), the spec in the report and the summary line; a wrong spec or a keypoint model is named
    in one line before any image is read."""
    from jobs.evaluate import main as evaluate_main
    from maskrcnn.checkpoint import load_checkpoint, save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.data import CocoDataset
    from maskrcnn.evaluation import evaluate_model
    from maskrcnn.modeling import build_model

    ann, images = shapes["val"]
    categories = json.loads(Path(ann).read_text())["categories"]
    torch.manual_seed(0)
    config = get_preset("small", num_classes=len(categories) + 1).with_overrides(min_size=96, max_size=128, score_thresh=0.0)
    save_checkpoint(str(tmp_path / "model.pt"), build_model(config), config, categories)
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--annotations", ann, "--images", images, "--loader-workers", "0"]
    assert evaluate_main([*args, "--tta", "vote, flip", "--output", str(tmp_path / "eval.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-2].endswith("s on cpu, --tta flip,vote)")
    report = json.loads((tmp_path / "eval.json").read_text())
    expected = evaluate_model(load_checkpoint(str(tmp_path / "model.pt")).model, CocoDataset(ann, images), 2, "cpu", fast=True,
                              tta="flip,vote")
    assert report["tta"] == "flip,vote" and report["num_detections"] == expected["num_detections"] > 0
    assert report["segm_AP"] == expected["segm_AP"] and report["bbox_AP"] == expected["bbox_AP"]
    with pytest.raises(JobError, match="^--tta 'flip,flop' has 'flop', which is neither"):
        evaluate_main([*args, "--tta", "flip,flop"])
    keypoints = get_preset("small_keypoint", num_classes=len(categories) + 1)
    save_checkpoint(str(tmp_path / "kp.pt"), build_model(keypoints), keypoints, categories)
    with pytest.raises(JobError, match="^--tta flip: test-time augmentation is for box and mask models"):
        evaluate_main([*args[:1], str(tmp_path / "kp.pt"), *args[2:], "--tta", "flip"])


def test_bf16_on_a_cpu_without_bf16_kernels_says_it_is_slower(shapes, tmp_path, capsys):
    """--precision bf16 on a CPU runs (autocast), with one line saying so where the CPU has no
    bf16 kernels (AVX2: 3.3x fp32's time), and none where it has them."""
    from jobs.evaluate import main as evaluate_main
    from maskrcnn.checkpoint import save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.engine import cpu_runs_bf16
    from maskrcnn.modeling import build_model

    ann, images = shapes["val"]
    categories = json.loads(Path(ann).read_text())["categories"]
    config = get_preset("small", num_classes=len(categories) + 1).with_overrides(min_size=96, max_size=128)
    save_checkpoint(str(tmp_path / "model.pt"), build_model(config), config, categories)
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--annotations", ann, "--images", images, "--loader-workers", "0"]
    for precision, note in (("bf16", not cpu_runs_bf16()), ("auto", False)):
        assert evaluate_main([*args, "--device", "cpu", "--precision", precision]) == 0
        out = capsys.readouterr().out
        assert ("note: --precision bf16 on a CPU without bf16 kernels" in out) == note, (precision, out)


def test_weights_decide_which_layers_start_fresh(shapes, tmp_path):
    """A jobs.train checkpoint of the same categories loads whole; of other categories, or a
    torchvision state dict, without the class-specific layers."""
    from jobs.training.inputs import resolve_model
    from maskrcnn.checkpoint import save_checkpoint, to_torchvision_state_dict
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    ann, images = shapes["train"]
    categories = json.loads(Path(ann).read_text())["categories"]
    categories = [{"id": c["id"], "name": c["name"]} for c in categories]
    config = get_preset("small", num_classes=len(categories) + 1)
    model = build_model(config)
    save_checkpoint(str(tmp_path / "same.pt"), model, config, categories)
    other = [{"id": 10 + c["id"], "name": "x" + c["name"]} for c in categories]
    save_checkpoint(str(tmp_path / "other.pt"), model, config, other)
    torch.save(to_torchvision_state_dict(model), tmp_path / "tv.pt")

    def resolve(weights, *extra):
        args = build_parser().parse_args(["--annotations", ann, "--images", images, "--output", "x", "--weights", str(weights), *extra])
        return resolve_model(args, categories, None)

    config_dict, kind, reinit = resolve(tmp_path / "same.pt")
    assert (kind, reinit, config_dict["backbone"]["name"]) == ("project", False, "small")  # the checkpoint names its architecture
    assert resolve(tmp_path / "other.pt")[1:] == ("project", True)
    assert resolve(tmp_path / "tv.pt", "--arch", "small")[1:] == ("torchvision", True)
    with pytest.raises(JobError, match="drop --arch"):
        resolve(tmp_path / "same.pt", "--arch", "r50_fpn")
    assert resolve(tmp_path / "same.pt", "--min-size", "200")[0]["input"]["min_size"] == 200


# --------------------------------------------------------------------------------------------
# Slow: real training on a real local Ray


@pytest.mark.slow
def test_two_workers_on_s3_learn_and_evaluate(s3_bucket, tmp_path):
    """2 CPU workers, data and output on the moto S3 server: the loss falls, model.pt lands in
    the bucket with the metrics and their plot, and jobs.evaluate on it finds AP above 0."""
    import s3fs

    data = make_sample_dataset(f"{s3_bucket}/data", {"train": 48, "val": 8}, seed=1)
    (train_ann, train_img), (val_ann, val_img) = data["train"], data["val"]
    output = f"{s3_bucket}/runs/r1"
    job = run_job(
        "jobs.train",
        [
            "--annotations",
            train_ann,
            "--images",
            train_img,
            "--val-annotations",
            val_ann,
            "--val-images",
            val_img,
            "--output",
            output,
            "--num-workers",
            "2",
            "--batch-size",
            "2",
            "--max-steps",
            "60",
            "--log-every",
            "4",
            "--checkpoint-every",
            "0",
            "--keep-checkpoints",
            "2",
            "--arch",
            "small",
            "--min-size",
            "192",
            "--max-size",
            "288",
            "--loader-workers",
            "1",
        ],
        timeout=400,
    )
    assert "Grad strides" not in job.output, job.output[-3000:]  # DDP buckets take the NHWC strides (tests/test_train_step.py)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    bucket_path = output.removeprefix("s3://")
    assert fs.exists(f"{bucket_path}/model.pt"), job.output[-3000:]
    assert fs.exists(f"{bucket_path}/metrics.png")
    checkpoints = [p for p in fs.ls(f"{bucket_path}/ray_train") if p.rsplit("/", 1)[-1].startswith("checkpoint_") and "manager" not in p]
    assert 1 <= len(checkpoints) <= 2  # --keep-checkpoints

    records = read_metrics(output)
    # every loss term the model returns is logged, under its own name
    assert all(
        {k for k in r if k.startswith("loss_")} == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        for r in records
        if "loss" in r
    )
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in records if "loss" in r)
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [12, 24, 36, 48, 60]  # every epoch's end (12 steps each)
    assert records[-1]["event"] == "end" and records[-1]["step"] == 60

    evaluation = f"{output}/eval.json"
    job = run_job(
        "jobs.evaluate",
        [
            "--checkpoint",
            f"{output}/model.pt",
            "--annotations",
            val_ann,
            "--images",
            val_img,
            "--output",
            evaluation,
            "--loader-workers",
            "1",
        ],
        timeout=120,
    )
    assert "mask AP" in job.output
    with fs.open(evaluation.removeprefix("s3://")) as f:
        result = json.load(f)
    assert result["num_images"] == 8 and result["min_size"] == 192
    print(
        f"after 60 steps: box AP {result['bbox_AP']:.4f} AP50 {result['bbox_AP50']:.4f}, "
        f"mask AP {result['segm_AP']:.4f} AP50 {result['segm_AP50']:.4f}"
    )
    # 60 steps of 4 images from scratch: far from converged, but clearly better than chance (0).
    assert result["bbox_AP50"] > 0.02 and result["segm_AP50"] > 0.02, result
    assert result["segm_AP"] == pytest.approx(evals[-1]["segm_AP"], abs=1e-6)  # the same model the last epoch evaluated


@pytest.mark.slow
def test_ray_data_ingestion_trains_on_the_same_batches_as_the_dataloader(s3_bucket):
    """--ingest ray-data: the images on the moto S3 server read by a Ray Data actor instead of a
    DataLoader process, the same batches (order, grouping, flips) into the same steps: the same
    losses to the last bit, over an epoch's end. (And the log steps do not wait for Ray Train.)"""
    data = make_sample_dataset(f"{s3_bucket}/data", {"train": 12}, seed=3)  # 6 steps an epoch
    (ann, images) = data["train"]
    common = ["--annotations", ann, "--images", images, "--num-workers", "1", "--batch-size", "2", "--max-steps", "8", "--log-every",
              "1", "--checkpoint-every", "0", *SMALL]

    def losses(output: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in read_metrics(output) if "loss" in r]

    # The first run also shows that a step never waits for Ray Train's controller: with its polls
    # 20 s apart, the 8 steps, each one logged, took seconds (a report at every log step waited
    # for a poll before the next: 6 x 20 s).
    run_job("jobs.train", [*common, "--output", f"{s3_bucket}/loader"], timeout=300, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "20"})
    job = run_job("jobs.train", [*common, "--output", f"{s3_bucket}/ray-data", "--ingest", "ray-data"], timeout=300)
    assert "Traceback" not in job.output and "Progress bars" not in job.output, job.output[-3000:]
    # Ray Train's preemption watcher (off on a private Ray) logged a core-worker error at its start
    # (Ray Data's actor pool still logs one: github.com/ray-project/ray/issues/57733)
    assert "'PreemptionWatcher'" not in job.output, job.output[-3000:]
    assert "Found credentials" not in job.output, job.output[-3000:]  # aiobotocore's INFO, at each S3 client
    expected = losses(f"{s3_bucket}/loader")
    assert [r["step"] for r in expected] == list(range(1, 9))
    assert losses(f"{s3_bucket}/ray-data") == expected
    times = [r["time"] for r in read_metrics(f"{s3_bucket}/loader") if "loss" in r]
    assert times[-1] - times[0] < 20, f"steps 1-8 took {times[-1] - times[0]:.1f} s: a step waited for the controller's poll"


@pytest.mark.slow
def test_resumes_after_a_killed_worker_and_after_a_killed_job(shapes, tmp_path):
    """Two failures in one run (each costs a Ray start-up, so they share one test):

    1. SIGKILL one training worker after the checkpoint at step 8: Ray Train replaces the worker
       group, which goes on from a checkpoint (FailureConfig), not from step 0;
    2. SIGKILL the whole job (driver and its Ray) after the replaced group's checkpoint at step
       12, then run the same command again: it resumes from the latest checkpoint in --output,
       and the run reaches its 16 steps, each step recorded once.

    Checkpoints at 4, 6 (epoch end), 8, 12 (epoch end) and 16. The controller registers a
    reported checkpoint when it next polls the workers (every 0.5 s, jobs.train's setting), so a
    kill right after a report may lose that one; the asserts allow the previous checkpoint.
    """
    output = tmp_path / "run"
    args = train_args(shapes, output, "--max-steps", "16", "--checkpoint-every", "4", "--log-every", "2")
    seen: dict = {"starts": 0}

    def inject_failures(job, line):
        if "starts at step" in line:
            seen["starts"] += 1
            if "rank 1/2 pid" in line and "rank1" not in seen:
                seen["rank1"] = int(line.split(" pid ")[1].split()[0])
        elif "checkpoint at step 8" in line and "rank1" in seen and "worker_killed" not in seen:
            seen["worker_killed"] = True
            os.kill(seen["rank1"], signal.SIGKILL)
        elif "checkpoint at step 12" in line and seen["starts"] == 4:  # the replaced group's
            job.kill()

    first = Job("jobs.train", args, on_line=inject_failures)
    assert first.wait(300) == -signal.SIGKILL, first.output[-3000:]
    starts = start_steps(first.output)
    assert seen.get("worker_killed") and len(starts) == 4, first.output[-3000:]
    assert starts[:2] == [0, 0] and min(starts[2:]) >= 4, starts  # the replaced group resumed from a checkpoint
    assert not (output / "model.pt").exists()
    time.sleep(1)  # let the killed Ray's processes go

    second = run_job("jobs.train", args, timeout=240)
    resumed = start_steps(second.output)
    assert len(resumed) == 2 and min(resumed) >= 8, second.output[-3000:]  # resumed, not restarted
    records = read_metrics(str(output))
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, starts[2], resumed[0]]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 16  # each step once: redone stretches replaced
    assert records[-1]["event"] == "end" and records[-1]["step"] == 16
    assert (output / "model.pt").exists()
    # the killed run's lease (its process gone from this host) was taken over at once, and released at the end
    from jobs.lease import lease_name

    lease = json.loads((output / "_lease" / lease_name(2)).read_text())
    assert lease["expires"] == 0 and lease["pid"] == second.process.pid, lease
    # Ray Train's checkpoints are written by the one checkpoint writer: each loads as a model too
    from maskrcnn.checkpoint import load_checkpoint

    saved = sorted((output / "ray_train").glob("checkpoint_*/checkpoint.pt"))
    assert saved and load_checkpoint(str(saved[-1])).config.num_classes == 4


@pytest.mark.slow
def test_fine_tune_from_torchvision_layout_with_other_classes(shapes, tmp_path):
    """--weights a torchvision-layout state dict of 7 classes, annotations of 3 categories: the
    trunk, FPN, RPN and heads load, the class-specific layers start fresh at 3 + 1 classes."""
    from maskrcnn.checkpoint import CLASS_SPECIFIC, load_checkpoint, to_torchvision_state_dict
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    torch.manual_seed(123)
    source = to_torchvision_state_dict(build_model(get_preset("small", num_classes=7)))
    torch.save(source, tmp_path / "tv7.pt")
    output = tmp_path / "run"
    ann, images = shapes["train"]
    # One worker, a vanishing learning rate: what model.pt holds is what was loaded.
    job = run_job(
        "jobs.train",
        [
            "--annotations",
            ann,
            "--images",
            images,
            "--output",
            str(output),
            "--weights",
            str(tmp_path / "tv7.pt"),
            "--num-workers",
            "1",
            "--max-steps",
            "3",
            "--lr",
            "1e-12",
            "--log-every",
            "1",
            *SMALL,
        ],
        timeout=200,
    )
    assert "class-specific layers re-initialised" in job.output

    loaded = load_checkpoint(str(output / "model.pt"))
    assert loaded.config.num_classes == 4
    assert [c["name"] for c in loaded.label_map.values()] == ["circle", "square", "triangle"]
    state = loaded.model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    shared = [k for k in source if not k.startswith(CLASS_SPECIFIC)]
    assert shared and all(torch.allclose(state[k], source[k], atol=1e-6) for k in shared)


# --------------------------------------------------------------------------------------------
# GPU: NCCL and bf16 autocast, where a GPU is there


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_worker_trains_under_bf16(shapes, tmp_path):
    output = tmp_path / "run"
    ann, images = shapes["train"]
    job = run_job(
        "jobs.train",
        [
            "--annotations",
            ann,
            "--images",
            images,
            "--output",
            str(output),
            "--num-workers",
            "1",
            "--use-gpu",
            "--max-steps",
            "6",
            "--log-every",
            "1",
            *SMALL,
        ],
        timeout=300,
    )
    assert "on cuda" in job.output
    records = read_metrics(str(output))
    assert records[-1]["event"] == "end" and records[-1]["step"] == 6
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
