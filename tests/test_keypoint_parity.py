"""Keypoint R-CNN parity: at torchvision's keypointrcnn_resnet50_fpn weights, torchvision's outputs.

The reference is built as torchvision builds the model for its COCO weights (FrozenBatchNorm2d).
Its weights: random, with the trunk's BatchNorm statistics calibrated on the images (a random
ResNet with identity frozen BN blows up), and the person logit's weights scaled by 10 and its
bias set to 1 so that the detections are confident and spread in score (0.2 to 0.95) instead of
the near-uniform ~0.4 of random weights. That costs one trunk forward instead of training; the
keypoint head (8 x 512-channel convs per detection) dominates the test's time either way, so
the per-image cap is 20 detections and the images are small.

Checked: the same number of detections in the same order, and boxes, scores, labels, keypoints
and keypoint scores all within 1e-4 (on the machine this was written on they are bit-identical:
every difference is 0.0).
"""

import dataclasses

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import KeypointRCNN, keypointrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.checkpoint import convert_torchvision_state_dict, load_checkpoint, to_torchvision_state_dict
from maskrcnn.config import COCO_PERSON_KEYPOINT_NAMES, InputConfig, get_preset
from maskrcnn.modeling import build_model
from tests.test_torchvision_parity import _legacy_layout
from tests.tv_reference import calibrate_trunk_batch_norm, synthetic_batch

MIN_SIZE, MAX_SIZE, DETECTIONS = 224, 320, 20
TOL = 1e-4


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def confident_keypoint_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """keypointrcnn_resnet50_fpn's state dict with weights that detect confidently (see the module doc)."""
    torch.manual_seed(seed)
    model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE)
    images, _ = synthetic_batch(torch.Generator().manual_seed(seed + 1))
    calibrate_trunk_batch_norm(model, images)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight[1] *= 10.0
        model.roi_heads.box_predictor.cls_score.bias[1] = 1.0
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def tv_state(one_thread):
    return confident_keypoint_state()


def test_same_detections_and_keypoints_as_torchvision(tv_state):
    reference = KeypointRCNN(
        _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3),
        num_classes=2, min_size=MIN_SIZE, max_size=MAX_SIZE, box_detections_per_img=DETECTIONS,
    )
    reference.load_state_dict(tv_state)
    reference.eval()
    config = get_preset("keypoint_r50_fpn", input=InputConfig(min_size=MIN_SIZE, max_size=MAX_SIZE))
    config = config.replace(roi_heads=dataclasses.replace(config.roi_heads, detections_per_img=DETECTIONS))
    ours = build_model(config)
    ours.load_state_dict(convert_torchvision_state_dict(tv_state))
    ours.eval()
    assert not ours.roi_heads.has_mask and ours.roi_heads.has_keypoint

    # images of two sizes and aspect ratios in one batch
    seen, _ = synthetic_batch(torch.Generator().manual_seed(1))
    unseen, _ = synthetic_batch(torch.Generator().manual_seed(7), count=1, size=(333, 250))
    images = seen + unseen
    with torch.inference_mode():
        expected = reference(images)
        got = ours(images)

    worst = dict.fromkeys(("boxes", "scores", "keypoints", "keypoints_scores"), 0.0)
    confident = 0
    for i, (exp, out) in enumerate(zip(expected, got)):
        assert "masks" not in out
        assert set(out) == set(exp) == {"boxes", "scores", "labels", "keypoints", "keypoints_scores"}
        assert out["keypoints"].shape == (len(exp["scores"]), 17, 3) and out["keypoints_scores"].shape == (len(exp["scores"]), 17)
        assert torch.equal(out["labels"], exp["labels"]), i
        for key in worst:
            assert out[key].shape == exp[key].shape, (i, key)
            diff = float((out[key] - exp[key]).abs().max()) if exp[key].numel() else 0.0
            worst[key] = max(worst[key], diff)
            assert diff <= TOL, f"image {i}: {key} differ by {diff}"
        # the keypoints lie in their boxes' extent, in the input image's pixels
        boxes, kps = out["boxes"], out["keypoints"]
        assert (kps[..., 0] >= boxes[:, None, 0] - 1e-3).all() and (kps[..., 0] <= boxes[:, None, 2] + 1e-3).all()
        assert (kps[..., 1] >= boxes[:, None, 1] - 1e-3).all() and (kps[..., 1] <= boxes[:, None, 3] + 1e-3).all()
        confident += int((exp["scores"] > 0.5).sum())
    print(f"largest differences from torchvision: {worst}")
    assert confident >= 4, "the reference weights must give confident detections, or the test proves little"


def test_keypoint_state_dict_loads_by_name_and_writes_back(tv_state, tmp_path):
    """load_checkpoint(arch="keypoint_r50_fpn") takes torchvision's state dict (current and legacy
    key layouts), and our weights load into torchvision's keypointrcnn_resnet50_fpn as they are."""
    path = tmp_path / "keypointrcnn.pth"
    categories = [{"id": 1, "name": "person"}]
    for layout in (tv_state, _legacy_layout(tv_state)):
        torch.save(layout, path)
        loaded = load_checkpoint(str(path), arch="keypoint_r50_fpn", categories=categories)
        assert loaded.config.keypoint_head.enabled and not loaded.config.mask_head.enabled
        assert loaded.config.keypoint_head.num_keypoints == 17 and loaded.config.num_classes == 2
        assert loaded.config.keypoint_head.keypoint_names == COCO_PERSON_KEYPOINT_NAMES
        assert loaded.label_map == {1: {"id": 1, "name": "person"}}
        state = loaded.model.state_dict()
        for key, value in convert_torchvision_state_dict(tv_state).items():
            assert torch.equal(state[key], value), key

    reference = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    exported = to_torchvision_state_dict(loaded.model)
    missing, unexpected = reference.load_state_dict(exported, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing) and not unexpected
    for key, value in exported.items():
        assert torch.equal(reference.state_dict()[key], value), key
