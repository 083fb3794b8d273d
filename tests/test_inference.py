"""maskrcnn.inference, the library's one inference face: images prepared once, masks pasted over
their boxes only, and the same detections and RLEs as the model's full-size output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.config import get_preset
from maskrcnn.data.images import ImageDecodeError
from maskrcnn.inference import Detections, PreparedImage, Predictor, prepare
from maskrcnn.masks import encode_masks
from maskrcnn.modeling import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = get_preset("small").with_overrides(min_size=96, max_size=128, score_thresh=0.0, detections_per_img=30)
    return build_model(config).eval()


@pytest.mark.parametrize("runs_on_device", [False, True], ids=["crops", "runs on the device"])
def test_box_local_masks_give_the_full_size_masks_rles(model, runs_on_device):
    """Pasted over its box only, each mask has exactly the pixels of the full-size paste: the
    RLEs equal pycocotools' of the model's own (D, H, W) masks, also for boxes at the borders,
    whether the crops come to the host or their runs, counted on the device for the batch."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 70, 90, generator=generator), torch.rand(3, 120, 60, generator=generator)]
    predictor = Predictor(model, device="cpu", fast=False, precision="fp32", runs_on_device=runs_on_device)
    found = predictor.predict(images)
    assert all((det.mask_runs is not None, det.mask_bits is None) == (runs_on_device, runs_on_device) for det in found)
    with torch.inference_mode():  # each image alone: the predictor batches an image only with its own size
        full = [model([image])[0] for image in images]
    touching = 0
    for det, out, image in zip(found, full, images):
        assert len(det) == len(out["scores"]) > 0
        np.testing.assert_array_equal(det.boxes, out["boxes"].numpy())
        np.testing.assert_array_equal(det.labels, out["labels"].numpy())
        rles, areas = det.mask_rles()
        assert rles == encode_masks(out["masks"])
        np.testing.assert_array_equal(areas, out["masks"].sum(dim=(1, 2)).numpy())
        assert det.image_size == tuple(image.shape[-2:])
        height, width = det.image_size
        extents = det.mask_extents
        assert (extents[:, :2] >= 0).all() and (extents[:, 2] <= height).all() and (extents[:, 3] <= width).all()
        touching += int(((extents[:, 0] == 0) | (extents[:, 1] == 0) | (extents[:, 2] == height) | (extents[:, 3] == width)).sum())
    assert touching > 0  # the border case was exercised


@pytest.mark.parametrize("runs_on_device", [False, True], ids=["crops", "runs on the device"])
def test_select_keeps_the_chosen_detections_and_their_masks(model, runs_on_device):
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(2))
    (det,) = Predictor(model, device="cpu", fast=False, runs_on_device=runs_on_device).predict([image])
    keep = np.arange(len(det)) % 3 == 0
    kept = det.select(keep)
    assert len(kept) == int(keep.sum())
    assert kept.mask_rles()[0] == [r for r, k in zip(det.mask_rles()[0], keep) if k]


def test_runs_and_crops_are_the_same_masks_through_the_label_rows(model):
    """Both forms of the masks (crops on a CPU, runs counted on the device on a GPU) give the same
    crops and, through jobs.label's actor columns and row stage, the same rows."""
    from jobs.labeling.predict import detection_table
    from jobs.labeling.rows import rows_table

    generator = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 70, 90, generator=generator), torch.rand(3, 50, 40, generator=generator)]
    batch = {
        "shard": np.zeros(3, np.int32),
        "index": np.arange(3, dtype=np.int32),
        "image_uri": np.array(["a.png", "bad.png", "b.png"], dtype=object),
        "height": np.array([70, -1, 50]),
        "width": np.array([90, -1, 40]),
    }
    errors = [None, "not an image", None]
    rows, crops = [], []
    for runs_on_device in (False, True):
        found = Predictor(model, device="cpu", fast=False, runs_on_device=runs_on_device).predict(images)
        crops.append([np.concatenate(det.mask_crops()) for det in found])
        table = detection_table(batch, errors, [found[0], None, found[1]])
        assert table.column("mask_bits").null_count == (3 if runs_on_device else 0)
        assert table.column("mask_runs").null_count == (0 if runs_on_device else 3)
        rows.append(rows_table(table, label_map={}, model_hash="sha256:x"))
    assert all((a == b).all() for a, b in zip(*crops))
    assert rows[0].equals(rows[1])
    instances = rows[0].column("instances").to_pylist()
    assert len(instances[0]) > 0 and instances[1] == [] and all(i["mask"]["size"] == [70, 90] for i in instances[0])


def test_prepare_keeps_small_images_as_decoded_and_resizes_large_ones_once():
    small = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)
    kept = prepare(small, 96, 128)
    assert kept == PreparedImage(small, (60, 80), False)
    large = torch.randint(0, 255, (3, 600, 800), dtype=torch.uint8)
    resized = prepare(large, 96, 128)
    assert resized.resized and resized.original_size == (600, 800) and resized.image.dtype == torch.float32
    assert tuple(resized.image.shape[-2:]) == (96, 128)
    with pytest.raises(ImageDecodeError, match="too thin"):
        prepare(torch.zeros(3, 1, 4000, dtype=torch.uint8), 96, 128)


def test_detections_of_a_plain_output_dict():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    output = {"boxes": torch.tensor([[3.0, 2, 7, 5], [0, 0, 1, 1]]), "scores": torch.tensor([0.9, 0.1]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    det = Detections.from_output(output)
    assert det.image_size == (10, 12) and det.mask_extents.tolist() == [[2, 3, 5, 7], [0, 0, 0, 0]]
    assert det.mask_rles()[0] == encode_masks(masks)
