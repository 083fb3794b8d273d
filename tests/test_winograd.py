"""maskrcnn.modeling.winograd: NNPACK's Winograd 3x3 convolutions on the fast path give the direct
convolution's outputs within float rounding, each image's and each RoI's independent of its batch.

(The whole fast path with them against torchvision: tests/test_torchvision_parity.py.)
"""

import copy

import pytest
import torch
from torch import nn

from maskrcnn.config import InputConfig, get_preset
from maskrcnn.modeling import build_model
from maskrcnn.modeling.optimize import optimize_for_inference
from maskrcnn.modeling.winograd import MIN_IMAGE_WORK, Conv1x1NCHW, WinogradConv2d, use_winograd, winograd_available

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="this torch has no NNPACK")


def _conv(channels: int, generator: torch.Generator, out_channels: int | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (9 * channels)) ** 0.5)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return conv.eval().requires_grad_(False)


@needs_nnpack
def test_an_image_convolution_takes_nnpack_and_gives_the_direct_convolutions_outputs():
    generator = torch.Generator().manual_seed(0)
    conv = _conv(128, generator)
    winograd = WinogradConv2d(conv, per_image=True)
    images = torch.randn(3, 128, 80, 96, generator=generator)  # 128 x 128 x 80 x 96 = 126M >= MIN_IMAGE_WORK
    assert winograd._takes(images)
    with torch.inference_mode():
        expected = conv(images)
        got = winograd(images)
        alone = [winograd(images[i : i + 1]) for i in range(3)]
    assert not torch.equal(got, expected), "NNPACK's Winograd rounds otherwise than the direct convolution"
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    # one NNPACK call per image: each image's bits are those it gets alone
    for i in range(3):
        assert torch.equal(got[i : i + 1], alone[i])
    # a channels_last input gives the same
    with torch.inference_mode():
        assert torch.equal(winograd(images.contiguous(memory_format=torch.channels_last)), got)


@needs_nnpack
def test_below_the_work_threshold_an_image_convolution_runs_the_wrapped_one():
    generator = torch.Generator().manual_seed(1)
    conv = _conv(64, generator)
    winograd = WinogradConv2d(conv, per_image=True)
    small = torch.randn(2, 64, 40, 40, generator=generator)
    assert 64 * 64 * 40 * 40 < MIN_IMAGE_WORK and not winograd._takes(small)
    with torch.inference_mode():
        assert torch.equal(winograd(small), conv(small))
    # nor with gradients, other dtypes or strides
    assert not winograd._takes(small.double())
    with pytest.raises(ValueError, match="3x3 stride-1"):
        WinogradConv2d(nn.Conv2d(8, 8, 3, stride=2, padding=1), per_image=True)


@needs_nnpack
@pytest.mark.parametrize("count", [1, 2, 7])
def test_a_roi_convolution_gives_each_roi_the_same_bits_whatever_its_batch(count):
    """All RoIs of all images go through one call; NNPACK's batched algorithm gives each RoI the
    same bits in any batch of 2 or more, and a lone RoI is run beside a zero one to get them too."""
    generator = torch.Generator().manual_seed(2)
    conv = _conv(64, generator, out_channels=96)
    winograd = WinogradConv2d(conv, per_image=False)
    rois = torch.randn(20, 64, 14, 14, generator=generator)
    with torch.inference_mode():
        everything = winograd(rois)
        some = winograd(rois[3 : 3 + count])
        expected = conv(rois)
    assert torch.equal(some, everything[3 : 3 + count])
    torch.testing.assert_close(everything, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    with torch.inference_mode():  # no RoIs at all: the wrapped convolution's empty output
        assert winograd(rois[:0]).shape == (0, 96, 14, 14)


def test_a_1x1_convolution_writes_nchw_from_either_layout():
    generator = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(32, 12, 1).eval().requires_grad_(False)
    pointwise = Conv1x1NCHW(conv)
    x = torch.randn(2, 32, 9, 11, generator=generator)
    with torch.inference_mode():
        expected = conv(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            got = pointwise(x.contiguous(memory_format=layout))
            assert got.is_contiguous()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1x1 stride-1"):
        Conv1x1NCHW(nn.Conv2d(4, 4, 3))


def _r50_fpn(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_preset("r50_fpn", num_classes=5, input=InputConfig(min_size=640, max_size=853))).eval()


def test_winograd_is_taken_only_where_it_pays_and_for_fp32():
    model = _r50_fpn()
    auto = optimize_for_inference(copy.deepcopy(model))
    wrapped = sum(isinstance(m, WinogradConv2d) for m in auto.modules())
    # the FPN's 4 outputs, the RPN's conv and the mask head's 4 convs on an AVX2 CPU; none elsewhere
    assert wrapped == (9 if winograd_available() else 0)
    held = optimize_for_inference(copy.deepcopy(model), weights_dtype=torch.bfloat16)
    assert not any(isinstance(m, (WinogradConv2d, Conv1x1NCHW)) for m in held.modules())
    with pytest.raises(ValueError, match="fp32 models only"):
        optimize_for_inference(copy.deepcopy(model), weights_dtype=torch.bfloat16, winograd=True)
    # C4 has no FPN: nothing to swap
    assert use_winograd(build_model(get_preset("small_c4", num_classes=3))) == 0


@needs_nnpack
def test_the_fast_path_with_winograd_finds_the_same_detections_in_any_batch():
    """An R50-FPN at 640 px (P2-P4 and the mask head on NNPACK): the same detections as without
    Winograd (boxes within 0.01 px, scores within 1e-4), and each image's the same alone as in a
    batch of two."""
    model = _r50_fpn(1)
    model.roi_heads.score_thresh = 0.0
    direct = optimize_for_inference(copy.deepcopy(model), winograd=False)
    winograd = optimize_for_inference(copy.deepcopy(model), winograd=True)
    generator = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 300, 400, generator=generator) for _ in range(2)]
    with torch.inference_mode():
        expected = direct(images)
        together = winograd(images)
        alone = [winograd([image])[0] for image in images]
    for exp, got, one in zip(expected, together, alone):
        assert len(got["scores"]) == len(exp["scores"]) > 0
        assert torch.equal(got["labels"], exp["labels"])
        torch.testing.assert_close(got["boxes"], exp["boxes"], rtol=0, atol=1e-2)
        torch.testing.assert_close(got["scores"], exp["scores"], rtol=0, atol=1e-4)
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(got[key], one[key]), key
