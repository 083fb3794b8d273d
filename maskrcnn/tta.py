"""Test-time augmentation (TTA): one image seen as several views, their detections merged.

The paper's data distillation (Radosavovic et al., 2018, which its keypoint results used) labels
an unlabeled image from several transformed copies of it, then merges what each copy found. Done
here as detectron2's ``GeneralizedRCNNWithTTA`` does it, from the model's own parts:

1. Views: the image at the model's input size, at each extra short side (``scales``), and each
   of these mirrored left-right (``flip``). Every view runs the backbone, the RPN and the box
   branch once; its detections are mapped back into the original image's pixels.
2. Boxes: all views' detections go through one class-wise NMS (``nms.batched_nms``, the model's
   IoU threshold), keeping at most the model's ``detections_per_img``. Each view's detections
   passed the model's score threshold already. A kept box keeps its best view's score and
   coordinates; with ``vote``, box voting (Gidaris & Komodakis, 2015, as Detectron's
   ``BBOX_VOTE``) with the views as voters: in each view, the best-scoring box of the kept box's
   class that overlaps it at the NMS threshold or more votes with its score; the kept box becomes
   the score-weighted mean of its voters, and its score their mean over all V views, a view that
   found nothing there counting 0 (an object seen in one view of two keeps half its score).
   Merged boxes whose score falls below the model's threshold are dropped.
3. Masks: the mask branch runs on the merged boxes in every view (each box mapped into it, from
   the features of step 1); a mirrored view's M x M probabilities are mirrored back, and all
   are averaged before the one paste into the image (over each box only, as the Predictor does).

Entry points: ``parse_tta("flip,640,800")`` (``jobs.label --tta``) and ``Predictor(model,
tta=...)`` in ``maskrcnn.inference``, which runs ``predict_with_tta`` one image at a time.

Shapes: V views; D detections; M x M mask probabilities; H x W the image as decoded (its
detections' pixels); h x w a view's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from maskrcnn.modeling.nms import batched_nms
from maskrcnn.modeling.postprocessing import paste_masks
from maskrcnn.modeling.preprocessing import batch_images, normalize_image, resize_boxes, resize_image, resized_size

__all__ = ["TTA", "parse_tta", "check_model", "predict_with_tta", "tta_inference", "vote_boxes", "decode_min_size"]

_MAX_SCALE = 4096  # a view short side beyond this is more likely a typo than a wish


@dataclass(frozen=True)
class TTA:
    """The views of an image: at the model's own input size, at each of ``scales`` (extra short
    sides, in pixels, each with the model's max size), and with ``flip`` each of these mirrored."""

    flip: bool = False
    scales: tuple[int, ...] = ()
    vote: bool = False  # box voting over the views (the module's step 2) instead of the best view's box and score

    def __str__(self) -> str:
        """The spec this was parsed from, in canonical form (``flip,vote,640,800``)."""
        return ",".join((["flip"] if self.flip else []) + (["vote"] if self.vote else []) + [str(s) for s in self.scales])

    def views(self, min_size: int) -> list[tuple[int, bool]]:
        """(short side, mirrored) of each view for a model whose input short side is ``min_size``:
        its own first, then the extra scales; each followed by its mirror with ``flip``."""
        sizes = [min_size, *[s for s in self.scales if s != min_size]]
        return [(size, mirrored) for size in sizes for mirrored in ((False, True) if self.flip else (False,))]


def parse_tta(spec: str | TTA | None) -> TTA | None:
    """``"flip"``, ``"flip,640,800"``, ``"640,800"``, ``"flip,vote"`` -> a TTA; ``""`` or None: off
    (None). Raises ValueError, in one line, naming the part of the spec that is wrong."""
    if spec is None or isinstance(spec, TTA):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"must be a spec like 'flip' or 'flip,640,800', got a {type(spec).__name__}")
    if not spec.strip():
        return None
    words, scales = set(), []
    parts = [p.strip() for p in spec.split(",")]
    for part in parts:
        if part.lower() in ("flip", "vote"):
            if part.lower() in words:
                raise ValueError(f"{spec!r} names {part.lower()} twice; give it once")
            words.add(part.lower())
        elif part.isdigit():
            size = int(part)
            if not 1 <= size <= _MAX_SCALE:
                raise ValueError(f"{spec!r} has scale {size}: a short side is 1 to {_MAX_SCALE} pixels")
            if size in scales:
                raise ValueError(f"{spec!r} names scale {size} twice; give each once")
            scales.append(size)
        else:
            what = "" if len(parts) == 1 else ("has an empty part, which " if not part else f"has {part!r}, which ")
            raise ValueError(f"{spec!r} {what}is neither 'flip', 'vote' nor a short side in pixels; give e.g. flip or flip,640,800")
    tta = TTA(flip="flip" in words, scales=tuple(scales), vote="vote" in words)
    if tta.vote and len(tta.views(1)) == 1:
        raise ValueError(f"{spec!r} votes with one view; add flip or a scale to vote among")
    return tta


def check_model(model: torch.nn.Module) -> None:
    """ValueError, in one line, for a model TTA cannot run: not this project's MaskRCNN, or one
    with a keypoint head (a mirrored view swaps left and right keypoints)."""
    from maskrcnn.modeling.meta_arch import MaskRCNN

    if not isinstance(model, MaskRCNN):
        raise ValueError(f"test-time augmentation runs this project's MaskRCNN (maskrcnn.modeling), not a {type(model).__name__}")
    if model.roi_heads.has_keypoint:
        raise ValueError("test-time augmentation is for box and mask models: this one has a keypoint head "
                         "(a mirrored view would swap its left and right keypoints)")


def decode_min_size(tta: TTA | None, min_size: int) -> int:
    """The short side to which images may be shrunk before the model sees them (on the CPU, where
    they are decoded) so that no view is upsampled from a smaller copy: the largest view's."""
    return max([min_size, *tta.scales]) if tta is not None else min_size


class _View(NamedTuple):
    features: list[Tensor]  # the levels the RoI heads pool from
    size: tuple[int, int]  # (h, w) of the view's input
    mirrored: bool


def _view_input(model, image: Tensor, min_size: int, mirrored: bool, resized: bool, original_size: tuple[int, int]) -> Tensor:
    """The normalized (3, h, w) view: mirrored, then resized as the model resizes (its own function,
    so the unmirrored view at its own size is the model's input to the bit). A copy resized on the
    CPU already (``resized``) is brought to the size the decoded image has in this view, and left
    as it is when it has that size."""
    transform = model.transform
    x = normalize_image(image, transform.image_mean.to(image.dtype), transform.image_std.to(image.dtype))
    if mirrored:
        x = x.flip(-1)
    if not resized:
        return resize_image(x, min_size, transform.max_size)
    size = resized_size(*original_size, min_size, transform.max_size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _run_view(model, x: Tensor, mirrored: bool) -> tuple[_View, Tensor, Tensor, Tensor]:
    """Backbone, RPN and box branch on one view (the model's own stages, as its forward runs
    them): the view, and its (D, 4) boxes in its own pixels, (D,) scores and (D,) labels after
    the model's class-wise NMS."""
    batch = batch_images([x], model.transform.size_divisible)
    features, roi_features = model.features(batch.tensor)
    proposals, _ = model.rpn(tuple(batch.tensor.shape[-2:]), batch.image_sizes, features, None)
    ((boxes, scores, labels),) = model.roi_heads.detect_boxes(roi_features, proposals, batch.image_sizes)
    return _View(roi_features, batch.image_sizes[0], mirrored), boxes, scores, labels


def _mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """(D, 4) x1, y1, x2, y2 in an image ``width`` pixels wide -> the same boxes in its mirror image."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=1)


def _to_image(boxes: Tensor, view: _View, image_size: tuple[int, int]) -> Tensor:
    """A view's boxes -> the original image's pixels."""
    boxes = resize_boxes(boxes, view.size, image_size)
    return _mirror_boxes(boxes, image_size[1]) if view.mirrored else boxes


def _to_view(boxes: Tensor, view: _View, image_size: tuple[int, int]) -> Tensor:
    """The original image's boxes -> a view's pixels."""
    if view.mirrored:
        boxes = _mirror_boxes(boxes, image_size[1])
    return resize_boxes(boxes, image_size, view.size)


def _mask_probs(model, view: _View, boxes: Tensor, labels: Tensor) -> Tensor:
    """(D, M, M) mask probabilities of the class ``labels`` over ``boxes`` (in the view's pixels),
    laid out as in the unmirrored image."""
    (probs,) = model.roi_heads.predict_mask_probs(view.features, [boxes], [labels], [view.size])
    return probs.flip(-1) if view.mirrored else probs


def tta_inference(model, image: Tensor, tta: TTA, *, resized: bool = False,
                  original_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """One image through every view of ``tta`` -> the merged detections in the original image's
    pixels: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), best score first, and with a mask
    head ``mask_probs`` (D, M, M), the views' average. ``image``: (3, h0, w0) float in [0, 1] on
    the model's device, the image as decoded, or with ``resized`` a copy resized on the CPU
    (``maskrcnn.inference.prepare``); ``original_size``: the (H, W) its detections are given in
    (default: the image's own). Run it under ``torch.inference_mode``."""
    check_model(model)
    if original_size is None:
        original_size = (int(image.shape[-2]), int(image.shape[-1]))
    views, all_boxes, all_scores, all_labels = [], [], [], []
    for min_size, mirrored in tta.views(model.transform.min_size):
        view, boxes, scores, labels = _run_view(model, _view_input(model, image, min_size, mirrored, resized, original_size), mirrored)
        views.append(view)
        all_boxes.append(_to_image(boxes, view, original_size))
        all_scores.append(scores)
        all_labels.append(labels)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    heads = model.roi_heads
    keep = batched_nms(boxes, scores, labels, heads.nms_thresh, max_keep=heads.detections_per_img)[: heads.detections_per_img]
    merged = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if tta.vote:
        merged = vote_boxes(merged, list(zip(all_boxes, all_scores, all_labels)), heads.nms_thresh, heads.score_thresh)
    if heads.has_mask:
        if len(keep) == 0:
            size = heads.mask_predictor_size()
            merged["mask_probs"] = boxes.new_zeros((0, size, size))
        else:
            probs = [_mask_probs(model, view, _to_view(merged["boxes"], view, original_size), merged["labels"]) for view in views]
            merged["mask_probs"] = torch.stack(probs).float().mean(dim=0)
    return merged


def vote_boxes(kept: dict[str, Tensor], views: list[tuple[Tensor, Tensor, Tensor]], iou_threshold: float,
               score_threshold: float) -> dict[str, Tensor]:
    """Box voting over views (the module's step 2): ``kept`` ``boxes`` (K, 4), ``scores``,
    ``labels`` (K,), the merge's NMS survivors; ``views``: each view's (D, 4) boxes (in the same
    pixels), (D,) scores, (D,) labels. Returns them voted, best first, below ``score_threshold``
    dropped."""
    boxes, labels = kept["boxes"], kept["labels"]
    if boxes.shape[0] == 0:
        return kept
    weights, voted = [], []
    for view_boxes, view_scores, view_labels in views:
        if view_boxes.shape[0] == 0:  # no votes from this view
            weights.append(boxes.new_zeros(boxes.shape[0]))
            voted.append(boxes)
            continue
        overlaps = box_iou(boxes, view_boxes.to(boxes.dtype))  # (K, D)
        voters = (overlaps >= iou_threshold) & (labels[:, None] == view_labels[None, :])
        score, best = torch.where(voters, view_scores[None, :].to(boxes.dtype), torch.zeros_like(overlaps)).max(dim=1)
        weights.append(score)
        voted.append(view_boxes[best].to(boxes.dtype))
    weights, voted = torch.stack(weights), torch.stack(voted)  # (V, K), (V, K, 4)
    total = weights.sum(dim=0)  # > 0: each kept box votes for itself in its own view
    new_boxes = (weights[..., None] * voted).sum(dim=0) / total[:, None]
    new_scores = (total / len(views)).to(kept["scores"].dtype)
    order = torch.argsort(new_scores, descending=True, stable=True)
    order = order[new_scores[order] >= score_threshold]
    return {"boxes": new_boxes[order], "scores": new_scores[order], "labels": labels[order]}


def predict_with_tta(model, image: Tensor, tta: TTA, *, resized: bool = False, original_size: tuple[int, int] | None = None,
                     mask_threshold: float = 0.5) -> dict[str, Tensor]:
    """``tta_inference`` with the masks pasted over their boxes only: the output dict of
    ``model(..., box_local_masks=True)`` for one image (``boxes``, ``scores``, ``labels``,
    ``mask_extents``, ``mask_crops``), which ``Detections.from_outputs`` takes."""
    if original_size is None:
        original_size = (int(image.shape[-2]), int(image.shape[-1]))
    merged = tta_inference(model, image, tta, resized=resized, original_size=original_size)
    probs = merged.pop("mask_probs", None)
    if probs is not None:
        merged["mask_extents"], merged["mask_crops"] = paste_masks(probs, merged["boxes"], original_size, mask_threshold, box_local=True)
    return merged
