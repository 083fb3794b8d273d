"""Unit tests of the model's parts: hand-computed values, slow references, empty inputs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from maskrcnn.config import PRESETS, ModelConfig, get_preset
from maskrcnn.modeling import build_model
from maskrcnn.modeling.anchor_generator import AnchorGenerator
from maskrcnn.modeling.box_regression import BoxCoder
from maskrcnn.modeling.matcher import Matcher, sample_positives_negatives
from maskrcnn.modeling.poolers import MultiScaleRoIPooler, assign_levels, roi_align_gather
from maskrcnn.modeling.postprocessing import paste_masks
from maskrcnn.modeling.preprocessing import batch_images, resize_image, resized_size
from maskrcnn.modeling.roi_heads.box_head import fast_rcnn_loss
from maskrcnn.modeling.roi_heads.mask_head import mask_rcnn_loss


def _random_boxes(n, size=200.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---- box coder ---------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    refs, gts = _random_boxes(50, generator=g), _random_boxes(50, generator=g)
    coder = BoxCoder(weights)
    decoded = coder.decode(coder.encode(gts, refs), refs)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], gts, atol=1e-3, rtol=1e-5)


def test_box_coder_hand_computed():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # centre (10, 20) vs (5, 10); 1x width, 2x height
    expected = torch.tensor([[10 * 5 / 10, 10 * 10 / 20, 5 * math.log(1.0), 5 * math.log(2.0)]])
    torch.testing.assert_close(coder.encode(gt, ref), expected)


def test_box_coder_decodes_no_boxes():
    assert BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(0, 12), torch.zeros(0, 4)).shape == (0, 3, 4)


def test_box_coder_clamps_huge_deltas():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert torch.isfinite(out).all()
    assert float(out[0, 0, 2] - out[0, 0, 0]) == pytest.approx(1000.0, rel=1e-4)


# ---- matcher and sampler -----------------------------------------------------------------

def test_matcher_thresholds_and_low_quality_matches():
    # 2 gts x 4 predictions
    iou = torch.tensor([[0.8, 0.5, 0.1, 0.0], [0.1, 0.2, 0.25, 0.05]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, Matcher.BETWEEN, Matcher.BELOW_LOW, Matcher.BELOW_LOW]
    # gt 1's best prediction (index 2, IoU 0.25) keeps its match despite being under both thresholds
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, Matcher.BETWEEN, 1, Matcher.BELOW_LOW]


def test_matcher_without_ground_truth():
    assert Matcher(0.5, 0.5)(torch.zeros(0, 3)).tolist() == [Matcher.BELOW_LOW] * 3


def test_sampler_respects_fraction_and_ignores():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_positives_negatives(labels, 16, 0.25)
    assert int(pos.sum()) == 4 and int(neg.sum()) == 12
    assert bool((labels[pos] >= 1).all()) and bool((labels[neg] == 0).all())
    assert not bool((pos | neg)[-5:].any())


def test_sampler_fills_with_negatives_and_handles_scarcity():
    # 2 positives (cap 4): 14 negatives fill the batch of 16
    labels = torch.tensor([0] * 50 + [1, 2] + [-1] * 3)
    pos, neg = sample_positives_negatives(labels, 16, 0.25)
    assert int(pos.sum()) == 2 and int(neg.sum()) == 14
    # fewer candidates than the batch: all of them, nothing else
    labels = torch.tensor([0, 0, 1, -1])
    pos, neg = sample_positives_negatives(labels, 16, 0.5)
    assert pos.tolist() == [False, False, True, False] and neg.tolist() == [True, True, False, False]
    pos, neg = sample_positives_negatives(torch.zeros(0), 16, 0.5)
    assert pos.shape == neg.shape == (0,)


def test_sampler_is_uniform():
    torch.manual_seed(0)
    labels = torch.tensor([1] * 8 + [0] * 8)
    counts = torch.zeros(16)
    for _ in range(2000):
        pos, neg = sample_positives_negatives(labels, 6, 0.5)  # 3 of 8 positives, 3 of 8 negatives
        counts += (pos | neg).float()
    # each is chosen with probability 3/8: 750 of 2000, binomial sd ~22
    assert (counts - 750).abs().max() < 100, counts.tolist()


# ---- anchors -------------------------------------------------------------------------------

def test_anchor_generator_grid_and_shapes():
    gen = AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),))
    feature = torch.zeros(1, 8, 2, 3)
    (anchors,) = gen((16, 24), [feature])
    assert anchors.shape == (2 * 3 * 3, 4)
    # cell (0, 0), aspect 1: a 32x32 box centred on the origin
    assert anchors[1].tolist() == [-16.0, -16.0, 16.0, 16.0]
    # cell (row 1, col 2) is shifted by the stride (8, 8)
    assert anchors[(1 * 3 + 2) * 3 + 1].tolist() == [-16.0 + 16, -16.0 + 8, 16.0 + 16, 16.0 + 8]


# ---- RoIAlign against a slow float64 reference ---------------------------------------------

def _bilinear(feature, y, x):
    h, w = feature.shape[-2:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
            + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])


def _roi_align_reference(feature, box, out, scale, sampling_ratio):
    """The paper's RoIAlign: each bin averages sampling_ratio^2 bilinear samples, no rounding."""
    x1, y1, x2, y2 = [float(v) * scale for v in box]
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_w, bin_h = roi_w / out, roi_h / out
    result = torch.zeros(feature.shape[0], out, out, dtype=torch.float64)
    for i in range(out):
        for j in range(out):
            acc = torch.zeros(feature.shape[0], dtype=torch.float64)
            for sy in range(sampling_ratio):
                for sx in range(sampling_ratio):
                    y = y1 + i * bin_h + (sy + 0.5) * bin_h / sampling_ratio
                    x = x1 + j * bin_w + (sx + 0.5) * bin_w / sampling_ratio
                    acc += _bilinear(feature, y, x)
            result[:, i, j] = acc / sampling_ratio**2
    return result


@pytest.mark.parametrize("training", [True, False], ids=["gather", "torchvision"])
def test_roi_align_matches_slow_reference(training):
    g = torch.Generator().manual_seed(0)
    feature = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[1.3, 2.2, 9.7, 10.1], [0.0, 0.0, 13.9, 11.9], [5.5, 3.25, 6.0, 4.0]], dtype=torch.float64)
    pooler = MultiScaleRoIPooler(output_size=3, sampling_ratio=2).train(training)
    assert pooler.gathers(feature.device) == training
    # one level at stride 2: a 12x14 image
    out = pooler([feature], [boxes], [(12, 14)])
    assert out.shape == (3, 2, 3, 3)
    for k in range(3):
        torch.testing.assert_close(out[k], _roi_align_reference(feature[0], boxes[k], 3, 0.5, 2))


def test_roi_align_gradcheck():
    from torchvision.ops import roi_align

    feature = torch.rand(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.7, 3.9, 4.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 2), 1.0, 2), (feature,))


def _odd_rois(count, num_images, height, width, scale, dtype, generator):
    """RoIs of every kind roi_align must place: inside the map, across its edges, wholly
    outside it, smaller than a pixel, inverted (x2 < x1), on every image of the batch."""
    size = torch.tensor([width, height], dtype=dtype) / scale
    xy = torch.rand(count, 2, generator=generator, dtype=dtype) * size * 1.4 - size * 0.2
    wh = torch.rand(count, 2, generator=generator, dtype=dtype) * size * 0.6
    wh[: count // 8] = 0.3  # sub-pixel
    wh[count // 8 : count // 4] *= -0.1  # inverted
    image = torch.randint(0, num_images, (count, 1), generator=generator).to(dtype)
    return torch.cat([image, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_roi_align_is_torchvisions_forward_and_backward(aligned, sampling_ratio, dtype):
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(sampling_ratio)
    feature = torch.randn(3, 5, 11, 17, generator=g, dtype=dtype).requires_grad_()
    rois = _odd_rois(64, 3, 11, 17, 0.25, dtype, g)
    expected = roi_align(feature, rois, (7, 6), 0.25, sampling_ratio, aligned)
    got = roi_align_gather(feature, rois, (7, 6), 0.25, sampling_ratio, aligned)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 1e-12}
    torch.testing.assert_close(got, expected, **tol)
    grad = torch.randn(expected.shape, generator=g, dtype=dtype)
    (want,) = torch.autograd.grad(expected, feature, grad)
    (have,) = torch.autograd.grad(got, feature, grad)
    torch.testing.assert_close(have, want, **tol)
    # a channels_last map (the inference fast path's) is read as it is, to the same result
    nhwc = roi_align_gather(feature.detach().contiguous(memory_format=torch.channels_last), rois, (7, 6), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(nhwc, got.detach(), rtol=0, atol=0)


def test_gather_roi_align_samples_on_the_limits_as_torchvision():
    """One sample per RoI, placed exactly on the limits of torchvision's rules: -1 and the map's
    size still count (they read the edge), a hair beyond does not; 0 and size - 1 exactly."""
    from torchvision.ops import roi_align

    feature = torch.arange(4 * 5, dtype=torch.float64).view(1, 1, 4, 5) + 1
    centres = [(-1.0, -1.0), (5.0, 4.0), (-1.0001, 2.0), (2.0, 4.0001), (0.0, 0.0), (4.0, 3.0), (2.5, 1.25)]
    rois = torch.tensor([[0, x - 1, y - 1, x + 1, y + 1] for x, y in centres], dtype=torch.float64)
    expected = roi_align(feature, rois, (1, 1), 1.0, 1)
    torch.testing.assert_close(roi_align_gather(feature, rois, (1, 1), 1.0, 1), expected, rtol=0, atol=0)
    assert expected.flatten().tolist()[2:4] == [0.0, 0.0] and min(expected.flatten().tolist()[:2]) > 0


def test_gather_roi_align_gradcheck_empty_and_errors():
    feature = torch.rand(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.7, 3.9, 4.2], [1, -3, -2, 9, 8.0], [1, 4.5, 3.5, 4.6, 3.6]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align_gather(f, rois, (2, 3), 1.0, 2), (feature,))
    assert roi_align_gather(feature, rois[:0], (2, 2), 1.0, 2).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_gather(feature, rois, (2, 2), 1.0, 0)


def test_gather_roi_align_under_autocast_runs_in_fp32_and_returns_the_input_dtype():
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 4, 9, 9, generator=g).to(torch.bfloat16)
    rois = _odd_rois(16, 1, 9, 9, 0.5, torch.float32, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = roi_align_gather(feature, rois, (3, 3), 0.5, 2)
        expected = roi_align(feature, rois, (3, 3), 0.5, 2)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.02)


def test_pooler_gathers_in_training_and_on_the_fast_path_with_the_same_result():
    """Over four FPN levels: the training-mode pooler (gather) equals the eval-mode one
    (torchvision's kernel), gradients included; sampling_ratio 0 (adaptive) always runs
    torchvision's kernel; optimize_for_inference switches eval mode to the gather."""
    from maskrcnn.modeling.optimize import optimize_for_inference

    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 4, 128 // s, 96 // s, generator=g, requires_grad=True) for s in (4, 8, 16, 32)]
    boxes = [_random_boxes(40, 90.0, g), _random_boxes(25, 120.0, g) * 0.8]
    pooler = MultiScaleRoIPooler(output_size=7, sampling_ratio=2)
    device = features[0].device
    assert pooler.train().gathers(device) and not pooler.eval().gathers(device)
    assert not MultiScaleRoIPooler(output_size=7, sampling_ratio=0).train().gathers(device)
    exact = pooler.eval()(features, boxes, [(128, 96), (100, 80)])
    gathered = pooler.train()(features, boxes, [(128, 96), (100, 80)])
    torch.testing.assert_close(gathered, exact, rtol=0, atol=1e-5)
    weights = torch.randn(exact.shape, generator=g)
    want = torch.autograd.grad(exact, features, weights)
    have = torch.autograd.grad(gathered, features, weights)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    model = build_model(get_preset("small", num_classes=3))
    poolers = [m for m in model.modules() if isinstance(m, MultiScaleRoIPooler)]
    assert poolers and not any(p.eval().gathers(device) for p in poolers)
    assert model.rpn.exact_inference and model.roi_heads.exact_inference
    optimize_for_inference(model)
    assert all(p.gathers(device) for p in poolers)
    assert not model.rpn.exact_inference and not model.roi_heads.exact_inference  # NMS stops at the top-k


def test_pooler_empty_rois_and_level_assignment():
    pooler = MultiScaleRoIPooler(output_size=7, sampling_ratio=2)
    features = [torch.rand(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    out = pooler(features, [torch.zeros(0, 4)], [(64, 64)])
    assert out.shape == (0, 4, 7, 7)
    # FPN eq. 1: a 224x224 box goes to P4, 112 to P3, 56 and smaller to P2, 448+ to P5
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 20, 20], [0, 0, 900, 900.0]])
    assert assign_levels(boxes, 2, 5).tolist() == [2, 1, 0, 3]


def test_roi_pool_variant_runs():
    pooler = MultiScaleRoIPooler(output_size=7, sampling_ratio=2, pooler_type="pool")
    features = [torch.rand(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    out = pooler(features, [torch.tensor([[3.0, 4.0, 40.0, 50.0]])], [(64, 64)])
    assert out.shape == (1, 4, 7, 7)


# ---- mask pasting against a direct computation ---------------------------------------------

def _paste_direct(probs, box, height, width):
    """One mask: pad by one pixel, expand the box to match, round it down to whole pixels,
    resize with F.interpolate and copy the part inside the image."""
    m = probs.shape[-1]
    padded = F.pad(probs, (1, 1, 1, 1))
    scale = (m + 2) / m
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x0, y0, x1, y1 = [int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh)]
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(height, width)
    for y in range(max(y0, 0), min(y0 + h, height)):
        for x in range(max(x0, 0), min(x0 + w, width)):
            out[y, x] = resized[y - y0, x - x0]
    return out


def test_paste_masks_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 4.7, 30.1, 21.9], [-6.0, -3.0, 12.0, 50.0], [35.0, 20.0, 70.0, 44.0], [10.0, 10.0, 10.3, 10.2]])
    pasted = paste_masks(probs, boxes, (40, 60), threshold=None)
    assert pasted.shape == (4, 40, 60)
    for k in range(4):
        torch.testing.assert_close(pasted[k], _paste_direct(probs[k], boxes[k].tolist(), 40, 60), atol=1e-5, rtol=0)
    binary = paste_masks(probs, boxes, (40, 60))
    assert binary.dtype == torch.bool and torch.equal(binary, pasted >= 0.5)


def test_paste_masks_empty():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 7)).shape == (0, 5, 7)


# ---- preprocessing -----------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(480, 640), (300, 200), (1, 1), (100, 1000)])
def test_resized_size_predicts_resize(hw):
    image = torch.rand(3, *hw)
    assert tuple(resize_image(image, 800, 1333).shape[-2:]) == resized_size(*hw, 800, 1333)


def test_batch_images_pads_to_multiple():
    batch = batch_images([torch.ones(3, 30, 50), torch.ones(3, 40, 20)], 32)
    assert batch.tensor.shape == (2, 3, 64, 64)
    assert batch.image_sizes == [(30, 50), (40, 20)]
    assert float(batch.tensor[1, :, 40:].abs().sum()) == 0.0


# ---- losses ------------------------------------------------------------------------------

def test_fast_rcnn_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    deltas = torch.zeros(2, 12)
    deltas[1, 4:8] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # class 1 of RoI 1
    labels = torch.tensor([0, 1])
    targets = torch.zeros(2, 4)
    losses = fast_rcnn_loss(logits, deltas, labels, targets)
    expected_cls = (F.cross_entropy(logits[:1], labels[:1]) + F.cross_entropy(logits[1:], labels[1:])) / 2
    torch.testing.assert_close(losses["loss_classifier"], expected_cls)
    # smooth L1 with beta 1/9 on 0.5 (linear part): 0.5 - 0.5/9, over 2 sampled RoIs
    torch.testing.assert_close(losses["loss_box_reg"], torch.tensor((0.5 - 0.5 / 9) / 2))


def test_mask_loss_uses_the_true_class_mask_only():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 10.0  # confident "on" for class 2
    logits[0, 1] = -10.0  # confident "off" for class 1: must not matter for an RoI of class 2
    target = torch.ones(1, 2, 2)
    loss = mask_rcnn_loss(logits, torch.tensor([2]), target)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-10.0)), rel=1e-4)


def test_mask_loss_without_positives_is_zero_with_grad():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    loss = mask_rcnn_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert float(loss.detach()) == 0.0
    loss.backward()


def _small_model(**overrides):
    torch.manual_seed(0)
    return build_model(get_preset("small", **overrides))


def _target(boxes, labels, size):
    masks = torch.zeros(len(boxes), *size, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, int(y1):int(y2), int(x1):int(x2)] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def test_training_losses_on_empty_and_nonempty_targets():
    model = _small_model()
    model.train()
    images = [torch.rand(3, 120, 160), torch.rand(3, 90, 70)]
    targets = [_target([[10, 20, 60, 80], [50, 5, 120, 60]], [1, 3], (120, 160)), _target([], [], (90, 70))]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None

    model.zero_grad()
    empty = model([images[1]], [targets[1]])
    assert float(empty["loss_mask"]) == 0.0 and float(empty["loss_box_reg"]) == 0.0 and float(empty["loss_rpn_box_reg"]) == 0.0
    assert float(empty["loss_classifier"]) > 0
    sum(empty.values()).backward()


def test_inference_outputs_original_sizes_and_sorted_scores():
    model = _small_model()
    model.roi_heads.score_thresh = 0.0
    model.eval()
    sizes = [(120, 160), (90, 70), (33, 300)]
    with torch.inference_mode():
        outputs = model([torch.rand(3, *s) for s in sizes])
    for out, (h, w) in zip(outputs, sizes):
        d = out["boxes"].shape[0]
        assert out["masks"].shape == (d, h, w) and out["masks"].dtype == torch.bool
        assert out["scores"].shape == (d,) and out["labels"].shape == (d,)
        assert d <= model.roi_heads.detections_per_img
        assert bool((out["labels"] >= 1).all())
        assert bool((out["scores"][:-1] >= out["scores"][1:]).all())
        assert bool((out["boxes"][:, 2] <= w + 1e-3).all()) and bool((out["boxes"][:, 3] <= h + 1e-3).all())


def test_predict_by_size_gives_each_image_its_batch_1_detections():
    """Images are batched only with others of their padded size, so each gets the detections it
    gets alone (the small preset's GroupNorm and every conv bias see the padding: a whole-batch
    forward gives others); per-image keyword arguments are split alike and the predictions come
    back in the images' order."""
    from maskrcnn.modeling.meta_arch import predict_by_size, size_groups

    assert size_groups([(64, 96), (96, 64), (64, 96), (64, 64)]) == [[0, 2], [1], [3]]
    assert size_groups([]) == []
    model = _small_model()
    model.roi_heads.score_thresh = 0.0
    model.eval()
    g = torch.Generator().manual_seed(4)
    shapes = [(60, 90), (100, 70), (61, 92), (120, 50), (58, 88)]
    images = [torch.rand(3, h, w, generator=g) for h, w in shapes]
    originals = [(2 * h, 2 * w) for h, w in shapes]
    padded = [model.transform.padded_size(h, w) for h, w in shapes]
    assert padded[0] == padded[2] == padded[4] and len(set(padded)) == 3, padded
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    with torch.inference_mode():
        got = predict_by_size(model, images, original_sizes=originals)
        alone = [model([image], original_sizes=[size])[0] for image, size in zip(images, originals)]
        together = model(images, original_sizes=originals)
    assert calls[:3] == [3, 1, 1]
    calls.clear()
    with torch.inference_mode():
        chunked = predict_by_size(model, images, max_batch=2, original_sizes=originals)
    assert calls == [2, 1, 1, 1]  # the group of 3 in forwards of at most 2
    for out, exp in zip(chunked, alone):
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-5, rtol=0)
    for i, out in enumerate(got):
        assert out["masks"].shape[-2:] == originals[i]
        assert torch.equal(out["labels"], alone[i]["labels"])
        torch.testing.assert_close(out["boxes"], alone[i]["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out["scores"], alone[i]["scores"], atol=1e-5, rtol=0)
    # the case the grouping avoids: padded with the others, the same images detect differently
    assert any(together[i]["scores"].shape != alone[i]["scores"].shape
               or not torch.allclose(together[i]["scores"], alone[i]["scores"], atol=1e-5) for i in range(len(images)))


def test_inference_with_no_detections():
    model = _small_model()
    model.roi_heads.score_thresh = 1.0
    model.eval()
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 50, 60)])
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 50, 60)


def test_model_rejects_bad_inputs():
    model = _small_model()
    model.eval()
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model([torch.rand(1, 10, 10)])
    with pytest.raises(ValueError, match=r"images\[0\].*float"):
        model([torch.zeros(3, 10, 10, dtype=torch.uint8)])
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 10, 10)])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\]"):
        model([torch.rand(3, 40, 40)], [_target([[10, 10, 5, 20]], [1], (40, 40))])
    good, bad = _target([[1, 2, 30, 20]], [1], (40, 40)), _target([[1, 2, 30, 20], [10, 10, 30, 10]], [1, 2], (40, 40))
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[1\] = \[10.0, 10.0, 30.0, 10.0\] has no positive"):
        model([torch.rand(3, 40, 40)] * 2, [good, bad])  # one check for the batch; the culprit named


# ---- config ------------------------------------------------------------------------------

def test_config_round_trip_and_errors():
    cfg = get_preset("small", num_classes=7)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again.anchors.sizes, tuple)
    with pytest.raises(ValueError, match="unknown model preset 'r51'.*r50_fpn"):
        get_preset("r51")
    bad = cfg.to_dict()
    bad["rpn"]["nms_treshold"] = 0.5
    with pytest.raises(ValueError, match=r"nms_treshold.*config\.rpn"):
        ModelConfig.from_dict(bad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    """Every preset builds and runs one small image in eval mode, returning what its heads promise
    at the input's size. Small inputs and few proposals keep the large trunks (and C4's res5 box
    head, run once per RoI) quick on a CPU."""
    cfg = get_preset(name, num_classes=3).with_overrides(min_size=64, max_size=80, score_thresh=0.0, detections_per_img=5)
    cfg = cfg.replace(rpn=dataclasses.replace(cfg.rpn, pre_nms_top_n_test=50, post_nms_top_n_test=8))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    # Untrained, a deep frozen-BN trunk's activations double with every residual block (to ~1e5 on
    # ResNet-101) and no proposal survives; each block starting as the identity keeps them in range.
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.zero_()
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 64, 80)])
    expected = {"boxes", "scores", "labels"}
    expected |= {"masks"} if cfg.mask_head.enabled else set()
    expected |= {"keypoints", "keypoints_scores"} if cfg.keypoint_head.enabled else set()
    assert set(out) == expected
    d = out["boxes"].shape[0]
    assert 1 <= d <= 5, d
    assert out["boxes"].shape == (d, 4) and out["scores"].shape == (d,) and out["labels"].shape == (d,)
    assert bool((out["labels"] >= 1).all()) and bool((out["labels"] < 3).all())
    if cfg.mask_head.enabled:
        assert out["masks"].shape == (d, 64, 80) and out["masks"].dtype == torch.bool
    if cfg.keypoint_head.enabled:
        k = cfg.keypoint_head.num_keypoints
        assert out["keypoints"].shape == (d, k, 3) and out["keypoints_scores"].shape == (d, k)
    if name == "r50_fpn":  # torchvision's default: stem and res2 frozen
        assert not model.backbone.body.conv1.weight.requires_grad
        assert model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_paste_masks_in_chunks_equals_one_pass(monkeypatch):
    import maskrcnn.modeling.postprocessing as post

    g = torch.Generator().manual_seed(1)
    probs = torch.rand(7, 28, 28, generator=g)
    boxes = _random_boxes(7, size=50.0, generator=g)
    whole = paste_masks(probs, boxes, (60, 80), threshold=None)
    monkeypatch.setattr(post, "_CHUNK_ELEMENTS", 60 * 80 * 2)  # 2 masks per chunk
    torch.testing.assert_close(paste_masks(probs, boxes, (60, 80), threshold=None), whole)


def _nms_inputs(count: int, classes: int, seed: int):
    """Overlapping boxes in a 480 px square, scores with many ties (every fifth equal), classes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + torch.rand(count, 2, generator=g) * 80 + 1], dim=1)
    scores = torch.rand(count, generator=g)
    scores[::5] = scores[min(1, count - 1)]
    return boxes, scores, torch.randint(0, classes, (count,), generator=g)


@pytest.mark.parametrize("count,classes", [(3000, 90), (900, 5), (6000, 3), (1500, 1)])
def test_batched_nms_keeps_what_torchvision_keeps(count, classes):
    """Above torchvision's size switch (1000 boxes on the CPU) our grouped NMS runs; below it,
    torchvision's own. Either way the kept indices and their order are torchvision's, ties included."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling.nms import batched_nms

    boxes, scores, idxs = _nms_inputs(count, classes, seed=count)
    expected = box_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert 0 < len(expected) < count
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), expected)


@pytest.mark.parametrize("count,classes", [(3000, 90), (900, 5), (6000, 3), (1500, 1), (1, 1), (40, 40)])
def test_dense_batched_nms_keeps_what_torchvision_keeps(count, classes):
    """The GPU path (all groups at once, greedy NMS as a fixed point), run here on the CPU:
    torchvision's kept indices and order, ties and chains of suppression included."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    boxes, scores, idxs = _nms_inputs(count, classes, seed=count + classes)
    idxs = idxs * 7  # group ids need not be 0..G-1
    expected = box_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(nms.dense_batched_nms(boxes, scores, idxs, 0.5), expected)
    # a chain: each box overlaps the next one, so keeping alternates (many rounds to settle)
    steps = torch.arange(30, dtype=torch.float32)[:, None] * 3.0
    chain = torch.cat([steps, torch.zeros(30, 1), steps + 10, torch.full((30, 1), 10.0)], dim=1)
    chain_scores = torch.linspace(1, 0.1, 30)
    same = torch.zeros(30, dtype=torch.int64)
    assert torch.equal(nms.dense_batched_nms(chain, chain_scores, same, 0.5), box_ops.batched_nms(chain, chain_scores, same, 0.5))
    assert len(box_ops.batched_nms(chain, chain_scores, same, 0.5)) == 15


def test_dense_batched_nms_in_chunks_and_empty(monkeypatch):
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(500, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 60 + 1], dim=1)
    scores, idxs = torch.rand(500, generator=g), torch.randint(0, 9, (500,), generator=g)
    monkeypatch.setattr(nms, "_DENSE_ELEMENTS", 1)  # one group per chunk
    assert torch.equal(nms.dense_batched_nms(boxes, scores, idxs, 0.7), box_ops.batched_nms(boxes, scores, idxs, 0.7))
    assert nms.dense_batched_nms(boxes[:0], scores[:0], idxs[:0], 0.7).shape == (0,)


def _in_score_then_index_order(keep, scores):
    """``keep`` reordered by decreasing score, equal scores by index (torchvision's one-call order)."""
    return torch.tensor(sorted(keep.tolist(), key=lambda i: (-float(scores[i]), i)), dtype=torch.int64)


@pytest.mark.parametrize("count,classes", [(3000, 90), (900, 5), (6000, 3), (1500, 1), (1, 1), (40, 40)])
@pytest.mark.parametrize("max_keep", [1, 100, 1000])
def test_leading_batched_nms_is_the_full_nms_top_k(count, classes, max_keep):
    """NMS that stops once it has max_keep boxes: the same boxes as torchvision's full NMS cut to
    max_keep, equal scores (every fifth score here) in index order."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    boxes, scores, idxs = _nms_inputs(count, classes, seed=count + classes + max_keep)
    idxs = idxs * 3
    full = _in_score_then_index_order(box_ops.batched_nms(boxes, scores, idxs, 0.5), scores)
    got = nms.batched_nms(boxes, scores, idxs, 0.5, max_keep=max_keep)
    assert torch.equal(got, full[:max_keep])
    assert torch.equal(nms.leading_batched_nms(boxes, scores, idxs, 0.5, max_keep), got)


def test_leading_batched_nms_across_blocks_and_empty():
    """Suppressions that reach from one block of the walk into later ones: 700 copies of one box
    (one survives), then a 30-box chain whose keeping alternates, all in one group, and a second
    group the first one must not suppress."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    copies = torch.tensor([[0.0, 0.0, 50.0, 50.0]]).repeat(700, 1)
    steps = torch.arange(30, dtype=torch.float32)[:, None] * 3.0 + 100
    chain = torch.cat([steps, torch.zeros(30, 1), steps + 10, torch.full((30, 1), 10.0)], dim=1)
    boxes = torch.cat([copies, chain, copies[:5] + 1])
    scores = torch.cat([torch.linspace(1.0, 0.9, 700), torch.linspace(0.8, 0.1, 30), torch.full((5,), 0.05)])
    idxs = torch.cat([torch.zeros(730, dtype=torch.int64), torch.ones(5, dtype=torch.int64)])
    full = box_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert len(full) == 1 + 15 + 1
    for max_keep in (1, 2, 16, 17, 100):
        assert torch.equal(nms.leading_batched_nms(boxes, scores, idxs, 0.5, max_keep), full[:max_keep])
    assert nms.leading_batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5, 10).shape == (0,)
    assert nms.leading_batched_nms(boxes, scores, idxs, 0.5, 0).shape == (0,)


def _valid_subsets(count: int, images: int, seed: int) -> torch.Tensor:
    """(images, count) valid flags, about 80% True, different per image."""
    return torch.rand(images, count, generator=torch.Generator().manual_seed(seed)) > 0.2


@pytest.mark.parametrize("count,classes,top_m", [(3000, 90, 512), (3000, 90, 64), (900, 5, 4096), (6000, 3, 256), (1, 1, 8), (40, 40, 8)])
@pytest.mark.parametrize("max_keep", [1, 100])
def test_top_m_batched_nms_is_torchvisions_nms_cut_to_max_keep(count, classes, top_m, max_keep):
    """The box head's fixed-shape NMS over two images' valid boxes: per image torchvision's kept
    boxes, first max_keep, equal scores (every fifth) in index order; with few candidates
    compared (top_m 64 < max_keep 100), the full NMS runs, and is counted."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    boxes, scores, idxs = _nms_inputs(count, classes, seed=count + classes)
    valid = _valid_subsets(count, 2, seed=count)
    nms.stats.clear()
    got = nms.top_m_batched_nms(boxes.expand(2, -1, -1), scores.expand(2, -1), idxs.expand(2, -1), valid, 0.5, max_keep, top_m=top_m)
    for image, keep in enumerate(got):
        subset = torch.where(valid[image])[0]
        full = subset[box_ops.batched_nms(boxes[subset], scores[subset], idxs[subset], 0.5)]
        assert torch.equal(keep, _in_score_then_index_order(full, scores)[:max_keep])
        assert torch.equal(keep, subset[nms.leading_batched_nms(boxes[subset], scores[subset], idxs[subset], 0.5, max_keep)])
    assert nms.stats["images"] == 2
    if top_m < max_keep < count:
        assert nms.stats["full_nms"] == 2
    if top_m >= count:
        assert nms.stats["full_nms"] == 0


def test_top_m_batched_nms_with_equal_scores_on_overlapping_boxes():
    """Boxes three times over with the same score and class: the first of each kept, as by
    torchvision's NMS; padding marked invalid (here with the highest scores) changes nothing."""
    from torchvision.ops import boxes as box_ops

    from maskrcnn.modeling import nms

    boxes, scores, idxs = _nms_inputs(600, 20, seed=4)
    triple = torch.arange(1800) // 3
    boxes, scores, idxs = boxes[triple], scores[triple], idxs[triple]
    full = box_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert len(full) >= 100 and bool((full % 3 == 0).all())
    padded = [torch.cat([t, torch.full((50, *t.shape[1:]), fill, dtype=t.dtype)])[None] for t, fill in
              ((boxes, 0.0), (scores, 2.0), (idxs, 0), (torch.ones(1800, dtype=torch.bool), False))]
    for max_keep in (7, 100):
        (got,) = nms.top_m_batched_nms(*padded, 0.5, max_keep, top_m=256)
        assert torch.equal(got, _in_score_then_index_order(full, scores)[:max_keep])


def _chain(length: int = 30):
    """Boxes each overlapping the next (IoU 0.54), by decreasing score: greedy NMS keeps every
    other one, and the fixed point needs as many rounds as the chain is long."""
    steps = torch.arange(length, dtype=torch.float32)[:, None] * 3.0
    boxes = torch.cat([steps, torch.zeros(length, 1), steps + 10, torch.full((length, 1), 10.0)], dim=1)
    return boxes, torch.linspace(1, 0.1, length)


@pytest.mark.parametrize("rounds", [1, 4, 40])
def test_fixed_shape_nms_with_too_few_rounds_stays_exact(rounds):
    """Boxes whose two last rounds agree are certain; the first max_keep kept before any
    uncertain box are the answer, else the exact NMS runs (counted as unsettled)."""
    from maskrcnn.modeling import nms

    boxes, scores = _chain()
    same, valid = torch.zeros(30, dtype=torch.int64), torch.ones(30, dtype=torch.bool)
    for max_keep in (1, 2, 15, 20):
        nms.stats.clear()
        expected = nms.leading_batched_nms(boxes, scores, same, 0.5, max_keep)
        got = nms.top_m_batched_nms(boxes[None], scores[None], same[None], valid[None], 0.5, max_keep, rounds=rounds)
        assert torch.equal(got[0], expected)
        # two groups of 10 and 20 (the chain cut in two): each settled on its own
        grouped = nms.grouped_batched_nms(boxes[None], scores[None], valid[None], [10, 20], 0.5, max_keep, rounds=rounds)
        cut = torch.cat([nms.leading_batched_nms(boxes[:10], scores[:10], same[:10], 0.5, 30),
                         10 + nms.leading_batched_nms(boxes[10:], scores[10:], same[10:], 0.5, 30)])
        assert torch.equal(grouped[0], _in_score_then_index_order(cut, scores)[:max_keep])
        if rounds == 40 or max_keep == 1:  # enough rounds; the first box is certain after one
            assert nms.stats["unsettled"] == 0
        if rounds == 1 and max_keep == 20:
            assert nms.stats["unsettled"] == 2  # one image each


def test_grouped_batched_nms_is_the_per_level_nms_top_k():
    """The RPN's fixed-shape NMS: levels of known sizes (each sorted inside the function), three
    images with different valid boxes, equal scores (every seventh) in index order."""
    from maskrcnn.modeling import nms

    g = torch.Generator().manual_seed(0)
    sizes, images = [300, 300, 200, 50], 3
    count = sum(sizes)
    xy = torch.rand(images, count, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(images, count, 2, generator=g) * 60 + 1], dim=2)
    scores = torch.rand(images, count, generator=g)
    scores[:, ::7] = 0.5
    valid = torch.rand(images, count, generator=g) > 0.1
    levels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    for max_keep in (10, 1000):
        got = nms.grouped_batched_nms(boxes, scores, valid, sizes, 0.7, max_keep)
        for image in range(images):
            subset = torch.where(valid[image])[0]
            expected = subset[nms.leading_batched_nms(boxes[image, subset], scores[image, subset], levels[subset], 0.7, max_keep)]
            assert torch.equal(got[image], expected)
    assert [k.shape for k in nms.grouped_batched_nms(boxes[:0], scores[:0], valid[:0], sizes, 0.7, 10)] == []
    assert all(len(k) == 0 for k in nms.top_m_batched_nms(boxes[:, :0], scores[:, :0], scores[:, :0].long(), valid[:, :0], 0.7, 10))
