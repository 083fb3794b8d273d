"""The main job on the embedded default: local Ray, local files, the sample dataset, CPU.

    python -m jobs.demo [--output runs/demo] [--steps N]

Makes the sample dataset, trains the ``small`` preset with Ray Train (2 CPU workers), labels
the held-out split with Ray Data into Parquet (with preview PNGs), evaluates COCO box and mask
AP, and prints where everything is. Each step is the very command a user would run, so the demo
also shows the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import subprocess
import sys
import time

from jobs.common import JobError, run_main


def _run(step: str, argv: list[str]) -> None:
    command = [sys.executable, "-m", *argv]
    print(f"\n== {step}\n$ python -m {shlex.join(argv)}", flush=True)
    started = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"demo: step '{step}' failed (exit {result.returncode}); its output above says why", file=sys.stderr)
        sys.exit(result.returncode)
    print(f"-- {step}: {time.time() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="folder for the data, the run, the labels and the report (default runs/demo)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--train-images", type=int, default=48, help="sample training images (default 48)")
    parser.add_argument("--val-images", type=int, default=16, help="held-out sample images (default 16)")
    args = parser.parse_args(argv)
    for name in ("steps", "train_images", "val_images"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise JobError(f"--output {args.output} is a file; give a folder")
    data, run, labels, report = (os.path.join(out, p) for p in ("data", "train", "labels", "eval.json"))
    # The demo starts over: a previous demo's run (another code version, other settings) would
    # otherwise be resumed, or refused by jobs.train as another model config.
    for path in (data, run, labels, report):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    started = time.time()
    _run("sample data", ["maskrcnn.data.synthetic", "--output", data, "--train", str(args.train_images), "--val", str(args.val_images)])
    _run("train (Ray Train, 2 CPU workers)", [
        "jobs.train", "--annotations", f"{data}/train/annotations.json", "--images", f"{data}/train/images",
        "--val-annotations", f"{data}/val/annotations.json", "--val-images", f"{data}/val/images",
        "--output", run, "--arch", "small", "--num-workers", "2", "--batch-size", "2",
        "--max-steps", str(args.steps), "--loader-workers", "0", "--log-every", "25",
    ])
    _run("label the held-out images (Ray Data -> Parquet)", [
        "jobs.label", "--input", f"{data}/val/images", "--output", labels, "--checkpoint", f"{run}/model.pt", "--preview", "8",
    ])
    _run("evaluate (COCO box and mask AP)", [
        "jobs.evaluate", "--checkpoint", f"{run}/model.pt", "--annotations", f"{data}/val/annotations.json",
        "--images", f"{data}/val/images", "--output", report,
    ])
    with open(report) as f:
        metrics = json.load(f)
    ap = metrics.get("metrics", metrics)
    print(f"\n== demo done in {time.time() - started:.0f} s")
    print(f"held-out mask AP {ap['segm_AP']:.3f}, box AP {ap['bbox_AP']:.3f} ({args.val_images} images)")
    print(f"sample data     {data}")
    print(f"training run    {run}  (model.pt, metrics.jsonl, metrics.png)")
    print(f"labels          {labels}  (Parquet; previews in {labels}/_preview)")
    print(f"evaluation      {report}")
    return 0


if __name__ == "__main__":
    run_main(main)
