"""maskrcnn.data.synthetic: deterministic, and its masks, boxes and areas agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data import CocoDataset, missing_images
from maskrcnn.data.synthetic import main, make_sample_dataset
from maskrcnn.masks import annotation_to_mask, mask_boxes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, make_sample_dataset(str(out), {"train": 32, "val": 8}, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_return_value(sample):
    out, splits = sample
    assert splits == {
        "train": (f"{out}/train/annotations.json", f"{out}/train/images"),
        "val": (f"{out}/val/annotations.json", f"{out}/val/images"),
    }
    document = json.loads((out / "train" / "annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in document["categories"]] == [1, 2, 3]
    assert len(document["images"]) == 32
    assert len(list((out / "train" / "images").glob("*.png"))) == 32


def test_deterministic_for_a_seed(sample, tmp_path):
    out, _ = sample
    make_sample_dataset(str(tmp_path / "again"), {"train": 32, "val": 8}, seed=3)
    assert _files(tmp_path / "again") == _files(out)
    make_sample_dataset(str(tmp_path / "other"), {"train": 4}, seed=4)
    other = _files(tmp_path / "other")
    assert other["train/annotations.json"] != _files(out)["train/annotations.json"]


def test_masks_match_boxes_areas_and_images(sample):
    out, _ = sample
    for split in ("train", "val"):
        document = json.loads((out / split / "annotations.json").read_text())
        images = {image["id"]: image for image in document["images"]}
        visible_by_image: dict[int, list[np.ndarray]] = {}
        for ann in document["annotations"]:
            image = images[ann["image_id"]]
            mask = annotation_to_mask(ann["segmentation"], image["height"], image["width"])
            assert mask.sum() == ann["area"] >= 80
            x1, y1, x2, y2 = mask_boxes(mask[None])[0]
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert 20 <= max(ann["bbox"][2:]) <= 120
            visible_by_image.setdefault(ann["image_id"], []).append(mask)
        for image_id, masks in visible_by_image.items():
            # Visible parts never overlap: each pixel belongs to at most one instance.
            assert np.stack(masks).sum(0).max() == 1
            with Image.open(out / split / "images" / images[image_id]["file_name"]) as decoded:
                assert decoded.format == "PNG" and decoded.mode == "RGB"
                assert decoded.size == (images[image_id]["width"], images[image_id]["height"])
                assert 160 <= min(decoded.size) and max(decoded.size) <= 320


def test_objects_contrast_with_the_background(sample):
    """A shape's pixels differ from the pixels just around it (learnable from the image alone)."""
    out, _ = sample
    document = json.loads((out / "val" / "annotations.json").read_text())
    images = {image["id"]: image for image in document["images"]}
    for ann in document["annotations"]:
        image = images[ann["image_id"]]
        pixels = np.asarray(Image.open(out / "val" / "images" / image["file_name"]), dtype=np.float64)
        mask = annotation_to_mask(ann["segmentation"], image["height"], image["width"]).astype(bool)
        grown = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None].float(), 7, stride=1, padding=3)
        ring = grown[0, 0].numpy().astype(bool) & ~mask
        inside, around = pixels[mask].mean(0), pixels[ring].mean(0)
        assert np.linalg.norm(inside - around) > 30


def test_all_segmentation_forms_and_rare_crowds(sample):
    out, _ = sample
    document = json.loads((out / "train" / "annotations.json").read_text())
    kinds = {"polygon": 0, "rle": 0, "uncompressed": 0}
    for ann in document["annotations"]:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            kinds["polygon"] += 1
        elif isinstance(segmentation["counts"], str):
            kinds["rle"] += 1
        else:
            kinds["uncompressed"] += 1
            assert ann["iscrowd"] == 1
    assert kinds["polygon"] > 5 and kinds["rle"] > 5 and kinds["uncompressed"] >= 1
    crowds = sum(ann["iscrowd"] for ann in document["annotations"])
    assert 1 <= crowds <= len(document["images"]) // 8
    assert len(document["annotations"]) >= 2 * len(document["images"])
    per_category = {c: sum(a["category_id"] == c for a in document["annotations"]) for c in (1, 2, 3)}
    assert min(per_category.values()) >= 10


def test_reads_back_as_a_coco_dataset(sample):
    _, splits = sample
    dataset = CocoDataset(*splits["val"])
    assert missing_images(dataset) == [] and dataset.num_dropped == 0
    image, target = dataset[0]
    assert image.shape[1:] == target["masks"].shape[1:]
    np.testing.assert_array_equal(mask_boxes(target["masks"]), target["boxes"].numpy())


def test_cli(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "cli"), "--train", "2", "--val", "1", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"--annotations {tmp_path}/cli/train/annotations.json --images {tmp_path}/cli/train/images" in printed
    assert len(json.loads((tmp_path / "cli" / "val" / "annotations.json").read_text())["images"]) == 1


def test_cli_as_a_module(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "maskrcnn.data.synthetic", "--output", str(tmp_path / "m"), "--train", "1", "--val", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "m" / "train" / "images" / "000001.png").exists()
    assert not (tmp_path / "m" / "val").exists()
    assert "RuntimeWarning" not in completed.stderr


def test_writes_to_s3(s3_bucket):
    splits = make_sample_dataset(s3_bucket + "/shapes", {"val": 2}, seed=1)
    annotations_uri, images_uri = splits["val"]
    assert annotations_uri == f"{s3_bucket}/shapes/val/annotations.json"
    dataset = CocoDataset(annotations_uri, images_uri)
    assert len(dataset) == 2 and missing_images(dataset) == []
