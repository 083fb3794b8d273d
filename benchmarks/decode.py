"""Decoding JPEGs: what jobs.label's CPU decode tasks do against torchvision's decoders, on the
CPU and (where there is one) batched on the GPU with nvJPEG.

jobs.label decodes in CPU tasks (``maskrcnn.inference.prepare_image``: Pillow, EXIF orientation,
the size checks) and sends the images to the model actors. At a GPU's rate of R images/s a node
needs R / (images/s per core) cores of decoding per GPU; this prints that figure, and what
decoding on the GPU would cost the GPU instead (``torchvision.io.decode_jpeg(device="cuda")``),
with how far its pixels are from Pillow's (another IDCT and chroma upsampling: the labels would
move by more than float rounding).

    python -m benchmarks.decode [--images 64] [--image-size 480x640] [--batch 8 32] [--gpu-rate 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision
from torchvision.io import decode_jpeg

from benchmarks.label_pipeline import resize_to_jpeg
from benchmarks.model_inference import _time
from maskrcnn.data.synthetic import make_sample_dataset
from maskrcnn.inference import prepare_image


def _best(fn, repeats: int, device: str = "cpu") -> float:
    """Seconds of one call of ``fn`` after a warm-up, the best of ``repeats``."""
    fn()
    return _time(lambda _: fn(), [None], repeats, torch.device(device))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", default="480x640", help="HxW of the JPEGs (COCO's usual 480x640)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="images per decode_jpeg call on the GPU")
    parser.add_argument("--gpu-rate", type=float, default=200.0, help="a model's images/s per GPU, to size the CPU decoding for")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one decode task holds one CPU
    height, width = (int(v) for v in args.image_size.lower().split("x"))

    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    try:
        make_sample_dataset(str(work), {"set": args.images}, seed=0)
        resize_to_jpeg(work, (height, width))
        data = [p.read_bytes() for p in sorted(work.rglob("*.jpg"))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(data)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; {n} JPEGs of {width}x{height}, "
          f"{sum(map(len, data)) / n / 1e3:.0f} KB on average; CPU figures on one thread")

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    ours = [prepare_image(d, 800, 1333).image for d in data]
    job_s = _best(lambda: [prepare_image(d, 800, 1333) for d in data], args.repeats)
    tv_s = _best(lambda: [decode_jpeg(t) for t in tensors], args.repeats)
    print(f"jobs.label's decode (Pillow, prepare_image): {1e3 * job_s / n:.2f} ms an image, {n / job_s:.0f} images/s a core: "
          f"{args.gpu_rate * job_s / n:.1f} cores a GPU at {args.gpu_rate:g} images/s")
    print(f"torchvision decode_jpeg on the CPU: {1e3 * tv_s / n:.2f} ms an image "
          f"({job_s / tv_s:.2f}x as fast as jobs.label's whole decode)")
    cpu_diff = max(int((a.int() - decode_jpeg(t).int()).abs().max()) for a, t in zip(ours, tensors))
    print(f"  pixels against Pillow's: at most {cpu_diff} levels apart")

    if not torch.cuda.is_available():
        print("on the GPU: no GPU here")
        return
    for batch in args.batch:
        chunks = [tensors[i:i + batch] for i in range(0, n, batch)]
        try:
            gpu_s = _best(lambda: [decode_jpeg(c, device="cuda") for c in chunks], args.repeats, "cuda")
        except Exception as exc:  # an older torchvision: no batched GPU decode
            print(f"decode_jpeg on the GPU, batch {batch}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        print(f"decode_jpeg on the GPU, batch {batch}: {1e3 * gpu_s / n:.3f} ms an image of wall time, {n / gpu_s:.0f} images/s "
              f"({100 * gpu_s / n * args.gpu_rate:.1f}% of a GPU running {args.gpu_rate:g} images/s, if it did nothing else meanwhile)")
    try:
        decoded = [decode_jpeg(t, device="cuda").cpu() for t in tensors]
    except Exception as exc:
        print(f"decode_jpeg on the GPU: failed: {type(exc).__name__}: {str(exc)[:300]}")
        return
    diffs = [(a.int() - b.int()).abs() for a, b in zip(ours, decoded)]
    print(f"  pixels against Pillow's: at most {max(int(d.max()) for d in diffs)} levels apart, "
          f"{sum(float(d.float().mean()) for d in diffs) / n:.3f} on average")


if __name__ == "__main__":
    main()
