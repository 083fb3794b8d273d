"""maskrcnn.tta, test-time augmentation: one view is the model itself, mirrored views map back
exactly, masks are the views' average, bad specs fail in one line; and jobs.label --tta end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from jobs.common import JobError
from jobs.label import main as label_main
from jobs.labeling.plan import read_plan
from maskrcnn.config import get_preset
from maskrcnn.inference import Predictor, prepare
from maskrcnn.modeling import build_model
from maskrcnn.tta import TTA, decode_min_size, parse_tta, tta_inference, vote_boxes
from tests.labeling_helpers import encode, read_output, rgb_noise


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = get_preset("small").with_overrides(min_size=96, max_size=128, score_thresh=0.0, detections_per_img=30)
    return build_model(config).eval()


def _images() -> list:
    """Two small images at their own size and one large enough to be resized on the CPU."""
    generator = torch.Generator().manual_seed(1)
    large = (torch.rand(3, 300, 420, generator=generator) * 255).to(torch.uint8)
    return [torch.rand(3, 70, 90, generator=generator), torch.rand(3, 120, 60, generator=generator), prepare(large, 96, 128)]


def _mirrored(boxes: np.ndarray, width: int) -> np.ndarray:
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


@pytest.mark.parametrize("fast", [False, True], ids=["reference path", "fast path"])
def test_one_view_is_the_model_itself(model, fast):
    """tta="" is the plain Predictor; a TTA of the model's own view alone (no flip, no scale)
    goes through the TTA path (views, merge, mask average, paste) to exactly the same boxes,
    scores, labels and mask RLEs, also for an image resized on the CPU."""
    images = _images()
    assert images[2].resized
    plain = Predictor(copy.deepcopy(model), device="cpu", fast=fast, precision="fp32")
    assert Predictor(copy.deepcopy(model), device="cpu", fast=fast, tta="").tta is None
    one_view = Predictor(copy.deepcopy(model), device="cpu", fast=fast, precision="fp32", tta=TTA())
    for image in images:  # one at a time: a batch of two may take other (equal up to rounding) conv kernels
        ((expected,), (found,)) = plain.predict([image]), one_view.predict([image])
        assert len(found) == len(expected) > 0
        np.testing.assert_array_equal(found.boxes, expected.boxes)
        np.testing.assert_array_equal(found.scores, expected.scores)
        np.testing.assert_array_equal(found.labels, expected.labels)
        assert found.mask_rles()[0] == expected.mask_rles()[0] and found.image_size == expected.image_size


def test_flip_on_the_mirror_image_is_flip_on_the_image_mirrored(model):
    """The views of an image and of its mirror image are the same two inputs, so flip TTA on the
    mirror image, mirrored back, is flip TTA on the image: boxes within 1e-3 px, the same scores
    and labels, and mask probabilities mirrored."""
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(3))
    mirror = image.flip(-1)
    with torch.inference_mode():
        found = tta_inference(model, image, TTA(flip=True))
        back = tta_inference(model, mirror, TTA(flip=True))
    assert len(found["scores"]) == len(back["scores"]) == 30
    np.testing.assert_allclose(_mirrored(back["boxes"].numpy(), 90), found["boxes"].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(back["scores"].numpy(), found["scores"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(back["labels"].numpy(), found["labels"].numpy())
    torch.testing.assert_close(back["mask_probs"].flip(-1), found["mask_probs"], atol=1e-4, rtol=0)
    # and the Predictor's pasted masks are those probabilities' (one path for the RLEs)
    (det,) = Predictor(copy.deepcopy(model), device="cpu", fast=False, tta="flip").predict([image])
    np.testing.assert_allclose(det.boxes, found["boxes"].numpy(), atol=1e-4, rtol=0)


def test_a_symmetric_image_gives_detections_symmetric_up_to_nms(model):
    """Both views of a left-right symmetric image are the same input: every merged detection's
    mirror box is merged too (same class and score), unless that mirror overlaps it past the NMS
    threshold (NMS keeps one of the two) or the pair straddles the cut at detections_per_img."""
    half = torch.rand(3, 64, 40, generator=torch.Generator().manual_seed(4))
    image = torch.cat([half, half.flip(-1)], dim=-1)  # (3, 64, 80), exactly symmetric
    with torch.inference_mode():
        found = tta_inference(model, image, TTA(flip=True))
        plain = model([image])[0]
    boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
    mirrors = torch.from_numpy(_mirrored(boxes.numpy(), 80))
    paired = 0
    cut = len(scores) == model.roi_heads.detections_per_img
    for k in range(len(scores)):
        if cut and scores[k] <= scores[-1]:
            continue
        same = (labels == labels[k]) & ((scores - scores[k]).abs() < 1e-6)
        close = ((boxes - mirrors[k]).abs().amax(dim=1) < 1e-3) & same
        if close.any():
            paired += 1
        else:
            assert box_iou(boxes[k : k + 1], mirrors[k : k + 1]).item() > model.roi_heads.nms_thresh, k
    assert paired > 0
    # the model's own detections are among the views' (its best one is kept)
    assert scores[0].item() == pytest.approx(plain["scores"][0].item(), abs=1e-6)


def test_masks_are_the_average_of_the_views(model):
    """A merged box's mask probabilities = the mean of the mask head on that box in the image
    and, mirrored back, on its mirror box in the mirrored image (computed here with the model's
    own preprocessing), and the two views do differ."""
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(5))
    heads = model.roi_heads

    def mask_probs(view_image: torch.Tensor, box: torch.Tensor, label: int) -> torch.Tensor:
        batch, _ = model.transform([view_image])
        features = list(model.backbone(batch.tensor).values())[:-1]
        (h, w) = batch.image_sizes[0]
        scaled = box * torch.tensor([w / 90, h / 70, w / 90, h / 70])
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [scaled[None]], batch.image_sizes)))
        return logits.sigmoid()[0, label]

    with torch.inference_mode():
        found = tta_inference(model, image, TTA(flip=True))
        for k in (0, 7):
            box, label = found["boxes"][k], int(found["labels"][k])
            own = mask_probs(image, box, label)
            mirrored = mask_probs(image.flip(-1), torch.tensor([90 - box[2], box[1], 90 - box[0], box[3]]), label).flip(-1)
            assert (own - mirrored).abs().max() > 1e-3  # two different views
            torch.testing.assert_close(found["mask_probs"][k], (own + mirrored) / 2, atol=2e-5, rtol=0)


def test_scales_add_views_and_detections_stay_in_the_image(model):
    tta = parse_tta("flip,64,96,128")
    assert str(tta) == "flip,64,96,128"
    assert tta.views(96) == [(96, False), (96, True), (64, False), (64, True), (128, False), (128, True)]
    assert parse_tta("640").views(800) == [(800, False), (640, False)]
    assert decode_min_size(tta, 96) == 128 and decode_min_size(None, 96) == 96
    large = (torch.rand(3, 300, 420, generator=torch.Generator().manual_seed(6)) * 255).to(torch.uint8)
    images = [prepare(large, decode_min_size(tta, 96), 128), large]  # resized on the CPU to the largest view, and not
    assert images[0].resized
    found = Predictor(copy.deepcopy(model), device="cpu", tta=tta).predict(images)
    for det in found:
        assert len(det) == 30 and det.image_size == (300, 420)
        assert (det.boxes >= -1e-3).all() and (det.boxes[:, [0, 2]] <= 420 + 1e-3).all() and (det.boxes[:, [1, 3]] <= 300 + 1e-3).all()
        assert (det.mask_extents[:, 2] <= 300).all() and (det.mask_extents[:, 3] <= 420).all()


@pytest.mark.parametrize("spec, message", [
    ("flop", "'flop' is neither 'flip', 'vote' nor a short side in pixels"),
    ("vote", "votes with one view; add flip or a scale"),
    ("flip,vote,VOTE", "names vote twice"),
    ("flip,,640", "has an empty part"),
    ("flip,flip", "names flip twice"),
    ("flip,0", "has scale 0: a short side is 1 to 4096 pixels"),
    ("flip,640,640", "names scale 640 twice"),
    ("flip,1e3", "has '1e3', which is neither"),
])
def test_bad_specs_fail_in_one_line_naming_the_part(model, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_tta(spec)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"^tta {spec!r}"):
        Predictor(model, device="cpu", fast=False, tta=spec)


def test_box_voting_averages_the_views_boxes_weighted_by_score():
    """Each kept box: the score-weighted mean of the best same-class box overlapping it (IoU >=
    the threshold) in each view; its score the mean over the views (0 where a view has none).
    Another class's box, or one overlapping too little, does not vote; scores sort the result
    and the score threshold drops what falls below it."""
    t = torch.tensor
    views = [
        (t([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 11]]), t([0.9, 0.3, 0.8]), t([1, 1, 2])),
        (t([[0.0, 0, 12, 10], [1, 0, 10, 10], [30, 30, 40, 40], [50, 50, 58, 60]]), t([0.6, 0.2, 0.8, 0.7]), t([1, 1, 1, 2])),
    ]
    kept = {"boxes": t([[0.0, 0, 10, 10], [30, 30, 40, 40], [50, 50, 60, 60], [0, 0, 10, 11]]),
            "scores": t([0.9, 0.8, 0.3, 0.8]), "labels": t([1, 1, 1, 2])}
    voted = vote_boxes(kept, views, 0.5, 0.2)
    expected_first = (0.9 * t([0.0, 0, 10, 10]) + 0.6 * t([0.0, 0, 12, 10])) / 1.5  # not the 0.2 box: the best vote per view
    torch.testing.assert_close(voted["scores"], t([0.75, 0.4, 0.4]))
    torch.testing.assert_close(voted["boxes"], torch.stack([expected_first, t([30.0, 30, 40, 40]), t([0.0, 0, 10, 11])]))
    assert voted["labels"].tolist() == [1, 1, 2]  # the class-1 box at (50, 50): 0.3 / 2 < 0.2, dropped; class 2's box did not vote
    assert str(parse_tta("vote, flip ,640")) == "flip,vote,640" and parse_tta("640,vote").vote


def test_voted_tta_is_the_flip_merge_rescored(model):
    """flip,vote keeps the boxes flip keeps (each moved by at most the spread of its voters),
    with scores that are views' means: never above the best view's."""
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        best = tta_inference(model, image, TTA(flip=True))
        voted = tta_inference(model, image, TTA(flip=True, vote=True))
    assert 0 < len(voted["scores"]) <= len(best["scores"])
    assert (voted["scores"][:-1] >= voted["scores"][1:]).all() and voted["scores"].max() <= best["scores"].max()
    overlap = box_iou(voted["boxes"], best["boxes"]) * (voted["labels"][:, None] == best["labels"][None, :])
    assert (overlap.max(dim=1).values >= 0.5).all()
    assert voted["mask_probs"].shape[0] == len(voted["scores"])


def test_a_keypoint_model_is_refused():
    with pytest.raises(ValueError, match="^tta test-time augmentation is for box and mask models: this one has a keypoint head"):
        Predictor(build_model(get_preset("small_keypoint")), device="cpu", fast=False, tta="flip")
    assert parse_tta("") is None and parse_tta(" flip , 640 ") == TTA(flip=True, scales=(640,))


def test_jobs_label_with_tta_labels_each_image_once_as_the_predictor_does(tmp_path, checkpoint, ray_local, capsys):
    """--tta flip through the whole job: every image its row, its instances those of a Predictor
    with the same TTA; the plan records the setting, so the output cannot be resumed without it."""
    from maskrcnn.checkpoint import load_checkpoint
    from maskrcnn.data.images import decode_image

    images = tmp_path / "in"
    images.mkdir()
    for k, (width, height) in enumerate([(80, 60), (64, 90), (96, 72)]):
        (images / f"{k}.png").write_bytes(encode(rgb_noise(width, height, seed=k), "PNG"))
    output = str(tmp_path / "out")
    base = ["--input", str(images), "--checkpoint", checkpoint, "--min-size", "64", "--max-size", "96", "--max-detections", "5"]
    with pytest.raises(JobError, match="^--tta 'flop' is neither 'flip', 'vote' nor"):
        label_main([*base, "--output", output, "--tta", "flop"])
    assert label_main([*base, "--output", output, "--tta", "flip", "--shard-size", "2", "--batch-size", "2"]) == 0, capsys.readouterr().out
    table = read_output(output)
    assert sorted(table.column("image_uri").to_pylist()) == sorted(str(p) for p in images.iterdir())
    assert read_plan(output, None).settings["tta"] == "flip"

    loaded = load_checkpoint(checkpoint, overrides={"min_size": 64, "max_size": 96, "detections_per_img": 5})
    predictor = Predictor(loaded.model, device="cpu", tta="flip")
    torch.set_num_threads(int(ray_local.cluster_resources()["CPU"]))  # the actor's threads: the same floats
    for row in table.to_pylist():
        with open(row["image_uri"], "rb") as f:
            (det,) = predictor.predict([decode_image(f.read(), max_pixels=10**8)])
        assert row["error"] is None and len(row["instances"]) == len(det) == 5
        np.testing.assert_allclose([i["score"] for i in row["instances"]], det.scores, atol=1e-5)
        x1, y1, x2, y2 = det.boxes.T
        np.testing.assert_allclose([i["bbox"] for i in row["instances"]], np.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=1e-3)
        assert [i["mask"] for i in row["instances"]] == det.mask_rles()[0]
    with pytest.raises(JobError, match="was labelled with --tta flip; give the same to resume it"):
        label_main([*base, "--output", output])
    with pytest.raises(JobError, match="was labelled with --tta flip; .* another --output to label with --tta flip,128$"):
        label_main([*base, "--output", output, "--tta", "flip,128"])
