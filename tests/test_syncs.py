"""Host syncs of one fast-path inference, counted on the CPU.

On a GPU, an op whose result the host must read (a count, a data-dependent shape, a value
copied either way through pageable memory) makes the host wait until the GPU has run all the
work queued before it, and no kernel is queued meanwhile. The CPU never waits, but the same ops
run there, so they are recorded: a ``TorchDispatchMode`` for the aten ops that read the device
(``_local_scalar_dense``, ``nonzero``, ``equal``, boolean indexing, ...), and a
``TorchFunctionMode`` for the host reads and copies that dispatch nothing on CPU tensors
(``tolist``, ``numpy``, ``torch.tensor(..., device=...)``). The accelerator's branches run: the
fixed-shape NMS (``nms.FIXED_SHAPE_ON_CPU``) and torchvision's RoIAlign (the GPU's kernel).
"""

from __future__ import annotations

import contextlib
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
from maskrcnn.modeling.poolers import MultiScaleRoIPooler
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
# elsewhere, or more of them, fails the test; update this only with the reason.
EXPECTED_SYNCS = {
    ("modeling/nms.py", "grouped_batched_nms"): lambda n: 1,  # the RPN: every image's proposal count
    ("modeling/nms.py", "top_m_batched_nms"): lambda n: 1,  # the box head: every image's detection count
    ("modeling/poolers.py", "forward"): lambda n: 8,  # torch.where per FPN level (4), box and mask poolers
    ("modeling/preprocessing.py", "resize_boxes"): lambda n: 4 * n,  # its ratios: 4 scalars made on the device
    ("modeling/postprocessing.py", "paste_masks"): lambda n: n,  # the size of an image's box-local mask crops
}


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_model(get_preset("small")), device="cpu")  # the fast path, as jobs.label builds it


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The accelerator's branches on CPU tensors: fixed-shape NMS, torchvision's RoIAlign."""
    monkeypatch.setattr(nms, "FIXED_SHAPE_ON_CPU", True)
    monkeypatch.setattr(MultiScaleRoIPooler, "gathers", lambda self, device: False)


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
    # 10 per batch and 5 per image (resize_boxes' 4 and the crops' size)
    assert counts[1] <= 15 and counts[4] <= 30, counts


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
