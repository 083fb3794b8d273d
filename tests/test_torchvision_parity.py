"""The proof the implementation is right: at torchvision's weights, torchvision's outputs.

Same labels, boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99 per detection.
"""

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.checkpoint import convert_torchvision_state_dict, to_torchvision_state_dict
from maskrcnn.config import InputConfig, get_preset
from maskrcnn.modeling import build_model
from tests.tv_reference import NUM_CLASSES, synthetic_batch, trained_torchvision_state


@pytest.fixture(scope="module")
def tv_state():
    return trained_torchvision_state()


def _legacy_layout(state):
    """torchvision's COCO checkpoints predate its current key names."""
    out = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
            key = key.replace(f"backbone.fpn.inner_blocks.{i}.0.", f"backbone.fpn.inner_blocks.{i}.")
            key = key.replace(f"backbone.fpn.layer_blocks.{i}.0.", f"backbone.fpn.layer_blocks.{i}.")
        out[key] = value
    return out


def _mask_iou(a, b):
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@pytest.mark.slow
@pytest.mark.parametrize("min_size,max_size", [(224, 320), (400, 560)])
@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_same_detections_as_torchvision(tv_state, min_size, max_size, layout):
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=min_size, max_size=max_size)
    reference.load_state_dict(tv_state)
    reference.eval()
    ours = build_model(get_preset("r50_fpn", num_classes=NUM_CLASSES, input=InputConfig(min_size=min_size, max_size=max_size)))
    state = tv_state if layout == "current" else _legacy_layout(tv_state)
    ours.load_state_dict(convert_torchvision_state_dict(state))
    ours.eval()

    # the training images and unseen ones, of other sizes and aspect ratios, in one batch
    seen, _ = synthetic_batch(torch.Generator().manual_seed(1))
    unseen, _ = synthetic_batch(torch.Generator().manual_seed(7), count=2, size=(333, 250))
    images = seen + unseen
    with torch.inference_mode():
        expected = reference(images)
        got = ours(images)

    confident = 0
    for exp, out in zip(expected, got):
        assert out["labels"].tolist() == exp["labels"].tolist()
        assert (out["boxes"] - exp["boxes"]).abs().max().item() <= 0.01 if len(exp["boxes"]) else True
        assert (out["scores"] - exp["scores"]).abs().max().item() <= 1e-4 if len(exp["scores"]) else True
        assert out["masks"].shape == exp["masks"][:, 0].shape
        assert _mask_iou(out["masks"], exp["masks"][:, 0] >= 0.5).min().item() >= 0.99 if len(exp["boxes"]) else True
        confident += int((exp["scores"] > 0.5).sum())
    assert confident >= 4, "the reference weights must give confident detections, or the test proves little"


def test_written_back_in_torchvision_layout(tv_state):
    ours = build_model(get_preset("r50_fpn", num_classes=NUM_CLASSES))
    ours.load_state_dict(convert_torchvision_state_dict(tv_state))
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    exported = to_torchvision_state_dict(ours)
    missing, unexpected = reference.load_state_dict(exported, strict=False)
    # torchvision's untrained trunk uses BatchNorm with step counters, which frozen BN does not keep
    assert all(k.endswith("num_batches_tracked") for k in missing) and not unexpected
    for key, value in exported.items():
        assert torch.equal(reference.state_dict()[key], value), key
