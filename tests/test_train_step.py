"""jobs.train's training step and what feeds it: the batches (aspect-ratio grouping, the order a
resumed run recomputes), the optimizer (fused SGD on a GPU), and the host syncs of one step.

The fast tests here need no Ray: ``jobs.training.worker``'s batching is called with a stand-in
for the worker's run, on a real ``CocoDataset`` of the synthetic shapes.
"""

from __future__ import annotations

import math
import random
from copy import deepcopy
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.training.spec import steps_per_epoch
from jobs.training.worker import RemainingBatches, load_batch, remaining_batches, shard_batches
from maskrcnn.config import get_preset
from maskrcnn.data import CocoDataset, RandomHorizontalFlip, group_by_orientation, landscape_images, make_sample_dataset
from maskrcnn.engine import DEFAULT_CLIP_GRAD_NORM, make_optimizer, prepare_for_training, sgd_kernel, train_step
from maskrcnn.modeling import build_model
from tests.test_keypoints import one_thread  # noqa: F401  (a fixture, used by name)
from tests.test_syncs import as_on_a_gpu, recorded_syncs  # noqa: F401  (as_on_a_gpu: a fixture, used by name)
from tests.tv_reference import synthetic_batch

# --------------------------------------------------------------------------------------------
# Batches: landscape and portrait apart, every image once, the same order on a resume


def _check_grouped(batches: list[list[int]], indices: list[int], landscape: list[bool], batch_size: int) -> None:
    assert len(batches) == math.ceil(len(indices) / batch_size)  # the steps of an ungrouped epoch
    assert sorted(i for batch in batches for i in batch) == sorted(indices)  # each index as often as given
    mixed = [k for k, batch in enumerate(batches) if len({landscape[i] for i in batch}) > 1]
    assert mixed in ([], [len(batches) - 1])  # only the last batch may mix, the two leftovers together
    short = [k for k, batch in enumerate(batches) if len(batch) < batch_size]
    assert all(k >= len(batches) - 2 for k in short)  # the leftovers: one or two batches at the end
    if mixed:
        assert len(batches[-1]) <= batch_size and len(short) <= 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_batches_keep_landscape_and_portrait_images_apart(batch_size):
    rng = random.Random(batch_size)
    for count in (0, 1, 5, 17, 64):
        landscape = [rng.random() < 0.6 for _ in range(count)]
        indices = rng.sample(range(count), count)
        _check_grouped(group_by_orientation(indices, landscape, batch_size), indices, landscape, batch_size)
    # a full batch is cut as soon as its orientation has batch_size images: the shuffle's order kept
    assert group_by_orientation([0, 1, 2, 3, 4, 5], [True, False, True, False, False, True], 2) == [[0, 2], [1, 3], [5, 4]]
    # leftovers that fit one batch make the one mixed batch; more than that stay apart
    assert group_by_orientation([0, 1, 2], [True, True, False], 2) == [[0, 1], [2]]
    assert group_by_orientation([0, 1, 2, 3], [True, False, False, False], 3) == [[1, 2, 3], [0]]
    assert group_by_orientation([0, 1, 2, 3, 4], [True, True, False, False, True], 3) == [[0, 1, 4], [2, 3]]
    assert group_by_orientation([0, 1, 2], [True, False, True], 4) == [[0, 2, 1]]
    assert group_by_orientation([0, 1, 2, 3, 4, 5], [True, False, True, False, True, False], 4) == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("num_items,world_size,batch_size", [(24, 2, 2), (25, 2, 4), (7, 3, 2), (1, 4, 2)])
def test_shard_batches_are_a_function_of_seed_epoch_and_rank(num_items, world_size, batch_size):
    landscape = [random.Random(num_items).random() < 0.5 for _ in range(num_items)]
    steps = steps_per_epoch(num_items, world_size, batch_size)
    for grouping in (landscape, None):
        for epoch in (0, 1):
            shards = [shard_batches(num_items, world_size, rank, epoch, 7, batch_size, grouping) for rank in range(world_size)]
            assert all(len(batches) == steps for batches in shards)  # every rank takes the epoch's steps
            assert {i for batches in shards for batch in batches for i in batch} == set(range(num_items))
            again = [shard_batches(num_items, world_size, rank, epoch, 7, batch_size, grouping) for rank in range(world_size)]
            assert again == shards  # what a resumed run recomputes
    if num_items >= 24:
        assert shard_batches(num_items, world_size, 0, 0, 7, batch_size, landscape) != shard_batches(
            num_items, world_size, 0, 1, 7, batch_size, landscape
        )  # reshuffled per epoch
        assert shard_batches(num_items, world_size, 0, 0, 7, batch_size) != shard_batches(
            num_items, world_size, 0, 0, 8, batch_size
        )  # and per seed


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    """13 synthetic images of 160-320 px a side, landscape and portrait mixed."""
    annotations, images = make_sample_dataset(str(tmp_path_factory.mktemp("shapes")), {"train": 13}, seed=5)["train"]
    return CocoDataset(annotations, images)


def _worker_run(dataset, rank: int, step: int, grouping: bool = True):
    """What ``remaining_batches`` reads of a worker's run: 2 ranks x 2 images a step, 2 epochs."""
    per_epoch = steps_per_epoch(len(dataset), 2, 2)
    plan = SimpleNamespace(steps_per_epoch=per_epoch, total_steps=2 * per_epoch, seed=3, batch_size=2, aspect_grouping=grouping,
                           loader_workers=0, ingest="dataloader")
    return SimpleNamespace(plan=plan, dataset=dataset, world_size=2, rank=rank, step=step, device=torch.device("cpu"))


def test_a_worker_trains_grouped_batches_and_resumes_at_the_batch_it_reached(shapes_dataset):
    landscape = landscape_images(shapes_dataset)
    assert 3 <= sum(landscape) <= 10  # both orientations, so the grouping has something to do
    per_epoch = steps_per_epoch(len(shapes_dataset), 2, 2)  # 7 images a rank: 4 steps
    for rank in (0, 1):
        run = _worker_run(shapes_dataset, rank, 0)
        run_batches = [([image.shape[-2:] for image in images], [t["image_id"] for t in targets])
                       for images, targets in remaining_batches(run)]
        assert len(run_batches) == 2 * per_epoch
        epoch = run_batches[:per_epoch]
        for k, (sizes, _) in enumerate(epoch[:-1]):  # all but the last: one orientation, from the decoded images
            assert len({int(w) > int(h) for h, w in sizes}) == 1, (k, sizes)
        ids = [image_ids for _, image_ids in epoch]
        assert [image_ids for _, image_ids in run_batches[per_epoch:]] != ids  # the next epoch: another shuffle
        for step in (1, 3, per_epoch + 2):  # mid-epoch, the last batch, the next epoch
            resumed = [[t["image_id"] for t in targets] for _, targets in remaining_batches(_worker_run(shapes_dataset, rank, step))]
            assert resumed == [image_ids for _, image_ids in run_batches[step:]]
    # --no-aspect-grouping: the shard in its shuffled order
    flat = shard_batches(len(shapes_dataset), 2, 0, 0, 3, 2)
    plain = [[t["image_id"] for t in targets] for _, targets in remaining_batches(_worker_run(shapes_dataset, 0, 0, grouping=False))]
    assert plain[: len(flat)] == [[shapes_dataset.image_ids[i] for i in batch] for batch in flat]


def test_a_batch_is_the_same_in_any_process_and_leaves_the_steps_random_numbers(shapes_dataset):
    """A batch's flips are drawn from (seed, epoch, image): the same whatever torch's generator
    holds (a DataLoader process, a Ray Data actor, a resumed run), another draw in another epoch;
    and the training process's random numbers (the samplers') are left as they were."""
    flipping = CocoDataset(shapes_dataset.annotations_uri, shapes_dataset.images_uri, transforms=RandomHorizontalFlip(0.5))
    indices = list(range(len(shapes_dataset)))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    images, targets = load_batch(flipping, indices, seed=3, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    again, _ = load_batch(flipping, indices, seed=3, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(images, again))
    plain = [shapes_dataset[i][0] for i in indices]
    flipped = [not torch.equal(image, original) for image, original in zip(images, plain)]
    assert 0 < sum(flipped) < len(indices), flipped
    assert all(torch.equal(image, original.flip(-1)) for image, original, f in zip(images, plain, flipped) if f)
    next_epoch, _ = load_batch(flipping, indices, seed=3, epoch=1)
    assert [not torch.equal(image, original) for image, original in zip(next_epoch, plain)] != flipped
    # the run's batches, item by item, are these batches
    run = _worker_run(flipping, 0, 0)
    batches = RemainingBatches(flipping, run.plan, 2, 0, 0)
    epoch, batch = batches.indices(0)
    assert epoch == 0 and all(torch.equal(a, b) for a, b in zip(batches[0][0], load_batch(flipping, batch, 3, 0)[0]))
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_landscape_images_are_read_from_the_annotations(shapes_dataset):
    expected = [image.shape[-1] > image.shape[-2] for image, _ in (shapes_dataset[i] for i in range(len(shapes_dataset)))]
    assert landscape_images(shapes_dataset) == expected


def test_aspect_grouping_is_on_unless_turned_off():
    from jobs.training.options import build_parser

    required = ["--annotations", "a.json", "--images", "img", "--output", "out"]
    assert not build_parser().parse_args(required).no_aspect_grouping
    assert build_parser().parse_args([*required, "--no-aspect-grouping"]).no_aspect_grouping


# --------------------------------------------------------------------------------------------
# The optimizer


def test_sgd_is_fused_on_a_gpu_and_torch_default_on_a_cpu():
    import inspect

    assert sgd_kernel(torch.device("cpu")) == {"fused": None, "foreach": None}  # the loop the pinned runs used
    fused = "fused" in inspect.signature(torch.optim.SGD).parameters
    assert sgd_kernel(torch.device("cuda")) == ({"fused": True, "foreach": None} if fused else {"fused": None, "foreach": None})

    # a checkpoint's optimizer state written on a GPU (fused) resumes on a CPU with the CPU's kernel
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GroupNorm(1, 3))
    optimizer = make_optimizer(model, lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["fused"] = True
    resumed = make_optimizer(model, lr=0.1)
    resumed.load_state_dict(state)
    assert all(group["fused"] is None and group["foreach"] is None for group in resumed.param_groups)
    assert len(resumed.state) == len(optimizer.state)  # the momentum buffers came with it
    resumed.step()


@pytest.mark.usefixtures("one_thread")
def test_momentum_resumed_takes_its_parameters_layout():
    """Momentum saved NCHW (a run checkpointed before training ran NHWC) resumed beside the NHWC
    parameters ``prepare_for_training`` makes: each buffer takes its parameter's strides, so the
    fused kernel, which walks parameter, gradient and buffer as flat arrays, updates the right
    elements. torch's CPU fused SGD shows what goes wrong otherwise (a CUDA one refuses)."""
    torch.manual_seed(0)
    model = prepare_for_training(build_model(get_preset("small")))
    optimizer = make_optimizer(model, lr=0.01)
    images, targets = synthetic_batch(torch.Generator().manual_seed(1), count=2)
    train_step(model, optimizer, images, targets)
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        state["momentum_buffer"] = state["momentum_buffer"].contiguous()  # as written NCHW
    nhwc = [p for p in model.parameters() if p.dim() == 4 and not p.is_contiguous()]
    assert nhwc  # the NHWC convolution weights whose momentum differs in layout
    models = {}
    for fused in (None, True):
        resumed_model = prepare_for_training(build_model(get_preset("small")))
        resumed_model.load_state_dict(model.state_dict())
        resumed = make_optimizer(resumed_model, lr=0.01)
        resumed.load_state_dict(deepcopy(saved))  # as read from a file: buffers of its own
        for param, state in resumed.state.items():
            assert state["momentum_buffer"].stride() == param.stride()
            assert torch.equal(state["momentum_buffer"], saved["state"][_index(resumed, param)]["momentum_buffer"])
        for group in resumed.param_groups:
            group["fused"] = fused  # torch's CPU fused kernel stands in for the GPU's
        torch.manual_seed(2)
        train_step(resumed_model, resumed, images, targets)
        models[fused] = resumed_model
    for (name, a), b in zip(models[True].named_parameters(), models[None].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def _index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """``param``'s index in ``optimizer.state_dict()``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_sgd_steps_as_the_per_parameter_loop_does():
    torch.manual_seed(0)  # the model as jobs.train steps it: NHWC
    model = prepare_for_training(build_model(get_preset("small")).cuda())
    reference = prepare_for_training(build_model(get_preset("small")).cuda())
    reference.load_state_dict(model.state_dict())
    fused = make_optimizer(model, lr=0.01)
    assert all(group["fused"] for group in fused.param_groups)
    loop = make_optimizer(reference, lr=0.01)
    for group in loop.param_groups:
        group.update(fused=None, foreach=False)
    images, targets = synthetic_batch(torch.Generator().manual_seed(1))
    images = [image.cuda() for image in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    for _ in range(3):
        torch.manual_seed(1)
        train_step(model, fused, images, targets, clip_grad_norm=DEFAULT_CLIP_GRAD_NORM)
        torch.manual_seed(1)
        train_step(reference, loop, images, targets, clip_grad_norm=DEFAULT_CLIP_GRAD_NORM)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


# --------------------------------------------------------------------------------------------
# Host syncs of one training step

# Where one training step of n images (the `small` preset, the accelerator's branches) still
# makes a GPU's host wait, by (op, file under maskrcnn/, function). A sync elsewhere, or more of
# them, fails the test; update this only with the reason. None is per image (it was 10 + 8n).
EXPECTED_TRAINING_SYNCS = {
    ("aten._local_scalar_dense", "modeling/meta_arch.py", "_check_targets"): lambda n: 1,  # `if` any degenerate box in the batch
    ("tolist", "modeling/nms.py", "grouped_batched_nms"): lambda n: 1,  # the RPN: every image's proposal count
    ("tolist", "modeling/roi_heads/roi_heads.py", "sample_proposals"): lambda n: 1,  # every image's sampled and positive counts
    ("tolist", "modeling/poolers.py", "forward"): lambda n: 2,  # the RoIs' level bounds, box and mask poolers
}
EXPECTED_TRAINING_SYNCS_PER_STEP = 5  # the sum, at any batch size


@pytest.mark.usefixtures("as_on_a_gpu", "one_thread")
def test_a_training_step_syncs_a_fixed_few_times():
    torch.manual_seed(0)
    model = build_model(get_preset("small")).train()
    optimizer = make_optimizer(model, lr=0.01)
    images, targets = synthetic_batch(torch.Generator().manual_seed(1), count=2)
    counts = {}
    for n in (1, 2):
        with recorded_syncs() as log:
            losses = train_step(model, optimizer, images[:n], targets[:n], clip_grad_norm=DEFAULT_CLIP_GRAD_NORM)
        assert float(losses["loss_mask"]) > 0  # the mask branch ran
        by_site = Counter(log)
        unexpected = {site: c for site, c in by_site.items() if c > EXPECTED_TRAINING_SYNCS.get(site, lambda n: 0)(n)}
        assert not unexpected, f"{n} images: syncs beyond EXPECTED_TRAINING_SYNCS: {unexpected}; all: {by_site}"
        counts[n] = len(log)
    assert counts[1] <= EXPECTED_TRAINING_SYNCS_PER_STEP and counts[2] <= EXPECTED_TRAINING_SYNCS_PER_STEP, counts


# --------------------------------------------------------------------------------------------
# DDP's buckets and the NHWC parameters

_DDP_STEP = """
import json, sys, warnings
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from maskrcnn.config import get_preset
from maskrcnn.engine import make_optimizer, prepare_for_training, train_step
from maskrcnn.modeling import build_model
from tests.tv_reference import synthetic_batch

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
if sys.argv[2] == "as jobs.train":
    model = DistributedDataParallel(prepare_for_training(build_model(get_preset("small"))))
else:  # NCHW parameters, NHWC input: a 1x1 convolution's gradient comes channels_last
    model = DistributedDataParallel(torch.nn.Conv2d(64, 4, 1))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if sys.argv[2] == "as jobs.train":
        images, targets = synthetic_batch(torch.Generator().manual_seed(1), count=2)
        train_step(model, make_optimizer(model.module, lr=0.01), images, targets)
    else:
        model(torch.randn(3, 64, 28, 28).contiguous(memory_format=torch.channels_last)).sum().backward()
dist.destroy_process_group()
print(json.dumps([str(w.message) for w in caught]))
"""


def _ddp_warnings(tmp_path, case: str) -> list[str]:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DDP_STEP, str(tmp_path / case.replace(" ", "_")), case],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ddp_takes_the_nhwc_parameters_strides_for_its_gradient_buckets(tmp_path):
    """jobs.train hands DDP the model channels_last (``prepare_for_training``), so each gradient
    bucket view has its parameter's strides: a real DDP step (gloo, in a process of its own, as
    torch warns once a process) warns nothing about strides, where NCHW parameters fed NHWC get
    DDP's "Grad strides do not match bucket view strides" (the control: what this test looks
    for). tests/test_job_train.py checks that a two-worker run prints none."""
    assert any("Grad strides" in m for m in _ddp_warnings(tmp_path, "nchw"))
    warned = _ddp_warnings(tmp_path, "as jobs.train")
    assert not [m for m in warned if "strides" in m.lower()], warned
