"""Host syncs of one fast-path inference, counted on the CPU.

On a GPU, an op whose result the host must read (a count, a data-dependent shape, a value
copied either way through pageable memory) makes the host wait until the GPU has run all the
work queued before it, and no kernel is queued meanwhile. The CPU never waits, but the same ops
run there, so they are recorded: a ``TorchDispatchMode`` for the aten ops that read the device
(``_local_scalar_dense``, ``nonzero``, ``equal``, boolean indexing, ...), and a
``TorchFunctionMode`` for the host reads and copies that dispatch nothing on CPU tensors
(``tolist``, ``numpy``, ``torch.tensor(..., device=...)``). The accelerator's branches run: the
fixed-shape NMS (``nms.FIXED_SHAPE_ON_CPU``); RoIAlign is the same gather over all levels on
every device.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from maskrcnn.config import get_preset
from maskrcnn.inference import Predictor
from maskrcnn.modeling import build_model, nms
from maskrcnn.modeling.meta_arch import predict_by_size
from maskrcnn.modeling.poolers import MultiScaleRoIPooler, assign_levels, roi_align_gather
from maskrcnn.modeling.postprocessing import paste_masks, paste_masks_box_local
from maskrcnn.modeling.preprocessing import resize_boxes, resize_keypoints, resize_ratios
from maskrcnn.modeling.roi_heads.roi_heads import _true_indices
from tests.tv_reference import synthetic_batch

# ops that make the host wait for the device, whatever their arguments
_SYNCING = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
    "aten.unique_consecutive", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_dim_consecutive",
    "torchvision.nms",  # its CUDA kernel reads the overlap mask on the host
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


def _site() -> tuple[str, str]:
    """(file under maskrcnn/, function) of the innermost frame of the library on the stack."""
    for frame in reversed(traceback.extract_stack()):
        if "/maskrcnn/" in frame.filename:
            return frame.filename.rsplit("/maskrcnn/", 1)[1], frame.name
    return "?", "?"


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _SYNCING:
        return True
    if name in ("aten.where", "aten.nonzero_numpy"):  # torch.where(condition): nonzero
        return len(args) == 1
    if name in _INDEXING:  # a boolean mask as an index: its true count sizes the result
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "aten.repeat_interleave":  # the output's size is the repeats' sum, unless given
        return isinstance(args[0], torch.Tensor) and isinstance(args[-1] if len(args) > 1 else args[0], torch.Tensor) \
            and kwargs.get("output_size") is None
    return False


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if _syncs(name, args, kwargs):
            self.log.append((name, *_site()))
        return func(*args, **kwargs)


class _HostReadRecorder(TorchFunctionMode):
    """Reads and copies that dispatch no aten op on the CPU but wait for a GPU: a tensor to a
    list or array, and a tensor made from host numbers on an explicit device (a pageable copy)."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy", "cpu") or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None):
            self.log.append((name, *_site()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def recorded_syncs():
    """Yields a list that fills with (op, file, function) for each op that would sync a GPU."""
    log: list = []
    with _HostReadRecorder(log), _DispatchRecorder(log):
        yield log


# Where one fast-path forward of n images (one padded size) still waits for a GPU. A sync
# elsewhere, or more of them, fails the test; update this only with the reason. None is per image.
EXPECTED_SYNCS = {
    ("modeling/nms.py", "grouped_batched_nms"): lambda n: 1,  # the RPN: every image's proposal count
    ("modeling/nms.py", "top_m_batched_nms"): lambda n: 1,  # the box head: every image's detection count
    ("modeling/postprocessing.py", "paste_masks_box_local"): lambda n: 1,  # every image's mask crop size
}
EXPECTED_SYNCS_PER_BATCH = 3  # the sum: at any batch size (it was 15 at batch 1 and 30 at batch 4; 5 with RoIAlign level by level)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_model(get_preset("small")), device="cpu")  # the fast path, as jobs.label builds it


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The accelerator's branches on CPU tensors: fixed-shape NMS."""
    monkeypatch.setattr(nms, "FIXED_SHAPE_ON_CPU", True)


def _forward(predictor: Predictor, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The model's part of ``Predictor.predict``: one forward per padded size, box-local masks."""
    with torch.inference_mode():
        return predict_by_size(predictor.model, images, max_batch=predictor.max_batch, box_local_masks=True)


def test_a_fast_path_forward_syncs_a_fixed_few_times(predictor, as_on_a_gpu):
    images, _ = synthetic_batch(torch.Generator().manual_seed(1), count=4)
    _forward(predictor, images)  # the anchors' first copy to the device, cached after
    counts = {}
    for n in (1, 4):
        with recorded_syncs() as log:
            outputs = _forward(predictor, images[:n])
        assert all(len(out["scores"]) > 0 for out in outputs)  # the mask branch ran
        by_site = Counter((file, function) for _, file, function in log)
        unexpected = {site: c for site, c in by_site.items() if c > EXPECTED_SYNCS.get(site, lambda n: 0)(n)}
        assert not unexpected, f"{n} images: syncs beyond EXPECTED_SYNCS: {unexpected}; all: {Counter(log)}"
        counts[n] = len(log)
    assert counts[1] <= EXPECTED_SYNCS_PER_BATCH and counts[4] <= EXPECTED_SYNCS_PER_BATCH, counts


def test_a_keypoint_models_forward_reads_its_heatmap_sizes_once_a_batch(as_on_a_gpu):
    """Keypoint R-CNN: the RPN's and box head's syncs, and one read of every RoI's heatmap size
    for the whole batch (each RoI's heatmap is resized to its box, as torchvision's)."""
    torch.manual_seed(0)
    predictor = Predictor(build_model(get_preset("small_keypoint")), device="cpu")
    images, _ = synthetic_batch(torch.Generator().manual_seed(1), count=4)
    _forward(predictor, images)
    for n in (1, 4):
        with recorded_syncs() as log:
            outputs = _forward(predictor, images[:n])
        assert all(len(out["keypoints"]) > 0 for out in outputs)
        by_site = Counter((file, function) for _, file, function in log)
        assert by_site == {("modeling/nms.py", "grouped_batched_nms"): 1, ("modeling/nms.py", "top_m_batched_nms"): 1,
                           ("modeling/roi_heads/keypoint_head.py", "heatmaps_to_keypoints"): 1}, (n, by_site)


def test_the_fixed_shape_path_gives_the_cpu_path_detections_bit_for_bit(predictor, monkeypatch):
    """The RPN's and the box head's fixed-shape NMS (all images at once) against the CPU's NMS
    that stops at the top-k, on the same model and images: equal boxes, scores, labels, masks."""
    images, _ = synthetic_batch(torch.Generator().manual_seed(2), count=3)
    expected = _forward(predictor, images)
    monkeypatch.setattr(nms, "FIXED_SHAPE_ON_CPU", True)
    nms.stats.clear()
    got = _forward(predictor, images)
    assert nms.stats["images"] == 3 and nms.stats["full_nms"] == 0
    for ours, theirs in zip(got, expected):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key


# --------------------------------------------------------------------------------------------
# The sync-free forms against the syncing ones they replaced, bit for bit


def test_resize_ratios_on_the_host_scale_as_the_device_scalars_did():
    """``resize_boxes``/``resize_keypoints`` took their ratios as a float32 division of scalars
    made on the boxes' device; the host's float32 quotient scales every dtype to the same bits."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 20_000, (3000, 4), generator=g).tolist()
    for new_h, new_w, old_h, old_w in sizes:
        device = (torch.tensor(new_h, dtype=torch.float32) / torch.tensor(old_h, dtype=torch.float32),
                  torch.tensor(new_w, dtype=torch.float32) / torch.tensor(old_w, dtype=torch.float32))
        assert resize_ratios((old_h, old_w), (new_h, new_w)) == tuple(float(r) for r in device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for new_h, new_w, old_h, old_w in sizes[:200]:
            ratio_h = torch.tensor(new_h, dtype=torch.float32) / torch.tensor(old_h, dtype=torch.float32)
            ratio_w = torch.tensor(new_w, dtype=torch.float32) / torch.tensor(old_w, dtype=torch.float32)
            boxes = (torch.rand(20, 4, generator=g, dtype=torch.float64) * 2000).to(dtype)
            expected = torch.stack([boxes[:, 0] * ratio_w, boxes[:, 1] * ratio_h, boxes[:, 2] * ratio_w, boxes[:, 3] * ratio_h], dim=1)
            got = resize_boxes(boxes, (old_h, old_w), (new_h, new_w))
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            keypoints = boxes.view(20, 2, 2)[..., [0, 1, 1]]
            expected = keypoints.clone()
            expected[..., 0] *= ratio_w
            expected[..., 1] *= ratio_h
            assert torch.equal(resize_keypoints(keypoints, (old_h, old_w), (new_h, new_w)), expected)


def _pooled_level_by_level(pooler: MultiScaleRoIPooler, features, boxes, image_sizes):
    """The pooler as it was: each level's RoIs selected with ``torch.where`` (a sync per level),
    pooled by torchvision's kernel or by the one-level gather."""
    max_h = max(s[0] for s in image_sizes)
    scales = [2.0 ** round(math.log2(float(f.shape[-2]) / max_h)) for f in features]
    concat = torch.cat(boxes)
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]), concat], dim=1)
    levels = assign_levels(concat, int(-math.log2(scales[0])), int(-math.log2(scales[-1])))
    gathers = pooler.gathers(features[0].device)
    layout = torch.channels_last if gathers else torch.contiguous_format
    result = torch.empty((rois.shape[0], features[0].shape[1], *pooler.output_size), memory_format=layout).zero_()
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        if gathers:
            result[idx] = roi_align_gather(feature, rois[idx], pooler.output_size, scale, pooler.sampling_ratio, pooler.aligned)
        else:
            result[idx] = pooler._pool(feature, rois[idx], scale)
    return result


@pytest.mark.parametrize("mode", ["gather", "torchvision", "pool"])
def test_the_pooler_pools_each_levels_slice_as_a_selection_per_level_did(mode):
    """All levels in one gather (no host read), or RoIs in level order with one host read of the
    levels' bounds (torchvision's kernels): the same features and gradients as one ``torch.where``
    per level, also with a level left empty and an image without RoIs."""
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(3, 4, 256 // s, 192 // s, generator=g, requires_grad=True) for s in (4, 8, 16, 32)]
    small = torch.rand(30, 2, generator=g) * 150
    boxes = [torch.cat([small, small + torch.rand(30, 2, generator=g) * 150 + 1], dim=1),  # P2 and P3 (P4 empty)
             torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 600.0, 500.0], [5.0, 7.0, 30.0, 20.0]])]  # P5, P2
    sizes = [(256, 192), (200, 150), (256, 180)]
    pooler = MultiScaleRoIPooler(output_size=5, sampling_ratio=2, pooler_type="pool" if mode == "pool" else "align")
    pooler.train(mode == "gather")
    assert pooler.gathers(features[0].device) == (mode == "gather")
    levels = assign_levels(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 3}
    with recorded_syncs() as log:
        got = pooler(features, boxes, sizes)
    assert [op for op, *_ in log] == ([] if mode == "gather" else ["tolist"])
    expected = _pooled_level_by_level(pooler, features, boxes, sizes)
    assert got.stride() == expected.stride() and torch.equal(got, expected)
    weights = torch.randn(got.shape, generator=g)
    for have, want in zip(torch.autograd.grad(got, features, weights), torch.autograd.grad(expected, features, weights)):
        if mode == "gather":  # the backward's scatter-add sums each row's terms in another order
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(have, want)


def test_a_batchs_box_local_masks_read_their_crop_sizes_once():
    """``paste_masks_box_local``: each image's (extents, crops) as ``paste_masks`` cut them one
    image at a time (the full paste, cropped), an image without detections included, for one sync."""
    g = torch.Generator().manual_seed(4)
    sizes = [(40, 60), (33, 21), (50, 50)]
    boxes = [torch.tensor([[3.2, 4.7, 30.1, 21.9], [-6.0, -3.0, 12.0, 50.0], [35.0, 20.0, 70.0, 44.0]]), torch.zeros(0, 4),
             torch.tensor([[10.0, 10.0, 10.3, 10.2], [0.0, 0.0, 49.0, 49.0]])]
    probs = [torch.rand(len(b), 28, 28, generator=g) for b in boxes]
    with recorded_syncs() as log:
        pasted = paste_masks_box_local(probs, boxes, sizes, 0.5)
    assert len(log) == 1
    for p, b, size, (extents, crops) in zip(probs, boxes, sizes, pasted):
        full = paste_masks(p, b, size, 0.5)
        assert crops.dtype == torch.bool and len(extents) == len(crops) == len(b)
        for (y0, x0, y1, x1), crop, whole in zip(extents.tolist(), crops, full):
            assert torch.equal(crop[: y1 - y0, : x1 - x0], whole[y0:y1, x0:x1]) and whole.sum() == whole[y0:y1, x0:x1].sum()
        single = paste_masks(p, b, size, 0.5, box_local=True)
        assert torch.equal(single[0], extents) and torch.equal(single[1], crops)
    assert pasted[1][1].shape == (0, 0, 0)


def test_true_indices_are_torch_where_of_the_mask():
    g = torch.Generator().manual_seed(5)
    for mask in [torch.rand(n, generator=g) < p for n in (0, 1, 7, 600) for p in (0.0, 0.3, 1.0)]:
        assert torch.equal(_true_indices(mask, int(mask.sum())), torch.where(mask)[0])
