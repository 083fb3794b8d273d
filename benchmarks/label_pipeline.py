"""jobs.label's pipeline against the same model in a plain loop over the same images.

The peer is what one would write without Ray: for each image, read the file, decode it, run
the model, encode its masks as COCO RLE (batch 1; torch's default threads or one thread,
whichever is faster here). The pipeline is ``jobs.label`` on a local Ray over the same cores.
The ceiling is the model alone: its forward over images already decoded, in memory.

A pipeline run has fixed costs (the actors start, import torch and load the checkpoint) that a
10-million-image run never notices. After a warm-up run (Ray's workers start and import once),
the timed run's steady rate is taken from its shard commits: the images committed after the
first commit over the time from the first to the last. The ratio of that to the model alone is
the pipeline's efficiency (the goal on a GPU: at least 0.9). Figures are CPU here; quote
absolute images/s only from a GPU (shared/DESIGN.md, "Performance method").

    python -m benchmarks.label_pipeline [--images 96] [--arch small] [--batch-size 1] [--num-actors N]
    # CPU only, end to end against the loop a user would write (torchvision's model, PIL, one image
    # at a time, torch's default threads), Ray start included: --cpu-vs-loop (below)
    python -m benchmarks.label_pipeline --cpu-vs-loop [--images 120] [--variant "--cpus-per-actor 1" ...]
    # on a GPU, COCO-like: R50-FPN, 480x640 JPEGs, 100 detections an image
    python -m benchmarks.label_pipeline --arch r50_fpn --image-size 480x640 --score-threshold 0 \\
        --images 2000 --distinct 64 --loop-images 64 --batch-size 8 --shard-size 64
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


def plain_loop(uris: list[str], predictor) -> tuple[float, int]:
    """Read, decode, predict, RLE: one image at a time, as jobs.label's actors run the model
    (``maskrcnn.inference.Predictor``)."""
    from maskrcnn.inference import prepare_image

    detections = 0
    started = time.perf_counter()
    for uri in uris:
        (found,) = predictor.predict([prepare_image(Path(uri).read_bytes(), *predictor.input_size)])
        detections += len(found.mask_rles()[0])
    return time.perf_counter() - started, detections


def model_alone(uris: list[str], predictor, batch_size: int) -> float:
    """jobs.label's model stage alone (``maskrcnn.inference.Predictor``: fast path, the precision
    jobs.label runs, masks cropped and copied to the host) on images already decoded and on the
    device: the ceiling."""
    from maskrcnn.data.images import decode_image

    device = predictor.device.type
    images = [decode_image(Path(uri).read_bytes(), 10**8).to(device) for uri in uris]
    predictor.predict(images[:batch_size])  # warm-up (cuDNN picks its algorithms)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predictor.predict(images[i : i + batch_size])
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


def run_job(images_dir: Path, output: Path, checkpoint: Path, args, in_flight: int | None = None) -> tuple[float, int, str]:
    """(seconds of the Ray Data run, detections, the job's stdout)."""
    from jobs.label import main as label_main

    command = ["--input", str(images_dir), "--output", str(output), "--checkpoint", str(checkpoint),
               "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    if args.cpus_per_actor is not None:
        command += ["--cpus-per-actor", str(args.cpus_per_actor)]
    if args.num_actors:
        command += ["--num-actors", str(args.num_actors)]
    if in_flight:
        command += ["--batches-in-flight", str(in_flight)]
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = label_main(command)
    text = buffer.getvalue()
    if code != 0:
        raise SystemExit(text)
    match = re.search(r"labelled (\d+) images in ([\d.]+) s .*: (\d+) detections", text)
    return float(match[2]), int(match[3]), text


def commit_times(output: Path) -> list[tuple[float, int]]:
    """(time, rows) of each committed part file of a label run, in commit order."""
    import pyarrow.parquet as pq

    parts = [(p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in output.glob("part-*.parquet")]
    return sorted(parts)


def steady_rate(parts: list[tuple[float, int]]) -> float:
    """Images/s between the first and the last commit: the run's rate once every stage is busy
    (the first commit waits for the actors to start and load the model)."""
    if len(parts) < 3:
        return float("nan")
    return sum(rows for _, rows in parts[1:]) / max(parts[-1][0] - parts[0][0], 1e-9)


CPU_VS_LOOP_DOC = """jobs.label end to end on the CPU against the loop a user would write.

The loop: torchvision's ``maskrcnn_resnet50_fpn`` in eval mode loaded from a state dict file,
each image opened with PIL and turned into a tensor, one image at a time, torch's default
threads; timed from loading the model to its last output. jobs.label: the same state dict as a
bare torchvision checkpoint (``--arch r50_fpn``), every option at its default, called in this
process with no Ray running (``--address local``: it starts its own private Ray), timed from the
call to its return: Ray's start, the actors' start and model load, and the writing of the
Parquet included. Same images (JPEGs of 320-512 px a side), same weights (torchvision's
initialisation, trunk statistics calibrated on the images), same score threshold (torchvision's
0.05 unless --score-threshold). The machine's load average is printed beside each run: on a
shared machine, threads of other programs slow both sides, intra-op threads most.
"""


def cpu_vs_loop(args) -> int:
    import random

    import torchvision
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from benchmarks.model_inference import calibrated_state
    from jobs.common import shutdown_ray
    from jobs.label import main as label_main
    from maskrcnn.data.synthetic import make_sample_dataset

    n = args.images
    work = Path(tempfile.mkdtemp(prefix="label-cpu-vs-loop-"))
    make_sample_dataset(str(work / "made"), {"set": min(n, 24)}, seed=0)
    made = sorted((work / "made").rglob("*.png"))
    rng = random.Random(0)
    (work / "images").mkdir()
    for i in range(n):
        height, width = rng.randint(320, 512), rng.randint(320, 512)
        with Image.open(made[i % len(made)]) as image:
            image.convert("RGB").resize((width, height), Image.BILINEAR).save(work / "images" / f"{i:05d}.jpg", quality=90)
    uris = sorted(str(p) for p in (work / "images").iterdir())
    sample = [to_tensor(Image.open(uri).convert("RGB")) for uri in uris[:2]]
    checkpoint = work / "maskrcnn_resnet50_fpn.pth"
    torch.manual_seed(0)
    torch.save(calibrated_state(sample, 800, 1333), checkpoint)
    threshold = 0.05 if args.score_threshold is None else args.score_threshold
    print(f"{n} JPEGs of 320-512 px, R50-FPN (a torchvision state dict, calibrated random weights), score threshold {threshold:g}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads by default)", flush=True)

    def load() -> str:
        return "load average %.2f %.2f %.2f" % os.getloadavg()

    def loop() -> tuple[float, int]:
        started = time.perf_counter()
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=threshold)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        model.eval()
        detections = 0
        with torch.inference_mode():
            for uri in uris:
                image = to_tensor(Image.open(uri).convert("RGB"))
                detections += len(model([image])[0]["scores"])
        return time.perf_counter() - started, detections

    def job(extra: list[str]) -> tuple[float, int, str, float]:
        output = work / f"labels-{uuid_hex()}"
        command = ["--input", str(work / "images"), "--output", str(output), "--checkpoint", str(checkpoint), "--arch", "r50_fpn",
                   "--address", "local", *extra]
        if args.score_threshold is not None:
            command += ["--score-threshold", str(args.score_threshold)]
        buffer = StringIO()
        started = time.perf_counter()
        with redirect_stdout(buffer):
            code = label_main(command)
        seconds = time.perf_counter() - started
        shutdown_ray()
        text = buffer.getvalue()
        if code != 0:
            raise SystemExit(text)
        done = re.search(r"labelled \d+ images in ([\d.]+) s .*: (\d+) detections", text)
        actors = re.search(r"with (\d+ model actor\(s\) \(.*?\)), batch", text)[1]
        return seconds, int(done[2]), actors, float(done[1])

    variants = [[]] + [v.split() for v in args.variant]
    print(f"plain loop ... ({load()})", flush=True)
    loop_s, loop_dets = loop()
    print(f"plain loop: {loop_s:.1f} s, {n / loop_s:.3f} images/s, {loop_dets} detections ({load()})", flush=True)
    results = []
    for extra in variants:
        name = "jobs.label " + (" ".join(extra) or "(defaults)")
        print(f"{name} ... ({load()})", flush=True)
        job_s, job_dets, actors, pipeline_s = job(extra)
        results.append((name, job_s, job_dets, actors))
        print(f"{name}: {job_s:.1f} s, {n / job_s:.3f} images/s, {job_dets} detections, {actors}; of which the Ray Data run "
              f"{pipeline_s:.1f} s, start-up (Ray, checkpoint check, plan) {job_s - pipeline_s:.1f} s ({load()})", flush=True)
    if args.loop_again:
        print(f"plain loop again ... ({load()})", flush=True)
        again_s, _ = loop()
        print(f"plain loop again: {again_s:.1f} s ({load()}); the ratios below use the mean of both loops", flush=True)
        loop_s = (loop_s + again_s) / 2
    for name, job_s, job_dets, actors in results:
        print(f"ratio {name} / plain loop, end to end: {loop_s / job_s:.2f}x  ({actors})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-vs-loop", action="store_true",
                        help="jobs.label at its defaults end to end against a plain torchvision loop on the CPU: "
                        + CPU_VS_LOOP_DOC.split("\n\n")[1].replace("\n", " "))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OPTIONS",
        help='--cpu-vs-loop: also time jobs.label with these options (e.g. "--cpus-per-actor 1", the old default); repeatable',
    )
    parser.add_argument(
        "--loop-again", action="store_true", help="--cpu-vs-loop: time the loop again after the jobs (drift of the machine's load)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="N: images in the timed pipeline run and the model-alone run (default 96; --cpu-vs-loop: 120)",
    )
    parser.add_argument("--distinct", type=int, default=None, help="distinct synthetic images, copied to make N (default N)")
    parser.add_argument("--loop-images", type=int, default=None, help="images for the plain loop (default N)")
    parser.add_argument("--arch", default="small", help="model preset, random weights (small: 50 detections an image)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--num-actors", type=int, default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="jobs.label --cpus-per-actor (default: the job's)")
    parser.add_argument(
        "--batches-in-flight",
        type=int,
        nargs="+",
        default=[None],
        help="jobs.label --batches-in-flight; several values: one timed run each (default: the job's)",
    )
    parser.add_argument(
        "--image-size",
        default=None,
        metavar="HxW",
        help="turn the synthetic images into HxW JPEGs (e.g. 480x640, COCO's usual; default: the PNGs as made)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="the model's box score threshold (0: up to 100 detections an image, the most encoding)",
    )
    args = parser.parse_args(argv)
    if args.cpu_vs_loop:
        args.images = args.images or 120
        return cpu_vs_loop(args)
    args.images = args.images or 96
    image_size = tuple(int(v) for v in args.image_size.lower().split("x")) if args.image_size else None

    import ray

    from maskrcnn.checkpoint import load_checkpoint, save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.data.synthetic import CATEGORIES, make_sample_dataset
    from maskrcnn.modeling import build_model
    from maskrcnn.inference import Predictor

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    n = args.images
    distinct = min(args.distinct or n, n)
    make_sample_dataset(str(work / "made"), {"set": distinct}, seed=0)
    if image_size:
        resize_to_jpeg(work / "made", image_size)
    made = sorted((work / "made").rglob("*.*g"))
    for folder, count in (("warm", min(n, 4 * args.shard_size)), ("timed", n)):
        (work / folder).mkdir()
        for i in range(count):  # copies, not links: each is read and decoded as its own file
            shutil.copyfile(made[i % len(made)], work / folder / f"{i:07d}{made[i % len(made)].suffix}")
    uris = sorted(str(p) for p in (work / "timed").iterdir())
    torch.manual_seed(0)
    config = get_preset(args.arch, num_classes=len(CATEGORIES) + 1)
    if args.score_threshold is not None:
        config.roi_heads.score_thresh = args.score_threshold
    model = build_model(config).eval()
    if args.arch.startswith("r50"):
        # torchvision's initialisation with trunk statistics measured on these images: a random
        # trunk with identity statistics blows up (benchmarks.model_inference)
        from benchmarks.model_inference import calibrated_state
        from maskrcnn.data.images import decode_image
        from maskrcnn.checkpoint import convert_torchvision_state_dict

        sample = [decode_image(Path(uri).read_bytes(), 10**8) for uri in uris[:2]]
        state = calibrated_state(sample, config.input.min_size, config.input.max_size)
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("roi_heads.box_predictor") and not k.startswith("roi_heads.mask_predictor.mask_fcn_logits")
        }
        model.load_state_dict(convert_torchvision_state_dict(state), strict=False)  # the class layers keep our num_classes
    checkpoint = work / "model.pt"
    save_checkpoint(str(checkpoint), model, config, CATEGORIES)
    del model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = os.cpu_count() or 1
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"{n} images ({distinct} distinct synthetic ones, {args.image_size or '160-320 px'}), {args.arch} preset (random weights), "
        f"{where}, {cpus} CPUs, torch {torch.__version__}"
    )

    # the model as the pipeline's actors run it (maskrcnn.inference.Predictor: the fast path)
    predictor = Predictor(load_checkpoint(str(checkpoint)).model, device=device, fast=True, max_batch=args.batch_size)
    loop_uris = uris[: args.loop_images or n]
    default_threads = torch.get_num_threads()
    trial = {}
    for threads in sorted({default_threads, 1}):
        torch.set_num_threads(threads)
        plain_loop(uris[:2], predictor)  # warm-up
        trial[threads] = plain_loop(uris[:8], predictor)[0]
    best_threads = min(trial, key=trial.get)
    torch.set_num_threads(best_threads)
    loop_s, loop_dets = plain_loop(loop_uris, predictor)
    alone_s = model_alone(uris, predictor, args.batch_size)
    torch.set_num_threads(default_threads)
    del predictor
    if device == "cuda":
        torch.cuda.empty_cache()

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    run_job(work / "warm", work / "labels-warm", checkpoint, args)  # Ray's workers start and import once
    runs = []
    for in_flight in args.batches_in_flight:
        output = work / f"labels-{in_flight}"
        run_s, pipe_dets, text = run_job(work / "timed", output, checkpoint, args, in_flight)
        flight = re.search(r"(\d+) batch\(es\) in flight", text)[1]
        runs.append((flight, run_s, pipe_dets, steady_rate(commit_times(output))))
    ray.shutdown()
    actors = re.search(r"with (\d+ model actor\(s\) \(.*?\)), batch", text)[1]

    loop_rate = len(loop_uris) / loop_s
    alone_rate = n / alone_s
    print(f"{'':<60}{'images/s':>10}{'detections':>12}")
    print(f"{f'model alone (decoded images on the device, batch {args.batch_size})':<60}{alone_rate:>10.2f}")
    print(f"{f'plain loop over {len(loop_uris)}, {best_threads} torch thread(s)':<60}{loop_rate:>10.2f}{loop_dets:>12}")
    for flight, run_s, pipe_dets, steady in runs:
        print(f"{f'pipeline, {flight} batch(es) in flight, whole run over {n} (start-up)':<60}{n / run_s:>10.2f}{pipe_dets:>12}")
        print(f"{f'pipeline, {flight} batch(es) in flight, steady (shard commits)':<60}{steady:>10.2f}")
    print(f"({actors}, batch {args.batch_size}, shards of {args.shard_size})")
    for flight, run_s, pipe_dets, steady in runs:
        print(f"ratio pipeline/loop with {flight} in flight: {steady / loop_rate:.2f} steady, {n / run_s / loop_rate:.2f} whole run")
        print(
            f"ratio pipeline/model alone with {flight} in flight: {steady / alone_rate:.2f} steady (on a GPU the goal is >= 0.9; "
            f"on a CPU the actors share the cores with decode and encode, so it cannot get there)"
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
