"""Datasets and training transforms: COCO-format instance segmentation read through fsspec,
and a synthetic shapes dataset for demos and tests."""

from maskrcnn.data.coco import (
    CocoDataset,
    collate_fn,
    missing_images,
    read_image,
)
from maskrcnn.data.coco_checks import AnnotationError, DegenerateAnnotationWarning
from maskrcnn.data.grouping import group_by_orientation, landscape_images
from maskrcnn.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from maskrcnn.data.transforms import Compose, RandomHorizontalFlip

__all__ = [
    "AnnotationError",
    "CocoDataset",
    "DegenerateAnnotationWarning",
    "collate_fn",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "decode_image",
    "missing_images",
    "group_by_orientation",
    "landscape_images",
    "read_image",
    "make_sample_dataset",
    "Compose",
    "RandomHorizontalFlip",
]


def __getattr__(name: str):
    # Imported on first use, so `python -m maskrcnn.data.synthetic` does not find its own module
    # already imported by the package (runpy warns about that).
    if name == "make_sample_dataset":
        from maskrcnn.data.synthetic import make_sample_dataset

        return make_sample_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
