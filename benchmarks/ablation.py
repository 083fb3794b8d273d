"""The paper's Table 2 ablations at CPU scale: each switch's variants trained alike, then scored.

    python -m benchmarks.ablation [--steps 150] [--images 32] [--val-images 16] [--seeds 0]
                                  [--b-backbone fpn|c4|both] [--c-backbone c4|fpn|both]
                                  [--batch-size 4] [--lr F]
                                  [--only c4,fpn] [--output runs/ablation] [--fresh]

Every variant is the ``small`` preset (a narrow GroupNorm ResNet, trained from scratch) or its
C4 twin ``small_c4`` with one switch flipped, trained in a plain loop (no Ray, one torch
thread) with the same budget: the same steps, batch, learning rate and schedule, seed, training
images, and the same sequence of batches and flips (drawn from a generator of their own, so a
variant's sampling cannot shift the data another sees). Each is scored on the held-out split
with COCO mask and box AP (``maskrcnn.evaluation``, pycocotools). The data is the synthetic
shapes set (``maskrcnn.data.synthetic.make_sample_dataset``), written under ``--output``.

The rows, grouped as in the paper's Table 2 (its letters):

- (a) backbone: small-C4 vs small-FPN (the paper: ResNet-50-C4 vs -FPN);
- (b) mask loss: softmax (multinomial) vs sigmoid (per-class binary, the paper's), and sigmoid
  class-agnostic;
- (c) RoI features: RoIPool vs RoIAlign (torchvision's and the paper's, no half-pixel offset)
  vs RoIAlign with ``aligned=True`` (detectron2's ROIAlignV2);
- (e) mask head, on small-FPN as the paper's R-50-FPN: MLP vs FCN.

The paper ran (b) and (c) on R-50-C4. Here (b) runs on ``--b-backbone``, small-FPN by default:
at this budget small-C4 is far from converged and its softmax runs' seeds differ by more than
the switch does (docs/ablation.md). (c) runs on ``--c-backbone``, small-C4 by default as in the paper:
misalignment costs most at coarse strides (the paper's (d)), and with FPN small RoIs pool from
stride 4. ``both`` runs a switch on both backbones. (d), RoIAlign on stride-32 C5 features, has
no variant here. A variant in several groups (the baseline) trains once.
Beside our numbers is the paper's, where the seed summary (``shared/seed/``) states one: it gives
no absolute AP for these rows, only directions and (c)'s gap, so the other cells stay empty.

Writes ``<output>/ablation.md`` (the table, in markdown) and ``<output>/ablation.json`` (every
run's metrics and config; written after every run, and runs in it with the same budget are
reused unless ``--fresh``), and prints the table. With several ``--seeds`` each cell is the
mean and +- half the range over seeds. The C4 variants train slowest (res5 runs on every RoI);
the times of a run at the defaults (7 variants, one seed) are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from maskrcnn.config import ModelConfig, get_preset

# ---- the variants --------------------------------------------------------------------------


def _with(cfg: ModelConfig, section: str, **changes) -> ModelConfig:
    return cfg.replace(**{section: dataclasses.replace(getattr(cfg, section), **changes)})


_BASES = {"fpn": ("small", "small-FPN"), "c4": ("small_c4", "small-C4")}
# switch key suffix: (what it flips, config section, changes)
_SWITCHES = {
    "": ("sigmoid, RoIAlign, FCN", None, {}),
    "_softmax": ("softmax mask loss", "mask_head", {"loss_type": "softmax"}),
    "_agnostic": ("class-agnostic sigmoid masks", "mask_head", {"class_agnostic": True}),
    "_roipool": ("RoIPool", "roi_heads", {"pooler_type": "pool"}),
    "_aligned": ("RoIAlign aligned=True", "roi_heads", {"aligned": True}),
    "_mlp": ("MLP mask head", "mask_head", {"head_type": "mlp"}),
}


def _make(preset: str, section: str | None, changes: dict) -> Callable[[int], ModelConfig]:
    def make(num_classes: int) -> ModelConfig:
        cfg = get_preset(preset, num_classes=num_classes)
        return _with(cfg, section, **changes) if section else cfg
    return make


# key (e.g. "c4_softmax"): (what it is, num_classes -> config)
VARIANTS: dict[str, tuple[str, Callable[[int], ModelConfig]]] = {
    f"{base}{suffix}": (f"{name}, {what}", _make(preset, section, changes))
    for base, (preset, name) in _BASES.items()
    for suffix, (what, section, changes) in _SWITCHES.items()
}

# The seed summary's words for each switch (shared/seed/000_26470e1d49df1794.txt, "Ablation Experiments").
SEED_CLAIMS = {
    "a": "Better backbones bring expected gains: ... FPN outperforms C4 features",
    "b": "(ResNet-50-C4) Decoupling via per-class binary masks (sigmoid) gives large gains over multinomial masks (softmax)",
    "c": "(ResNet-50-C4) Our RoIAlign layer improves AP by ~3 points and AP75 by ~5 points",
    "e": "(ResNet-50-FPN) FCNs improve results as they take advantage of explicitly encoding spatial layout",
}


def groups(b_backbones: tuple[str, ...], c_backbones: tuple[str, ...]) -> list:
    """[(letter, switch, [(row label, variant key, paper mask AP cell, paper AP75 cell)], (better, worse) as the paper finds)].

    (b) runs on each of ``b_backbones``, (c) on each of ``c_backbones`` (the paper: C4 for both).
    The paper cells hold only what the seed states: no absolute AP for any row; for (c),
    RoIAlign's gain over RoIPool."""
    out = [("a", "backbone", [("small-C4", "c4", "", ""), ("small-FPN", "fpn", "", "")], ("fpn", "c4"))]
    for base in b_backbones:
        name = _BASES[base][1]
        out.append(("b", f"mask loss (on {name})", [
            ("softmax", f"{base}_softmax", "", ""),
            ("sigmoid", base, "", ""),
            ("sigmoid, class-agnostic", f"{base}_agnostic", "", ""),
        ], (base, f"{base}_softmax")))
    for base in c_backbones:
        name = _BASES[base][1]
        out.append(("c", f"RoI features (on {name})", [
            ("RoIPool", f"{base}_roipool", "", ""),
            # the seed's gap is for C4 (the paper's R-50-C4)
            ("RoIAlign", base, *(("~+3 over RoIPool", "~+5 over RoIPool") if base == "c4" else ("", ""))),
            ("RoIAlign, aligned=True", f"{base}_aligned", "", ""),
        ], (base, f"{base}_roipool")))
    out.append(("e", "mask head (on small-FPN)", [
        ("MLP (fc 256, 256, 4x28x28)", "fpn_mlp", "", ""), ("FCN (2 conv + deconv)", "fpn", "", ""),
    ], ("fpn", "fpn_mlp")))
    return out


METRICS = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")


# ---- one run -------------------------------------------------------------------------------


def batch_schedule(num_images: int, steps: int, batch_size: int, seed: int) -> list[list[tuple[int, bool]]]:
    """For each step, the (image index, flip) pairs of its batch: shuffled epochs back to back,
    from a generator of its own, so every variant sees exactly the same batches."""
    g = torch.Generator().manual_seed(10_000 + seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_images, generator=g).tolist())
    flips = (torch.rand(steps * batch_size, generator=g) < 0.5).tolist()
    picks = list(zip(order[: steps * batch_size], flips))
    return [picks[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def train_and_evaluate(cfg: ModelConfig, train_items: list, val_set, args, seed: int) -> dict:
    from maskrcnn.data.transforms import hflip
    from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, make_optimizer, make_scheduler, prepare_for_training, train_step
    from maskrcnn.evaluation import evaluate_model
    from maskrcnn.modeling import build_model

    torch.manual_seed(seed)
    model = prepare_for_training(build_model(cfg))
    optimizer = make_optimizer(model, lr=args.lr)
    scheduler = make_scheduler(optimizer, args.steps)  # jobs.train's default warmup and steps down
    schedule = batch_schedule(len(train_items), args.steps, args.batch_size, seed)
    torch.manual_seed(seed + 1)  # the RPN's and RoI heads' sampling starts alike for every variant
    started = time.perf_counter()
    first = last = None
    recent: list[float] = []
    diverged = False
    for picks in schedule:
        batch = [hflip(*train_items[i]) if flip else train_items[i] for i, flip in picks]
        losses = train_step(
            model, optimizer, [b[0] for b in batch], [b[1] for b in batch], scheduler=scheduler, clip_grad_norm=DEFAULT_CLIP_GRAD_NORM
        )
        value = float(losses["loss"])
        if not torch.isfinite(torch.tensor(value)):
            diverged = True
            break
        first = value if first is None else first
        recent = (recent + [value])[-20:]
    train_s = time.perf_counter() - started
    last = sum(recent) / len(recent) if recent else float("nan")
    started = time.perf_counter()
    metrics = evaluate_model(model, val_set, batch_size=4)
    eval_s = time.perf_counter() - started
    return {
        "seed": seed,
        **{m: float(metrics[m]) for m in METRICS},
        "bbox_AP50": float(metrics["bbox_AP50"]),
        "bbox_AP75": float(metrics["bbox_AP75"]),
        "first_loss": first,
        "last_loss_mean20": last,
        "diverged": diverged,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


# ---- the table -----------------------------------------------------------------------------


def _summary(runs: list[dict]) -> dict:
    out = {}
    for m in (*METRICS, "train_s"):
        values = [r[m] for r in runs]
        out[m] = statistics.fmean(values)
        out[m + "_halfrange"] = (max(values) - min(values)) / 2
    return out


def _cell(summary: dict, metric: str, seeds: int) -> str:
    value = f"{100 * summary[metric]:.1f}"
    return f"{value} ±{100 * summary[metric + '_halfrange']:.1f}" if seeds > 1 else value


def render_markdown(results: dict, settings: dict, table_groups: list) -> str:
    seeds = len(settings["seeds"])
    lines = [
        "| | variant | mask AP | AP50 | AP75 | box AP | paper mask AP (seed) | paper AP75 (seed) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    verdicts = []
    for letter, switch, rows, (better, worse) in table_groups:
        present = [row for row in rows if row[1] in results]
        for k, (label, key, paper_ap, paper_ap75) in enumerate(present):
            s = results[key]["summary"]
            group = f"({letter}) {switch}" if k == 0 else ""
            lines.append(
                f"| {group} | {label} | {_cell(s, 'segm_AP', seeds)} | {_cell(s, 'segm_AP50', seeds)} | {_cell(s, 'segm_AP75', seeds)} | "
                f"{_cell(s, 'bbox_AP', seeds)} | {paper_ap} | {paper_ap75} | {s['train_s']:.0f} |"
            )
        if better in results and worse in results:
            b, w = results[better]["summary"], results[worse]["summary"]
            delta = 100 * (b["segm_AP"] - w["segm_AP"])
            delta75 = 100 * (b["segm_AP75"] - w["segm_AP75"])
            noise = 100 * (b["segm_AP_halfrange"] + w["segm_AP_halfrange"])
            if abs(delta) < 0.05:
                word = "no difference"
            elif seeds > 1 and abs(delta) <= noise:
                word = "within the seeds' spread"
            else:
                word = "agrees with the paper's direction" if delta > 0 else "opposite to the paper's direction"
                if seeds == 1:
                    word += " (one seed: its noise is not measured)"
            names = {key: label for label, key, _, _ in rows}
            verdicts.append(
                f"- ({letter}) {switch}: {names[better]} minus {names[worse]}: mask AP {delta:+.1f}, AP75 {delta75:+.1f}"
                + (f" (seeds' half-ranges of mask AP summed: {noise:.1f})" if seeds > 1 else "")
                + f", {word}. Seed: \"{SEED_CLAIMS[letter]}\"."
            )
    runs = sum(len(v["runs"]) for v in results.values())
    compute = sum(r["train_s"] + r["eval_s"] for v in results.values() for r in v["runs"])
    header = (
        f"Budget per variant: {settings['steps']} steps x {settings['batch_size']} images, lr {settings['lr']} "
        f"(warmup {settings.get('warmup_steps', '')}, x0.1 at 2/3 and 8/9, gradient norm clipped at {settings.get('clip_grad_norm', '')}), "
        f"{settings['train_images']} training / {settings['val_images']} held-out sample images, "
        f"seed(s) {', '.join(map(str, settings['seeds']))}, {settings['threads']} torch thread(s). "
        f"APs in percent on the held-out split; {'mean ±half the range over seeds; ' if seeds > 1 else ''}"
        f"train s: wall seconds of training (mean over seeds). Machine: {settings['machine']}. "
        f"Training and evaluation of the {runs} runs: {compute / 60:.0f} min; this invocation: {settings['total_s'] / 60:.0f} min."
    )
    return "\n".join([header, "", *lines, "", *verdicts]) + "\n"


# ---- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per variant (default 150)")
    parser.add_argument("--images", type=int, default=32, help="training images of the sample data (default 32)")
    parser.add_argument("--val-images", type=int, default=16, help="held-out images to score on (default 16)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--lr", type=float, default=None, help="peak lr (default: jobs.train's for the small presets at --batch-size)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; each variant trains once per seed (default 0)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample data (default 0)")
    parser.add_argument(
        "--b-backbone", choices=("fpn", "c4", "both"), default="fpn",
        help="backbone of switch (b), the mask loss. The paper: R-50-C4; default small-FPN, the one that gets anywhere "
        "in this budget (on small-C4 the softmax runs' seeds differ by more than the switch does)",
    )
    parser.add_argument(
        "--c-backbone", choices=("fpn", "c4", "both"), default="c4",
        help="backbone of switch (c), the RoI pooling: default small-C4 as the paper (stride 16, where quantization "
        "costs most; on small-FPN small RoIs pool from stride 4)",
    )
    parser.add_argument("--only", default=None, help=f"comma-separated variants to run instead of the table's ({','.join(VARIANTS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: two are slower on a shared 2-core CPU)")
    parser.add_argument("--output", default="runs/ablation", help="folder for the data, ablation.md and .json (default runs/ablation)")
    parser.add_argument(
        "--fresh", action="store_true",
        help="retrain everything; by default runs already in <output>/ablation.json with the same budget are reused "
        "(it is written after every run, so an interrupted ablation goes on where it stopped)",
    )
    return parser


BUDGET_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "clip_grad_norm", "train_images", "val_images", "data_seed", "threads")


def _previous_variants(path: str, settings: dict) -> dict[str, dict]:
    """The variants of an earlier ablation.json with the same budget (else none)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if any(old.get("settings", {}).get(k) != settings[k] for k in BUDGET_KEYS):
        return {}
    return old.get("variants", {})


def _merged(previous: dict[str, dict], results: dict[str, dict]) -> dict[str, dict]:
    """Every run known at this budget: this invocation's, and earlier ones of other variants or
    seeds (so a run of a subset never drops what an earlier run measured). ``summary`` covers
    this invocation's seeds (``summary_seeds``)."""
    merged = {k: v for k, v in previous.items() if k not in results}
    for key, entry in results.items():
        seeds_now = {r["seed"] for r in entry["runs"]}
        older = [r for r in previous.get(key, {}).get("runs", []) if r["seed"] not in seeds_now]
        merged[key] = {**entry, "runs": sorted(entry["runs"] + older, key=lambda r: r["seed"]), "summary_seeds": sorted(seeds_now)}
    return merged


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"--seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    both = ("c4", "fpn")
    table_groups = groups(
        both if args.b_backbone == "both" else (args.b_backbone,), both if args.c_backbone == "both" else (args.c_backbone,)
    )
    if args.only is None:
        keys = list(dict.fromkeys(key for _, _, rows, _ in table_groups for _, key, _, _ in rows))
    else:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys or not seeds or min(args.steps, args.images, args.val_images, args.batch_size) < 1:
        print(f"nothing to run: unknown variant(s) {unknown} (known: {', '.join(VARIANTS)}), or a budget below 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from maskrcnn.data import CocoDataset, make_sample_dataset
    from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, default_lr, default_warmup_steps

    args.lr = args.lr or default_lr(args.batch_size, get_preset("small").backbone.norm)

    started = time.perf_counter()
    os.makedirs(args.output, exist_ok=True)
    json_path, md_path = os.path.join(args.output, "ablation.json"), os.path.join(args.output, "ablation.md")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, shared with other work"
    settings = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": default_warmup_steps(args.steps),
        "clip_grad_norm": DEFAULT_CLIP_GRAD_NORM, "train_images": args.images,
        "val_images": args.val_images, "seeds": seeds, "data_seed": args.data_seed, "threads": args.threads,
        "b_backbone": args.b_backbone, "c_backbone": args.c_backbone, "machine": machine, "total_s": 0.0,
    }
    previous_variants = {} if args.fresh else _previous_variants(json_path, settings)
    previous = {(key, run["seed"]): run for key, v in previous_variants.items() for run in v.get("runs", [])}
    splits = make_sample_dataset(os.path.join(args.output, "data"), {"train": args.images, "val": args.val_images}, seed=args.data_seed)
    train_set = CocoDataset(*splits["train"])
    val_set = CocoDataset(*splits["val"])
    train_items = [train_set[i] for i in range(len(train_set))]  # decoded once, shared by every variant
    num_classes = train_set.num_classes
    todo = sum((key, seed) not in previous for key in keys for seed in seeds)
    print(f"ablation: {len(keys)} variants x {len(seeds)} seed(s), {args.steps} steps x {args.batch_size} images each, "
          f"{todo} to train ({len(keys) * len(seeds) - todo} reused from {json_path}); {machine}", flush=True)

    results: dict[str, dict] = {}
    trained = 0
    for key in keys:
        label, make = VARIANTS[key]
        cfg = make(num_classes)
        results[key] = {"label": label, "config": cfg.to_dict(), "runs": [], "summary": {}}
        for seed in seeds:
            reused = (key, seed) in previous
            if reused:
                run = previous[(key, seed)]
            else:
                run = train_and_evaluate(cfg, train_items, val_set, args, seed)
                trained += 1
            results[key]["runs"].append(run)
            results[key]["summary"] = _summary(results[key]["runs"])
            elapsed = time.perf_counter() - started
            eta = elapsed / max(trained, 1) * (todo - trained)
            print(
                f"  {key:12s} seed {seed}: mask AP {100 * run['segm_AP']:5.1f}  AP50 {100 * run['segm_AP50']:5.1f}  "
                f"AP75 {100 * run['segm_AP75']:5.1f}  box AP {100 * run['bbox_AP']:5.1f}  loss {run['first_loss']:.2f} -> "
                f"{run['last_loss_mean20']:.2f}{'  DIVERGED' if run['diverged'] else ''}  train {run['train_s']:.0f} s, "
                f"eval {run['eval_s']:.0f} s" + ("  (reused)" if reused else f"  (ETA {eta / 60:.1f} min)"),
                flush=True,
            )
            settings["total_s"] = time.perf_counter() - started
            with open(json_path, "w") as f:  # after every run, so an interrupted ablation resumes
                json.dump({"settings": settings, "seed_claims": SEED_CLAIMS, "variants": _merged(previous_variants, results)}, f, indent=1)

    settings["total_s"] = time.perf_counter() - started
    table = render_markdown(results, settings, table_groups)
    with open(md_path, "w") as f:
        f.write(table)
    with open(json_path, "w") as f:
        json.dump({"settings": settings, "seed_claims": SEED_CLAIMS, "variants": _merged(previous_variants, results)}, f, indent=1)
    print()
    print(table)
    print(f"wrote {md_path} and {json_path} in {settings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
