"""maskrcnn.modeling.optimize: the inference fast path changes float rounding, nothing else.

(Against torchvision at trained weights: tests/test_torchvision_parity.py; its AP under bf16:
tests/test_overfit.py; jobs.label's rows equal to the fast model in a loop: tests/test_job_label.py.)
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.config import get_preset
from maskrcnn.modeling import build_model
from maskrcnn.modeling.optimize import fold_norms, optimize_for_inference


def _small(norm: str):
    cfg = get_preset("small", num_classes=3)
    cfg.backbone.norm = norm
    return cfg


def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine parameters far from identity, so a wrong fold shows."""
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = module.weight.shape[0]
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean.data = torch.randn(n, generator=generator) * 0.1
            module.running_var.data = torch.rand(n, generator=generator) + 0.5


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_folded_backbone_gives_the_same_features(norm):
    generator = torch.Generator().manual_seed(0)
    model = build_model(_small(norm))
    _randomize_norms(model, generator)
    model.eval()
    image = torch.rand(1, 3, 128, 160, generator=generator)
    with torch.inference_mode():
        expected = model.backbone(image)
    folded = copy.deepcopy(model)
    count = fold_norms(folded.backbone)
    # stem + 4 stages x (2 convs + a downsample) of the small trunk's BasicBlocks; stage 1 has no downsample
    assert count == 1 + 4 * 2 + 3
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.backbone.modules())
    with torch.inference_mode():
        got = folded.backbone(image)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_training_mode_batch_norm_is_not_folded():
    model = build_model(_small("bn"))
    model.train()
    assert fold_norms(model.backbone) == 0


def test_group_norm_trunk_runs_channels_last_with_the_same_outputs():
    torch.manual_seed(0)
    model = build_model(get_preset("small", num_classes=3)).eval()
    model.roi_heads.score_thresh = 0.0  # random weights: keep every candidate, so there is something to compare
    images = [torch.rand(3, 150, 200), torch.rand(3, 180, 120)]
    with torch.inference_mode():
        expected = model(images)
    fast = optimize_for_inference(copy.deepcopy(model))
    assert fast.channels_last and not any(p.requires_grad for p in fast.parameters())
    with torch.inference_mode():
        got = fast(images)
    for exp, out in zip(expected, got):
        assert len(exp["boxes"]) > 0
        n = min(len(exp["boxes"]), len(out["boxes"]), 20)  # the best-scoring ones: far from any cut
        torch.testing.assert_close(out["boxes"][:n], exp["boxes"][:n], rtol=0, atol=1e-2)
        torch.testing.assert_close(out["scores"][:n], exp["scores"][:n], rtol=0, atol=1e-4)
        assert out["labels"][:n].tolist() == exp["labels"][:n].tolist()


@pytest.mark.parametrize("preset", ["small", "small_keypoint", "r50_fpn_v2"])
def test_weights_held_in_the_autocast_dtype_give_the_same_outputs(preset):
    """Predictor(precision="bf16") holds the weights of the layers autocast runs in bf16 in bf16
    (once, not cast on every forward): the same detections, to the bit, as the fast path with
    fp32 weights cast by autocast; the layers that run in fp32 (the RPN's and the box head's
    predictors) and the norms stay fp32."""
    from maskrcnn.inference import Predictor

    torch.manual_seed(0)
    overrides = {"min_size": 96, "max_size": 128, "score_thresh": 0.0, "detections_per_img": 20}
    config = get_preset(preset, num_classes=3)
    model = build_model(config.with_overrides(**overrides)).eval()
    held = Predictor(copy.deepcopy(model), device="cpu", precision="bf16")
    # winograd=False: as Predictor(precision="bf16") optimizes (NNPACK's convolutions are fp32 only)
    cast = Predictor(optimize_for_inference(copy.deepcopy(model), winograd=False), device="cpu", fast=False, precision="bf16")
    layers = [m for m in held.model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    fp32 = [held.model.rpn.head.cls_logits, held.model.rpn.head.bbox_pred,
            held.model.roi_heads.box_predictor.cls_score, held.model.roi_heads.box_predictor.bbox_pred]
    assert all(m.weight.dtype == torch.float32 for m in fp32)
    assert all(m.weight.dtype == torch.bfloat16 for m in layers if not any(m is f for f in fp32)) and len(layers) > 10
    assert all(p.dtype == torch.float32 for m in held.model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))
               for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in cast.model.parameters())
    images = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1))]
    (expected,), (found,) = cast.predict(images), held.predict(images)
    assert len(found) == len(expected) > 0
    assert (found.boxes == expected.boxes).all() and (found.scores == expected.scores).all()
    assert (found.labels == expected.labels).all()
    if found.mask_extents is not None:
        assert found.mask_rles()[0] == expected.mask_rles()[0]
    if found.keypoints is not None:
        assert (found.keypoints == expected.keypoints).all()
