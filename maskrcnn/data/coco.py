"""A COCO-format instance-segmentation dataset read through fsspec (local paths or ``s3://``).

N: instances of one image, H x W: the decoded image (after EXIF orientation), K: categories.

``CocoDataset[i]`` is ``(image, target)``: ``image`` float32 ``(3, H, W)`` in [0, 1] at its
decoded size (the model resizes), and ``target``:

- ``boxes``    float32 ``(N, 4)`` x1, y1, x2, y2 in pixels (COCO's x, y, w, h with x2 = x + w),
  clipped to the image;
- ``labels``   int64 ``(N,)`` contiguous class index 1..K; index k is ``dataset.categories[k - 1]``
  (categories sorted by id), 0 is the background;
- ``masks``    uint8 ``(N, H, W)`` of 0 and 1;
- ``image_id`` int, the COCO image id;
- ``area``     float32 ``(N,)`` COCO's ``area`` (mask pixels where the file has none);
- ``iscrowd``  int64 ``(N,)``, all 0: crowd regions are left out of training targets;
- ``keypoints`` float32 ``(N, K, 3)`` x, y, visibility (COCO's 0 not labelled, 1 labelled but
  hidden, 2 visible), only when the file's categories name keypoints (COCO's person keypoints:
  a category's ``keypoints`` names and ``skeleton``); an instance without ``keypoints`` gets
  zeros. K is ``dataset.num_keypoints``; ``dataset.keypoint_flip`` is the left/right swap a
  horizontal flip needs (``RandomHorizontalFlip(p, keypoint_flip=...)``).

Crowd and degenerate annotations stay in ``dataset.coco``, the ground truth for evaluation
(those without a mask for box AP only: ``maskrcnn.evaluation`` leaves them out of mask AP).
A malformed file raises ``AnnotationError`` (the checks are in :mod:`maskrcnn.data.coco_checks`).
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from maskrcnn.data.coco_checks import (
    NO_MASK,
    AnnotationError,
    DegenerateAnnotationWarning,
    check_annotation,
    check_categories,
    check_rle_strings,
    check_images,
    check_keypoint_categories,
    degenerate_message,
    has_no_mask,
    load_instances,
    where,
)
from maskrcnn.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from maskrcnn.masks import annotation_to_mask, annotation_to_rle
from maskrcnn.storage import filesystem, join_uri, open_uri

__all__ = [
    "AnnotationError",
    "DegenerateAnnotationWarning",
    "CocoDataset",
    "collate_fn",
    "read_image",
    "missing_images",
    "keypoint_flip_indices",
]

# An annotation whose file 'area' is at least this (and min_area) is trusted to have a mask.
_TRUSTED_AREA = 64.0

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def read_image(uri: str, storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read and decode one image from any URI (``maskrcnn.data.images.decode_image``); an image
    it refuses raises ``ImageDecodeError`` naming ``uri``."""
    with open_uri(uri, "rb", storage_options) as f:
        data = f.read()
    try:
        return decode_image(data, max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{uri}: {exc}") from None


def collate_fn(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """For ``DataLoader``: images differ in size, so a batch is two lists, not stacked tensors."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def _mask_pixels(segmentation: Any, height: int, width: int) -> float:
    return float(mask_utils.area(annotation_to_rle(segmentation, height, width)))


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances (polygons, compressed or uncompressed RLE, iscrowd) for Mask R-CNN.

    Args:
        annotations_uri: the COCO JSON (local path, ``file://``, ``s3://``, ...).
        images_uri: the folder or prefix the JSON's ``file_name``s are relative to.
        storage_options: fsspec options for both URIs (e.g. s3fs ``key``/``secret``/``endpoint_url``).
        transforms: ``(image, target) -> (image, target)``, applied after decoding.
        min_area: an annotation whose mask has fewer pixels than this is degenerate.
        max_pixels: an image of more pixels is refused (a decompression bomb), as jobs.label refuses it.

    Raises ``AnnotationError`` (a ``ValueError``) on a malformed file, and, when an image is
    read, ``ImageDecodeError`` naming the image that is empty, corrupt or too large. Degenerate annotations
    (box of zero or negative width or height after clipping to the image, an empty
    segmentation ``[]`` as box-only exports write, polygons none of which has 3 or more points,
    or a mask under ``min_area`` pixels) are left out of the targets with one
    ``DegenerateAnnotationWarning`` that counts them by reason and names examples; it also
    counts the polygons of fewer than 3 points (they enclose nothing) that an annotation with
    larger ones loses, and the crowd regions without a mask. Evaluation scores the boxes of
    annotations without a mask but leaves them out of mask AP (``maskrcnn.evaluation``).
    An RLE whose runs are not non-negative integers covering its size is a malformed file.
    Masks are rasterized at load time only where the file's ``area`` is missing or small; an
    instance whose mask still decodes to fewer than ``min_area`` pixels is left out when its
    image is read.
    """

    def __init__(
        self,
        annotations_uri: str,
        images_uri: str,
        storage_options: dict[str, Any] | None = None,
        transforms: Transform | None = None,
        min_area: float = 1.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.annotations_uri = annotations_uri
        self.images_uri = images_uri
        self.storage_options = storage_options
        self.transforms = transforms
        self.min_area = min_area
        self.max_pixels = max_pixels

        data = load_instances(annotations_uri, storage_options)
        images = check_images(annotations_uri, data["images"])
        categories = check_categories(annotations_uri, data["categories"])
        self._keypoint_names, self._skeleton = check_keypoint_categories(annotations_uri, categories)
        self._categories = [{"id": c["id"], "name": c["name"]} for c in sorted(categories.values(), key=lambda c: c["id"])]
        self._category_id_to_class = {c["id"]: k + 1 for k, c in enumerate(self._categories)}
        self._image_ids = [image["id"] for image in data["images"]]

        # Training targets per image: its annotations that are neither crowds nor degenerate.
        self._targets: dict[int, list[dict]] = {image_id: [] for image_id in self._image_ids}
        dropped: dict[str, list[str]] = {}  # reason -> the annotations ("annotations[3] (id 17)")
        short_polygons: list[str] = []  # one entry per polygon of fewer than 3 points in a kept annotation
        maskless_crowds: list[str] = []  # crowd regions whose segmentation has no polygon of 3 or more points
        seen_ids: set = set()
        rle_strings: list = []  # compressed RLEs, read at once once the others are checked
        for index, ann in enumerate(data["annotations"]):
            check_annotation(annotations_uri, ann, where(index, ann), images, categories, seen_ids, len(self._keypoint_names),
                             rle_strings)
        check_rle_strings(annotations_uri, rle_strings)
        del rle_strings
        for index, ann in enumerate(data["annotations"]):
            at = where(index, ann)
            image = images[ann["image_id"]]
            height, width = image["height"], image["width"]
            ann.setdefault("iscrowd", 0)  # COCOeval reads both
            pixels = None
            if "area" not in ann:
                pixels = ann["area"] = _mask_pixels(ann["segmentation"], height, width)
            if ann["iscrowd"]:
                if has_no_mask(ann["segmentation"]):
                    maskless_crowds.append(at)
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                dropped.setdefault("an empty box", []).append(at)
                continue
            if isinstance(ann["segmentation"], list):
                # pycocotools' polygons need 3 points (6 numbers); a shorter one encloses nothing.
                # As detectron2's load_coco_json, an instance without one is left out of training.
                short = sum(1 for polygon in ann["segmentation"] if len(polygon) < 6)
                if short == len(ann["segmentation"]):
                    dropped.setdefault(NO_MASK[0] if not ann["segmentation"] else NO_MASK[1], []).append(at)
                    continue
                short_polygons += [at] * short
            # Only small or unsized masks are rasterized here, not every polygon of a large file
            # (what that would cost: docs/performance.md); a mask the file says is large is not
            # empty. __getitem__ still drops any mask that decodes to fewer than min_area pixels.
            if ann["area"] < max(_TRUSTED_AREA, min_area):
                if pixels is None:
                    pixels = _mask_pixels(ann["segmentation"], height, width)
                if pixels < min_area:
                    dropped.setdefault("an empty mask" if min_area <= 1 else f"a mask under {min_area:g} pixels", []).append(at)
                    continue
            self._targets[ann["image_id"]].append(ann)
        self.num_dropped = sum(len(ats) for ats in dropped.values())
        if dropped or short_polygons or maskless_crowds:
            message = degenerate_message(annotations_uri, dropped, short_polygons, maskless_crowds)
            warnings.warn(message, DegenerateAnnotationWarning, stacklevel=2)

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        self._coco = coco

    @property
    def coco(self) -> COCO:
        """The pycocotools ``COCO`` of the whole file (crowds included): evaluation's ground truth."""
        return self._coco

    @property
    def categories(self) -> list[dict]:
        """``[{"id": int, "name": str}, ...]`` sorted by id; class index k is ``categories[k - 1]``."""
        return [dict(c) for c in self._categories]

    @property
    def num_classes(self) -> int:
        """Classifier outputs, background included: K + 1."""
        return len(self._categories) + 1

    @property
    def num_keypoints(self) -> int:
        """K, the keypoints the categories name (0: the file has no keypoints)."""
        return len(self._keypoint_names)

    @property
    def keypoint_names(self) -> list[str]:
        return list(self._keypoint_names)

    @property
    def keypoint_skeleton(self) -> list[list[int]]:
        """COCO's ``skeleton``: pairs of 1-based keypoint numbers."""
        return [list(b) for b in self._skeleton]

    @property
    def keypoint_flip(self) -> list[int]:
        """For a horizontal flip: keypoint k becomes keypoint ``keypoint_flip[k]``'s mirror
        (left and right swapped by name, as torchvision's and detectron2's COCO flip maps)."""
        return keypoint_flip_indices(self._keypoint_names)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order (``dataset[i]`` is image ``image_ids[i]``)."""
        return list(self._image_ids)

    @property
    def category_id_to_class(self) -> dict[int, int]:
        """COCO category id -> contiguous class index (1..K)."""
        return dict(self._category_id_to_class)

    def class_to_category_id(self, labels: int | Iterable[int] | torch.Tensor) -> int | list[int]:
        """Class index (1..K) -> COCO category id; an int for an int, a list for many."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        if isinstance(labels, (int, np.integer)):
            return self._categories[int(labels) - 1]["id"]
        return [self._categories[int(label) - 1]["id"] for label in labels]

    def image_uri(self, index: int) -> str:
        """The URI of ``dataset[index]``'s image."""
        return join_uri(self.images_uri, _relative_path(self._coco.imgs[self._image_ids[index]]["file_name"]))

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self._image_ids[index]
        info = self._coco.imgs[image_id]
        try:
            image = read_image(self.image_uri(index), self.storage_options, self.max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(
                f"{self.annotations_uri}: image id {image_id} ({info['file_name']}): {exc}; fix or remove this image"
            ) from None
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise AnnotationError(
                f"{self.annotations_uri}: image id {image_id} ({info['file_name']}) decodes to "
                f"{width}x{height} (after EXIF orientation) but the file says "
                f"{info['width']}x{info['height']}; fix its width/height"
            )
        anns = self._targets[image_id]
        masks = np.zeros((0, height, width), dtype=np.uint8)
        if anns:
            masks = np.stack([annotation_to_mask(a["segmentation"], height, width) for a in anns])
            pixels = masks.reshape(len(anns), -1).sum(axis=1)
            if (pixels < self.min_area).any():  # a file 'area' that overstated its mask
                keep = np.flatnonzero(pixels >= self.min_area)
                anns, masks = [anns[k] for k in keep], masks[keep]
        if anns:
            boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32), "xywh", "xyxy")
            boxes[:, 0::2].clamp_(0, width)
            boxes[:, 1::2].clamp_(0, height)
        else:
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([self._category_id_to_class[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": int(image_id),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self._keypoint_names:
            count = len(self._keypoint_names)
            flat = [a.get("keypoints") or [0.0] * (3 * count) for a in anns]
            target["keypoints"] = torch.tensor(flat, dtype=torch.float32).reshape(len(anns), count, 3)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    collate_fn = staticmethod(collate_fn)

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.annotations_uri!r}, {self.images_uri!r}: "
            f"{len(self)} images, {len(self._categories)} categories)"
        )


def keypoint_flip_indices(names: Sequence[str]) -> list[int]:
    """The permutation that swaps each "left..." keypoint with its "right..." twin (any case,
    anywhere in the name: "left_eye" <-> "right_eye", "top_left" <-> "top_right"); a name
    without a twin maps to itself."""
    import re

    def swap(match: "re.Match[str]") -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    index = {name: k for k, name in enumerate(names)}
    return [index.get(re.sub(r"left|right", swap, name, flags=re.IGNORECASE), k) for k, name in enumerate(names)]


def missing_images(dataset: CocoDataset) -> list[str]:
    """The ``file_name``s of ``dataset``'s images that do not exist under its ``images_uri``.

    One recursive listing of the folder or prefix (a few paginated LIST requests on S3),
    not one request per image, so a job can check a large dataset before it starts.
    """
    fs, root = filesystem(dataset.images_uri, dataset.storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # a listing cached earlier in this process may predate an upload
    try:
        listed = fs.find(root)
    except FileNotFoundError:
        listed = []
    prefix = root + "/" if root else ""
    present = {path[len(prefix):] for path in listed if path.startswith(prefix)}
    missing = []
    for image_id in dataset.image_ids:
        file_name = dataset.coco.imgs[image_id]["file_name"]
        if _relative_path(file_name) not in present:
            missing.append(file_name)
    return missing


def _relative_path(file_name: str) -> str:
    """A ``file_name`` as a clean relative path: ``./a//b.png`` -> ``a/b.png``."""
    return posixpath.normpath(file_name.lstrip("/"))
