"""The small preset trained from scratch on the sample data learns masks: an overfit test with an AP bound."""

import copy

import pytest
import torch

from maskrcnn.config import get_preset
from maskrcnn.data import CocoDataset, collate_fn, make_sample_dataset
from maskrcnn.data.transforms import RandomHorizontalFlip
from maskrcnn.engine import autocast_context, make_optimizer, make_scheduler, train_step
from maskrcnn.evaluation import evaluate_model
from maskrcnn.modeling import build_model
from maskrcnn.modeling.optimize import optimize_for_inference

STEPS = 260
BATCH = 4


@pytest.fixture
def one_thread():
    """The small model's convolutions are tiny: one intra-op thread is 6x faster than two
    when anything else (a Ray worker, another test) wants the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_small_preset_overfits_sample_data(tmp_path, one_thread):
    torch.manual_seed(0)
    ann, image_root = make_sample_dataset(str(tmp_path / "sample"), splits={"train": 16}, seed=3)["train"]
    dataset = CocoDataset(ann, image_root, transforms=RandomHorizontalFlip(0.5))
    model = build_model(get_preset("small", num_classes=dataset.num_classes))
    optimizer = make_optimizer(model, lr=0.02)
    scheduler = make_scheduler(optimizer, STEPS, warmup_steps=50)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate_fn)
    model.train()
    step, first, last = 0, None, []
    while step < STEPS:
        for images, targets in loader:
            losses = train_step(model, optimizer, images, targets, scheduler=scheduler, clip_grad_norm=10.0)
            first = first if first is not None else float(losses["loss"])
            last = (last + [float(losses["loss"])])[-10:]
            step += 1
            if step == STEPS:
                break
    assert sum(last) / len(last) < 0.3 * first

    eval_set = CocoDataset(ann, image_root)
    metrics = evaluate_model(model, eval_set, batch_size=4)
    print(f"after {STEPS} steps: mask AP {metrics['segm_AP']:.3f}, box AP {metrics['bbox_AP']:.3f}")
    assert metrics["segm_AP"] >= 0.5
    assert metrics["bbox_AP"] >= 0.5

    # jobs.label's fast path keeps the outputs: channels_last (the GN trunk has no norm to fold)
    # and bf16 autocast (the GPU default; here on the CPU): mask AP within 0.3 points of fp32
    # (issue #7's bound); box AP within 0.5 (on 16 images one detection moving is ~0.3).
    fast = optimize_for_inference(copy.deepcopy(model))
    for dtype in (None, torch.bfloat16):
        with autocast_context(torch.device("cpu"), dtype):
            got = evaluate_model(fast, eval_set, batch_size=4)
        print(f"fast path, autocast {dtype}: mask AP {got['segm_AP']:.4f}, box AP {got['bbox_AP']:.4f}")
        assert abs(got["segm_AP"] - metrics["segm_AP"]) <= 0.003, (dtype, got["segm_AP"], metrics["segm_AP"])
        assert abs(got["bbox_AP"] - metrics["bbox_AP"]) <= 0.005, (dtype, got["bbox_AP"], metrics["bbox_AP"])
