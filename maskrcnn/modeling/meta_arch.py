"""The Mask R-CNN model: preprocess, backbone + FPN, RPN, RoI heads, postprocess.

Input: a list of N float images (3, Hi, Wi) in [0, 1], any sizes. Output in eval mode: one dict
per image with ``boxes`` (D, 4) x1, y1, x2, y2 in the input image's pixels, ``scores`` (D,),
``labels`` (D,) class indices (0 is background and never returned) and ``masks`` (D, Hi, Wi)
bool, best score first; with a keypoint head (Keypoint R-CNN) also ``keypoints`` (D, K, 3)
x, y, 1 in the input image's pixels and ``keypoints_scores`` (D, K), torchvision's names; a
model without a mask head has no ``masks``. In training mode, with targets, a dict of the loss terms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.modeling.poolers import MultiScaleRoIPooler
from maskrcnn.modeling.postprocessing import postprocess_batch
from maskrcnn.modeling.preprocessing import ImagePreprocessor


class MaskRCNN(nn.Module):
    """Mask R-CNN: detections with masks (and keypoints) for a list of images; its losses in training.

    Args:
        preprocessor: normalizes, resizes (short side ``min_size``) and pads the images into one batch.
        backbone: the (N, 3, H, W) batch -> its feature levels (FPN: P2-P6; C4: res4 alone).
        rpn: ``RegionProposalNetwork``: levels -> (P, 4) proposals per image.
        roi_heads: ``RoIHeads``: levels (P6 left out) and proposals -> detections, mask probabilities, keypoints.

    ``forward(images, targets=None, *, resized=False, original_sizes=None, mask_threshold=0.5)``:
    ``images`` N float (3, Hi, Wi) in [0, 1]; ``targets`` per image ``boxes`` (G, 4), ``labels``
    (G,), and ``masks`` (G, Hi, Wi) / ``keypoints`` (G, K, 3) as the heads need. With targets it
    returns the loss dict; else per image ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,),
    ``masks`` (D, Hi, Wi) bool (probabilities with ``mask_threshold=None``), ``keypoints``
    (D, K, 3) and ``keypoints_scores`` (D, K), as the heads give. For predictions in
    applications, ``maskrcnn.inference.Predictor`` runs it (device, precision, fast path, batches).
    """

    def __init__(self, *, preprocessor: ImagePreprocessor, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module):
        super().__init__()
        self.transform = preprocessor
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        # Set by ``optimize.optimize_for_inference``: the batch goes in NHWC like the weights.
        self.channels_last = False

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        resized: bool | list[bool] = False,
        original_sizes: list[tuple[int, int]] | None = None,
        mask_threshold: float | None = 0.5,
        box_local_masks: bool = False,
    ):
        """``resized=True`` (or one flag per image): the images were already resized with
        ``preprocessing.resize_image`` (e.g. in CPU decode tasks); ``original_sizes`` then gives
        the sizes to map outputs back to. ``box_local_masks``: each mask pasted only over its box,
        returned as ``mask_extents`` (D, 4) y0, x0, y1, x1 and ``mask_crops`` (D, h, w) in place of
        ``masks`` (``postprocessing.paste_masks(box_local=True)``)."""
        if self.training and targets is None:
            raise ValueError("training mode needs targets: a dict with boxes, labels (and masks) per image")
        if targets is not None:
            _check_targets(targets, len(images), self.roi_heads.has_mask, self.roi_heads.has_keypoint)
        if original_sizes is None:
            original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets, resized=resized)
        features, roi_features = self.features(batch.tensor)
        gt_boxes = [t["boxes"] for t in targets] if targets is not None else None
        proposals, rpn_losses = self.rpn(tuple(batch.tensor.shape[-2:]), batch.image_sizes, features, gt_boxes)
        detections, head_losses = self.roi_heads(roi_features, proposals, batch.image_sizes, targets)
        if targets is not None:
            return {**rpn_losses, **head_losses}
        return postprocess_batch(detections, batch.image_sizes, original_sizes, mask_threshold, box_local_masks)

    def features(self, batch: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The (N, 3, H, W) preprocessed batch -> its feature levels (the RPN's), and the levels
        the RoI heads pool from, in the layout their poolers read. The stages of ``forward``
        are public so that other inference schemes (``maskrcnn.tta``) run the model's own:
        ``features``, ``rpn``, ``roi_heads.detect_boxes``, ``roi_heads.predict_mask_probs``."""
        tensor = batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch
        features = list(self.backbone(tensor).values())
        # RoI heads pool from P2..P5 only; P6 serves the RPN's largest anchors. A one-level
        # backbone (C4: res4) serves both. torchvision's roi_align reads NCHW (it copies NHWC
        # input on every call): one copy per level here serves both heads. The CPU's gather
        # RoIAlign reads NHWC as it is.
        roi_features = features[:-1] if len(features) > 1 else features
        if self.channels_last and not self._poolers_read_nhwc(tensor.device):
            roi_features = [f.contiguous() for f in roi_features]
        return features, roi_features

    def _poolers_read_nhwc(self, device: torch.device) -> bool:
        poolers = [m for m in self.roi_heads.modules() if isinstance(m, MultiScaleRoIPooler)]
        return bool(poolers) and all(p.gathers(device) for p in poolers)


def _check_targets(targets: list[dict[str, Tensor]], num_images: int, needs_masks: bool, needs_keypoints: bool = False) -> None:
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be a (G, 4) tensor, got {None if boxes is None else tuple(boxes.shape)}")
        if "labels" not in t:
            raise ValueError(f"targets[{i}] has no 'labels'")
        if needs_masks and "masks" not in t:
            raise ValueError(f"targets[{i}] has no 'masks' (the model has a mask head)")
        if needs_keypoints:
            keypoints = t.get("keypoints")
            if keypoints is None or keypoints.dim() != 3 or keypoints.shape[0] != boxes.shape[0] or keypoints.shape[-1] != 3:
                shape = None if keypoints is None else tuple(keypoints.shape)
                raise ValueError(f"targets[{i}]['keypoints'] must be a (G, K, 3) tensor x, y, visibility for its {boxes.shape[0]} boxes "
                                 f"(the model has a keypoint head), got {shape}")
    # Degenerate boxes: one host read for the whole batch (one GPU sync, not one per image); the
    # culprit is looked up only then.
    degenerate = [(t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1) for t in targets]
    if degenerate and torch.cat(degenerate).any():
        i = next(i for i, d in enumerate(degenerate) if d.any())
        j = int(degenerate[i].nonzero()[0])
        raise ValueError(f"targets[{i}]['boxes'][{j}] = {targets[i]['boxes'][j].tolist()} has no positive width and height")


def size_groups(padded_sizes: list[tuple[int, int]]) -> list[list[int]]:
    """A batch's indices grouped by the padded size each image has alone, groups in order of
    first appearance, indices in order within each."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(padded_sizes):
        groups.setdefault(tuple(size), []).append(i)
    return list(groups.values())


def predict_by_size(model: nn.Module, images: list[Tensor], max_batch: int | None = None, **per_image: list) -> list[dict[str, Tensor]]:
    """``model(images, **per_image)`` in eval mode, run as one forward per group of images that
    are padded to the same size (``size_groups``): the predictions, in the images' order.

    Why: a batch is zero-padded to its largest image, and the padding is not zero after the first
    convolution (biases, folded norms) nor to GroupNorm's statistics, so an image's features near
    its right and bottom borders, and so its detections, would depend on which images share its
    batch. Batched only with images of its own padded size, each image sees exactly the tensor it
    sees alone: its labels are those of batch 1, whatever the batch, shard or job (and a GPU sees
    few distinct shapes). ``per_image``: keyword arguments that hold one value per image
    (``resized``, ``original_sizes``), split alike; ``resized`` also tells the padded size.
    ``max_batch``: at most this many images per forward (a group is cut into chunks)."""
    resized = per_image.get("resized", False)
    flags = [resized] * len(images) if isinstance(resized, bool) else list(resized)
    shapes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    padded_size = getattr(getattr(model, "transform", None), "padded_size", None)
    # Another model (torchvision's, a test's): images of one shape pad alike in any model.
    padded = [padded_size(h, w, flag) for (h, w), flag in zip(shapes, flags)] if padded_size else shapes
    predictions: list = [None] * len(images)
    groups = size_groups(padded)
    if max_batch is not None:
        groups = [g[k : k + max_batch] for g in groups for k in range(0, len(g), max_batch)]
    for group in groups:
        kwargs = {k: ([v[i] for i in group] if isinstance(v, (list, tuple)) else v) for k, v in per_image.items()}
        outputs = model([images[i] for i in group], **kwargs)
        for i, out in zip(group, outputs):
            predictions[i] = out
    return predictions
