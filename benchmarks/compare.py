"""Speed against accuracy: our Mask R-CNN v1 and v2 beside torchvision's one-stage detectors.

    python -m benchmarks.compare [--steps 24] [--images 16] [--val-images 8] [--min-size 320] [--batch-size 2]
                                 [--threads 1] [--models r50_fpn,r50_fpn_v2,retinanet,fcos,ssdlite] [--output docs]

The contenders: Mask R-CNN R50-FPN (the ``r50_fpn`` preset) and its v2 (``r50_fpn_v2``), built
from this project's parts, and torchvision's RetinaNet (``retinanet_resnet50_fpn``), FCOS
(``fcos_resnet50_fpn``) and SSDlite (``ssdlite320_mobilenet_v3_large``). No weights are
downloaded: each model starts from its random initialisation, built the way torchvision builds
its detectors without weights (a trunk with trainable BatchNorm, every stage trained), and all
are trained the same way: the same sample images (``maskrcnn.data.synthetic``, as ``make demo``
makes them), the same batches and flips (``benchmarks.ablation.batch_schedule``), steps, seed
and input size, with the project's one recipe (``maskrcnn.engine``: SGD, warmup, steps down,
gradient clipping). One inference setting for all: score >= 0.05, at most 100 detections an
image. SSDlite always sees its fixed square (320 x 320); the others a short side of ``--min-size``.

Each is scored on the held-out split with COCO box AP (and mask AP for the Mask R-CNNs) by the
project's one evaluation loop (``maskrcnn.evaluation.evaluate_model``, pycocotools' COCOeval),
then all are timed side by side in this process, round-robin (eval mode, fp32, a plain
``model(images)``; best of ``--repeats``): images/s at batch 1 and at batch 8 on the held-out
images. Writes ``<output>/speed_accuracy.png`` (AP against images/s on a log axis, one point a
model: the AP measured here, and beside it torchvision's published COCO AP of each model at the
same measured speed) and ``<output>/speed_accuracy.md`` (both tables, the settings, what the
small-data setting can and cannot show); prints the table and the ratios against Mask R-CNN v1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

# ---- the contenders ------------------------------------------------------------------------

SCORE_THRESH = 0.05  # Mask R-CNN's; torchvision's one-stage defaults differ (0.001 to 0.2)
DETECTIONS_PER_IMAGE = 100  # COCO's AP counts the best 100 of an image


@dataclass(frozen=True)
class Published:
    """torchvision's COCO val2017 figures of the model's checkpoint (its docs, and its weights'
    ``meta["_metrics"]``)."""

    weights: str  # the torchvision weights enum, e.g. "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    box_ap: float
    mask_ap: float | None
    gflops: float
    params_m: float
    source: str


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    has_masks: bool
    build: Callable[[int, int, int], torch.nn.Module]  # (num_classes, min_size, max_size) -> model
    published: Published


def _ours(preset: str) -> Callable[[int, int, int], torch.nn.Module]:
    def build(num_classes: int, min_size: int, max_size: int) -> torch.nn.Module:
        from maskrcnn.config import get_preset
        from maskrcnn.modeling import build_model

        cfg = get_preset(preset, num_classes=num_classes).with_overrides(
            min_size=min_size, max_size=max_size, score_thresh=SCORE_THRESH, detections_per_img=DETECTIONS_PER_IMAGE
        )
        # torchvision's rule for a detector built without weights: a BatchNorm trunk that trains, all
        # five stages trainable (the presets' frozen BatchNorm is for starting from COCO weights)
        return build_model(cfg.replace(backbone=dataclasses.replace(cfg.backbone, norm="bn", trainable_layers=5)))

    return build


def _torchvision(builder: str, sized: bool = True) -> Callable[[int, int, int], torch.nn.Module]:
    def build(num_classes: int, min_size: int, max_size: int) -> torch.nn.Module:
        from torchvision.models import detection

        size = {"min_size": min_size, "max_size": max_size} if sized else {}  # SSDlite: its fixed 320 x 320
        return getattr(detection, builder)(
            weights=None, weights_backbone=None, num_classes=num_classes,
            score_thresh=SCORE_THRESH, detections_per_img=DETECTIONS_PER_IMAGE, **size,
        )

    return build


_DOCS = "https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.detection.{}.html"
CONTENDERS = {
    c.key: c
    for c in (
        Contender("r50_fpn", "Mask R-CNN R50-FPN (ours, r50_fpn)", True, _ours("r50_fpn"), Published(
            "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", 37.9, 34.6, 134.38, 44.4, _DOCS.format("maskrcnn_resnet50_fpn"))),
        Contender("r50_fpn_v2", "Mask R-CNN R50-FPN v2 (ours, r50_fpn_v2)", True, _ours("r50_fpn_v2"), Published(
            "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1", 47.4, 41.8, 333.58, 46.4, _DOCS.format("maskrcnn_resnet50_fpn_v2"))),
        Contender("retinanet", "RetinaNet R50-FPN (torchvision)", False, _torchvision("retinanet_resnet50_fpn"), Published(
            "RetinaNet_ResNet50_FPN_Weights.COCO_V1", 36.4, None, 151.54, 34.0, _DOCS.format("retinanet_resnet50_fpn"))),
        Contender("fcos", "FCOS R50-FPN (torchvision)", False, _torchvision("fcos_resnet50_fpn"), Published(
            "FCOS_ResNet50_FPN_Weights.COCO_V1", 39.2, None, 128.21, 32.3, _DOCS.format("fcos_resnet50_fpn"))),
        Contender("ssdlite", "SSDlite320 MobileNetV3-L (torchvision)", False, _torchvision("ssdlite320_mobilenet_v3_large", sized=False),
                  Published("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", 21.3, None, 0.58, 3.4,
                            _DOCS.format("ssdlite320_mobilenet_v3_large"))),
    )
}
PEER = "r50_fpn"  # ratios are against Mask R-CNN v1

# ---- train, score, time ----------------------------------------------------------------------


def train(model: torch.nn.Module, train_items: list, settings: dict, device: torch.device) -> dict:
    """``settings["steps"]`` steps of the project's recipe on the shared batch schedule; the
    first loss, the mean of the last 10, seconds a step, and whether it diverged."""
    from benchmarks.ablation import batch_schedule
    from maskrcnn.data.transforms import hflip
    from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, make_optimizer, make_scheduler, train_step

    optimizer = make_optimizer(model, lr=settings["lr"])
    scheduler = make_scheduler(optimizer, settings["steps"])  # jobs.train's default warmup and steps down
    schedule = batch_schedule(len(train_items), settings["steps"], settings["batch_size"], settings["seed"])
    torch.manual_seed(settings["seed"] + 1)  # sampling inside the models starts alike
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for picks in schedule:
        batch = [hflip(*train_items[i]) if flip else train_items[i] for i, flip in picks]
        images = [image.to(device) for image, _ in batch]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in target.items()} for _, target in batch]
        loss = float(train_step(model, optimizer, images, targets, scheduler=scheduler, clip_grad_norm=DEFAULT_CLIP_GRAD_NORM)["loss"])
        if not torch.isfinite(torch.tensor(loss)):
            return {"first_loss": losses[0] if losses else loss, "last_loss": loss, "diverged": True,
                    "train_s_per_step": (time.perf_counter() - started) / (len(losses) + 1)}
        losses.append(loss)
    recent = losses[-10:]
    return {"first_loss": losses[0], "last_loss": sum(recent) / len(recent), "diverged": False,
            "train_s_per_step": (time.perf_counter() - started) / len(schedule)}


def score(model: torch.nn.Module, contender: Contender, val_set, device: torch.device) -> dict:
    """COCO box AP (and mask AP with masks) on the held-out split, by the project's evaluation loop."""
    from maskrcnn.evaluation import evaluate_model

    metrics = evaluate_model(model, val_set, batch_size=4, device=device, fast=False)
    return {
        "box_AP": metrics["bbox_AP"], "box_AP50": metrics["bbox_AP50"],
        "mask_AP": metrics["segm_AP"] if contender.has_masks else None,
        "detections_per_image": metrics["num_detections"] / max(metrics["num_images"], 1),
    }


def time_side_by_side(models: dict[str, torch.nn.Module], images: list[torch.Tensor], batch_sizes: list[int],
                      repeats: int, device: torch.device) -> dict[str, dict[int, float]]:
    """Images/s of each model's plain eval-mode forward at each batch size over the same images.
    Round-robin batch by batch, so a change of the shared machine's load hits every model alike;
    each batch's best of ``repeats`` counts."""
    for model in models.values():
        model.eval()
    speeds: dict[str, dict[int, float]] = {key: {} for key in models}
    with torch.inference_mode():
        for model in models.values():
            model(images[:1])  # warm-up
        for batch_size in batch_sizes:
            count = max(batch_size, len(images) // batch_size * batch_size)
            cycle = [images[i % len(images)] for i in range(count)]
            batches = [cycle[i:i + batch_size] for i in range(0, count, batch_size)]
            best = {key: [float("inf")] * len(batches) for key in models}
            for _ in range(repeats):
                for b, batch in enumerate(batches):
                    for key, model in models.items():
                        started = time.perf_counter()
                        model(batch)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        best[key][b] = min(best[key][b], time.perf_counter() - started)
            for key in models:
                speeds[key][batch_size] = count / sum(best[key])
    return speeds


# ---- the report ------------------------------------------------------------------------------


def _ap(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_rows(results: dict[str, dict], batch_sizes: list[int]) -> list[str]:
    speed_heads = " | ".join(f"img/s, batch {b}" for b in batch_sizes)
    lines = [
        f"| model | box AP | box AP50 | mask AP | {speed_heads} | detections/image | train s/step | loss first -> last | params (M) |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in batch_sizes) + " | ---: | ---: | --- | ---: |",
    ]
    for key, r in results.items():
        speeds = " | ".join(f"{r['speed'][b]:.2f}" for b in batch_sizes)
        loss = f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}" + (" (diverged)" if r["diverged"] else "")
        lines.append(
            f"| {CONTENDERS[key].name} | {_ap(r['box_AP'])} | {_ap(r['box_AP50'])} | {_ap(r['mask_AP'])} | {speeds} | "
            f"{r['detections_per_image']:.1f} | {r['train_s_per_step']:.2f} | {loss} | {r['params'] / 1e6:.1f} |"
        )
    return lines


def silent_lines(results: dict[str, dict]) -> list[str]:
    """A line for each model with no detection above the score threshold: its AP is 0 for that reason."""
    return [f"- {CONTENDERS[key].name}: no detection scored {SCORE_THRESH} or more on the held-out images, so its AP is 0 "
            "(its scores have not risen that far yet)" for key, r in results.items() if r["detections_per_image"] == 0]


def ratio_lines(results: dict[str, dict], batch_sizes: list[int]) -> list[str]:
    """Each model against Mask R-CNN v1 (when it ran): speed ratios and AP differences."""
    if PEER not in results:
        return []
    peer = results[PEER]
    lines = []
    for key, r in results.items():
        if key == PEER:
            continue
        speed = ", ".join(f"{r['speed'][b] / peer['speed'][b]:.2f}x at batch {b}" for b in batch_sizes)
        box = 100 * (r["box_AP"] - peer["box_AP"])
        published = CONTENDERS[key].published.box_ap - CONTENDERS[PEER].published.box_ap
        lines.append(f"- {CONTENDERS[key].name} against Mask R-CNN v1: speed {speed}; box AP {box:+.1f} here, "
                     f"{published:+.1f} on COCO (published)")
    return lines


def published_rows(keys: list[str]) -> list[str]:
    lines = [
        "| model | torchvision weights | COCO val2017 box AP | mask AP | GFLOPs | params (M) | source |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in keys:
        p = CONTENDERS[key].published
        mask = "-" if p.mask_ap is None else f"{p.mask_ap:.1f}"
        lines.append(
            f"| {CONTENDERS[key].name} | `{p.weights}` | {p.box_ap:.1f} | {mask} | {p.gflops:.2f} | {p.params_m:.1f} | [docs]({p.source}) |"
        )
    return lines


def render_markdown(results: dict[str, dict], settings: dict) -> str:
    b = settings["batch_sizes"]
    return "\n".join([
        "# Speed against accuracy: Mask R-CNN beside one-stage detectors",
        "",
        "Written by `python -m benchmarks.compare` (`make compare`); the chart: "
        "[speed_accuracy.png](speed_accuracy.png). Left, the box AP measured here; right, torchvision's published "
        "COCO box AP of each model, placed at the speed measured here.",
        "",
        "![box AP against images/s](speed_accuracy.png)",
        "",
        f"Machine: {settings['machine']}; torch {settings['torch']}, torchvision {settings['torchvision']}, "
        f"{settings['threads']} torch thread(s), device {settings['device']}. Run: {settings['total_s'] / 60:.1f} min, in which this "
        f"process had {settings['cpu_share']:.0%} of a CPU core on average (other work shared the machine).",
        "",
        f"Command: `{settings['command']}`" + (" (its defaults)." if settings["command"] == "python -m benchmarks.compare" else "."),
        "",
        "## Measured here: trained alike on the sample data",
        "",
        f"Every model from random weights (no download), built as torchvision builds detectors without weights "
        f"(trunk BatchNorm trained, all stages trainable), trained with the project's one recipe (`maskrcnn.engine`: SGD "
        f"momentum 0.9, weight decay 1e-4, lr {settings['lr']:g} with a linear warmup over {settings['warmup_steps']} steps "
        f"and x0.1 at 2/3 and 8/9 of the run, gradient norm clipped at {settings['clip_grad_norm']:g}) for "
        f"{settings['steps']} steps of {settings['batch_size']} images (the same batches and flips for all, seed {settings['seed']}) "
        f"on {settings['train_images']} synthetic shapes images (`maskrcnn.data.synthetic`, as `make demo` makes them); "
        f"scored on {settings['val_images']} held-out images with COCO AP (`maskrcnn.evaluation`, pycocotools), in percent. "
        f"Input: short side {settings['min_size']} (long side at most {settings['max_size']}); SSDlite its fixed 320 x 320. "
        f"One inference setting for all: score >= {SCORE_THRESH}, at most {DETECTIONS_PER_IMAGE} detections an image. "
        f"Speed: a plain `model(images)` in eval mode, fp32, the models timed side by side in one process, round-robin "
        f"batch by batch (each batch's best of {settings['repeats']} counts), on the held-out images; a batch of {max(b)} is "
        "padded to its largest image's height and width, so it computes more pixels than its images hold (on a CPU, which "
        "gains little else from batching, it can be the slower). "
        "Our Mask R-CNNs run here as built; `jobs.label`'s fast path (norms folded, masks pasted over their boxes only) "
        "is faster ([performance.md](performance.md)).",
        "",
        *table_rows(results, b),
        "",
        *ratio_lines(results, b),
        *silent_lines(results),
        "",
        "**What this can show, and what it cannot.** The speeds are the models' own: they depend on the architecture "
        "and the input size, barely on the weights (a little on how many detections pass the score threshold, whose "
        "masks the Mask R-CNNs then paste: the detections/image column), so their ratios carry over to other data at "
        "this size on a machine like this one (a GPU's ratios differ). On a shared machine they move between runs, at "
        "times by 2x under a changing load: read their order of magnitude, not their decimals. The APs "
        "do not carry over. These are a few dozen steps from random weights on a few synthetic images of three "
        "saturated shapes, scored on a handful of held-out ones: every model is far from converged, the models that "
        "learn fastest in the first steps lead (a small or one-stage model can come first), seeds and step counts "
        "move them by points, and the ranking of accuracies is not COCO's. A team choosing a model should read the "
        "accuracy from the published COCO figures below (torchvision's checkpoints, trained on COCO's 118k images for 26 "
        "to 600 epochs) and the cost from the speeds above; `jobs.train` with `--weights` on its own data "
        "tells it the rest.",
        "",
        "## Published: torchvision's COCO checkpoints",
        "",
        "COCO val2017 AP of torchvision's checkpoints (its model docs, and the weights' `meta[\"_metrics\"]` in "
        f"torchvision {settings['torchvision']}); GFLOPs at torchvision's input size (800 px; SSDlite 320 px). "
        "`r50_fpn` and `r50_fpn_v2` load these checkpoints with outputs equal to torchvision's ([model.md](model.md)).",
        "",
        *published_rows(list(results)),
        "",
    ])


def plot(results: dict[str, dict], path: str, batch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (key, r) in enumerate(results.items()):
        contender, colour, speed = CONTENDERS[key], colours[k % len(colours)], r["speed"][batch_size]
        axes[0].scatter(speed, 100 * r["box_AP"], color=colour, s=60, label=contender.name, zorder=3)
        if r["mask_AP"] is not None:
            axes[0].scatter(speed, 100 * r["mask_AP"], color=colour, s=60, marker="^", facecolors="none", zorder=3)
        axes[1].scatter(speed, contender.published.box_ap, color=colour, s=60, zorder=3)
        if contender.published.mask_ap is not None:
            axes[1].scatter(speed, contender.published.mask_ap, color=colour, s=60, marker="^", facecolors="none", zorder=3)
        for ax, y in ((axes[0], 100 * r["box_AP"]), (axes[1], contender.published.box_ap)):
            ax.annotate(key, (speed, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes[0].set_title("trained here alike: tiny synthetic data, few steps")
    axes[1].set_title("torchvision's published COCO val2017 AP")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"images/s at batch {batch_size} (this machine, measured here)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("AP (%): dots box AP, triangles mask AP")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24, help="training steps per model (default 24: the run takes 11 min of one "
                        "core, 20 min on the shared 2-core CPU when busy)")
    parser.add_argument("--images", type=int, default=16, help="training images of the sample data (default 16)")
    parser.add_argument("--val-images", type=int, default=8, help="held-out images, scored and timed (default 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step (default 2)")
    parser.add_argument("--min-size", type=int, default=320, help="short side of the input (default 320, SSDlite's size)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak lr (default: the recipe's floor for trunks trained from scratch, 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="training seed, the same for every model (default 0)")
    parser.add_argument("--models", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)} (default all)")
    parser.add_argument("--batch-sizes", default="1,8", help="inference batch sizes to time (default 1,8)")
    parser.add_argument("--repeats", type=int, default=2, help="timing passes; the best counts (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the CPU is shared)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if there is one)")
    parser.add_argument("--output", default="docs", help="folder for speed_accuracy.md and speed_accuracy.png (default docs)")
    return parser


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core shared CPU ({platform.machine()}) development machine"


def selection(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The models and inference batch sizes ``args`` asks for; ValueError naming what is wrong."""
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONTENDERS]
    if unknown or not keys:
        raise ValueError(f"--models {args.models!r}: unknown {unknown}; choose from {','.join(CONTENDERS)}")
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not batch_sizes or min(args.steps, args.images, args.val_images, args.batch_size, args.repeats, *batch_sizes) < 1:
        raise ValueError("--steps, --images, --val-images, --batch-size, --repeats and --batch-sizes must be 1 or more")
    return keys, batch_sizes


def _changed_options(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that differ from the defaults, as a command line writes them."""
    defaults = vars(build_parser().parse_args([]))
    return [f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items() if value != defaults.get(name)]


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Trains, scores and times ``args.models``; writes the chart and the table; returns each
    model's figures (APs as fractions, ``speed`` {batch size: images/s})."""
    import torchvision

    from maskrcnn.data import CocoDataset, make_sample_dataset
    from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, GROUPNORM_LR_FLOOR, default_lr, default_warmup_steps

    keys, batch_sizes = selection(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_start = usage.ru_utime + usage.ru_stime
    # Every model trains from random weights at a CPU-sized batch: the case the recipe floors its lr for
    # (it names GroupNorm trunks, the only ones the project trained from scratch so far).
    lr = args.lr or max(default_lr(args.batch_size), GROUPNORM_LR_FLOOR)
    max_size = round(args.min_size * 1333 / 800)  # torchvision's aspect cap
    settings = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": lr, "warmup_steps": default_warmup_steps(args.steps),
        "clip_grad_norm": DEFAULT_CLIP_GRAD_NORM, "seed": args.seed, "train_images": args.images, "val_images": args.val_images,
        "min_size": args.min_size, "max_size": max_size, "batch_sizes": batch_sizes, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "device": str(device), "machine": _machine(device),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "command": " ".join(["python -m benchmarks.compare", *_changed_options(args)]),
    }
    print(f"compare: {', '.join(keys)}; {args.steps} steps x {args.batch_size} images, lr {lr:g}, min size {args.min_size}, "
          f"{settings['machine']}, torch {torch.__version__}, torchvision {torchvision.__version__}, {settings['threads']} thread(s)",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="compare-") as data:
        splits = make_sample_dataset(data, {"train": args.images, "val": args.val_images}, seed=0)
        train_set, val_set = CocoDataset(*splits["train"]), CocoDataset(*splits["val"])
        train_items = [train_set[i] for i in range(len(train_set))]  # decoded once, the same for every model
        val_images = [val_set[i][0].to(device) for i in range(len(val_set))]
        results: dict[str, dict] = {}
        models: dict[str, torch.nn.Module] = {}
        for key in keys:
            contender = CONTENDERS[key]
            torch.manual_seed(args.seed)
            model = contender.build(train_set.num_classes, args.min_size, max_size).to(device)
            trained = train(model, train_items, settings, device)
            scored = score(model, contender, val_set, device)
            results[key] = {**trained, **scored, "params": sum(p.numel() for p in model.parameters())}
            models[key] = model
            print(f"  {key:11s} box AP {_ap(scored['box_AP']):>5}  mask AP {_ap(scored['mask_AP']):>5}  "
                  f"loss {trained['first_loss']:.2f} -> {trained['last_loss']:.2f}{'  DIVERGED' if trained['diverged'] else ''}  "
                  f"{trained['train_s_per_step']:.2f} s/step  ({time.perf_counter() - started:.0f} s)", flush=True)
    speeds = time_side_by_side(models, val_images, batch_sizes, args.repeats, device)
    for key in keys:
        results[key]["speed"] = speeds[key]
    settings["total_s"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    settings["cpu_share"] = (usage.ru_utime + usage.ru_stime - cpu_at_start) / settings["total_s"]

    os.makedirs(args.output, exist_ok=True)
    markdown = render_markdown(results, settings)
    with open(os.path.join(args.output, "speed_accuracy.md"), "w") as f:
        f.write(markdown)
    plot(results, os.path.join(args.output, "speed_accuracy.png"), max(batch_sizes))
    print()
    print("\n".join(table_rows(results, batch_sizes)))
    print()
    print("\n".join(ratio_lines(results, batch_sizes) + silent_lines(results)))
    print(f"\nwrote {args.output}/speed_accuracy.md and speed_accuracy.png in {settings['total_s']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        selection(args)
    except ValueError as exc:
        parser.error(str(exc))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
