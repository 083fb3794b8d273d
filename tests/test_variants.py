"""The paper's architecture switches as config fields (issue #6): the ResNet-C4 backbone
(``backbone.kind``) and the MLP mask head (``mask_head.head_type``), crossed with the mask loss,
class-agnostic masks and the RoI pooler; checkpoints of the variants; invalid combinations."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from maskrcnn.checkpoint import CLASS_SPECIFIC, CheckpointError, load_checkpoint, load_state, save_checkpoint
from maskrcnn.config import InputConfig, ModelConfig, get_preset
from maskrcnn.engine import make_optimizer, prepare_for_training, train_step
from maskrcnn.modeling import build_model, validate_config
from maskrcnn.modeling.postprocessing import paste_masks

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def variant(
    kind: str = "fpn", head: str = "fcn", loss: str = "sigmoid", agnostic: bool = False, pooler: str = "align", **top
) -> ModelConfig:
    """The ``small`` (or ``small_c4``) preset with the given switches, at a reduced input size."""
    cfg = get_preset("small_c4" if kind == "c4" else "small", input=InputConfig(min_size=160, max_size=224), **top)
    return cfg.replace(
        mask_head=dataclasses.replace(cfg.mask_head, head_type=head, loss_type=loss, class_agnostic=agnostic),
        roi_heads=dataclasses.replace(cfg.roi_heads, pooler_type=pooler),
    )


def _target(boxes, labels, size):
    masks = torch.zeros(len(boxes), *size, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, int(y1) : int(y2), int(x1) : int(x2)] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def _mask_logits_shape(model, images):
    """The mask predictor's output shape in one inference pass (through a forward hook)."""
    seen = []
    handle = model.roi_heads.mask_predictor.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        with torch.inference_mode():
            outputs = model(images)
    finally:
        handle.remove()
    return outputs, seen


SENSIBLE_MASK_LOSSES = [("sigmoid", False), ("sigmoid", True), ("softmax", False)]  # softmax + class-agnostic is rejected
COMBINATIONS = [
    (kind, head, loss, agnostic, pooler)
    for kind, head, (loss, agnostic), pooler in itertools.product(("fpn", "c4"), ("fcn", "mlp"), SENSIBLE_MASK_LOSSES, ("align", "pool"))
]


@pytest.mark.parametrize("kind,head,loss,agnostic,pooler", COMBINATIONS, ids=["-".join(map(str, c)) for c in COMBINATIONS])
def test_every_sensible_combination_trains_and_infers(kind, head, loss, agnostic, pooler):
    torch.manual_seed(0)
    model = build_model(variant(kind, head, loss, agnostic, pooler))
    images = [torch.rand(3, 120, 160), torch.rand(3, 90, 70)]
    targets = [_target([[10, 20, 60, 80], [50, 5, 120, 60]], [1, 3], (120, 160)), _target([], [], (90, 70))]

    # one optimisation step on a batch with objects and an image without any, as jobs.train takes it (NHWC)
    prepare_for_training(model)
    optimizer = make_optimizer(model, lr=0.01)
    before = {k: v.clone() for k, v in model.roi_heads.mask_predictor.state_dict().items()}
    losses = train_step(model, optimizer, images, targets)
    assert set(losses) == LOSS_KEYS | {"loss"}
    assert all(bool(torch.isfinite(v)) for v in losses.values()), losses
    assert float(losses["loss_mask"]) > 0
    after = model.roi_heads.mask_predictor.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the mask loss did not reach the mask predictor"

    # an image with no objects alone: every loss present and finite, no mask or box regression loss
    empty = model([images[1]], [targets[1]])
    assert set(empty) == LOSS_KEYS and all(bool(torch.isfinite(v.detach())) for v in empty.values())
    assert float(empty["loss_mask"].detach()) == 0.0 and float(empty["loss_box_reg"].detach()) == 0.0
    sum(empty.values()).backward()

    # inference: m x m masks (28 with FPN, 14 with C4), pasted at each image's own size
    model.eval()
    model.roi_heads.score_thresh = 0.0
    outputs, shapes = _mask_logits_shape(model, images)
    m = 14 if kind == "c4" else 28
    assert shapes and shapes[0][1:] == (1 if agnostic else 4, m, m)
    assert model.roi_heads.mask_predictor_size() == m
    for out, (h, w) in zip(outputs, [(120, 160), (90, 70)]):
        d = out["boxes"].shape[0]
        assert d > 0
        assert out["masks"].shape == (d, h, w) and out["masks"].dtype == torch.bool
        assert out["scores"].shape == (d,) and out["labels"].shape == (d,) and bool((out["labels"] >= 1).all())

    # inference with no detections at all
    model.roi_heads.score_thresh = 1.0
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 50, 60)])
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 50, 60)


# ---- the C4 backbone ----------------------------------------------------------------------


def test_c4_structure_small():
    model = build_model(variant("c4"))
    # RPN and RoI features on res4 alone: one level, all 5 anchor sizes x 3 ratios there
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert model.backbone.out_channels == 64  # res4 of the small trunk
    assert not hasattr(model.backbone.body, "layer4")
    # res5 is the box head: 14x14 RoIs -> 7x7 -> average pool -> box predictor
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    assert model.roi_heads.box_predictor.cls_score.in_features == 128
    # the mask branch runs the very same res5 (shared weights, saved once) and a 2x deconv
    assert model.roi_heads.mask_roi_pool._box_head[0] is model.roi_heads.box_head
    keys = list(model.state_dict())
    assert any(k.startswith("roi_heads.box_head.res5.") for k in keys)
    assert not any("res5" in k and not k.startswith("roi_heads.box_head.res5.") for k in keys)
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 160, 224))
    assert list(features) == ["0"] and features["0"].shape == (1, 64, 10, 14)  # stride 16


def test_c4_mask_loss_trains_the_shared_res5():
    torch.manual_seed(0)
    model = build_model(variant("c4")).train()
    targets = [_target([[10, 20, 60, 80], [50, 5, 120, 60]], [1, 3], (120, 160))]
    losses = model([torch.rand(3, 120, 160)], targets)
    losses["loss_mask"].backward()
    grad = model.roi_heads.box_head.res5[0].conv1.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_r50_c4_preset_builds_and_runs():
    cfg = get_preset("r50_c4", num_classes=3, input=InputConfig(min_size=96, max_size=128))
    cfg = cfg.replace(
        rpn=dataclasses.replace(cfg.rpn, pre_nms_top_n_test=200, post_nms_top_n_test=6),
        roi_heads=dataclasses.replace(cfg.roi_heads, score_thresh=0.0, detections_per_img=4),
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert cfg.backbone.kind == "c4" and tuple(cfg.anchors.sizes) == (32, 64, 128, 256, 512)
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert model.backbone.out_channels == 1024
    assert model.roi_heads.box_predictor.cls_score.in_features == 2048
    assert model.roi_heads.mask_predictor.conv5_mask.out_channels == 256
    # frozen-BN trunk: the stem and res2 stay frozen, res5 (the head) trains
    assert not model.backbone.body.conv1.weight.requires_grad
    assert model.roi_heads.box_head.res5[0].conv1.weight.requires_grad
    outputs, shapes = _mask_logits_shape(model, [torch.rand(3, 96, 128)])
    assert shapes[0][1:] == (3, 14, 14)
    assert outputs[0]["masks"].shape[1:] == (96, 128)
    for name in ("r101_c4", "small_c4"):
        assert get_preset(name).backbone.kind == "c4"
        validate_config(get_preset(name))


def test_paste_masks_handles_14x14_masks_as_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 14, 14, generator=g)
    xy = torch.rand(5, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 5 + torch.rand(5, 2, generator=g) * 40], dim=1)
    ours = paste_masks(probs, boxes, (90, 110), threshold=None)
    theirs = paste_masks_in_image(probs[:, None], boxes, (90, 110), padding=1)[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---- the MLP mask head ----------------------------------------------------------------------


def test_mlp_head_structure():
    fpn = build_model(variant(head="mlp"))
    # the small preset scales the paper's fc 1024 -> 1024 -> K*28*28 to 256 wide
    assert fpn.roi_heads.mask_head.mask_fc1.in_features == 64 * 14 * 14
    assert fpn.roi_heads.mask_predictor.mask_fcn_logits.out_features == 4 * 28 * 28
    agnostic = build_model(variant(head="mlp", agnostic=True))
    assert agnostic.roi_heads.mask_predictor.mask_fcn_logits.out_features == 1 * 28 * 28
    c4 = build_model(variant("c4", head="mlp"))
    assert c4.roi_heads.mask_head.mask_fc1.in_features == 128 * 7 * 7  # res5's 7x7 output
    assert c4.roi_heads.mask_predictor.mask_fcn_logits.out_features == 4 * 14 * 14
    paper = get_preset("r50_fpn").mask_head
    assert tuple(paper.mlp_dims) == (1024, 1024)


# ---- invalid combinations -------------------------------------------------------------------


def _with(cfg: ModelConfig, section: str, **changes) -> ModelConfig:
    return cfg.replace(**{section: dataclasses.replace(getattr(cfg, section), **changes)})


@pytest.mark.parametrize(
    "cfg,match",
    [
        (variant(loss="softmax", agnostic=True), r"mask_head\.loss_type 'softmax'.*class_agnostic"),
        (variant("c4", loss="softmax", agnostic=True), r"mask_head\.loss_type 'softmax'.*class_agnostic"),
        (_with(variant(), "backbone", kind="c5"), r"backbone\.kind must be one of \('fpn', 'c4'\), got 'c5'"),
        (_with(variant(), "anchors", sizes=(32, 64, 128)), r"anchors\.sizes needs one size per FPN level.*got 3.*'c4'"),
        (_with(variant("c4"), "anchors", sizes=(32, 32, 64)), r"anchors\.sizes of backbone\.kind 'c4'.*must differ"),
        (_with(variant("c4"), "anchors", sizes=()), r"anchors\.sizes must be positive"),
        (_with(variant("c4"), "roi_heads", mask_resolution=13), r"roi_heads\.mask_resolution must be even"),
        (_with(variant("c4"), "mask_head", dilation=2), r"mask_head\.dilation"),
        (_with(variant(), "mask_head", head_type="conv"), r"mask_head\.head_type must be one of \('fcn', 'mlp'\), got 'conv'"),
        (_with(variant(head="mlp"), "mask_head", mlp_dims=()), r"mask_head\.mlp_dims"),
        (_with(variant(), "mask_head", conv_layers=()), r"mask_head\.conv_layers"),
    ],
    ids=[
        "softmax-agnostic",
        "c4-softmax-agnostic",
        "kind",
        "fpn-anchors",
        "c4-dup-anchors",
        "c4-no-anchors",
        "c4-odd-mask",
        "c4-dilation",
        "head-type",
        "mlp-dims",
        "conv-layers",
    ],
)
def test_invalid_combinations_name_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_config_round_trip_and_old_configs_default_to_fpn_fcn():
    for cfg in (variant("c4", head="mlp"), get_preset("r50_c4"), get_preset("small_c4")):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = get_preset("small").to_dict()  # a checkpoint's config from before these fields
    del old["backbone"]["kind"], old["mask_head"]["mlp_dims"]
    restored = ModelConfig.from_dict(old)
    assert restored.backbone.kind == "fpn" and restored.mask_head.head_type == "fcn"
    build_model(restored)


# ---- checkpoints ----------------------------------------------------------------------------


def _outputs(model, image):
    model.roi_heads.score_thresh = 0.0
    with torch.inference_mode():
        return model([image])[0]


@pytest.mark.parametrize("kind,head", [("c4", "fcn"), ("fpn", "mlp"), ("c4", "mlp")])
def test_checkpoint_round_trip(tmp_path, kind, head):
    torch.manual_seed(0)
    cfg = variant(kind, head)
    model = build_model(cfg).eval()
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, cfg, CATEGORIES)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["backbone"]["kind"] == kind and raw["config"]["mask_head"]["head_type"] == head
    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    image = torch.rand(3, 100, 120)
    a, b = _outputs(model, image), _outputs(loaded.model, image)
    assert a["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key]), key
    # the shared res5 survives the round trip as one module used by both branches
    if kind == "c4":
        assert loaded.model.roi_heads.mask_roi_pool._box_head[0] is loaded.model.roi_heads.box_head


def test_checkpoint_arch_must_match_the_backbone_kind(tmp_path):
    cfg = variant("c4")
    path = str(tmp_path / "c4.pt")
    save_checkpoint(path, build_model(cfg), cfg, CATEGORIES)
    with pytest.raises(CheckpointError, match=r"small \(c4\).*--arch small asks for small \(fpn\).*drop --arch"):
        load_checkpoint(path, arch="small")
    assert load_checkpoint(path, arch="small_c4").config.backbone.kind == "c4"


def test_mlp_head_fine_tunes_to_other_classes():
    """The MLP predictor's last layer is class-specific: re-initialised when the classes change."""
    assert any(p.startswith("roi_heads.mask_predictor.mask_fcn_logits") for p in CLASS_SPECIFIC)
    source = build_model(variant(head="mlp", num_classes=4))
    target = build_model(variant(head="mlp", num_classes=6))
    load_state(target, source.state_dict(), skip_class_specific=True)
    torch.testing.assert_close(target.roi_heads.mask_head.mask_fc1.weight, source.roi_heads.mask_head.mask_fc1.weight)


# ---- labeling and evaluation go through build_model unchanged -------------------------------


def test_c4_checkpoint_labels_and_evaluates(tmp_path):
    """A C4 + MLP checkpoint through the labeling stages (decode -> LabelActor -> Parquet rows,
    no Ray needed for the stages themselves) and through COCO evaluation."""
    from jobs.labeling.decode import decode_batch
    from jobs.labeling.predict import LabelActor
    from jobs.labeling.rows import rows_table
    from maskrcnn.data import CocoDataset, make_sample_dataset
    from maskrcnn.evaluation import evaluate_model

    torch.manual_seed(0)
    cfg = variant("c4", head="mlp")
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, build_model(cfg).eval(), cfg, CATEGORIES)
    ann, image_root = make_sample_dataset(str(tmp_path / "data"), splits={"val": 2}, seed=1)["val"]

    uris = [f"{image_root}/000001.png", f"{image_root}/000002.png"]
    batch = {"shard": np.zeros(2, np.int64), "index": np.arange(2), "image_uri": np.asarray(uris, dtype=object)}
    decoded = decode_batch(batch, storage_options=None, min_size=160, max_size=224, max_pixels=10**8)
    actor = LabelActor(checkpoint_uri=path, load_kwargs={}, storage_options=None, use_gpu=False, max_batch=2)
    label_map = {k + 1: c for k, c in enumerate(CATEGORIES)}
    rows = rows_table(actor(decoded), label_map=label_map, model_hash="test").to_pylist()
    assert [r["error"] for r in rows] == [None, None]
    for row in rows:
        assert row["instances"], "random weights pass the 0.05 score threshold"
        inst = row["instances"][0]
        assert inst["mask"]["size"] == [row["height"], row["width"]] and inst["category"] in {c["name"] for c in CATEGORIES}

    metrics = evaluate_model(load_checkpoint(path).model, CocoDataset(ann, image_root), batch_size=2)
    assert {"segm_AP", "bbox_AP", "segm_AP50", "bbox_AP75"} <= set(metrics)


# ---- the ablation script's plumbing (one step per variant: no figures here) -----------------


def test_ablation_script_writes_tables_and_resumes(tmp_path, capsys):
    import json

    from benchmarks import ablation

    out = str(tmp_path / "abl")
    argv = ["--steps", "1", "--images", "2", "--val-images", "2", "--batch-size", "2", "--only", "fpn,c4", "--output", out]
    assert ablation.main(argv) == 0
    table = open(f"{out}/ablation.md").read()
    assert "| (a) backbone | small-C4 |" in table and "small-FPN" in table and "(a) backbone: small-FPN minus small-C4" in table
    first = json.load(open(f"{out}/ablation.json"))
    assert set(first["variants"]) == {"fpn", "c4"} and first["settings"]["steps"] == 1
    # a second seed and another variant at the same budget: the earlier runs are reused, not retrained
    assert ablation.main(argv[:-4] + ["--only", "fpn,fpn_mlp", "--seeds", "0,1", "--output", out]) == 0
    assert "3 to train (1 reused" in capsys.readouterr().out
    again = json.load(open(f"{out}/ablation.json"))
    assert again["variants"]["c4"] == first["variants"]["c4"]  # kept, though not in this run
    assert [r["seed"] for r in again["variants"]["fpn"]["runs"]] == [0, 1]
    assert ablation.batch_schedule(5, 4, 2, seed=3) == ablation.batch_schedule(5, 4, 2, seed=3)
