"""``python -m jobs.evaluate``: COCO box and mask AP of a checkpoint on a COCO-format dataset.

    python -m jobs.evaluate --checkpoint s3://bucket/run/model.pt \\
        --annotations s3://bucket/val/annotations.json --images s3://bucket/val/images \\
        [--output s3://bucket/run/eval.json]

Prints the AP table and, with ``--output``, writes it as JSON. Evaluation runs in this process
(on its GPU when it has one): on a cluster, ask for one with ``ray job submit
--entrypoint-num-gpus 1 -- python -m jobs.evaluate ...``. Images are read and decoded by
DataLoader workers while the model runs.

The model's classes are mapped to the annotations' category ids through the checkpoint's own
category list (a ``jobs.train`` checkpoint), or, for a bare torchvision state dict, as in
torchvision: the class index is the category id (then ``--arch`` names its architecture).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from jobs.atomic import AtomicOutput, check_not_an_input
from jobs.common import JobError, run_main
from jobs.options import (add_precision_options, add_size_options, add_storage_options, add_tta_option, check_tta, parse_storage_options,
                          resolve_uri_options, warn_slow_cpu_precision)

__all__ = ["main", "build_parser", "class_map_for"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="COCO box and mask AP (pycocotools' COCOeval) of a Mask R-CNN checkpoint on a COCO-format dataset. "
        "Every URI may be a local path or s3:// (any fsspec URI).",
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="URI",
        help="model.pt written by jobs.train (or its --output folder), or a bare torchvision Mask R-CNN state dict",
    )
    parser.add_argument("--annotations", required=True, metavar="URI", help="COCO instances JSON, the ground truth")
    parser.add_argument("--images", required=True, metavar="URI", help="folder or prefix that the JSON's file_names are relative to")
    parser.add_argument(
        "--output",
        default=None,
        metavar="URI",
        help="where to write the metrics as JSON: a .json file, or a folder (then <folder>/evaluation.json); default: print only",
    )
    add_size_options(parser, "the checkpoint's")
    parser.add_argument(
        "--arch",
        default=None,
        metavar="PRESET",
        help="architecture of a bare torchvision state dict (e.g. r50_fpn); not needed for a jobs.train checkpoint",
    )
    parser.add_argument(
        "--categories",
        default=None,
        metavar="URI",
        help="COCO JSON naming a bare torchvision state dict's classes (class index = category id); default: --annotations",
    )
    parser.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per forward pass (default 2)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=2,
        metavar="N",
        help="DataLoader processes that read and decode images (default 2; 0 reads in this process)",
    )
    add_precision_options(parser, reference_path=" that jobs.label runs")
    add_tta_option(parser, "the views' detections are merged and scored as jobs.label --tta labels them")
    parser.add_argument(
        "--device", default="auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ... (default auto)"
    )
    add_storage_options(parser)
    return parser


def class_map_for(label_map: dict[int, dict], gt_categories: list[dict], checkpoint_uri: str, annotations_uri: str) -> dict[int, int]:
    """Class index -> category id, from a checkpoint's label map; refuses a model whose
    categories share no id with the ground truth's, or share ids under other names only, where AP
    would be a silent 0; warns of the shared ids whose names differ when others agree."""
    class_map = {k: int(c["id"]) for k, c in label_map.items()}
    gt_names = {int(c["id"]): str(c["name"]) for c in gt_categories}
    shared = sorted(set(class_map.values()) & set(gt_names))
    if not shared:
        raise JobError(
            f"the categories of {checkpoint_uri} (ids {sorted(class_map.values())[:10]}) share no id with those of {annotations_uri} "
            f"(ids {sorted(gt_names)[:10]}); evaluate a checkpoint trained on these categories"
        )
    names = {int(c["id"]): str(c["name"]) for c in label_map.values()}
    renamed = [i for i in shared if names[i].strip().lower() != gt_names[i].strip().lower()]
    if renamed:
        pairs = ", ".join(f"{i}: {names[i]!r} vs {gt_names[i]!r}" for i in renamed[:3])
        if len(renamed) == len(shared):
            raise JobError(
                f"the categories of {checkpoint_uri} and of {annotations_uri} share ids but none of their names ({pairs}); "
                "evaluate a checkpoint trained on these categories"
            )
        print(f"warning: {len(renamed)} of the {len(shared)} category ids of {checkpoint_uri} have other names in "
              f"{annotations_uri} ({pairs}); they are scored as the same class", file=sys.stderr)
    return class_map


def _resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise JobError(f"--device {name} is not a device this job runs on: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise JobError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")
    return device


def output_json_uri(output: str) -> str:
    from maskrcnn.storage import join_uri

    return output if output.lower().endswith(".json") else join_uri(output, "evaluation.json")


def check_output_apart(args: argparse.Namespace) -> None:
    """Refuses an --output that is one of the files the job reads: the metrics would replace it.
    Before the model loads, so that the mistake costs no evaluation."""
    output = output_json_uri(args.output)
    shown = f"--output {args.output}" + ("" if output == args.output else f" (its {output})")
    inputs = {f"--{option}": getattr(args, option) for option in ("checkpoint", "annotations", "categories")}
    check_not_an_input(output, inputs, shown, "the metrics")


def format_table(metrics: dict[str, Any]) -> str:
    from maskrcnn.evaluation import KEYPOINT_STAT_NAMES, STAT_NAMES

    lines = [f"{'':6s}" + "".join(f"{name:>7s}" for name in STAT_NAMES)]
    for iou_type in ("bbox", "segm"):
        stats = metrics.get(f"{iou_type}_stats")
        if stats is not None:
            lines.append(f"{iou_type:6s}" + "".join(f"{v:7.3f}" for v in stats))
    stats = metrics.get("keypoints_stats")
    if stats is not None:  # COCO's keypoint summary has its own 10 columns
        lines.append(f"{'':10s}" + "".join(f"{name:>7s}" for name in KEYPOINT_STAT_NAMES))
        lines.append(f"{'keypoints':10s}" + "".join(f"{v:7.3f}" for v in stats))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_uri_options(parser, args)
    storage_options = parse_storage_options(args.storage_options)
    from maskrcnn.config import PRESETS

    if args.arch is not None and args.arch not in PRESETS:
        raise JobError(f"--arch {args.arch} is not a model preset; choose one of: {', '.join(sorted(PRESETS))}")
    for name in ("min_size", "max_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.loader_workers < 0:
        raise JobError(f"--loader-workers must be 0 or more, got {args.loader_workers}")
    check_tta(args.tta)
    if args.output:
        check_output_apart(args)
    device = _resolve_device(args.device)

    from jobs.training.inputs import check_dataset
    from maskrcnn.checkpoint import CheckpointError, categories_from_coco, load_checkpoint

    dataset = check_dataset(args.annotations, args.images, storage_options, "")

    try:
        categories = None
        if args.arch is not None:  # a bare torchvision state dict names its classes in a COCO file
            categories = categories_from_coco(args.categories or args.annotations, storage_options)
        loaded = load_checkpoint(
            args.checkpoint,
            arch=args.arch,
            categories=categories,
            storage_options=storage_options,
            overrides={"min_size": args.min_size, "max_size": args.max_size},
        )
    except CheckpointError as exc:
        message = str(exc)  # "checkpoint X ..." -> "--checkpoint X ...": name the option
        raise JobError("--" + message if message.startswith("checkpoint ") else message) from None
    except ValueError as exc:  # an unknown --arch preset
        raise JobError(str(exc)) from None
    tta = check_tta(args.tta, loaded.model)
    class_map = class_map_for(loaded.label_map, dataset.categories, args.checkpoint, args.annotations)

    with contextlib.ExitStack() as stack:  # an --output that cannot be written fails here, before the evaluation
        out = stack.enter_context(AtomicOutput(output_json_uri(args.output), storage_options)) if args.output else None
        report = _evaluate(args, loaded, dataset, device, class_map, tta)
        if out is not None:
            json.dump(report, out, indent=2)
    if args.output:
        print(f"wrote {output_json_uri(args.output)}")
    sys.stdout.flush()
    return 0


def _evaluate(args: argparse.Namespace, loaded, dataset, device, class_map, tta: str) -> dict:
    """The evaluation of ``main``, its AP table printed; returns the report --output holds."""
    from maskrcnn.evaluation import evaluate_model

    warn_slow_cpu_precision(args.precision, on_cpu=device.type == "cpu")
    started = time.perf_counter()
    # the fast path unless --reference-path: what jobs.label runs, so the AP is that of its labels
    metrics = evaluate_model(
        loaded.model,
        dataset,
        args.batch_size,
        device,
        class_map=class_map,
        loader_workers=args.loader_workers,
        precision=args.precision,
        fast=not args.reference_path,
        tta=tta or None,
    )
    seconds = time.perf_counter() - started
    report = {
        "checkpoint": args.checkpoint,
        "model": loaded.model_hash,
        "annotations": args.annotations,
        "images": args.images,
        "min_size": loaded.config.input.min_size,
        "max_size": loaded.config.input.max_size,
        "seconds": round(seconds, 3),
        "precision": args.precision,
        "fast_path": not args.reference_path,
        "tta": tta,
        **metrics,
    }
    print(format_table(metrics))
    print(
        f"box AP {metrics['bbox_AP']:.4f}  mask AP {metrics['segm_AP']:.4f}  "
        + (f"keypoint AP {metrics['keypoints_AP']:.4f}  " if "keypoints_AP" in metrics else "")
        + f"({metrics['num_images']} images, {metrics['num_detections']} detections, {seconds:.1f} s on {device}"
        + (f", --tta {tta}" if tta else "") + ")"
    )
    return report


if __name__ == "__main__":
    run_main(main)
