"""How long jobs.label takes to plan a run over a manifest of 1,000,000 image URIs, and how
much driver memory it needs, without reading a single image.

Three measurements, each in this process with tracemalloc's peak (Python allocations) beside
the wall time:

1. plan: stream the manifest, cut it into shards, write the plan (``_plan/``);
2. resume: a rerun after half the shards were committed: read the plan, list the output's
   part files (names only), work out the pending shards;
3. peer: the same manifest read into a Python list and sorted, the naive planner, to show what
   streaming saves.

    python -m benchmarks.label_plan [--images 1000000] [--shard-size 1000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from jobs.labeling.inputs import iter_input_uris
from jobs.labeling.plan import read_plan, write_plan
from jobs.labeling.shards import finished_shards, part_name


def measure(fn, clean=None):
    """(result, seconds, peak bytes): timed on its own, then run again under tracemalloc
    (which slows allocation several-fold) for the peak of Python allocations."""
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    if clean:
        clean()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="where to write the manifest and the plan (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="label-plan-"))
    manifest = workdir / "manifest.txt"
    output = workdir / "labels"
    shutil.rmtree(output, ignore_errors=True)
    with open(manifest, "w") as f:  # realistic URIs: a bucket, shard folders, 8-digit names
        for i in range(args.images):
            f.write(f"s3://my-company-images/2024/shard-{i // 10000:05d}/img_{i:08d}.jpg\n")
    print(f"manifest: {args.images:,} URIs, {manifest.stat().st_size / 1e6:.0f} MB at {manifest}")

    plan, plan_s, plan_peak = measure(
        lambda: write_plan(iter_input_uris(str(manifest)), str(output), str(manifest), args.shard_size, {"model": "sha256:bench"}),
        clean=lambda: shutil.rmtree(output),
    )
    # half the shards committed by an earlier run (empty files: only names are read)
    for shard in range(0, plan.num_shards, 2):
        (output / part_name(shard)).touch()

    def resume():
        again = read_plan(str(output))
        done = finished_shards(str(output))
        return [s for s in range(again.num_shards) if s not in done]

    pending, resume_s, resume_peak = measure(resume)
    _, naive_s, naive_peak = measure(lambda: sorted(manifest.read_text().splitlines()))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = args.images
    print(f"{'step':<34}{'seconds':>9}{'peak MB':>10}{'bytes/image':>13}")
    print(f"{'plan (stream, shard, write)':<34}{plan_s:>9.2f}{plan_peak / 1e6:>10.1f}{plan_peak / n:>13.1f}")
    print(f"{'resume (plan + list parts)':<34}{resume_s:>9.2f}{resume_peak / 1e6:>10.1f}{resume_peak / n:>13.1f}")
    print(f"{'peer: read all + sort in memory':<34}{naive_s:>9.2f}{naive_peak / 1e6:>10.1f}{naive_peak / n:>13.1f}")
    print(f"shards: {plan.num_shards} of {plan.shard_size}; pending after resume: {len(pending)}")
    print(
        f"planner memory vs peer: {plan_peak / naive_peak:.3f}x. The planner's peak is one plan file's buffer "
        f"({args.shard_size} x 64 URIs), the same for 10M images; resume holds one entry per shard"
    )
    print(f"process max RSS {rss_mb:.0f} MB (includes pyarrow, and the peer's list)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
