"""COCO box, mask and keypoint AP with pycocotools' COCOeval, the reference evaluator.

N: detections of one image, H x W: the original image. A prediction is the model's output for
one image, a dict of tensors: ``boxes`` float (N, 4) x1, y1, x2, y2 in the original image's
pixels, ``scores`` float (N,), ``labels`` int64 (N,) class indices, and optionally ``masks``
(N, H, W) bool at the original size (also accepted: (N, 1, H, W), and float probabilities,
which are cut at 0.5 as in the paper), and ``keypoints`` (N, K, 3) x, y, v of a Keypoint R-CNN.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from maskrcnn.inference import Detections

__all__ = ["STAT_NAMES", "KEYPOINT_STAT_NAMES", "predictions_to_coco_results", "evaluate_coco", "evaluate_model"]

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize(), in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
# For iou_type "keypoints" it prints 10 (no small objects, 20 detections per image).
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# OKS sigma of every keypoint when there are not COCO's 17 person keypoints (whose own
# per-keypoint sigmas COCOeval knows): a keypoint off by 10% of sqrt(area) scores OKS 0.61.
DEFAULT_KEYPOINT_SIGMA = 0.05

ClassMap = Callable[[Any], Any] | Mapping[int, int] | Sequence[int] | None


def _category_ids(labels: list[int], class_to_category_id: ClassMap) -> list[int]:
    if class_to_category_id is None:  # torchvision's COCO weights: the class index is the id
        return list(labels)
    if callable(class_to_category_id):
        mapped = class_to_category_id(labels)
        return [int(v) for v in mapped]
    return [int(class_to_category_id[label]) for label in labels]  # a mapping or a sequence


def _binary_masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.dim() == 4 and masks.shape[1] == 1:  # (N, 1, H, W) -> (N, H, W)
        masks = masks[:, 0]
    if masks.dtype != torch.bool:
        masks = masks > 0.5 if masks.is_floating_point() else masks != 0
    return masks


def _as_detections(prediction: Mapping[str, torch.Tensor] | Detections) -> Detections:
    if isinstance(prediction, Detections):
        return prediction
    if "masks" in prediction:
        prediction = {**prediction, "masks": _binary_masks(prediction["masks"])}
    return Detections.from_output(prediction)


def predictions_to_coco_results(
    predictions: Iterable[Mapping[str, torch.Tensor] | Detections],
    image_ids: Iterable[int],
    class_to_category_id: ClassMap = None,
) -> list[dict]:
    """Model outputs -> COCO result dicts, as ``COCO.loadRes`` takes them.

    A prediction is a model's output dict (see the module's docstring) or a
    ``maskrcnn.inference.Detections``. Each result: ``image_id``, ``category_id``, ``bbox``
    [x, y, w, h], ``score`` and, when the prediction has masks, ``segmentation`` (RLE with str
    counts). ``class_to_category_id`` maps class indices to category ids: a callable taking a
    list (e.g. ``CocoDataset.class_to_category_id``), a mapping, a sequence, or None when the
    class index is the category id (torchvision's COCO weights).
    """
    results = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        det = _as_detections(prediction)
        if len(det) == 0:
            continue
        xywh = box_convert(torch.from_numpy(det.boxes).double(), "xyxy", "xywh").tolist()
        scores = det.scores.tolist()
        category_ids = _category_ids(det.labels.tolist(), class_to_category_id)
        rles = det.mask_rles()[0] if det.mask_extents is not None else None
        keypoints = det.keypoints.astype(np.float64).tolist() if det.keypoints is not None else None
        for k in range(len(xywh)):
            result = {
                "image_id": int(image_id),
                "category_id": category_ids[k],
                "bbox": [round(v, 3) for v in xywh[k]],
                "score": float(scores[k]),
            }
            if rles is not None:
                result["segmentation"] = rles[k]
            if keypoints is not None:  # COCO's flat x1, y1, v1, ...; COCOeval reads x and y only
                result["keypoints"] = [round(v, 3) for point in keypoints[k] for v in (point[0], point[1], 1)]
            results.append(result)
    return results


def _mask_ground_truth(coco_gt: COCO) -> tuple[COCO, list[Any]]:
    """The ground truth of mask AP, and the ids of the annotations it leaves out: those without a
    mask, whose segmentation is missing, ``[]`` (a box-only export) or polygons none of which
    has 3 points (pycocotools would crash on the first two and read a 4-number polygon as a
    box). As detectron2 filters instances without a valid polygon, they are not scored for
    masks; box AP keeps them. Polygons of fewer than 3 points beside larger ones are dropped, as
    ``maskrcnn.masks.annotation_to_rle`` drops them. ``coco_gt`` itself when nothing changes."""
    kept, left_out, changed = [], [], False
    for ann in coco_gt.dataset.get("annotations", []):
        segmentation = ann.get("segmentation")
        if segmentation is None or (isinstance(segmentation, list) and (not segmentation or any(
                not isinstance(polygon, list) or len(polygon) < 6 for polygon in segmentation))):
            polygons = [p for p in segmentation or [] if isinstance(p, list) and len(p) >= 6]
            if not polygons:
                left_out.append(ann.get("id"))
                continue
            ann, changed = {**ann, "segmentation": polygons}, True
        kept.append(ann)
    if not left_out and not changed:
        return coco_gt, []
    masks = COCO()
    masks.dataset = {**coco_gt.dataset, "annotations": kept}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        masks.createIndex()
    return masks, left_out


def _run_cocoeval(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: Sequence[int] | None) -> tuple[list[float], str]:
    """COCOeval's 12 stats and its printed summary for one IoU type."""
    results = copy.deepcopy(results)  # loadRes writes ids and areas into the dicts
    if iou_type == "segm":
        # With a bbox present, loadRes would take each detection's area from its box; the
        # area ranges (small/medium/large) of mask AP must use the mask's area.
        for result in results:
            result.pop("bbox", None)
    else:
        for result in results:
            result.pop("segmentation", None)
            if iou_type != "keypoints":
                result.pop("keypoints", None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        if iou_type == "keypoints":
            _keypoint_params(coco_gt, evaluator)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats], printed.getvalue()


def _keypoint_params(coco_gt: COCO, evaluator: COCOeval) -> None:
    """Keypoint AP over the categories that name keypoints; OKS sigmas for other than COCO's 17."""
    categories = [c for c in coco_gt.dataset["categories"] if c.get("keypoints")]
    evaluator.params.catIds = sorted(c["id"] for c in categories)
    count = len(categories[0]["keypoints"])
    if count != len(evaluator.params.kpt_oks_sigmas):
        evaluator.params.kpt_oks_sigmas = np.full(count, DEFAULT_KEYPOINT_SIGMA)
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=evaluator.params.catIds)):
        # COCOeval ignores ground truth without labelled keypoints; it needs the count on each
        ann.setdefault("num_keypoints", sum(1 for v in (ann.get("keypoints") or [])[2::3] if v > 0))


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> dict[str, Any]:
    """COCO AP of ``results`` (from :func:`predictions_to_coco_results`) against ``coco_gt``.

    Returns ``{iou_type}_AP``, ``_AP50``, ``_AP75`` (floats in [0, 1]) and ``{iou_type}_stats``,
    COCOeval's 12 numbers in ``STAT_NAMES`` order (-1 where COCO leaves a stat undefined, e.g.
    no small objects); for ``keypoints`` (Keypoint R-CNN, over the categories that name keypoints)
    the 10 numbers of ``KEYPOINT_STAT_NAMES``. ``image_ids`` restricts evaluation to those images (default: all of
    ``coco_gt``'s). No detections, or no masks for ``segm``, give AP 0.0. COCOeval's printout is
    logged at INFO on this module's logger, not printed. Ground truth without a mask (a
    segmentation ``[]``, or no polygon of 3 or more points) counts for box AP and is left out of
    mask AP, with a warning on this module's logger that counts it.
    """
    return _evaluate_coco(coco_gt, results, image_ids, iou_types, logging.WARNING)


def _evaluate_coco(coco_gt: COCO, results: list[dict], image_ids: Sequence[int] | None, iou_types: Sequence[str],
                   left_out_level: int) -> dict[str, Any]:
    """:func:`evaluate_coco`, logging the annotations mask AP leaves out at ``left_out_level``
    (INFO where a ``CocoDataset`` has warned of them already)."""
    metrics: dict[str, Any] = {}
    for iou_type in iou_types:
        needs = {"segm": "segmentation", "keypoints": "keypoints"}.get(iou_type)
        usable = [r for r in results if needs is None or needs in r]
        if iou_type == "keypoints" and not any(c.get("keypoints") for c in coco_gt.dataset["categories"]):
            usable = []  # the ground truth has no keypoints to compare with
        if usable:
            ground_truth = coco_gt
            if iou_type == "segm":
                ground_truth, left_out = _mask_ground_truth(coco_gt)
                if left_out:
                    examples = ", ".join(str(i) for i in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
                    logger.log(left_out_level, "mask AP leaves out %d ground-truth annotations without a mask (a segmentation "
                               "[] or no polygon of 3 or more points), e.g. ids %s; box AP keeps them", len(left_out), examples)
            stats, summary = _run_cocoeval(ground_truth, usable, iou_type, image_ids)
            logger.info("COCO %s evaluation:\n%s", iou_type, summary)
        else:
            stats = [0.0] * len(KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES)
            logger.info("COCO %s evaluation: no detections, AP 0.0", iou_type)
        metrics[f"{iou_type}_AP"] = max(stats[0], 0.0)
        metrics[f"{iou_type}_AP50"] = max(stats[1], 0.0)
        metrics[f"{iou_type}_AP75"] = max(stats[2], 0.0)
        metrics[f"{iou_type}_stats"] = stats
    return metrics


def iou_types_for(model: torch.nn.Module) -> tuple[str, ...]:
    """What to evaluate a model on: boxes and masks (AP 0 without a mask head), and keypoints
    when it has a keypoint head."""
    has_keypoint = bool(getattr(getattr(model, "roi_heads", None), "has_keypoint", False))
    return ("bbox", "segm") + (("keypoints",) if has_keypoint else ())


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    *,
    class_map: Mapping[int, int] | None = None,
    loader_workers: int = 0,
    precision: str = "fp32",
    fast: bool = False,
    tta: Any = None,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` (a ``CocoDataset``) and return :func:`evaluate_coco`'s
    metrics against ``dataset.coco`` on the dataset's images, plus ``num_images`` and
    ``num_detections``. The one evaluation loop: tests, benchmarks, ``jobs.evaluate`` and
    training's per-epoch evaluation all run it.

    Predictions come from ``maskrcnn.inference.Predictor`` (as jobs.label's do): a batch runs as
    one forward per padded size, under autocast to ``precision`` (fp32, bf16, fp16, auto),
    exactly as built unless ``fast`` (which changes ``model`` in place: norms folded; give it a
    model you do not train afterwards); with ``tta`` (a ``maskrcnn.tta`` spec or TTA) each image
    is predicted from its views, as jobs.label --tta labels it. ``loader_workers`` DataLoader processes read and decode
    the images (0: in this process). Class indices map to category ids through ``class_map``
    (default: the dataset's own categories); detections of classes it lacks (e.g. torchvision's
    unused COCO indices) are dropped. Masks leave the device as crops and are encoded batch by
    batch, so memory stays flat. The model's train/eval mode is restored afterwards.
    """
    from maskrcnn.data import CocoDataset, collate_fn
    from maskrcnn.inference import Predictor

    device = torch.device(device)
    if class_map is None:
        class_map = {k + 1: int(c["id"]) for k, c in enumerate(dataset.categories)}
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    predictor = Predictor(model, device=device, fast=fast, precision=precision, tta=tta)
    results: list[dict] = []
    image_ids: list[int] = []
    try:
        for images, targets in loader:
            detections = predictor.predict(images)
            batch_ids = [int(target["image_id"]) for target in targets]
            results.extend(predictions_to_coco_results([_known_classes(d, class_map) for d in detections], batch_ids, class_map))
            image_ids.extend(batch_ids)
    finally:
        model.train(was_training)
    # a CocoDataset has warned of the annotations mask AP leaves out, once, when it was read
    told = logging.INFO if isinstance(dataset, CocoDataset) else logging.WARNING
    metrics = _evaluate_coco(dataset.coco, results, image_ids, iou_types_for(model), told)
    metrics["num_images"] = len(image_ids)
    metrics["num_detections"] = len(results)
    return metrics


def _known_classes(detections: Detections, class_map: Mapping[int, int]) -> Detections:
    """``detections`` without those whose class ``class_map`` lacks."""
    keep = np.asarray([int(label) in class_map for label in detections.labels.tolist()], dtype=bool)
    return detections if keep.all() else detections.select(keep)
