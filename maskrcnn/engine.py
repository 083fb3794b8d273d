"""The one training recipe, used by ``jobs.train``, the overfit test and the ablation benchmark:
optimizer, learning-rate schedule, gradient clipping, one step.

The paper's recipe, as detectron2's and torchvision's references run it: SGD with momentum 0.9
and weight decay 1e-4 (none on norm layers' affine parameters, as detectron2, nor on biases), lr
0.02 at 16 images per iteration scaled linearly with the batch (Goyal et al.'s rule), linear
warmup from a thousandth of it, and the lr cut by 10x at fixed points of the run. Two additions,
for models trained from scratch on a CPU-sized batch: a GroupNorm trunk (the ``small`` presets)
takes a floor under the scaled lr; and gradients are clipped at a total norm of
``DEFAULT_CLIP_GRAD_NORM`` (for every model; the references do not clip).
``docs/performance.md`` has what the defaults gave against the alternatives.

The recipe's numbers import nothing: each function that needs torch imports it, so that the jobs
build their options from them (``--help``, an option's mistake) without torch's seconds of import.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

REFERENCE_LR = 0.02  # the paper's lr ...
REFERENCE_BATCH = 16  # ... at its 8 GPUs x 2 images
# The least default lr of a model whose trunk uses GroupNorm and trains from scratch (the
# ``small`` presets): at a CPU's 4 images a step the linear rule's lr leaves it undertrained.
GROUPNORM_LR_FLOOR = 0.02
MAX_WARMUP_STEPS = 1000  # detectron2's and torchvision's warmup, capped at a tenth of a short run
DEFAULT_MILESTONES = (2 / 3, 8 / 9)  # detectron's 1x schedule: 60k and 80k of 90k steps
DEFAULT_CLIP_GRAD_NORM = 10.0


def default_lr(total_batch: int, norm: str = "frozen_bn") -> float:
    """The peak lr for ``total_batch`` images per step across all workers: the linear scaling
    rule, at least ``GROUPNORM_LR_FLOOR`` for a trunk with ``norm`` "gn"."""
    lr = REFERENCE_LR * total_batch / REFERENCE_BATCH
    return max(lr, GROUPNORM_LR_FLOOR) if norm == "gn" else lr


def default_warmup_steps(total_steps: int) -> int:
    return min(MAX_WARMUP_STEPS, total_steps // 10)


def milestone_steps(milestones, total_steps: int) -> list[int]:
    """Milestones as steps: a value below 1 is a fraction of ``total_steps``, any other a step."""
    return sorted(int(round(m * total_steps)) if m < 1 else int(m) for m in milestones)


def sgd_kernel(device: torch.device) -> dict[str, bool | None]:
    """``torch.optim.SGD``'s implementation flags for parameters on ``device``: on a GPU the
    fused kernel (the whole update in one multi-tensor kernel, instead of foreach's 3-4 or the
    loop's several launches per parameter), where this torch has it; else torch's default
    (foreach on a GPU, the per-parameter loop on the CPU, as the pinned and overfit runs use)."""
    import torch

    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters:
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": None}


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; no weight decay on norm layers' affine parameters and
    biases. Fused on a GPU (``sgd_kernel`` of the device the parameters are on, so build the
    optimizer after moving the model)."""
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernel = sgd_kernel(next((p.device for p in decay + no_decay), torch.device("cpu")))
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, **kernel)

    def keep_kernel_and_layout(optimizer: torch.optim.Optimizer) -> None:
        # load_state_dict takes the saved groups' flags too: a checkpoint written on a GPU
        # (fused) resumes on a CPU, and one written on a CPU resumes fused on a GPU.
        # And the saved momentum keeps the strides it was saved with: one saved NCHW beside an
        # NHWC parameter (``prepare_for_training``) makes the fused kernel stop (CUDA) or
        # update the wrong elements (CPU), so each state tensor takes its parameter's layout.
        for group in optimizer.param_groups:
            group.update(kernel)
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                        state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

    optimizer.register_load_state_dict_post_hook(keep_kernel_and_layout)
    return optimizer


def warmup_multistep_factor(step: int, warmup_steps: int, milestones, warmup_factor: float = 0.001, gamma: float = 0.1) -> float:
    """The lr multiplier at ``step``: linear warmup from ``warmup_factor`` to 1 over
    ``warmup_steps``, then x``gamma`` at each milestone (a step) passed."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                   milestones=DEFAULT_MILESTONES, warmup_factor: float = 0.001, gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``warmup_steps`` (default: ``default_warmup_steps``), then decay by ``gamma``
    at ``milestones`` (fractions of the run below 1, steps otherwise); stepped once per step."""
    import torch

    if warmup_steps is None:
        warmup_steps = default_warmup_steps(total_steps)
    steps = milestone_steps(milestones, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_multistep_factor(s, warmup_steps, steps, warmup_factor, gamma))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--precision`` choice on ``device``; None: fp32, no autocast.

    ``auto``: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPUs. A CPU with AVX512-BF16
    or AMX runs bf16 about twice as fast (docs/performance.md), but bf16 moves detections beyond
    rounding, and a CPU's labels keep matching torchvision's fp32 ones unless bf16 is asked for."""
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def cpu_runs_bf16() -> bool:
    """Whether torch runs bf16 convolutions on this CPU with oneDNN's bf16 kernels (torch asks for
    AVX512 BW/VL/DQ; AVX512-BF16 and AMX speed them up); elsewhere (AVX2) it falls back to slower
    generic code: ``small``'s inference took 3.3x fp32's time on a 2-core AMD EPYC without
    AVX512, with other rounding."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on the device's type, or nothing when ``dtype`` is None."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_for_training(model: "torch.nn.Module") -> "torch.nn.Module":
    """The model as the recipe trains it, before its optimizer and any DDP wrapper: train mode,
    convolution weights and batches NHWC (``modeling.optimize.set_channels_last``), the layout
    cuDNN's tensor cores and oneDNN run natively. The losses are the NCHW model's, float rounding
    apart (``tests/test_pinned.py``); on a 2-core CPU a step is 1.1-1.2x faster (r50_fpn, 512 px,
    and ``small``). Checkpoints are written NCHW (``maskrcnn.checkpoint.save_checkpoint``), so
    what a run saves does not depend on it. Returns the same model."""
    from maskrcnn.modeling.optimize import set_channels_last

    return set_channels_last(model).train()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    scheduler=None,
    autocast_dtype: torch.dtype | None = None,
    scaler: "torch.amp.GradScaler | None" = None,
    clip_grad_norm: float | None = None,
) -> dict[str, Tensor]:
    """One optimisation step: forward (under autocast to ``autocast_dtype`` when set; fp16 wants
    a ``scaler``), backward, step. Returns the loss terms and their sum ``loss``, detached and
    still on the device: no host sync here; the caller decides when to read them."""
    import torch

    device = images[0].device
    with autocast_context(device, autocast_dtype):
        losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    out = {k: v.detach() for k, v in losses.items()}
    out["loss"] = total.detach()
    return out
