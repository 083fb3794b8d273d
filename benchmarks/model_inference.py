"""Model inference, ours against torchvision's Mask R-CNN R50-FPN at the same weights and images.

Side by side in one process, round-robin, on the same inputs; prints images/s and the ratios.
Three contenders:

- ``torchvision``: ``MaskRCNN`` on a frozen-BN ResNet-50-FPN, exactly as
  ``maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds it;
- ``ours fp32``: our model at the same weights, the reference path (bit-identical outputs);
- ``ours fast``: ``maskrcnn.inference.Predictor`` on the same model (norms folded into the
  convs, channels_last; bf16 autocast on a GPU; masks cropped on the device and copied to the
  host): the path ``jobs.label`` and ``jobs.evaluate`` run by default.

Weights: torchvision's initialisation with BatchNorm statistics calibrated on the images (a
random trunk with identity statistics blows up), so the features are well scaled. Both models
run with score threshold 0 so every image yields the full 100 detections and 100 pasted masks:
the worst case, and the same work on every side. Before timing, the outputs are compared
(``ours fp32`` must equal torchvision's; ``ours fast`` is reported as the share of torchvision's
detections it reproduces within 0.5 px with the same label, and its mask IoU).

    python -m benchmarks.model_inference [--device cpu|cuda] [--batch 1 8] [--min-size 800] [--images 8]

Then, to see where a forward's time goes and what might pay next: ``--stages`` times the fast
path's stages (each waited for at its end), at every batch size, over the timed images and over
one padded size (``--batch`` copies of one image: one forward, as most of COCO's images pad to
800x1088 or 1088x800); ``--cuda-graph`` replays the static part (trunk, FPN, the RPN's convs) of
that one-size batch from a CUDA graph against running it eagerly; ``--cudnn-benchmark`` lets
cuDNN time its algorithms for each new shape (``torch.backends.cudnn.benchmark``);
``--direct-convs`` adds the fast path without its Winograd convolutions (AVX2 CPUs, fp32) as a
fourth contender and prints the fast path's ratio to it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d, box_iou

from maskrcnn.checkpoint import convert_torchvision_state_dict
from maskrcnn.config import InputConfig, get_preset
from maskrcnn.modeling import build_model, nms
from maskrcnn.inference import Detections, Predictor
from maskrcnn.modeling.optimize import optimize_for_inference
from tests.tv_reference import calibrate_trunk_batch_norm


def _images(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    sizes = [(480, 640), (640, 480), (427, 640), (512, 512)]
    return [torch.rand(3, *sizes[i % len(sizes)], generator=generator) for i in range(count)]


def torchvision_model(min_size: int, max_size: int, norm_layer=FrozenBatchNorm2d, num_classes: int = 91) -> TorchvisionMaskRCNN:
    """torchvision's maskrcnn_resnet50_fpn as its COCO weights build it (frozen BN, 3 trainable
    stages), without downloading weights."""
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm_layer), 3)
    return TorchvisionMaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, box_score_thresh=0.0)


def calibrated_state(images: list[torch.Tensor], min_size: int, max_size: int) -> dict[str, torch.Tensor]:
    """torchvision's initialisation, trunk BatchNorm statistics measured on ``images``."""
    model = torchvision_model(min_size, max_size, norm_layer=torch.nn.BatchNorm2d)
    calibrate_trunk_batch_norm(model, images[:2])
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def full_output(det: Detections) -> dict[str, torch.Tensor]:
    """Detections as a model's output dict, the masks pasted back from their crops (to compare)."""
    masks = torch.zeros((len(det), *det.image_size), dtype=torch.bool)
    for d, ((y0, x0, y1, x1), crop) in enumerate(zip(det.mask_extents.tolist(), det.mask_crops())):
        masks[d, y0:y1, x0:x1] = torch.from_numpy(crop.reshape(y1 - y0, x1 - x0).astype(bool))
    return {"boxes": torch.from_numpy(det.boxes), "labels": torch.from_numpy(det.labels), "masks": masks}


def compare(reference: dict, candidate: dict) -> tuple[float, float, float]:
    """(share of the reference's detections the candidate has: same label, box within 0.5 px;
    their mean mask IoU; the largest box difference among them)."""
    reference = {k: v.cpu() for k, v in reference.items()}
    candidate = {k: v.cpu() for k, v in candidate.items()}
    n = len(reference["boxes"])
    if n == 0:
        return 1.0, 1.0, 0.0
    ious = box_iou(reference["boxes"].float(), candidate["boxes"].float())
    same = reference["labels"][:, None] == candidate["labels"][None, :]
    diff = (reference["boxes"][:, None, :] - candidate["boxes"][None, :, :]).abs().amax(-1)
    close = same & (diff <= 0.5)
    def as_bool(masks):  # torchvision's are (D, 1, H, W) probabilities; ours (D, H, W) cut at 0.5
        return masks[:, 0] >= 0.5 if masks.dim() == 4 else masks

    ref_masks, cand_masks = as_bool(reference["masks"]), as_bool(candidate["masks"])
    matched, mask_ious, worst = 0, [], 0.0
    used = torch.zeros(len(candidate["boxes"]), dtype=torch.bool)
    for i in range(n):
        options = torch.where(close[i] & ~used)[0]
        if len(options) == 0:
            continue
        j = options[ious[i, options].argmax()]
        used[j] = True
        matched += 1
        worst = max(worst, float(diff[i, j]))
        a, b = ref_masks[i], cand_masks[j]
        union = (a | b).sum()
        mask_ious.append(float((a & b).sum() / union) if union > 0 else 1.0)
    return matched / n, (sum(mask_ious) / len(mask_ious)) if mask_ious else 0.0, worst


def _time(fn, batches, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        if device.type == "cuda":
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
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="the fast path's autocast: auto = bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--score-thresh", type=float, default=0.0,
                        help="box score threshold on every side (0: every image gets 100 detections, the worst case; "
                        "torchvision's default 0.05 leaves random heads almost none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="then profile the fast path at the largest batch and print its ROWS costliest ops (device and host)")
    parser.add_argument("--stages", action="store_true", help="then time the fast path's stages (see above)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="then the static part (trunk, FPN, RPN convs) of a one-size batch, eager against a CUDA graph's replay")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--direct-convs", action="store_true",
                        help="also time the fast path without its Winograd convolutions (maskrcnn/modeling/winograd.py; "
                        "AVX2 CPUs), as a fourth contender")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    images = _images(args.images, torch.Generator().manual_seed(0))
    state = calibrated_state(images, args.min_size, args.max_size)
    reference = torchvision_model(args.min_size, args.max_size)
    reference.roi_heads.score_thresh = args.score_thresh
    reference.load_state_dict(state)
    reference.eval().to(device)
    cfg = get_preset("r50_fpn", input=InputConfig(min_size=args.min_size, max_size=args.max_size))
    cfg.roi_heads.score_thresh = args.score_thresh
    ours = build_model(cfg)
    ours.load_state_dict(convert_torchvision_state_dict(state))
    ours.eval().to(device)
    predictor = Predictor(copy.deepcopy(ours), device=device, fast=True, precision=precision)
    images = [img.to(device) for img in images]

    def run_fast(batch):
        return predictor.predict(batch)

    contenders = {"torchvision": reference, "ours fp32": ours, f"ours fast ({precision})": run_fast}
    if args.direct_convs:  # the same fast path, every convolution oneDNN's (cuDNN's) direct one
        direct = Predictor(optimize_for_inference(copy.deepcopy(ours), winograd=False), device=device, fast=False, precision=precision)
        contenders["ours fast, direct convs"] = direct.predict
    with torch.inference_mode():
        checks = []
        for image in images[:2]:
            exp, got, quick = reference([image])[0], ours([image])[0], full_output(predictor.predict([image])[0])
            assert exp["labels"].tolist() == got["labels"].tolist(), "ours fp32 differs from torchvision: the comparison would be unfair"
            checks.append((float((exp["boxes"] - got["boxes"]).abs().max()) if len(exp["boxes"]) else 0.0, *compare(exp, quick)))
        print(f"device {device}, threads {torch.get_num_threads()}, cudnn.benchmark {args.cudnn_benchmark}, "
              f"{args.images} images at min_size {args.min_size}, "
              f"{len(exp['boxes'])} detections/image")
        print(f"ours fp32 vs torchvision: same labels, max box diff {max(c[0] for c in checks):.2e} px")
        if precision == "fp32":
            print(f"ours fast vs torchvision: {min(c[1] for c in checks):.1%} of detections reproduced (box within 0.5 px, "
                  f"same label), mean mask IoU {min(c[2] for c in checks):.4f}, max box diff {max(c[3] for c in checks):.2e} px")
        else:  # random heads score every class alike, so low precision reorders everything
            print(f"ours fast ({precision}): outputs differ beyond rounding; its accuracy is checked as COCO AP "
                  f"(tests/test_overfit.py: within 0.3 points of fp32)")
        names = list(contenders)
        print(f"{'batch':>5} " + " ".join(f"{n + ' img/s':>24}" for n in names) + f" {'fp32/tv':>8} {'fast/tv':>8}"
              + (f" {'fast/direct':>11}" if args.direct_convs else ""))
        nms_stats = {}
        for batch_size in args.batch:
            nms.stats.clear()
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            for fn in contenders.values():
                fn(batches[0])  # warm-up
            seconds = {name: float("inf") for name in names}
            for _ in range(args.repeats):  # round-robin, so load changes hit every contender alike
                for name, fn in contenders.items():
                    seconds[name] = min(seconds[name], _time(fn, batches, 1, device))
            ips = {name: len(images) / s for name, s in seconds.items()}
            tv = ips["torchvision"]
            print(f"{batch_size:>5} " + " ".join(f"{ips[n]:>24.2f}" for n in names)
                  + f" {ips[names[1]] / tv:>7.2f}x {ips[names[2]] / tv:>7.2f}x"
                  + (f" {ips[names[2]] / ips[names[3]]:>10.2f}x" if args.direct_convs else ""))
            nms_stats[batch_size] = dict(nms.stats)
        print_nms_stats(nms_stats)
        if args.profile:
            profile(run_fast, [images[i:i + max(args.batch)] for i in range(0, len(images), max(args.batch))], device, args.profile)
    if args.stages:
        for batch_size in args.batch:
            print_stages(f"batch {batch_size}, the timed images", predictor, device,
                         [images[i:i + batch_size] for i in range(0, len(images), batch_size)])
        one_size = [images[0]] * max(args.batch)
        print_stages(f"batch {len(one_size)}, one padded size", predictor, device, [one_size])
    if args.cuda_graph:
        graph_probe(predictor, images[0], max(args.batch), device)


@contextlib.contextmanager
def timed_stages(model, device: torch.device):
    """Seconds spent in each stage of ``model``'s forwards while inside, a dict filled in place:
    each stage waits for the device at its start and end."""
    seconds: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stages = {"preprocess": (model.transform, None), "trunk+FPN": (model.backbone, None), "RPN convs": (model.rpn.head, None),
              "RPN (all)": (model.rpn, None), "box head + NMS": (model.roi_heads, "detect_boxes"),
              "mask head": (model.roi_heads, "predict_mask_probs"), "forward (all)": (model, None)}
    undo = []
    for name, (owner, method) in stages.items():
        def timed(fn, name=name):
            def run(*args, **kwargs):
                sync()
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                return out
            return run
        if method:  # an instance attribute in front of the bound method
            setattr(owner, method, timed(getattr(owner, method)))
            undo.append(lambda owner=owner, method=method: delattr(owner, method))
        else:
            owner.forward = timed(owner.forward)
            undo.append(lambda owner=owner: delattr(owner, "forward"))
    try:
        yield seconds
    finally:
        for fn in undo:
            fn()


def print_stages(title: str, predictor: Predictor, device: torch.device, batches: list[list[torch.Tensor]]) -> None:
    """Milliseconds an image in each stage of the fast path over one pass of ``batches`` (after a
    warm-up pass): the rest of ``predict`` is pasting, cropping and the copies to the host."""
    with torch.inference_mode():
        for batch in batches:
            predictor.predict(batch)
        with timed_stages(predictor.model, device) as seconds:
            start = time.perf_counter()
            for batch in batches:
                predictor.predict(batch)
            total = time.perf_counter() - start
    n = sum(len(b) for b in batches)
    seconds["RPN proposals (RPN less its convs)"] = seconds.pop("RPN (all)") - seconds["RPN convs"]
    seconds["postprocess, crops, copies to host"] = total - seconds.pop("forward (all)")
    print(f"stages, {title}: {1e3 * total / n:.1f} ms an image with a sync at each stage's ends; " + ", ".join(
        f"{name} {1e3 * s / n:.1f} ({s / total:.0%})" for name, s in seconds.items()))


def graph_probe(predictor: Predictor, image: torch.Tensor, batch_size: int, device: torch.device, iters: int = 20) -> None:
    """The static part of one forward (trunk, FPN, RPN convs) on ``batch_size`` copies of
    ``image``, eager against a CUDA graph's replay; their outputs compared."""
    if device.type != "cuda":
        print("cuda graph: needs a GPU")
        return
    model = predictor.model
    dtype = predictor.autocast_dtype

    def static_part(x):
        features, _ = model.features(x)
        return [*features, *(t for ts in model.rpn.head(features) for t in ts)]

    def autocast():  # a graph cannot hold autocast's cached casts
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    def timed(fn) -> float:  # seconds a call: a warm-up, then the best of 3 passes of ``iters`` calls
        fn()
        return _time(lambda _: fn(), range(iters), 3, device) / iters

    try:
        with torch.no_grad():
            batch, _ = model.transform([image] * batch_size)
            static = batch.tensor.clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), autocast():
                for _ in range(3):
                    static_part(static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), autocast():
                graphed = static_part(static)
            graph.replay()
            with autocast():
                eager = static_part(static)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(graphed, eager))
            with autocast():
                eager_s = timed(lambda: static_part(static))
            graph_s = timed(graph.replay)
            whole_s = timed(lambda: predictor.predict([image] * batch_size))
    except Exception as exc:  # a probe: say what failed, do not hide the figures above
        print(f"cuda graph: failed: {type(exc).__name__}: {str(exc)[:500]}")
        return
    print(f"cuda graph, batch {batch_size} at {tuple(static.shape[-2:])}: trunk+FPN+RPN convs eager {1e3 * eager_s:.2f} ms, "
          f"replayed {1e3 * graph_s:.2f} ms ({eager_s / graph_s:.2f}x; outputs differ by {diff:.2e}); "
          f"the whole fast-path forward {1e3 * whole_s:.2f} ms, so a graph could save {(eager_s - graph_s) / whole_s:.0%} of it")


def print_nms_stats(by_batch: dict[int, dict[str, int]]) -> None:
    """The fixed-shape NMS's record (``maskrcnn.modeling.nms.stats``) over each batch size's
    warm-up and timed runs: images through the box head's top-M NMS, how many of them fell back
    to the full NMS, and images of either fixed-shape NMS not settled in its fixed rounds."""
    if not any(stats.get("images") for stats in by_batch.values()):
        print("fixed-shape NMS: not run (it runs on accelerators; the CPU's NMS stops at the top-k)")
        return
    print(f"fixed-shape NMS (top {nms.TOP_M} candidates, {nms.ROUNDS} rounds): " + "; ".join(
        f"batch {b}: {s.get('images', 0)} images, {s.get('full_nms', 0)} full-NMS fallbacks, {s.get('unsettled', 0)} unsettled"
        for b, s in by_batch.items()))


def profile(fn, batches, device: torch.device, rows: int) -> None:
    """torch.profiler over one pass of ``fn``: the costliest ops by self time on the device (or
    the CPU), the host's, and the share of wall time the device was busy."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in averages) / 1e6
        print(f"profile: {len(batches)} batches in {wall:.3f} s under the profiler; device busy {busy:.3f} s ({busy / wall:.0%})")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
