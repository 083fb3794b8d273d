"""torchvision's COCO state dicts load without --categories: the shipped COCO categories name them."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
import torchvision

from maskrcnn.checkpoint import CheckpointError, load_checkpoint

# pycocotools' instances_val2017.json: the 80 categories at their ids (10 ids unused)
COCO_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})


def test_shipped_categories_are_coco_2017s():
    data = json.loads((resources.files("maskrcnn.data") / "coco_categories.json").read_text())
    cats = data["categories"]
    assert [c["id"] for c in cats] == COCO_IDS
    names = {c["id"]: c["name"] for c in cats}
    assert (names[1], names[18], names[44], names[62], names[72], names[90]) == ("person", "dog", "bottle", "chair", "tv", "toothbrush")
    assert all(c["supercategory"] for c in cats)
    # the same names, at the same class indices, as torchvision's COCO weights
    tv = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert [(i, n) for i, n in enumerate(tv) if n not in ("__background__", "N/A")] == [(c["id"], c["name"]) for c in cats]


def test_bare_coco_state_dict_loads_without_categories(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(model.state_dict(), path)

    loaded = load_checkpoint(str(path), arch="r50_fpn")
    assert loaded.label_map[1]["name"] == "person" and loaded.label_map[90]["name"] == "toothbrush"
    assert 12 not in loaded.label_map and len(loaded.label_map) == 80
    assert loaded.categories_note == "categories: COCO's 80 (maskrcnn/data/coco_categories.json)"

    # jobs.label says which categories it took
    from jobs.label import build_parser, load_model_for_labeling

    args = build_parser().parse_args(["--input", "x", "--output", "y", "--checkpoint", str(path), "--arch", "r50_fpn"])
    _, _, load_kwargs = load_model_for_labeling(args, None)
    assert "categories: COCO's 80 (maskrcnn/data/coco_categories.json)" in capsys.readouterr().out
    # given categories still win
    given = load_checkpoint(str(path), arch="r50_fpn", categories=[{"id": 1, "name": "pedestrian"}])
    assert given.label_map == {1: {"id": 1, "name": "pedestrian"}}


def test_other_class_counts_still_need_categories(tmp_path):
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    torch.save(model.state_dict(), tmp_path / "five.pth")
    with pytest.raises(CheckpointError, match="--categories"):
        load_checkpoint(str(tmp_path / "five.pth"), arch="r50_fpn")


def test_bare_keypoint_state_dict_is_a_person(tmp_path):
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "keypoints.pth")
    loaded = load_checkpoint(str(tmp_path / "keypoints.pth"), arch="keypoint_r50_fpn")
    assert loaded.label_map == {1: {"id": 1, "name": "person"}}
    assert loaded.categories_note == "categories: COCO's person (maskrcnn/data/person_keypoints.json)"
