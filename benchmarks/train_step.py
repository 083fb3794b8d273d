"""Training images/s of jobs.train's per-worker step against torchvision's reference training loop.

Both sides run in this process on the same device, the same batch of images and targets (from
the synthetic shapes dataset) and the same weights, in turns, so that a shared, noisy machine
slows both alike:

- ours: ``maskrcnn.modeling.build_model(r50_fpn)`` prepared and stepped as every Ray Train
  worker of jobs.train does: ``maskrcnn.engine.prepare_for_training`` (NHWC), ``train_step`` (forward under the job's autocast,
  backward, the gradient norm clipped at jobs.train's default) with ``make_optimizer``'s SGD
  (fused on a GPU);
- peer: torchvision's ``maskrcnn_resnet50_fpn`` assembled as its builder does for a pretrained
  trunk (frozen BatchNorm, 3 trainable ResNet stages), stepped as
  ``references/detection/engine.py::train_one_epoch`` does, with its ``torch.optim.SGD``.

A batch holds landscape images only, as jobs.train's aspect-ratio grouping gives them. The
learning rate is 0: the weights here are random, and a diverging model would change the work (the
number of proposals) from step to step. For each precision and batch size, prints each side's
median step time and images/s, and the ratio ours / torchvision (above 1: ours is faster); a batch
that does not fit in the GPU's memory is reported as such and the larger ones skipped. Absolute
figures mean something only on a GPU.

    python -m benchmarks.train_step [--batch-sizes 2 8 16] [--precisions bf16 fp32] [--steps N]
                                    [--min-size 800 --max-size 1333] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def reference_step(model, optimizer, images, targets, autocast_dtype):
    """torchvision/references/detection/engine.py's train_one_epoch, one iteration."""
    with torch.autocast(images[0].device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()
    return loss_dict


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def landscape_batches(largest: int, device: torch.device):
    """``(images, targets)`` of the ``largest`` first landscape images of the synthetic shapes
    (on ``device``; slice them for smaller batches), and the number of classes."""
    from jobs.training.worker import targets_to
    from maskrcnn.data import CocoDataset, collate_fn, landscape_images, make_sample_dataset

    with tempfile.TemporaryDirectory() as folder:
        annotations, images_uri = make_sample_dataset(folder, {"train": 3 * largest + 8}, seed=0)["train"]
        dataset = CocoDataset(annotations, images_uri)
        chosen = [i for i, wide in enumerate(landscape_images(dataset)) if wide][:largest]
        if len(chosen) < largest:
            raise SystemExit(f"the synthetic dataset has only {len(chosen)} landscape images; ask for smaller --batch-sizes")
        images, targets = collate_fn([dataset[i] for i in chosen])
    return [image.to(device) for image in images], targets_to(targets, device), dataset.num_classes


def time_steps(steps: dict, warmup: int, timed: int, device: torch.device) -> dict[str, float]:
    """Each side's median seconds per step over ``timed`` steps after ``warmup`` untimed ones,
    the sides taking turns (and turns at going first)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for iteration in range(warmup + timed):
        order = list(steps) if iteration % 2 == 0 else list(reversed(steps))
        for name in order:
            sync(device)
            started = time.perf_counter()
            steps[name]()
            sync(device)
            if iteration >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-sizes", "--batch-size", type=int, nargs="+", default=[2], metavar="N",
        help="images per step, as per worker in jobs.train (default 2); each is timed",
    )
    parser.add_argument(
        "--precisions", "--precision", nargs="+", choices=("auto", "bf16", "fp16", "fp32"), default=["auto"],
        help="as jobs.train --precision; each is timed (default auto: bf16 on a GPU, fp32 on a CPU)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per side, after untimed warm-up ones (default: 20 on a GPU, 3 on a CPU)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default: 5 on a GPU, 1 on a CPU)")
    parser.add_argument("--min-size", type=int, default=None, help="default: 800 on a GPU, 320 on a CPU")
    parser.add_argument("--max-size", type=int, default=None, help="default: 1333 on a GPU, 480 on a CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument(
        "--gather-roialign", action="store_true",
        help="on a GPU too, pool RoIs from all FPN levels in one gather (poolers.roi_align_gather, as the inference fast path "
        "and CPU training do: no host sync) instead of torchvision's kernel level by level",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gather_roialign:
        from maskrcnn.modeling.poolers import MultiScaleRoIPooler

        MultiScaleRoIPooler.gathers = lambda self, device: self.pooler_type == "align" and self.sampling_ratio > 0

    from benchmarks.model_inference import torchvision_model
    from maskrcnn.checkpoint import load_state
    from maskrcnn.config import get_preset
    from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, autocast_dtype, make_optimizer, prepare_for_training, train_step
    from maskrcnn.modeling import build_model

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    min_size = args.min_size or (800 if gpu else 320)
    max_size = args.max_size or (1333 if gpu else 480)
    timed = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    batch_sizes = sorted(set(args.batch_sizes))
    images, targets, num_classes = landscape_batches(batch_sizes[-1], device)

    torch.manual_seed(0)
    peer = torchvision_model(min_size, max_size, num_classes=num_classes)  # the score threshold does not touch training
    config = get_preset("r50_fpn", num_classes=num_classes)
    config = config.replace(input=type(config.input)(min_size=min_size, max_size=max_size))
    ours = build_model(config)
    load_state(ours, peer.state_dict(), "torchvision maskrcnn_resnet50_fpn")  # the same weights on both sides
    prepare_for_training(ours.to(device))  # the recipe's layout: NHWC
    peer.to(device).train()
    ours_optimizer = make_optimizer(ours, lr=0.0)
    peer_optimizer = torch.optim.SGD([p for p in peer.parameters() if p.requires_grad], lr=0.0, momentum=0.9, weight_decay=1e-4)

    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"r50_fpn training step, landscape images {min_size}-{max_size} px, {where}, torch {torch.__version__}, "
          f"median of {timed} steps after {warmup}:", flush=True)
    print(f"  {'precision':9s} {'batch':>5s} {'ours ms/step':>13s} {'img/s':>8s} {'torchvision ms/step':>20s} {'img/s':>8s} {'ratio':>6s}")
    for precision in dict.fromkeys(args.precisions):
        dtype = autocast_dtype(precision, device)
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        for batch in batch_sizes:
            batch_images, batch_targets = images[:batch], targets[:batch]
            steps = {
                "ours": lambda: train_step(ours, ours_optimizer, batch_images, batch_targets, autocast_dtype=dtype,
                                           clip_grad_norm=DEFAULT_CLIP_GRAD_NORM),
                "torchvision": lambda: reference_step(peer, peer_optimizer, batch_images, batch_targets, dtype),
            }
            try:
                medians = time_steps(steps, warmup, timed, device)
            except torch.cuda.OutOfMemoryError:
                ours_optimizer.zero_grad(set_to_none=True)
                peer_optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"  {name:9s} {batch:5d}  out of GPU memory: larger batches skipped", flush=True)
                break
            ours_rate, peer_rate = batch / medians["ours"], batch / medians["torchvision"]
            print(f"  {name:9s} {batch:5d} {medians['ours'] * 1000:13.1f} {ours_rate:8.2f} {medians['torchvision'] * 1000:20.1f} "
                  f"{peer_rate:8.2f} {ours_rate / peer_rate:6.3f}", flush=True)
    print("ratio: ours / torchvision images/s (above 1: ours is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
