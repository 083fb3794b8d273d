"""The main job on the embedded default: local Ray, local files, the sample dataset, CPU.

    python -m jobs.demo [--output runs/demo] [--steps N]

Makes the sample dataset, trains the ``small`` preset with Ray Train (2 CPU workers), labels
the held-out split with Ray Data into Parquet (with preview PNGs), evaluates COCO box and mask
AP, and prints where everything is. Each step is the very command a user would run, so the demo
also shows the commands.

--output is the demo's own: a new or empty folder, or an earlier demo's output (it writes a
``.jobs-demo`` marker there), whose data, run, labels and report a rerun replaces. A folder that
holds anything else is refused, so that the demo never deletes what it did not make.
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

# What the demo makes in --output, replaced on each run, and the marker it writes there first: a
# folder that holds anything else is another's, and is refused before anything is deleted.
MADE = ("data", "train", "labels", "eval.json")
MARKER = ".jobs-demo"


def _run(step: str, argv: list[str]) -> None:
    command = [sys.executable, "-m", *argv]
    print(f"\n== {step}\n$ python -m {shlex.join(argv)}", flush=True)
    started = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"demo: step '{step}' failed (exit {result.returncode}); its output above says why", file=sys.stderr)
        sys.exit(result.returncode)
    print(f"-- {step}: {time.time() - started:.0f} s", flush=True)


def _earlier_demo(out: str, names: list[str]) -> bool:
    """Whether ``out`` is a whole output of a demo from before the marker: only the demo's
    entries, and an eval.json that scored the model of ``out``/train on the data of ``out``/data."""
    if not set(names) <= set(MADE) or "eval.json" not in names:
        return False
    try:
        with open(os.path.join(out, "eval.json")) as f:
            report = json.load(f)
        return (os.path.abspath(report["checkpoint"]) == os.path.join(out, "train", "model.pt")
                and os.path.abspath(report["annotations"]) == os.path.join(out, "data", "val", "annotations.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def claim_output(out: str, given: str) -> None:
    """Makes the folder ``out`` (--output ``given``) the demo's and empties it of what an earlier
    demo made there (which would otherwise be resumed, or refused by jobs.train as another model
    config). A new or empty folder, or an earlier demo's output, is the demo's; a folder that
    holds anything else is refused, before anything is deleted."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise JobError(f"--output {given} is a file; give a folder")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if names and MARKER not in names and not _earlier_demo(out, names):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise JobError(
            f"--output {given} holds files the demo did not make ({shown}); give a new or empty folder "
            "(the demo replaces only its own earlier output)"
        )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:  # first, so that a demo stopped half-way is still the demo's
        f.write(f"made by python -m jobs.demo, which replaces {', '.join(MADE)} here on each run\n")
    for path in (os.path.join(out, name) for name in MADE):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", default="runs/demo",
        help="folder for the data, the run, the labels and the report: a new or empty one, or an earlier demo's, "
        "whose files are replaced (default runs/demo)",
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--train-images", type=int, default=48, help="sample training images (default 48)")
    parser.add_argument("--val-images", type=int, default=16, help="held-out sample images (default 16)")
    args = parser.parse_args(argv)
    for name in ("steps", "train_images", "val_images"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    out = os.path.abspath(args.output)
    claim_output(out, args.output)
    data, run, labels, report = (os.path.join(out, p) for p in MADE)
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
