"""Keypoint R-CNN: the keypoint head, its loss and inference, the presets and checkpoints, COCO
keypoint data with the left/right flip, and a jobs.train -> jobs.label -> jobs.export_coco round
trip on the synthetic squares' corners (tests/test_keypoint_parity.py has the parity with torchvision)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor as TvKeypointRCNNPredictor

from maskrcnn.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from maskrcnn.config import COCO_PERSON_KEYPOINT_NAMES, KeypointHeadConfig, ModelConfig, get_preset
from maskrcnn.data import AnnotationError, CocoDataset, RandomHorizontalFlip, make_sample_dataset
from maskrcnn.data.coco import keypoint_flip_indices
from maskrcnn.data.transforms import hflip
from maskrcnn.modeling import build_model, validate_config
from maskrcnn.modeling.optimize import optimize_for_inference
from maskrcnn.modeling.preprocessing import resize_target
from maskrcnn.modeling.roi_heads.keypoint_head import (
    KeypointRCNNConvHead,
    KeypointRCNNPredictor,
    heatmaps_to_keypoints,
    keypoint_rcnn_loss,
    keypoints_to_heatmap,
)

K = 4  # the synthetic squares' corners


@pytest.fixture
def one_thread():
    """Tiny convolutions: one intra-op thread is many times faster than two on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kp_data(tmp_path_factory):
    """8 training and 3 validation images of shapes whose squares carry their corners as keypoints."""
    return make_sample_dataset(str(tmp_path_factory.mktemp("kp")), {"train": 8, "val": 3}, seed=3, keypoints=True)


def _small_keypoint(**overrides):
    torch.manual_seed(0)
    return build_model(get_preset("small_keypoint", **overrides))


def _target(boxes, labels, keypoints):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "keypoints": torch.tensor(keypoints, dtype=torch.float32).reshape(len(boxes), K, 3),
    }


# ---------------------------------------------------------------- the head, its loss and inference


def test_head_shapes_and_torchvision_key_layout():
    head, predictor = KeypointRCNNConvHead(32, (16, 16, 8)), KeypointRCNNPredictor(8, 5)
    out = predictor(head(torch.rand(3, 32, 14, 14)))
    assert out.shape == (3, 5, 56, 56)
    assert predictor(head(torch.rand(0, 32, 14, 14))).shape == (0, 5, 56, 56)
    # the same parameter names and shapes as torchvision's, so its state dicts load as they are
    tv_head, tv_predictor = KeypointRCNNHeads(32, (16, 16, 8)), TvKeypointRCNNPredictor(8, 5)
    assert {k: v.shape for k, v in head.state_dict().items()} == {k: v.shape for k, v in tv_head.state_dict().items()}
    assert {k: v.shape for k, v in predictor.state_dict().items()} == {k: v.shape for k, v in tv_predictor.state_dict().items()}
    tv_head.load_state_dict(head.state_dict())
    tv_predictor.load_state_dict(predictor.state_dict())
    x = torch.rand(2, 32, 14, 14)
    assert torch.equal(tv_predictor(tv_head(x)), predictor(head(x)))


def test_heatmap_targets_by_hand():
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0]])  # 56 x 56 px: one pixel per heatmap cell
    keypoints = torch.tensor([[[10.0, 20.0, 2], [12.7, 30.2, 1], [66.0, 76.0, 2], [40.0, 40.0, 0], [9.9, 30.0, 2], [30.0, 76.5, 2]]])
    index, valid = keypoints_to_heatmap(keypoints, rois, 56)
    assert valid.tolist() == [[True, True, True, False, False, False]]  # hidden v=0 and outside the box are not trained
    assert index[0, :3].tolist() == [0, 10 * 56 + 2, 55 * 56 + 55]  # y * 56 + x; the right/bottom edge is the last cell
    assert index[0, 3:].tolist() == [0, 0, 0]


def test_loss_matches_torchvision_and_is_zero_without_visible_keypoints():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, K, 56, 56, generator=generator, requires_grad=True)
    props = torch.tensor([[10.0, 10, 60, 80], [0, 0, 30, 30], [5, 5, 100, 50], [20, 30, 40, 90], [0, 0, 56, 56]])
    gt = torch.rand(5, K, 3, generator=generator) * torch.tensor([100.0, 90.0, 1.0])
    gt[..., 2] = torch.tensor([2.0, 1.0, 0.0, 2.0]).repeat(5, 1)
    index, valid = keypoints_to_heatmap(gt, props, 56)
    ours = keypoint_rcnn_loss(logits, index, valid)
    theirs = tv_roi_heads.keypointrcnn_loss(logits, [props[:2], props[2:]], [gt[:2], gt[2:]], [torch.arange(2), torch.arange(3)])
    assert valid.sum() >= 4 and torch.equal(ours, theirs)
    # by hand: mean over valid keypoints of -log softmax at the target cell
    flat = logits.reshape(5 * K, -1)[valid.reshape(-1)]
    manual = -(flat.log_softmax(-1).gather(1, index.reshape(-1)[valid.reshape(-1)][:, None])).mean()
    assert torch.allclose(ours, manual)

    invisible = gt.clone()
    invisible[..., 2] = 0
    loss = keypoint_rcnn_loss(logits, *keypoints_to_heatmap(invisible, props, 56))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    empty = torch.randn(0, K, 56, 56, requires_grad=True)
    assert keypoint_rcnn_loss(empty, torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K, dtype=torch.bool)).item() == 0.0


def test_heatmaps_to_keypoints_matches_torchvision():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(6, K, 56, 56, generator=generator)
    rois = torch.tensor(
        [[3.3, 4.1, 70.8, 50.2], [0, 0, 0.5, 0.4], [100, 10, 101.5, 200], [7, 7, 63, 63], [1.2, 3.4, 300.9, 250.1], [5, 5, 5, 5]]
    )
    keypoints, scores = heatmaps_to_keypoints(maps, rois)
    expected_keypoints, expected_scores = tv_roi_heads.heatmaps_to_keypoints(maps, rois)
    assert torch.equal(keypoints, expected_keypoints) and torch.equal(scores, expected_scores)
    # a single peak: the keypoint is that cell's centre, mapped into the box
    peak = torch.full((1, 1, 56, 56), -10.0)
    peak[0, 0, 14, 42] = 10.0
    (point,), _ = heatmaps_to_keypoints(peak, torch.tensor([[100.0, 200.0, 156.0, 256.0]]))
    assert point[0].tolist() == pytest.approx([100 + 42.5, 200 + 14.5, 1.0], abs=1.0)


# ---------------------------------------------------------------- the model: training and inference


def test_training_step_losses_on_empty_and_nonempty_targets(one_thread):
    model = _small_keypoint()
    model.train()
    images = [torch.rand(3, 120, 160), torch.rand(3, 90, 70)]
    corners = [[30, 20, 2, 90, 20, 2, 90, 60, 1, 30, 60, 0], [60, 10, 2, 110, 10, 2, 110, 50, 2, 60, 50, 2]]
    targets = [_target([[30, 20, 90, 60], [60, 10, 110, 50]], [2, 1], corners), _target([], [], [])]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_keypoint"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_keypoint"].detach().item() == pytest.approx(math.log(56 * 56), rel=0.2)  # untrained: near uniform over 56 x 56
    sum(losses.values()).backward()
    grad = model.roi_heads.keypoint_predictor.kps_score_lowres.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0

    model.zero_grad()
    empty = model([images[1]], [targets[1]])
    assert empty["loss_keypoint"].detach().item() == 0.0 and empty["loss_classifier"].detach().item() > 0
    sum(empty.values()).backward()
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.weight.grad is not None

    with pytest.raises(ValueError, match="keypoints"):
        model(images[:1], [{k: v for k, v in targets[0].items() if k != "keypoints"}])
    with pytest.raises(ValueError, match="keypoints"):
        model(images[:1], [dict(targets[0], keypoints=torch.zeros(2, 17, 3))])


def test_inference_outputs_keypoints_in_original_pixels(one_thread):
    model = _small_keypoint()
    model.roi_heads.score_thresh = 0.0
    model.eval()
    sizes = [(120, 160), (90, 70), (33, 300)]
    images = [torch.rand(3, *s) for s in sizes]
    with torch.inference_mode():
        outputs = model(images)
    for out, (h, w) in zip(outputs, sizes):
        d = out["boxes"].shape[0]
        assert d > 0 and set(out) == {"boxes", "scores", "labels", "keypoints", "keypoints_scores"}  # no masks: no mask head
        assert out["keypoints"].shape == (d, K, 3) and out["keypoints_scores"].shape == (d, K)
        assert out["keypoints"].dtype == torch.float32 and bool((out["keypoints"][..., 2] == 1).all())
        # keypoints lie in their boxes, both in the input image's pixels (the model ran at another size)
        kx, ky, boxes = out["keypoints"][..., 0], out["keypoints"][..., 1], out["boxes"]
        assert bool((kx >= boxes[:, None, 0] - 0.5).all() and (kx <= boxes[:, None, 2] + 0.5).all())
        assert bool((ky >= boxes[:, None, 1] - 0.5).all() and (ky <= boxes[:, None, 3] + 0.5).all())
        assert bool((kx <= w + 0.5).all() and (ky <= h + 0.5).all())

    model.roi_heads.score_thresh = 1.0
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 50, 60)])
    assert out["keypoints"].shape == (0, K, 3) and out["keypoints_scores"].shape == (0, K)


def test_postprocessing_scales_keypoints_like_boxes():
    from maskrcnn.modeling.postprocessing import postprocess_detections

    result = {
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "keypoints": torch.tensor([[[10.0, 20.0, 1.0], [50.0, 60.0, 1.0]]]),
        "keypoints_scores": torch.tensor([[3.0, -1.0]]),
    }
    out = postprocess_detections(result, (100, 200), (50, 400))
    assert out["boxes"].tolist() == [[20.0, 10.0, 100.0, 30.0]]
    assert out["keypoints"].tolist() == [[[20.0, 10.0, 1.0], [100.0, 30.0, 1.0]]]
    assert torch.equal(out["keypoints_scores"], result["keypoints_scores"]) and "masks" not in out


def test_mask_model_has_no_keypoint_outputs():
    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    assert not model.roi_heads.has_keypoint and not any("keypoint" in k for k in model.state_dict())
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 80, 90)])
    assert set(out) == {"boxes", "scores", "labels", "masks"}


def test_config_round_trip_presets_and_validation():
    for name in ("keypoint_r50_fpn", "small_keypoint"):
        cfg = get_preset(name)
        assert cfg.keypoint_head.enabled and not cfg.mask_head.enabled
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tv = get_preset("keypoint_r50_fpn")
    assert (tv.num_classes, tv.keypoint_head.num_keypoints, tv.keypoint_head.conv_layers, tv.keypoint_head.pooled_resolution) == (
        2,
        17,
        (512,) * 8,
        14,
    )
    assert tv.keypoint_head.keypoint_names == COCO_PERSON_KEYPOINT_NAMES and tv.input.train_min_sizes == (640, 672, 704, 736, 768, 800)
    old = get_preset("r50_fpn").to_dict()
    del old["keypoint_head"]  # a checkpoint written before keypoints existed
    assert not ModelConfig.from_dict(old).keypoint_head.enabled
    for bad, match in [
        (KeypointHeadConfig(enabled=True, num_keypoints=0), "num_keypoints"),
        (KeypointHeadConfig(enabled=True, num_keypoints=3, keypoint_names=("a", "b")), "keypoint_names"),
        (KeypointHeadConfig(enabled=True, num_keypoints=3, skeleton=((1, 4),)), "skeleton"),
        (KeypointHeadConfig(enabled=True, conv_layers=()), "conv_layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate_config(get_preset("small").replace(keypoint_head=bad))


def test_training_draws_the_short_side_from_train_min_sizes():
    model = _small_keypoint()
    model.transform.train_min_sizes = (100, 140)
    model.train()
    sizes = {tuple(model.transform([torch.rand(3, 50, 60)])[0].image_sizes[0]) for _ in range(30)}
    assert sizes == {(100, 120), (140, 168)}
    model.eval()
    assert model.transform([torch.rand(3, 50, 60)])[0].image_sizes[0] == (256, 307)  # min_size at inference


def test_checkpoint_round_trip_and_keypoint_errors(tmp_path, one_thread):
    model = _small_keypoint().eval()
    config = get_preset("small_keypoint")
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
    save_checkpoint(str(tmp_path / "kp.pt"), model, config, categories)
    loaded = load_checkpoint(str(tmp_path / "kp.pt"))
    assert loaded.config == config
    image = torch.rand(3, 100, 120)
    with torch.inference_mode():
        a, b = model([image])[0], loaded.model([image])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a keypoint state dict into a model without a keypoint head: the error says what to use
    with pytest.raises(CheckpointError, match="keypoint"):
        load_state(
            build_model(get_preset("small", mask_head=dataclasses.replace(get_preset("small").mask_head, enabled=False))),
            model.state_dict(),
        )
    # fine-tuning onto other keypoints: the keypoint predictor starts fresh, the rest loads
    three = build_model(
        get_preset("small_keypoint", keypoint_head=KeypointHeadConfig(enabled=True, num_keypoints=3, conv_layers=(64,) * 4))
    )
    with pytest.raises(CheckpointError):
        load_state(three, model.state_dict())
    load_state(three, model.state_dict(), skip_class_specific=True)
    assert torch.equal(three.roi_heads.keypoint_head[0].weight, model.roi_heads.keypoint_head[0].weight)


# ---------------------------------------------------------------- data


def test_coco_reads_keypoints_and_the_flip_swaps_left_and_right(kp_data):
    dataset = CocoDataset(*kp_data["train"])
    assert dataset.num_keypoints == K and dataset.keypoint_names == ["top_left", "top_right", "bottom_right", "bottom_left"]
    assert dataset.keypoint_flip == [1, 0, 3, 2] and dataset.keypoint_skeleton == [[1, 2], [2, 3], [3, 4], [4, 1]]
    squares = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        kps = target["keypoints"]
        assert kps.shape == (len(target["boxes"]), K, 3) and kps.dtype == torch.float32
        is_square = target["labels"] == 2  # class 2 = category 2, the square
        assert bool((kps[~is_square] == 0).all())  # the other shapes have none
        visible = kps[is_square][..., 2] > 0
        squares += int(is_square.sum())
        assert bool(visible.all())  # a square's corners are labelled (v 1 or 2)
        flipped_image, flipped = hflip(image, target, dataset.keypoint_flip)
        width = image.shape[-1]
        for g in torch.where(is_square)[0].tolist():
            before, after = kps[g], flipped["keypoints"][g]
            # the mirror of the top-left corner is the flipped square's top-right corner
            assert torch.allclose(after[1, :2], torch.stack([width - before[0, 0], before[0, 1]]))
            assert after[0, 0] < after[1, 0] and after[3, 0] < after[2, 0]  # left stays left of right
        assert bool((flipped["keypoints"][~is_square] == 0).all())  # unlabelled ones stay at (0, 0, 0)
        _, back = hflip(flipped_image, flipped, dataset.keypoint_flip)
        assert torch.allclose(back["keypoints"], kps)
    assert squares >= 4
    with pytest.raises(ValueError, match="keypoint_flip"):
        RandomHorizontalFlip(1.0)(*dataset[0])


def test_flip_map_of_coco_person_keypoints_is_torchvision_references():
    # torchvision's references/detection/transforms.py _flip_coco_person_keypoints
    assert keypoint_flip_indices(COCO_PERSON_KEYPOINT_NAMES) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert keypoint_flip_indices(["Left_Hand", "RIGHT_HAND", "head"]) == [0, 1, 2]
    assert keypoint_flip_indices(["Left_Hand", "Right_Hand", "head"]) == [1, 0, 2]


def test_resizing_scales_keypoints_keeps_visibility():
    target = _target([[10, 10, 50, 50]], [1], [[10, 20, 2, 30, 40, 1, 0, 0, 0, 50, 50, 2]])
    resized = resize_target(target, (100, 200), (50, 400))
    assert resized["keypoints"][0].tolist() == [[20, 10, 2], [60, 20, 1], [0, 0, 0], [100, 25, 2]]


def test_bad_keypoint_annotations_name_the_entry(kp_data, tmp_path):
    data = json.loads(open(kp_data["train"][0]).read())
    with_kps = next(i for i, a in enumerate(data["annotations"]) if "keypoints" in a)

    def fails(change, match):
        broken = json.loads(json.dumps(data))
        change(broken)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(AnnotationError, match=match):
            CocoDataset(str(path), kp_data["train"][1])

    fails(lambda d: d["annotations"][with_kps].update(keypoints=[1.0, 2.0, 2]), rf"annotations\[{with_kps}\].*12 finite numbers")
    fails(lambda d: d["annotations"][with_kps]["keypoints"].__setitem__(2, 3), "visibilities")
    fails(lambda d: d["categories"][1].pop("keypoints"), "no category names keypoints")
    fails(lambda d: d["categories"][0].update(keypoints=["a", "b", "c", "d"]), "differ")
    fails(lambda d: d["categories"][1].update(skeleton=[[1, 5]]), "skeleton")


def test_synthetic_keypoints_change_nothing_else(kp_data, tmp_path):
    plain = make_sample_dataset(str(tmp_path / "plain"), {"train": 8}, seed=3)["train"]
    with_kps, without = json.loads(open(kp_data["train"][0]).read()), json.loads(open(plain[0]).read())
    for a, b in zip(with_kps["annotations"], without["annotations"]):
        points, count = a.pop("keypoints", None), a.pop("num_keypoints", None)
        assert a == b
        assert (points is not None) == (a["category_id"] == 2)  # the squares, and only they
        if points is not None:
            assert count == sum(1 for v in points[2::3] if v > 0) == (0 if a["iscrowd"] else K)
    for name in ("000001.png", "000005.png"):
        assert (tmp_path / "plain" / "train" / "images" / name).read_bytes() == open(f"{kp_data['train'][1]}/{name}", "rb").read()


def test_keypoint_ap_of_the_ground_truth_is_one(kp_data):
    """COCOeval's keypoint AP through predictions_to_coco_results: the ground truth scores 1,
    the ground truth with left and right swapped scores less (OKS sigmas of 4 keypoints, not COCO's 17)."""
    from maskrcnn.evaluation import KEYPOINT_STAT_NAMES, evaluate_coco, predictions_to_coco_results

    dataset = CocoDataset(*kp_data["train"])
    predictions, swapped = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        prediction = {k: target[k] for k in ("boxes", "labels", "keypoints")}
        prediction["scores"] = torch.ones(len(target["labels"]))
        predictions.append(prediction)
        swapped.append(dict(prediction, keypoints=prediction["keypoints"][:, dataset.keypoint_flip]))
    for preds, expected in ((predictions, 1.0), (swapped, None)):
        results = predictions_to_coco_results(preds, dataset.image_ids, dataset.class_to_category_id)
        assert all(len(r["keypoints"]) == 3 * K for r in results)
        metrics = evaluate_coco(dataset.coco, results, iou_types=("bbox", "keypoints"))
        assert len(metrics["keypoints_stats"]) == len(KEYPOINT_STAT_NAMES)
        if expected is not None:
            assert metrics["keypoints_AP"] == pytest.approx(expected) and metrics["bbox_AP"] == pytest.approx(1.0)
        else:
            assert metrics["keypoints_AP"] < 0.5


@pytest.mark.slow
def test_keypoint_head_learns_the_corners(kp_data, one_thread):
    """Overfit two images for 40 steps: on the ground-truth boxes, the heatmaps' argmax finds the
    corners to a pixel or two (boxes are 15-45 px here), where a head that learned the wrong
    targets (x and y swapped, or left and right) would be tens of pixels off."""
    from maskrcnn.engine import make_optimizer, prepare_for_training, train_step

    dataset = CocoDataset(*kp_data["train"])
    batch = [dataset[i] for i in range(2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    assert sum(int((t["keypoints"][..., 2] > 0).sum()) for t in targets) >= 8
    config = get_preset("small_keypoint", num_classes=dataset.num_classes)
    model = _small_keypoint(num_classes=dataset.num_classes, input=dataclasses.replace(config.input, min_size=160, max_size=240))
    prepare_for_training(model)  # as jobs.train trains it (NHWC)
    optimizer = make_optimizer(model, lr=0.01)
    losses = [float(train_step(model, optimizer, images, targets, clip_grad_norm=10.0)["loss_keypoint"]) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses

    model.eval()
    with torch.no_grad():
        batched, resized = model.transform(images, targets)
        features = list(model.backbone(batched.tensor).values())[:-1]
        results = [{"boxes": t["boxes"]} for t in resized]
        model.roi_heads.keypoint_inference(features, results, batched.image_sizes)
    errors = torch.cat(
        [(r["keypoints"][..., :2] - t["keypoints"][..., :2]).norm(dim=-1)[t["keypoints"][..., 2] > 0] for r, t in zip(results, resized)]
    )
    print(f"keypoint errors on the ground-truth boxes (px at {model.transform.min_size}): median {errors.median():.2f}, {errors.tolist()}")
    assert float(errors.median()) < 2.5 and float((errors < 4).float().mean()) >= 0.75


# ---------------------------------------------------------------- labeling and export


def _output(boxes, scores, labels, masks=None, keypoints=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
    if masks is not None:
        out["masks"] = masks
    if keypoints is not None:
        out["keypoints"] = torch.tensor(keypoints, dtype=torch.float32)
        out["keypoints_scores"] = out["keypoints"][..., 0] / 100
        out["keypoints"][..., 2] = 1
    return out


@pytest.mark.parametrize("with_masks", [False, True])
def test_label_rows_carry_keypoints_with_or_without_masks(with_masks):
    from jobs.labeling.predict import detection_table
    from jobs.labeling.rows import rows_table
    from maskrcnn.inference import Detections
    from jobs.labeling.rows import OUTPUT_SCHEMA, PIECE_SCHEMA

    height, width = 20, 30
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:12, 20:25] = True
    kps = [[[3.5, 2.5, 0], [8.0, 5.0, 0]], [[20.0, 10.0, 0], [24.5, 11.5, 0]]]
    out = _output([[3, 2, 9, 6], [20, 10, 25, 12]], [0.9, 0.6], [1, 2], masks if with_masks else None, kps)
    label_map = {1: {"id": 1, "name": "person"}, 2: {"id": 7, "name": "dog"}}
    batch = {
        "shard": np.array([0, 0], np.int32),
        "index": np.array([0, 1], np.int32),
        "image_uri": np.array(["a.png", "b.png"], dtype=object),
        "height": np.array([height, height]),
        "width": np.array([width, width]),
    }
    none = _output(np.zeros((0, 4)), [], [], masks[:0] if with_masks else None, np.zeros((0, 2, 3)))
    detections = detection_table(batch, [None, None], [Detections.from_output(out), Detections.from_output(none)])
    table = rows_table(detections, label_map=label_map, model_hash="sha256:x")
    assert table.schema == PIECE_SCHEMA
    rows = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA).to_pylist()
    first, second = rows[0]["instances"]
    assert rows[1]["instances"] == []
    assert first["keypoints"] == [[3.5, 2.5, pytest.approx(0.035)], [8.0, 5.0, pytest.approx(0.08)]]
    assert second["keypoints"] == [[20.0, 10.0, pytest.approx(0.2)], [24.5, 11.5, pytest.approx(0.245)]]
    assert (first["category_id"], second["category_id"]) == (1, 7)
    if with_masks:
        assert first["area"] == 24 and first["mask"]["size"] == [height, width]
    else:
        assert first["mask"] is None and first["area"] is None


@pytest.mark.slow
def test_train_label_export_round_trip(kp_data, tmp_path, ray_local, capsys, one_thread):
    """jobs.train trains small_keypoint on COCO keypoints (a few steps, a real local Ray), jobs.label
    writes its keypoints into the Parquet (the model's own outputs, in the images' pixels), and
    jobs.export_coco writes them into COCO results that pycocotools' keypoint evaluation reads."""
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from jobs.export_coco import main as export_main
    from jobs.label import main as label_main
    from jobs.train import main as train_main
    from maskrcnn.data.coco import read_image

    (train_ann, train_images), (val_ann, val_images) = kp_data["train"], kp_data["val"]
    run = tmp_path / "run"
    code = train_main(
        [
            "--annotations",
            train_ann,
            "--images",
            train_images,
            "--val-annotations",
            val_ann,
            "--val-images",
            val_images,
            "--output",
            str(run),
            "--arch",
            "small_keypoint",
            "--num-workers",
            "1",
            "--batch-size",
            "2",
            "--max-steps",
            "3",
            "--min-size",
            "160",
            "--max-size",
            "240",
            "--loader-workers",
            "0",
            "--log-every",
            "1",
            "--checkpoint-every",
            "0",
            # a small lr keeps the 3-step model near its start, whose detections score above the threshold
            "--lr",
            "0.0025",
        ]
    )
    assert code == 0, capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_keypoint" in r and "loss_mask" not in r for r in records if "loss" in r)
    evals = [r for r in records if r.get("event") == "eval"]
    assert evals and all(len(r["keypoints_stats"]) == 10 and 0 <= r["keypoints_AP"] <= 1 for r in evals)  # keypoint AP on --val-annotations
    loaded = load_checkpoint(str(run / "model.pt"))
    assert loaded.config.keypoint_head.keypoint_names == ("top_left", "top_right", "bottom_right", "bottom_left")
    assert loaded.config.input.min_size == 160 and not loaded.config.mask_head.enabled

    labels = tmp_path / "labels"
    # one image a forward pass: the small trunk's GroupNorm sees the padding, so a batch's floats depend on its other images
    code = label_main(
        [
            "--input",
            val_images,
            "--output",
            str(labels),
            "--checkpoint",
            str(run / "model.pt"),
            "--batch-size",
            "1",
            "--num-actors",
            "1",
            "--cpus-per-actor",
            "1",
            "--preview",
            "1",
        ]
    )  # one torch thread, as here
    assert code == 0, capsys.readouterr().out
    table = pq.read_table(str(labels / "part-000000.parquet"))
    rows = table.to_pylist()
    assert len(rows) == 3 and all(r["error"] is None for r in rows)
    model = optimize_for_inference(loaded.model)  # the fast path jobs.label runs by default
    detections = 0
    for row in rows:
        image = read_image(row["image_uri"])
        with torch.inference_mode():
            expected = model([image])[0]
        assert len(row["instances"]) == len(expected["scores"]) > 0
        for inst, points, scores in zip(row["instances"], expected["keypoints"], expected["keypoints_scores"]):
            assert inst["mask"] is None and inst["area"] is None  # no mask head
            got = np.asarray(inst["keypoints"], dtype=np.float32)
            assert got.shape == (K, 3)
            np.testing.assert_array_equal(got[:, :2], points[:, :2].numpy())
            np.testing.assert_array_equal(got[:, 2], scores.numpy())
            assert (got[:, 0] <= row["width"] + 0.5).all() and (got[:, 1] <= row["height"] + 0.5).all()
            detections += 1
    assert detections > 0

    results = tmp_path / "results.json"
    assert export_main(["--input", str(labels), "--output", str(results), "--annotations", val_ann, "--images-root", val_images]) == 0
    exported = json.loads(results.read_text())
    assert len(exported) == detections
    assert all(len(r["keypoints"]) == 3 * K and "segmentation" not in r for r in exported)
    gt = COCO(val_ann)
    evaluator = COCOeval(gt, gt.loadRes(exported), iouType="keypoints")
    evaluator.params.kpt_oks_sigmas = np.full(K, 0.05)
    evaluator.params.catIds = [2]  # the squares: the other shapes have no keypoints
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert len(evaluator.stats) == 10  # keypoint AP ran (near 0 after 3 steps)

    review = tmp_path / "review.json"
    assert export_main(["--input", str(labels), "--output", str(review), "--format", "annotations", "--categories", val_ann]) == 0
    coco = COCO(str(review))
    # the head is class-agnostic: every detection has keypoints; the square's category names them
    for category in coco.loadCats(coco.getCatIds()):
        names = (
            ["top_left", "top_right", "bottom_right", "bottom_left"] if category["id"] == 2 else [f"keypoint_{k}" for k in range(1, K + 1)]
        )
        assert category["keypoints"] == names
    assert all(a["num_keypoints"] == K and a["keypoints"][2::3] == [2] * K for a in coco.anns.values())
