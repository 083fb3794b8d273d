"""jobs.label's pipeline against the same model in a plain loop over the same images.

The peer is what one would write without Ray: for each image, read the file, decode it, run
the model, encode its masks as COCO RLE (batch 1; torch's default threads or one thread,
whichever is faster here). The pipeline is ``jobs.label`` on a local Ray over the same cores.
The ceiling is the model alone: its forward over images already decoded, in memory.

A pipeline run has fixed costs (the actors start, import torch and load the checkpoint) that a
10-million-image run never notices, so the pipeline is run over N and over 2N images and its
steady rate is the marginal one: N / (T(2N) - T(N)). The ratio, steady pipeline images/s over
loop images/s, is the pipeline's efficiency. Figures are CPU here; quote absolute images/s only
from a GPU (shared/DESIGN.md, "Performance method").

    python -m benchmarks.label_pipeline [--images 96] [--arch small] [--batch-size 1] [--num-actors N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch


def plain_loop(uris: list[str], model, device: str) -> tuple[float, int]:
    """Read, decode, model, RLE: one image at a time, at the precision jobs.label runs."""
    from jobs.labeling.decode import decode_image
    from maskrcnn.engine import autocast_context, autocast_dtype
    from maskrcnn.masks import encode_masks

    dtype = autocast_dtype("auto", torch.device(device))
    detections = 0
    started = time.perf_counter()
    for uri in uris:
        image = decode_image(Path(uri).read_bytes(), 10**8)
        with torch.inference_mode(), autocast_context(torch.device(device), dtype):
            out = model([image.to(device)])[0]
        detections += len(encode_masks(out["masks"].cpu()))
    return time.perf_counter() - started, detections


def model_alone(uris: list[str], model, device: str, batch_size: int) -> float:
    """The model's forward alone on images already decoded and on the device, at the precision
    jobs.label runs (bf16 on a GPU): the ceiling."""
    from jobs.labeling.decode import decode_image
    from maskrcnn.engine import autocast_context, autocast_dtype

    dtype = autocast_dtype("auto", torch.device(device))
    images = [decode_image(Path(uri).read_bytes(), 10**8).to(device) for uri in uris]
    with torch.inference_mode(), autocast_context(torch.device(device), dtype):
        model(images[:batch_size])  # warm-up (cuDNN picks its algorithms)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def resize_to_jpeg(folder: Path, size: tuple[int, int]) -> None:
    """Each synthetic PNG under ``folder`` -> a JPEG of ``size`` (height, width), as COCO's are."""
    from PIL import Image

    for png in sorted(folder.rglob("*.png")):
        with Image.open(png) as image:
            image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()


def run_job(images_dir: Path, output: Path, checkpoint: Path, args) -> tuple[float, int, str]:
    """(seconds of the Ray Data run, detections, the job's stdout)."""
    from jobs.label import main as label_main

    command = ["--input", str(images_dir), "--output", str(output), "--checkpoint", str(checkpoint),
               "--batch-size", str(args.batch_size), "--shard-size", "16", "--cpus-per-actor", str(args.cpus_per_actor)]
    if args.num_actors:
        command += ["--num-actors", str(args.num_actors)]
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = label_main(command)
    text = buffer.getvalue()
    if code != 0:
        raise SystemExit(text)
    match = re.search(r"labelled (\d+) images in ([\d.]+) s .*: (\d+) detections", text)
    return float(match[2]), int(match[3]), text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="N: the pipeline runs over N and 2N images, the loop over 2N")
    parser.add_argument("--arch", default="small", help="model preset, random weights (small: 50 detections an image)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-actors", type=int, default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--image-size", default=None, metavar="HxW",
                        help="turn the synthetic images into HxW JPEGs (e.g. 480x640, COCO's usual; default: the PNGs as made)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="the model's box score threshold (0: up to 100 detections an image, the most encoding)")
    args = parser.parse_args(argv)
    image_size = tuple(int(v) for v in args.image_size.lower().split("x")) if args.image_size else None

    import ray

    from maskrcnn.checkpoint import load_checkpoint, save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.data.synthetic import CATEGORIES, make_sample_dataset
    from maskrcnn.modeling import build_model
    from maskrcnn.modeling.optimize import optimize_for_inference

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    n = args.images
    make_sample_dataset(str(work / "small"), {"set": n}, seed=0)
    make_sample_dataset(str(work / "large"), {"set": n, "more": n}, seed=0)  # the first N are the same images
    if image_size:
        resize_to_jpeg(work / "small", image_size)
        resize_to_jpeg(work / "large", image_size)
    uris = sorted(str(p) for p in (work / "large").rglob("*.*g"))
    torch.manual_seed(0)
    config = get_preset(args.arch, num_classes=len(CATEGORIES) + 1)
    if args.score_threshold is not None:
        config.roi_heads.score_thresh = args.score_threshold
    model = build_model(config).eval()
    if args.arch.startswith("r50"):
        # torchvision's initialisation with trunk statistics measured on these images: a random
        # trunk with identity statistics blows up (benchmarks.model_inference)
        from benchmarks.model_inference import calibrated_state
        from jobs.labeling.decode import decode_image
        from maskrcnn.checkpoint import convert_torchvision_state_dict

        sample = [decode_image(Path(uri).read_bytes(), 10**8) for uri in uris[:2]]
        state = calibrated_state(sample, config.input.min_size, config.input.max_size)
        state = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor") and not k.startswith("roi_heads.mask_predictor.mask_fcn_logits")}
        model.load_state_dict(convert_torchvision_state_dict(state), strict=False)  # the class layers keep our num_classes
    checkpoint = work / "model.pt"
    save_checkpoint(str(checkpoint), model, config, CATEGORIES)
    del model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = os.cpu_count() or 1
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{len(uris)} synthetic images ({args.image_size or '160-320 px'}), {args.arch} preset (random weights), {where}, "
          f"{cpus} CPUs, torch {torch.__version__}")

    # the model as the pipeline's actors run it: the fast path (maskrcnn.modeling.optimize)
    model = optimize_for_inference(load_checkpoint(str(checkpoint)).model.to(device))
    default_threads = torch.get_num_threads()
    trial = {}
    for threads in sorted({default_threads, 1}):
        torch.set_num_threads(threads)
        plain_loop(uris[:2], model, device)  # warm-up
        trial[threads] = plain_loop(uris[:16], model, device)[0]
    best_threads = min(trial, key=trial.get)
    torch.set_num_threads(best_threads)
    loop_s, loop_dets = plain_loop(uris, model, device)
    alone_s = model_alone(uris, model, device, args.batch_size)
    torch.set_num_threads(default_threads)
    del model

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    small_s, _, _ = run_job(work / "small", work / "labels-small", checkpoint, args)
    large_s, pipe_dets, text = run_job(work / "large", work / "labels-large", checkpoint, args)
    ray.shutdown()
    actors = re.search(r"with (\d+) model actor", text)[1]

    loop_rate = len(uris) / loop_s
    steady = n / max(large_s - small_s, 1e-9)
    print(f"{'':<50}{'images/s':>10}{'detections':>12}")
    alone_rate = len(uris) / alone_s
    print(f"{f'model alone (decoded images, batch {args.batch_size})':<50}{alone_rate:>10.2f}")
    print(f"{f'plain loop, {best_threads} torch thread(s)':<50}{loop_rate:>10.2f}{loop_dets:>12}")
    print(f"{f'pipeline, whole run over {2 * n} (with start-up)':<50}{2 * n / large_s:>10.2f}{pipe_dets:>12}")
    print(f"{f'pipeline, steady: {n} / (T({2 * n}) - T({n}))':<50}{steady:>10.2f}")
    print(f"ratio pipeline/loop: {steady / loop_rate:.2f} steady, {2 * n / large_s / loop_rate:.2f} whole run "
          f"({actors} actor(s) x {args.cpus_per_actor:g} CPU, batch {args.batch_size}; T({n}) = {small_s:.1f} s, T({2 * n}) = {large_s:.1f} s)")
    print(f"ratio pipeline/model alone: {steady / alone_rate:.2f} steady (on a GPU the goal is >= 0.9; on a CPU the "
          f"actors share the cores with decode and encode, so it cannot get there)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
