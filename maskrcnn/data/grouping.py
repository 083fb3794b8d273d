"""Aspect-ratio grouping of training batches (detectron2's ``AspectRatioGroupedDataset``).

A batch is zero-padded to its largest height and its largest width, so a landscape and a
portrait image batched together are both padded to a square: at 800 x 1333 px, 1.67x the pixels
of either, all of it convolved forward and backward for nothing. Grouping keeps the landscape
images (width > height) and the others (portrait and square) in separate batches.

The batches are a pure function of the order given (a seeded shuffle of a rank's shard) and of
the image sizes in the annotations, so a run that resumes at batch k of an epoch recomputes the
same batches and goes on from k.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["landscape_images", "group_by_orientation"]


def landscape_images(dataset) -> list[bool]:
    """Per image of a ``CocoDataset``, in dataset order: whether it is wider than high, from the
    COCO file's ``width`` and ``height`` (the decoded size, which the dataset checks on reading),
    so nothing is decoded to know it."""
    images = dataset.coco.imgs
    return [images[image_id]["width"] > images[image_id]["height"] for image_id in dataset.image_ids]


def group_by_orientation(indices: Sequence[int], landscape: Sequence[bool], batch_size: int) -> list[list[int]]:
    """``indices`` (dataset indices, in the order to train them) cut into batches of
    ``batch_size`` that hold only landscape or only other images (``landscape[i]``: image i's).

    As detectron2 does, each index goes into its orientation's bucket and a bucket full at
    ``batch_size`` is the next batch, so the batches keep the shuffled order's randomness. What is
    left in the two buckets at the end (fewer than ``batch_size`` each) follows: as one batch
    when it fits in one (the only batch that may mix orientations, and only when both buckets
    hold some), else as one short batch per orientation. Either way there are exactly
    ``ceil(len(indices) / batch_size)`` batches, as without grouping, so every rank of a run
    takes the same number of steps per epoch; each index appears as often as in ``indices``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    buckets: dict[bool, list[int]] = {True: [], False: []}
    batches: list[list[int]] = []
    for index in indices:
        bucket = buckets[bool(landscape[index])]
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(bucket.copy())
            bucket.clear()
    # Leftovers: fewer than batch_size each, so together fewer than 2 x batch_size, which takes
    # ceil(total / batch_size) batches either way: one when they fit, else two, one per bucket.
    leftovers = [bucket for bucket in (buckets[True], buckets[False]) if bucket]
    if sum(map(len, leftovers)) <= batch_size:
        leftovers = [[index for bucket in leftovers for index in bucket]] if leftovers else []
    return batches + leftovers
