"""The ``r50_fpn_v2`` preset is torchvision's ``maskrcnn_resnet50_fpn_v2`` built from our parts:
at its weights (a bare state dict, loaded as jobs.label loads one), its outputs.

Same labels, boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99 per detection (the
criteria of test_torchvision_parity.py, whose helpers these tests share); the fast path (every
BatchNorm, the FPN's and the heads' too, folded) within that test's fast-path criteria; our
weights written back load strictly into torchvision's model. Weights: tv_reference's, briefly
trained until the detections are confident; images at 224-320 px to stay quick on a CPU.
"""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from maskrcnn.checkpoint import CheckpointError, convert_torchvision_state_dict, load_checkpoint, load_state, to_torchvision_state_dict
from maskrcnn.config import ModelConfig, get_preset
from maskrcnn.modeling import build_model, validate_config
from maskrcnn.modeling.optimize import optimize_for_inference
from tests.test_torchvision_parity import (
    _check_fast_path, _check_job_rows, _check_same_detections, _label, _legacy_layout, _mixed_size_images,
)
from tests.tv_reference import NUM_CLASSES, trained_torchvision_v2_state

MIN_SIZE, MAX_SIZE = 224, 320
CATEGORIES = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]


@pytest.fixture(scope="module")
def v2_files(tmp_path_factory):
    """torchvision's v2 weights as the bare state dicts users hold: the current key layout (with
    BatchNorm's step counters, as torchvision saves them) and the legacy one."""
    state = trained_torchvision_v2_state()
    folder = tmp_path_factory.mktemp("tv_v2")
    files = {"state": state, "folder": folder, "current": str(folder / "tv2.pth"), "legacy": str(folder / "tv2_legacy.pth")}
    torch.save(state, files["current"])
    torch.save(_legacy_layout(state), files["legacy"])
    files["categories"] = str(folder / "categories.json")
    with open(files["categories"], "w") as f:
        json.dump({"categories": CATEGORIES}, f)
    return files


@pytest.fixture(scope="module")
def reference(v2_files):
    model = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    model.load_state_dict(v2_files["state"])
    return model.eval()


def _load(path):
    """As jobs.label loads a bare state dict: ``--arch r50_fpn_v2 --categories ...``."""
    return load_checkpoint(path, arch="r50_fpn_v2", categories=CATEGORIES, overrides={"min_size": MIN_SIZE, "max_size": MAX_SIZE})


@pytest.fixture(scope="module")
def ours(v2_files):
    return _load(v2_files["current"]).model


def test_the_preset_has_torchvisions_v2_layers():
    """Every key and shape of torchvision's v2 (BatchNorm in the trunk, FPN and heads, two RPN
    convs, a 4conv1fc box head); v1's preset refuses its weights, naming the preset that fits."""
    with torch.device("meta"):
        ours = build_model(get_preset("r50_fpn_v2"))
        theirs = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules()) == 69  # 53 trunk, 8 FPN, 4 box, 4 mask


def test_new_fields_default_to_v1_and_are_checked():
    """A config saved before these fields existed loads as it was; impossible choices are refused."""
    old = get_preset("r50_fpn").to_dict()
    for section, name in (("backbone", "fpn_norm"), ("rpn", "conv_depth"), ("roi_heads", "box_head_type"),
                          ("roi_heads", "box_conv_layers"), ("roi_heads", "box_head_norm"), ("mask_head", "norm")):
        del old[section][name]
    assert ModelConfig.from_dict(old) == get_preset("r50_fpn")
    v2 = get_preset("r50_fpn_v2")
    for field, bad, match in (
        ("backbone", dataclasses.replace(v2.backbone, fpn_norm="ln"), "backbone.fpn_norm"),
        ("rpn", dataclasses.replace(v2.rpn, conv_depth=0), "rpn.conv_depth"),
        ("roi_heads", dataclasses.replace(v2.roi_heads, box_head_type="4conv"), "roi_heads.box_head_type"),
        ("roi_heads", dataclasses.replace(v2.roi_heads, box_head_type="mlp"), "roi_heads.box_head_norm"),
        ("backbone", dataclasses.replace(v2.backbone, kind="c4", fpn_norm="none"), "backbone.kind 'c4'"),
    ):
        with pytest.raises(ValueError, match=match):
            validate_config(v2.replace(**{field: bad}))


def test_v2_weights_load_for_fine_tuning(v2_files):
    """As jobs.train --weights loads them: onto other classes (the class-specific layers start
    fresh), and, BatchNorm's step counters being optional both ways, into a frozen-BatchNorm
    trunk (for fine-tuning on small batches) as into the preset's."""
    state = convert_torchvision_state_dict(v2_files["state"])
    config = get_preset("r50_fpn_v2", num_classes=NUM_CLASSES + 4)
    frozen = config.replace(backbone=dataclasses.replace(config.backbone, norm="frozen_bn"))
    for cfg in (config, frozen):
        with torch.device("meta"):
            model = build_model(cfg)
        load_state(model, state, skip_class_specific=True)
    with torch.device("meta"):
        load_state(build_model(frozen.replace(num_classes=NUM_CLASSES)), state)


def test_v1_preset_names_r50_fpn_v2_for_v2_weights(v2_files):
    with pytest.raises(CheckpointError, match="--arch r50_fpn_v2"):
        load_checkpoint(v2_files["current"], arch="r50_fpn", categories=CATEGORIES)


def test_same_detections_as_torchvision_v2(reference, ours):
    box_diff, score_diff, min_iou = _check_same_detections(reference, ours)
    print(f"r50_fpn_v2 exact: max box diff {box_diff:.2e} px, max score diff {score_diff:.2e}, min mask IoU {min_iou:.4f}")


def test_legacy_key_layout_loads_the_same_weights(v2_files, ours):
    legacy = _load(v2_files["legacy"]).model.state_dict()
    current = ours.state_dict()
    assert legacy.keys() == current.keys()
    assert all(torch.equal(legacy[k], current[k]) for k in current)


def test_fast_path_keeps_torchvision_v2s_detections(reference, ours):
    """optimize_for_inference folds every BatchNorm (trunk, FPN, box and mask convs): only float
    rounding changes, within the v1 fast path's criteria."""
    fast = optimize_for_inference(copy.deepcopy(ours))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "every BatchNorm follows a conv and folds"
    box_diff, score_diff, min_iou = _check_fast_path(reference, ours, fast)
    print(f"r50_fpn_v2 fast: max box diff {box_diff:.2e} px, max score diff {score_diff:.2e}, min mask IoU {min_iou:.4f}")


def test_written_back_loads_strictly_into_torchvision_v2(v2_files, ours):
    exported = to_torchvision_state_dict(ours)
    theirs = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    theirs.load_state_dict(exported)  # strict
    for key, value in v2_files["state"].items():
        if not key.endswith("num_batches_tracked"):  # a converted state dict's counters restart
            assert torch.equal(exported[key], value), key


@pytest.mark.slow
def test_jobs_label_gives_torchvision_v2s_detections(v2_files, reference, ray_local):
    """jobs.label --arch r50_fpn_v2 --categories ... on a bare v2 state dict, at its defaults
    (fast path, batches of mixed sizes): every confident detection has its twin both ways."""
    folder = v2_files["folder"] / "label"
    (folder / "images").mkdir(parents=True)
    images, uris = _mixed_size_images(folder / "images", sizes=[(200, 260), (333, 250), (300, 300)])
    rows = _label(folder, "out", folder / "images", v2_files["current"], v2_files["categories"], arch="r50_fpn_v2",
                  size=(MIN_SIZE, MAX_SIZE))
    _check_job_rows(reference, images, uris, rows, min_confident=3)
