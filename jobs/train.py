"""``python -m jobs.train``: train or fine-tune Mask R-CNN on a Ray cluster with Ray Train.

    python -m jobs.train --annotations s3://b/train.json --images s3://b/train/ --output s3://b/runs/r1 \\
        [--val-annotations s3://b/val.json --val-images s3://b/val/] [--weights URI] \\
        [--num-workers 8 --use-gpu] [--epochs 12 | --max-steps N] [--batch-size 2]

How it runs:

- The driver (this process) checks the inputs before anything trains: the annotations parse and
  name images that exist, the dataset is not empty, ``--weights`` is readable and fits the
  architecture, ``--use-gpu`` has GPUs to use (with ``--wait-for-gpus S``, after asking the
  autoscaler for them and waiting up to S seconds). Each problem stops the job with exit status 2
  and a message naming it. The driver never reads an image.
- A ``TorchTrainer`` starts ``--num-workers`` workers: DDP over gloo on CPUs, NCCL on GPUs.
  Every worker reads the annotations itself and its own shard of the images (a per-epoch
  shuffle split by world rank, as ``DistributedSampler`` does) through fsspec, in its own
  DataLoader processes.
- The recipe is ``maskrcnn.engine``'s, the one the overfit test and the ablation benchmark
  prove: SGD without weight decay on norms and biases; the linear scaling rule's lr, 0.02 for 16
  images per step (with a floor for the ``small`` GroupNorm presets, which train from scratch);
  linear warmup from ``--warmup-factor`` times that, then x ``--lr-gamma`` at ``--lr-steps``
  (2/3 and 8/9 of the run, detectron's 1x schedule); gradients clipped at ``--clip-grad-norm``.
- On GPUs the forward pass runs under bf16 autocast (fp16 with a GradScaler where the GPU has
  no bf16); on CPUs in fp32. ``--precision`` overrides.
- ``--output`` holds the whole run (local or any fsspec URI, e.g. ``s3://``):
  ``ray_train/`` (Ray Train's checkpoints, the last ``--keep-checkpoints``, each with the model,
  optimizer, scheduler and step), ``metrics.jsonl`` (one JSON object per logged step,
  evaluation and (re)start), ``metrics.png`` (the curves) and, at the end, ``model.pt``: the
  single-file checkpoint that ``jobs.label`` and ``jobs.evaluate`` take as it is; ``_lease/``:
  one run at a time trains into it (a second stops with one line naming the holder, or waits
  with ``--wait-for-lease``; a dead run's lease is taken over when it expires, at once on the
  same machine).
- A worker that dies is replaced and training goes on from the latest checkpoint
  (``--max-failures`` times). Running the same command again after the job itself died
  resumes from the latest checkpoint in ``--output`` (Ray Train finds the run there by its
  storage path and name); a run that had finished only rewrites ``model.pt``.
"""

from __future__ import annotations

from jobs.common import run_main
from jobs.options import parse_storage_options
from jobs.training.launch import train_on_ray
from jobs.training.options import build_parser, parse_args
from jobs.training.spec import LEASE_DIR, plan_run

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Runs the job on the command line ``argv`` (default: ``sys.argv[1:]``). Returns 0 when the
    run is done and ``model.pt`` written, 1 when training failed; bad input raises JobError
    (``run_main``: exit status 2) before anything trains."""
    import uuid

    from jobs.lease import Lease

    args = parse_args(argv)
    storage_options = parse_storage_options(args.storage_options)
    plan = plan_run(args, storage_options)  # the inputs, checked before any worker starts
    # One run at a time trains into an output: two would write each other's checkpoints and
    # record, and resume from them (jobs/lease.py).
    lease = Lease(plan.output, LEASE_DIR, uuid.uuid4().hex[:12], storage_options, held_by="is being trained into by")
    lease.acquire(wait=args.wait_for_lease)
    try:
        return train_on_ray(args, plan, storage_options)
    except KeyboardInterrupt as exc:
        if lease.lost.is_set():
            exc.args = ("another run took over the lease on --output (this one had stopped renewing it)",)
        raise
    finally:  # a run that stopped before training (a cluster unfit for it) leaves nothing in the output, not even its lease
        lease.release(remove=not _run_started(plan.output, storage_options))


def _run_started(output: str, storage_options: dict | None) -> bool:
    """Whether ``output`` holds anything besides the lease: a run's checkpoints or record."""
    from maskrcnn.storage import filesystem

    try:
        fs, root = filesystem(output, storage_options)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(root)
        return any(p.rstrip("/").rsplit("/", 1)[-1] != LEASE_DIR for p in fs.ls(root, detail=False))
    except Exception:  # unreachable: keep the lease (released) rather than fail here
        return True


if __name__ == "__main__":
    run_main(main)
