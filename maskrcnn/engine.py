"""Training pieces shared by the Ray job and plain loops: optimizer, LR schedule, one step.

The paper's schedule: SGD with momentum 0.9 and weight decay 1e-4, lr 0.02 at 16 images per
iteration scaled linearly with the batch (Goyal et al.'s rule), linear warmup, and the lr cut
by 10x at fixed fractions of the run.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

BASE_LR = 0.02
BASE_BATCH = 16


def scaled_lr(total_batch: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """The linear scaling rule: lr proportional to the images per iteration across all workers."""
    return base_lr * total_batch / base_batch


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; no weight decay on norm layers' affine parameters and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def warmup_multistep_factor(step: int, warmup_steps: int, milestones: tuple[int, ...], warmup_factor: float = 0.001, gamma: float = 0.1) -> float:
    """The lr multiplier at ``step``: linear warmup from ``warmup_factor``, then x``gamma`` at each milestone."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                   milestones: tuple[float, ...] = (2 / 3, 8 / 9)) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``warmup_steps`` (default: min(500, total/10)), decay at fractions of the run."""
    if warmup_steps is None:
        warmup_steps = min(500, max(1, total_steps // 10))
    steps = tuple(int(f * total_steps) for f in milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_multistep_factor(s, warmup_steps, steps))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--precision`` choice on ``device``; None: fp32, no autocast.

    ``auto``: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPUs (where bf16 is slower
    than fp32 unless the CPU has AMX)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on the device's type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
