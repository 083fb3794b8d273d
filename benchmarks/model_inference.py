"""Model inference, ours against torchvision's maskrcnn_resnet50_fpn at the same weights and images.

Side by side in one process, alternating, on the same inputs; prints images/s and the ratio.
Both models run with score threshold 0 so every image yields the full 100 detections and 100
pasted masks: the worst case, and the same work on both sides (outputs are checked equal).

    python -m benchmarks.model_inference [--device cpu|cuda] [--batch 1 8] [--min-size 800] [--images 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.checkpoint import convert_torchvision_state_dict
from maskrcnn.config import InputConfig, get_preset
from maskrcnn.modeling import build_model


def _images(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    sizes = [(480, 640), (640, 480), (427, 640), (512, 512)]
    return [torch.rand(3, *sizes[i % len(sizes)], generator=generator) for i in range(count)]


def _time(fn, batches, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=args.min_size, max_size=args.max_size, box_score_thresh=0.0)
    reference.eval().to(device)
    cfg = get_preset("r50_fpn", input=InputConfig(min_size=args.min_size, max_size=args.max_size))
    cfg.roi_heads.score_thresh = 0.0
    ours = build_model(cfg)
    ours.load_state_dict(convert_torchvision_state_dict(reference.state_dict()))
    ours.eval().to(device)

    images = [img.to(device) for img in _images(args.images, torch.Generator().manual_seed(0))]
    with torch.inference_mode():
        exp, got = reference(images[:1])[0], ours(images[:1])[0]
        assert exp["labels"].tolist() == got["labels"].tolist(), "outputs differ: the comparison would be unfair"
        max_box = (exp["boxes"] - got["boxes"]).abs().max().item() if len(exp["boxes"]) else 0.0
        print(f"device {device}, {args.images} images at min_size {args.min_size}, {len(exp['boxes'])} detections/image; max box diff {max_box:.2e} px")
        print(f"{'batch':>5} {'torchvision img/s':>18} {'ours img/s':>11} {'ratio':>6}")
        for batch_size in args.batch:
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            reference(batches[0]); ours(batches[0])  # warm-up
            t_ref = _time(reference, batches, args.repeats)
            t_ours = _time(ours, batches, args.repeats)
            ips_ref, ips_ours = len(images) / t_ref, len(images) / t_ours
            print(f"{batch_size:>5} {ips_ref:>18.2f} {ips_ours:>11.2f} {ips_ours / ips_ref:>6.2f}x")


if __name__ == "__main__":
    main()
