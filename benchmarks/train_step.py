"""Training images/s of jobs.train's per-worker step against torchvision's reference training loop.

Both sides run in this process on the same device, the same batch of images and targets (from
the synthetic shapes dataset) and the same weights, in turns, so that a shared, noisy machine
slows both alike:

- ours: ``maskrcnn.modeling.build_model(r50_fpn)`` and ``maskrcnn.engine.train_step``, the step
  every Ray Train worker runs (forward under the job's autocast, backward, SGD step);
- peer: torchvision's ``maskrcnn_resnet50_fpn`` assembled as its builder does for a pretrained
  trunk (frozen BatchNorm, 3 trainable ResNet stages), stepped as
  ``references/detection/engine.py::train_one_epoch`` does.

The learning rate is 0: the weights here are random, and a diverging model would change the
work (the number of proposals) from step to step. Prints each side's median step time and
images/s, and the ratio ours / torchvision (above 1: ours is faster). Absolute figures mean
something only on a GPU.

    python -m benchmarks.train_step [--batch-size 2] [--steps N] [--min-size 800 --max-size 1333]
                                    [--device auto] [--precision auto]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2, help="images per step, as per worker in jobs.train (default 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per side, after untimed warm-up ones (default: 20 on a GPU, 3 on a CPU)"
    )
    parser.add_argument("--min-size", type=int, default=None, help="default: 800 on a GPU, 320 on a CPU")
    parser.add_argument("--max-size", type=int, default=None, help="default: 1333 on a GPU, 480 on a CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="as jobs.train --precision")
    args = parser.parse_args(argv)

    from benchmarks.model_inference import torchvision_model
    from jobs.training.worker import targets_to
    from maskrcnn.engine import autocast_dtype, train_step
    from maskrcnn.checkpoint import load_state
    from maskrcnn.config import get_preset
    from maskrcnn.data import CocoDataset, collate_fn, make_sample_dataset
    from maskrcnn.modeling import build_model

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    min_size = args.min_size or (800 if gpu else 320)
    max_size = args.max_size or (1333 if gpu else 480)
    autocast_to = autocast_dtype(args.precision, device)
    timed = args.steps or (20 if gpu else 3)
    warmup = 5 if gpu else 1

    with tempfile.TemporaryDirectory() as folder:
        annotations, images_uri = make_sample_dataset(folder, {"train": args.batch_size}, seed=0)["train"]
        dataset = CocoDataset(annotations, images_uri)
        images, targets = collate_fn([dataset[i] for i in range(args.batch_size)])
    images = [image.to(device) for image in images]
    targets = targets_to(targets, device)
    num_classes = dataset.num_classes

    torch.manual_seed(0)
    peer = torchvision_model(min_size, max_size, num_classes=num_classes)  # the score threshold does not touch training
    config = get_preset("r50_fpn", num_classes=num_classes)
    config = config.replace(input=type(config.input)(min_size=min_size, max_size=max_size))
    ours = build_model(config)
    load_state(ours, peer.state_dict(), "torchvision maskrcnn_resnet50_fpn")  # the same weights on both sides
    sides = {}
    for name, model in (("ours", ours), ("torchvision", peer)):
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        sides[name] = (model, torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4))
    steps = {
        "ours": lambda m, o: train_step(m, o, images, targets, autocast_dtype=autocast_to),
        "torchvision": lambda m, o: reference_step(m, o, images, targets, autocast_to),
    }

    times: dict[str, list[float]] = {name: [] for name in sides}
    for iteration in range(warmup + timed):
        order = list(sides) if iteration % 2 == 0 else list(reversed(sides))  # alternate who goes first
        for name in order:
            model, optimizer = sides[name]
            sync(device)
            started = time.perf_counter()
            steps[name](model, optimizer)
            sync(device)
            if iteration >= warmup:
                times[name].append(time.perf_counter() - started)

    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"r50_fpn training step, batch {args.batch_size}, images {min_size}-{max_size} px, {where}, "
          f"autocast {autocast_to or 'off'}, median of {timed} steps:")
    rates = {}
    for name in sides:
        median = statistics.median(times[name])
        rates[name] = args.batch_size / median
        print(f"  {name:12s} {median * 1000:9.1f} ms/step  {rates[name]:8.2f} images/s")
    print(f"ratio ours / torchvision: {rates['ours'] / rates['torchvision']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
