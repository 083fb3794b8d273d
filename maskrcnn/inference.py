"""The library's one way to run a model for predictions: prepare images on the CPU, predict
batches on the device, get each image's detections on the host with box-local mask crops.

    from maskrcnn.inference import Predictor, prepare_image

    predictor = Predictor.from_checkpoint("model.pt", device="cuda")   # or Predictor(model)
    image = prepare_image(open("photo.jpg", "rb").read(), *predictor.input_size)
    (detections,) = predictor.predict([image])
    rles, areas = detections.mask_rles()

D: detections of one image; H x W: the image as decoded; h x w: the model's input size.

- ``prepare_image`` / ``prepare``: where an image's size and dtype are decided, once. Small
  images stay uint8 as decoded (the model converts, normalizes and resizes them on its device,
  exactly as ``model([image])`` would; 4x fewer bytes to move); images much larger than the
  model's input are resized here, on the CPU, with the model's own resize.
- ``Predictor``: eval mode on a device; ``fast=True`` (the default) is the fast path
  (``maskrcnn.modeling.optimize``: norms folded, channels_last, the CPU's gather RoIAlign and
  top-k NMS), ``fast=False`` runs the model exactly as built. A batch runs as one forward per
  padded size (``meta_arch.predict_by_size``), so an image's detections do not depend on its
  batch. Each calling thread gets its own CUDA stream, so several batches can be in flight.
- ``Detections``: numpy arrays on the host. Our model pastes each mask over its box only
  (``paste_masks(box_local=True)``); another model's full masks are cut to their extent on the
  device. On a GPU (``runs_on_device``) the masks come to the host as COCO run lengths, counted
  on the device for the whole batch and copied in one piece (``maskrcnn.masks.crop_runs``); on a
  CPU, where that is slower than the crops, as the crops bit-packed. ``mask_rles`` turns either
  into COCO RLE without a full-size mask.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from maskrcnn.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, as_float, decode_compact
from maskrcnn.engine import autocast_context, autocast_dtype
from maskrcnn.masks import RLE, compress_runs, crop_runs, encode_crops
from maskrcnn.modeling.meta_arch import MaskRCNN, predict_by_size
from maskrcnn.modeling.preprocessing import resize_image, resized_size
from maskrcnn.tta import TTA, check_model, parse_tta, predict_with_tta

__all__ = ["PreparedImage", "prepare", "prepare_image", "Detections", "Predictor", "crop_masks"]


class PreparedImage(NamedTuple):
    """An image as it travels to the model."""

    image: Tensor  # (3, H, W) uint8 as decoded, or (3, h, w) float32 in [0, 1] when ``resized``
    original_size: tuple[int, int]  # (H, W): the size detections are given in
    resized: bool  # already resized to the model's input size (on the CPU)


def prepare(image: Tensor, min_size: int, max_size: int) -> PreparedImage:
    """A decoded (3, H, W) image (uint8, or float in [0, 1]) -> the form it travels to the model
    in: the smaller of the decoded image and the image resized to the model's input (``min_size``
    short side unless the long side would pass ``max_size``). Raises ImageDecodeError for an
    image so thin that a side would resize to 0 pixels."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    new_height, new_width = resized_size(height, width, min_size, max_size)
    if new_height < 1 or new_width < 1:
        raise ImageDecodeError(
            f"image of {width}x{height} is too thin: resized for the model (--min-size {min_size}, --max-size {max_size}) "
            f"a side would be 0 pixels"
        )
    if image.dtype == torch.uint8 and height * width <= 4 * new_height * new_width:
        return PreparedImage(image, (height, width), False)
    return PreparedImage(resize_image(as_float(image), min_size, max_size), (height, width), True)


def prepare_image(data: bytes, min_size: int, max_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Encoded image bytes -> ``prepare``'s form; raises ImageDecodeError naming what is wrong
    (not an image, truncated, more than ``max_pixels`` pixels, too thin)."""
    return prepare(decode_compact(data, max_pixels), min_size, max_size)


def crop_masks(masks: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) bool masks -> (D, 4) int32 extents y0, x0, y1, x1 (exclusive) and the crops'
    pixels, bit-packed, laid end to end. Cut on the masks' device: only the pixels inside each
    mask's extent travel to the host. An empty mask has the extent (0, 0, 0, 0)."""
    count, height, width = masks.shape
    if count == 0:
        return np.zeros((0, 4), dtype=np.int32), np.zeros(0, dtype=np.uint8)
    rows = masks.any(dim=2)  # (D, H)
    cols = masks.any(dim=1)  # (D, W)
    nonempty = rows.any(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = height - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = width - cols.flip(1).int().argmax(dim=1)
    extents = (torch.stack([y0, x0, y1, x1], dim=1) * nonempty[:, None]).to("cpu", torch.int32).numpy()
    crops = [masks[d, a:c, b:e].reshape(-1) for d, (a, b, c, e) in enumerate(extents.tolist())]
    return extents, np.packbits(torch.cat(crops).to("cpu").numpy())


@dataclass
class Detections:
    """One image's detections on the host, best score first, in the original image's pixels."""

    boxes: np.ndarray  # (D, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (D,) float32
    labels: np.ndarray  # (D,) int64 class indices (0, the background, never appears)
    mask_extents: np.ndarray | None = None  # (D, 4) int32 y0, x0, y1, x1 holding the mask; None: no mask head
    mask_bits: np.ndarray | None = None  # the crops inside the extents, bit-packed end to end (``crop_masks``)
    # or, made on the device (``maskrcnn.masks.crop_runs``), in place of the bits: each mask's COCO
    # run lengths in the image laid end to end, and (D,) how many runs each mask has
    mask_runs: np.ndarray | None = None
    mask_run_lengths: np.ndarray | None = None
    keypoints: np.ndarray | None = None  # (D, K, 3) float32 x, y, score; None: no keypoint head
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the image, which the masks' RLEs cover

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_outputs(cls, outputs: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]], *,
                     runs_on_device: bool = False) -> list[Detections]:
        """``from_output`` of each image of a batch. ``runs_on_device``: box-local masks become
        run lengths on their device, for the whole batch at once, with one copy to the host
        (``maskrcnn.masks.crop_runs``), in place of crops copied to the host."""
        if not (runs_on_device and outputs and all("mask_crops" in out for out in outputs)):
            return [cls.from_output(out, size) for out, size in zip(outputs, image_sizes)]
        runs, lengths = crop_runs([out["mask_crops"] for out in outputs], [out["mask_extents"] for out in outputs], image_sizes)
        masks_per_image = np.cumsum([len(out["mask_crops"]) for out in outputs])
        runs_per_image = np.concatenate([[0], np.cumsum(lengths)])[masks_per_image]
        return [cls.from_output(out, size, mask_runs=(image_runs, image_lengths)) for out, size, image_runs, image_lengths
                in zip(outputs, image_sizes, np.split(runs, runs_per_image[:-1]), np.split(lengths, masks_per_image[:-1]))]

    @classmethod
    def from_output(cls, output: dict[str, Tensor], image_size: tuple[int, int] | None = None,
                    mask_runs: tuple[np.ndarray, np.ndarray] | None = None) -> Detections:
        """From the model's output dict for one image of ``image_size`` (H, W; default: the masks'):
        ``boxes``, ``scores``, ``labels`` and optionally ``masks`` (D, H, W) bool, or box-local
        ``mask_extents`` and ``mask_crops``, and ``keypoints``/``keypoints_scores``. ``mask_runs``:
        the box-local masks' runs and run lengths (``crop_runs``), kept in place of the crops."""
        if image_size is None:
            image_size = tuple(output["masks"].shape[-2:]) if "masks" in output else (0, 0)
        det = cls(
            boxes=output["boxes"].detach().to("cpu", torch.float32).numpy(),
            scores=output["scores"].detach().to("cpu", torch.float32).numpy(),
            labels=output["labels"].detach().to("cpu", torch.int64).numpy(),
            image_size=(int(image_size[0]), int(image_size[1])),
        )
        if "mask_crops" in output and mask_runs is not None:
            det.mask_extents = output["mask_extents"].to("cpu", torch.int32).numpy()
            det.mask_runs, det.mask_run_lengths = mask_runs
        elif "mask_crops" in output:  # box-local: crop d valid in its top-left (y1 - y0, x1 - x0)
            extents = output["mask_extents"].to("cpu", torch.int32)
            # slices of the crops, one per mask: on a CPU far faster than a mask over all crops
            crops = [output["mask_crops"][d, : y1 - y0, : x1 - x0].reshape(-1) for d, (y0, x0, y1, x1) in enumerate(extents.tolist())]
            flat = torch.cat(crops).to("cpu").numpy() if crops else np.zeros(0, dtype=bool)
            det.mask_extents, det.mask_bits = extents.numpy(), np.packbits(flat)
        elif "masks" in output:
            det.mask_extents, det.mask_bits = crop_masks(output["masks"])
        if "keypoints" in output:  # x, y and the keypoint's score in place of torchvision's visibility 1
            keypoints = output["keypoints"].detach().to(torch.float32).clone()
            if "keypoints_scores" in output:
                keypoints[..., 2] = output["keypoints_scores"].to(torch.float32)
            det.keypoints = keypoints.cpu().numpy()
        return det

    def mask_crops(self) -> list[np.ndarray]:
        """Each mask's crop, flat (row-major inside its extent), as bits 0/1."""
        if self.mask_runs is not None:  # cut from the full mask the runs paint (to look at, not on a hot path)
            height, width = self.image_size
            crops = []
            for (y0, x0, y1, x1), runs in zip(self.mask_extents.tolist(), self._runs_per_mask()):
                full = np.repeat(np.arange(len(runs), dtype=np.uint8) % 2, runs).reshape(width, height).T
                crops.append(full[y0:y1, x0:x1].reshape(-1))
            return crops
        sizes = [(y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in self.mask_extents.tolist()]
        bits = np.unpackbits(self.mask_bits)
        return np.split(bits[: sum(sizes)], np.cumsum(sizes)[:-1]) if sizes else []

    def mask_rles(self) -> tuple[list[RLE], np.ndarray]:
        """The masks as COCO compressed RLEs in the image, and their areas in pixels, straight
        from the runs (``maskrcnn.masks.compress_runs``) or the crops (``encode_crops``)."""
        if self.mask_runs is not None:
            return compress_runs(*self.image_size, self.mask_runs, self.mask_run_lengths)
        return encode_crops(*self.image_size, self.mask_extents, self.mask_crops())

    def _runs_per_mask(self) -> list[np.ndarray]:
        return np.split(self.mask_runs, np.cumsum(self.mask_run_lengths)[:-1]) if len(self.mask_run_lengths) else []

    def select(self, keep: np.ndarray) -> Detections:
        """The detections where the boolean ``keep`` (D,) is True."""
        kept = Detections(self.boxes[keep], self.scores[keep], self.labels[keep], image_size=self.image_size)
        if self.mask_runs is not None:
            kept.mask_extents, kept.mask_run_lengths = self.mask_extents[keep], self.mask_run_lengths[keep]
            chosen = [r for r, k in zip(self._runs_per_mask(), keep.tolist()) if k]
            kept.mask_runs = np.concatenate(chosen) if chosen else np.zeros(0, np.int32)
        elif self.mask_extents is not None:
            crops = self.mask_crops()
            kept.mask_extents = self.mask_extents[keep]
            chosen = [c for c, k in zip(crops, keep.tolist()) if k]
            kept.mask_bits = np.packbits(np.concatenate(chosen)) if chosen else np.zeros(0, np.uint8)
        if self.keypoints is not None:
            kept.keypoints = self.keypoints[keep]
        return kept


class Predictor:
    """A model ready to predict: eval mode on ``device``, the fast path unless ``fast=False``,
    autocast to ``precision`` (auto: bf16 on GPUs, fp32 on CPUs; fp32, bf16, fp16), at most
    ``max_batch`` images per forward (None: a whole size group). ``fast=True`` changes ``model``
    in place (its norms are folded): give it a model you do not train or save afterwards.
    ``runs_on_device``: masks counted into COCO runs on the device (``Detections.from_outputs``);
    None: on a GPU, not on a CPU (where copying the crops and counting them on the host is faster).
    ``tta``: test-time augmentation, a ``maskrcnn.tta.parse_tta`` spec ("flip", "flip,640,800") or
    a ``TTA``; each image's views' detections merged (``maskrcnn.tta``); "" or None: off. Raises
    ValueError for a bad spec or a model it cannot augment (a keypoint head)."""

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device | None = None, fast: bool = True,
                 precision: str = "auto", max_batch: int | None = None, runs_on_device: bool | None = None,
                 tta: str | TTA | None = None):
        try:
            self.tta = parse_tta(tta)
            if self.tta is not None:
                check_model(model)
        except ValueError as exc:
            raise ValueError(f"tta {exc}") from None
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.autocast_dtype = autocast_dtype(precision, self.device)
        if fast:  # under autocast, the weights held in its dtype: the same outputs without a cast per forward
            from maskrcnn.modeling.optimize import optimize_for_inference

            optimize_for_inference(self.model, weights_dtype=self.autocast_dtype if isinstance(self.model, MaskRCNN) else None)
        self.fast = fast
        self.max_batch = max_batch
        self.runs_on_device = self.device.type != "cpu" if runs_on_device is None else runs_on_device
        self.label_map: dict[int, dict] = {}  # class index -> {"id", "name"}: set by from_checkpoint
        self.model_hash = ""
        self._local = threading.local()

    @classmethod
    def from_checkpoint(cls, uri: str, *, arch: str | None = None, categories: list[dict] | None = None,
                        overrides: dict | None = None, storage_options: dict | None = None, **options) -> Predictor:
        """A project checkpoint or a torchvision state dict (``maskrcnn.checkpoint.load_checkpoint``'s
        arguments), with ``options`` as in the constructor; ``label_map`` and ``model_hash`` set."""
        from maskrcnn.checkpoint import load_checkpoint

        loaded = load_checkpoint(uri, arch=arch, categories=categories, overrides=overrides, storage_options=storage_options)
        predictor = cls(loaded.model, **options)
        predictor.label_map, predictor.model_hash = loaded.label_map, loaded.model_hash
        return predictor

    @property
    def input_size(self) -> tuple[int, int]:
        """(min_size, max_size) of the model's resize: the arguments ``prepare`` needs."""
        transform = self.model.transform
        return transform.min_size, transform.max_size

    def predict(self, images: Sequence[PreparedImage | Tensor]) -> list[Detections]:
        """Detections of each image, in order. A plain tensor is a decoded (3, H, W) image (uint8
        or float in [0, 1]) at its own size."""
        prepared = [img if isinstance(img, PreparedImage) else PreparedImage(img, tuple(img.shape[-2:]), False) for img in images]
        if not prepared:
            return []
        with torch.inference_mode(), self._stream():
            # uint8 images become float on the device, as maskrcnn.data.images.to_rgb_float does
            tensors = [as_float(p.image.to(self.device, non_blocking=True)) for p in prepared]
            # images resized on the CPU tell the model so, and their original size; other models
            # (torchvision's: ``model(images)``) work for images at their own size
            per_image = {"resized": [p.resized for p in prepared], "original_sizes": [p.original_size for p in prepared]}
            options = per_image if any(per_image["resized"]) else {}
            if isinstance(self.model, MaskRCNN):  # ours pastes each mask over its box only: no full-size masks
                options["box_local_masks"] = True
            with autocast_context(self.device, self.autocast_dtype):
                if self.tta is not None:  # views of one image at a time
                    outputs = [predict_with_tta(self.model, t, self.tta, resized=p.resized, original_size=p.original_size)
                               for t, p in zip(tensors, prepared)]
                else:
                    outputs = predict_by_size(self.model, tensors, max_batch=self.max_batch, **options)
            # on this thread's stream: the copies to the host wait for its own work only
            return Detections.from_outputs(outputs, [p.original_size for p in prepared], runs_on_device=self.runs_on_device)

    def _stream(self):
        """One CUDA stream per calling thread: a host sync in one batch waits for its own work only."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)
