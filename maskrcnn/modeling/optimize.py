"""The inference fast path: the same model, rearranged to run faster at (almost) the same outputs.

``optimize_for_inference(model)`` changes a MaskRCNN in place for eval-only use:

- **Norm folding.** Every frozen (or eval-mode) batch norm that follows a convolution is folded
  into that convolution's weights and bias, and replaced by an identity: one pass over each
  feature map instead of two. The outputs change only by float rounding (about 1e-6 relative).
  The trunk's, the FPN's and the RoI heads' (r50_fpn_v2's BatchNorm FPN and box and mask
  convs; C4's res5) alike; GroupNorm, which normalises with each input's statistics, stays.
- **channels_last.** Convolution weights and the batched input are stored NHWC, the layout
  oneDNN (CPU) and cuDNN tensor cores (GPU) run natively, so no layout reorders happen
  between layers.
- **RoIAlign on the CPU** runs as a weighted gather over NHWC rows (``poolers.roi_align_gather``)
  instead of torchvision's one-thread kernel: the same samples and weights, summed in another
  order.
- **NMS stops at the top-k**: the RPN's and the box head's NMS find the post-NMS top-k instead
  of running NMS over every box of every class. The same boxes; equal scores in index order.
  On the CPU ``nms.leading_batched_nms`` walks the boxes by score and stops once it has them.
  On accelerators the box head's ``nms.top_m_batched_nms`` compares only the top
  ``nms.TOP_M`` candidates of each image, all images at once, in a fixed number of fixed-point
  rounds (``nms.ROUNDS``) and one host sync; an image whose result is not provably final gets
  the full NMS instead, counted in ``nms.stats`` (``benchmarks/model_inference.py`` prints it).
  The RPN's levels go through ``nms.grouped_batched_nms`` the same way.

- **Winograd 3x3 convolutions on AVX2 CPUs** (fp32): the FPN's, the RPN's and the mask and
  keypoint heads' 3x3 convolutions run as NNPACK's Winograd F(6x6, 3x3) where that pays, 2-3x
  oneDNN's direct convolutions on large maps; each image's result independent of its batch
  (``maskrcnn.modeling.winograd``). Float rounding only (about 1e-5 of the outputs' scale).

- **Weights held in the autocast dtype** (``weights_dtype``: bf16 or fp16, the precision the
  forward will run under ``torch.autocast``): every convolution and linear layer that autocast
  runs in that dtype stores its weights in it, once. Autocast caches its casts only for weights
  that require grad, so frozen fp32 weights would be cast again on every forward (a read of the
  fp32 weights, a write of the copies and a launch per layer). Casting them to the same dtype
  ahead of time gives autocast nothing to do and the same bits: the outputs are identical. The
  layers that run in fp32 under autocast (``FP32_LAYERS`` of the RPN head and the box
  predictor) keep fp32; norms, which autocast runs in fp32, too.

The model keeps its outputs' meaning; its ``state_dict`` no longer matches a checkpoint (the
norms are gone), so save checkpoints from a model that was not optimized. Mixed precision itself
is ``torch.autocast`` around the forward (``jobs.label --precision``, ``Predictor(precision=)``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.modeling.winograd import use_winograd, winograd_available

_FOLDABLE = (FrozenBatchNorm2d, nn.BatchNorm2d)


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's per-channel scale and shift, in float64 on the CPU."""
    weight, bias, mean, var = (t.detach().to("cpu", torch.float64) for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var))
    scale = weight * (var + norm.eps).rsqrt()
    return scale, bias - mean * scale


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv followed by norm -> conv alone: weights scaled per output channel, bias shifted.
    Computed in float64 and rounded once to the conv's dtype: the folded conv is then as close
    to conv-then-norm as its dtype allows (a float32 fold rounds twice, and r50_fpn_v2's folded
    FPN and head convs carried that to scores 1e-4 off)."""
    scale, shift = _norm_scale_shift(norm)
    conv.weight.copy_(conv.weight.detach().to("cpu", torch.float64) * scale[:, None, None, None])
    bias = shift if conv.bias is None else conv.bias.detach().to("cpu", torch.float64) * scale + shift
    conv.bias = nn.Parameter(bias.to(conv.weight.device, conv.weight.dtype), requires_grad=False)


def _foldable(norm: nn.Module) -> bool:
    # A BatchNorm in training mode normalises with batch statistics: nothing to fold.
    return (
        isinstance(norm, _FOLDABLE)
        and not (isinstance(norm, nn.BatchNorm2d) and norm.training)
        and getattr(norm, "running_var", None) is not None
    )


def fold_norms(module: nn.Module) -> int:
    """Folds conv -> norm pairs found by torchvision's naming (``convN``/``bnN`` siblings, as in
    ResNet blocks and the stem) and inside Sequentials (``downsample = Sequential(conv, bn)``).
    Returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.Conv2d) or not name.startswith("conv"):
                continue
            norm_name = "bn" + name[len("conv") :]
            norm = children.get(norm_name)
            if norm is not None and _foldable(norm):
                fold_conv_norm(child, norm)
                setattr(parent, norm_name, nn.Identity())
                folded += 1
        if isinstance(parent, nn.Sequential):
            items = list(parent.named_children())
            for (_, first), (second_name, second) in zip(items, items[1:]):
                if isinstance(first, nn.Conv2d) and _foldable(second):
                    fold_conv_norm(first, second)
                    setattr(parent, second_name, nn.Identity())
                    folded += 1
    return folded


_AUTOCAST_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)  # autocast runs these in its lower precision


@torch.no_grad()
def hold_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Stores the weights and biases of the layers autocast runs in ``dtype`` in ``dtype``, but
    not those a module names in its ``FP32_LAYERS`` (run in fp32 under autocast). Returns how
    many layers changed. Only for inference under ``torch.autocast(dtype=dtype)``."""
    fp32 = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "FP32_LAYERS", ())}
    held = 0
    for module in model.modules():
        if isinstance(module, _AUTOCAST_LAYERS) and id(module) not in fp32:
            for param in (module.weight, module.bias):
                if param is not None and param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)  # keeps the memory format (channels_last)
            held += 1
    return held


def set_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Stores the convolution weights NHWC (``enabled``) or NCHW again, and has the model put its
    batch in the same layout; returns the same model. The fast path's layout, and training's
    (``maskrcnn.engine.prepare_for_training``): the same values, float rounding apart. A
    ``Module.to`` keeps each parameter object, so an optimizer made before still holds them; a
    DDP wrapper must come after (its gradient buckets take the parameters' strides)."""
    model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
    model.channels_last = enabled
    return model


def optimize_for_inference(model: nn.Module, *, fold: bool = True, channels_last: bool = True,
                           weights_dtype: torch.dtype | None = None, winograd: bool | None = None) -> nn.Module:
    """Eval mode, norms folded, NHWC weights and inputs, and with ``weights_dtype`` (bf16, fp16:
    the autocast dtype the model will run under) the weights held in it; returns the same
    (changed) model. ``winograd``: the FPN, RPN and RoI heads' 3x3 convolutions by NNPACK's
    Winograd transform (``winograd.use_winograd``); None: where it pays, an fp32 model on an
    AVX2 CPU (``winograd.winograd_available``)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if fold:
        fold_norms(model.backbone)
        fold_norms(model.roi_heads)
    if channels_last:
        set_channels_last(model)
    for module in model.modules():
        # poolers: the CPU's gather RoIAlign (poolers.py); RPN and box head: NMS that stops
        # at the top-k (nms.batched_nms)
        if hasattr(module, "exact_inference"):
            module.exact_inference = False
    fp32 = weights_dtype in (None, torch.float32)
    if winograd is None:
        device = next(model.parameters()).device
        winograd = fp32 and winograd_available(device)
    if winograd:
        if not fp32:
            raise ValueError("winograd=True runs fp32 models only: NNPACK has no bf16 or fp16 convolutions")
        if not torch.backends.nnpack.is_available():
            raise ValueError("winograd=True needs a torch built with NNPACK (torch.backends.nnpack.is_available())")
        use_winograd(model)
    if not fp32:
        hold_weights(model, weights_dtype)
    return model
