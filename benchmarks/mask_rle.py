"""COCO RLE of an image's box-local masks, two ways side by side on the same masks:

- ``crops``: each crop copied to the host and bit-packed (``Detections.from_output``), then
  counted and compressed there (``Detections.mask_rles`` -> ``maskrcnn.masks.encode_crops``): the
  CPU default;
- ``runs``: run lengths counted on the device for the whole batch, one copy to the host
  (``maskrcnn.masks.crop_runs``), compressed there (``compress_runs``): the GPU default.

100 masks an image (28x28 smoothed random probabilities pasted at random boxes, as
``paste_masks(box_local=True)`` pastes them), 800x1067 images; prints ms per image (best of
``--repeats``) and the ratio.

    python -m benchmarks.mask_rle [--device cpu|cuda] [--images 1] [--detections 100]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maskrcnn.inference import Detections
from maskrcnn.modeling.postprocessing import paste_masks


def outputs(images: int, detections: int, height: int, width: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    result = []
    for _ in range(images):
        centre = torch.rand(detections, 2, generator=generator) * torch.tensor([width, height])
        size = torch.rand(detections, 2, generator=generator) ** 2 * torch.tensor([width, height]) * 0.6 + 8
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
        logits = F.avg_pool2d(torch.randn(detections, 1, 28, 28, generator=generator) * 6, 5, 1, 2)[:, 0]
        extents, crops = paste_masks(torch.sigmoid(logits).to(device), boxes.to(device), (height, width), 0.5, box_local=True)
        result.append({"boxes": boxes.to(device), "scores": torch.rand(detections, generator=generator).to(device),
                       "labels": torch.ones(detections, dtype=torch.int64, device=device), "mask_extents": extents, "mask_crops": crops})
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=1, help="images a batch")
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1067], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = outputs(args.images, args.detections, *args.size, device)
    sizes = [tuple(args.size)] * args.images

    def rles(runs_on_device: bool) -> list:
        return [det.mask_rles() for det in Detections.from_outputs(batch, sizes, runs_on_device=runs_on_device)]

    crops, runs = rles(False), rles(True)
    assert all(a[0] == b[0] and (a[1] == b[1]).all() for a, b in zip(crops, runs)), "the two ways disagree"
    pixels = sum(int(((o["mask_extents"][:, 2] - o["mask_extents"][:, 0]) * (o["mask_extents"][:, 3] - o["mask_extents"][:, 1])).sum())
                 for o in batch)
    print(f"{args.images} image(s) of {args.size[0]}x{args.size[1]}, {args.detections} masks each, on {device}: "
          f"crops padded to {tuple(batch[0]['mask_crops'].shape)}, {pixels / args.images / args.detections:.0f} pixels a crop on average")
    best = {}
    for _ in range(2):  # interleaved: the machine's noise falls on both
        for name, runs_on_device in (("crops", False), ("runs", True)):
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                rles(runs_on_device)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - started) / args.images)
    for name, seconds in best.items():
        print(f"{name}: {seconds * 1e3:.1f} ms an image")
    print(f"runs / crops: {best['runs'] / best['crops']:.2f}x the time")


if __name__ == "__main__":
    main()
