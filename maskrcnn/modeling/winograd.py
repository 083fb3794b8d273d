"""3x3 convolutions by Winograd's transform on CPUs without AVX512: the fast path's FPN, RPN and
RoI-head convolutions, where most of an R50-FPN forward's arithmetic is.

oneDNN runs a 3x3 convolution directly (9 multiply-adds per input and output channel per pixel)
and on AVX2 reaches about this CPU's matmul rate; NNPACK, built into torch's x86 and ARM wheels,
runs it as Winograd's F(6x6, 3x3): 8x8 input tiles transformed, multiplied channel by channel
and transformed back, about 5x fewer multiplications. On a 2-core AVX2 EPYC, fp32, 2 threads,
256 channels: 2.2-2.9x oneDNN's speed on the FPN's P2-P4 maps of an 800 px image, 2x on the mask
head's 100 RoIs of 14x14; slower on small maps and few channels, where the transforms dominate
(docs/performance.md, "Winograd convolutions on AVX2 CPUs"). Its results differ from the direct
convolution by float rounding (about 1e-5 of the outputs' scale; oneDNN's are within 2e-6).

What the wrappers here guarantee, beyond the arithmetic:

- **Each image's result is independent of its batch.** NNPACK runs one image with its inference
  algorithm and several with another (4x slower on large maps, and other roundings): an image
  convolution (``per_image``) calls it once per image, and a RoI convolution, whose batch is
  every RoI of every image, at least 2 RoIs at a time (one alone is run beside a zero RoI). Its
  batched algorithm gives each RoI the same bits whatever the others (``tests/test_winograd.py``).
- **It runs where it pays and nowhere else**: an image convolution takes NNPACK when its work per
  image (in x out channels x pixels) is at least ``MIN_IMAGE_WORK``; a RoI convolution when it has
  at least ``MIN_ROI_CHANNELS`` input channels. Both decisions depend on the image and the model
  alone. Anything else (CUDA, bf16, gradients, strides, dilation) runs the wrapped convolution.
- **NCHW in, NCHW out**: NNPACK reads and writes NCHW. The FPN's 1x1 laterals (``Conv1x1NCHW``)
  write NCHW directly as one matmul each, so the top-down sums and the output convolutions run
  without a layout change (an NHWC-to-NCHW copy of P2 costs 60-100 ms here, half of what the
  transform saves).

NNPACK's thread pool is made at its first convolution in a process, with torch's thread count
then (``torch.set_num_threads`` before the first forward, as jobs.label's CPU actor does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MIN_IMAGE_WORK = 100_000_000  # in x out channels x output pixels of one image (256 ch: maps of ~40x40 up)
MIN_ROI_CHANNELS = 64  # a RoI head's convolutions on 14x14 maps: 1.4-2.5x from 64 channels up, 0.8x at 32


def winograd_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fast path takes NNPACK's Winograd convolutions on ``device``: a CPU whose torch
    has NNPACK and whose best kernels are AVX2 (with AVX512, oneDNN's direct convolutions run at
    twice the vector width, and NNPACK's AVX2 kernels were not measured against them)."""
    if torch.device(device).type != "cpu":
        return False
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    # is_available() also initializes NNPACK, which its convolution assumes done
    return capability == "AVX2" and torch.backends.nnpack.is_available()


def _eligible(conv: nn.Conv2d) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def _cpu_fp32_inference(x: Tensor, weight: Tensor) -> bool:
    """An fp32 forward on the CPU that records no gradient: what both wrappers replace."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding == (0, 0))


class WinogradConv2d(nn.Module):
    """``conv`` (3x3, stride 1) by NNPACK's Winograd transform on the CPU in fp32; otherwise, or
    below the thresholds of the module's doc, ``conv`` itself. ``per_image``: an image convolution
    (one NNPACK call per image); else a RoI convolution (all RoIs at once)."""

    def __init__(self, conv: nn.Conv2d, *, per_image: bool):
        super().__init__()
        if not _eligible(conv):
            raise ValueError(f"WinogradConv2d takes a 3x3 stride-1 undilated convolution, got {conv}")
        self.available = torch.backends.nnpack.is_available()  # which also initializes NNPACK
        self.conv = conv
        self.per_image = per_image

    def _takes(self, x: Tensor) -> bool:
        if not (self.available and x.dim() == 4 and _cpu_fp32_inference(x, self.conv.weight)):
            return False
        if self.per_image:
            return self.conv.in_channels * self.conv.out_channels * x.shape[-2] * x.shape[-1] >= MIN_IMAGE_WORK
        return self.conv.in_channels >= MIN_ROI_CHANNELS and x.shape[0] > 0

    def forward(self, x: Tensor) -> Tensor:
        if not self._takes(x):
            return self.conv(x)
        padding = list(self.conv.padding)

        def run(inputs: Tensor) -> Tensor:  # the op makes its input and weight NCHW-contiguous itself
            return torch._nnpack_spatial_convolution(inputs, self.conv.weight, self.conv.bias, padding, [1, 1])

        if self.per_image:
            return torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])]) if x.shape[0] > 1 else run(x)
        if x.shape[0] == 1:  # a lone RoI would take the one-image algorithm: run it beside a zero RoI
            return run(torch.cat([x, torch.zeros_like(x)]))[:1]
        return run(x)


class Conv1x1NCHW(nn.Module):
    """A 1x1 convolution (stride 1, no groups) whose output is NCHW whatever its input's layout, as
    one matmul per image (weight (O, I) times the input's (I, H*W) view, which an NHWC input gives
    without a copy); on other devices, dtypes or with gradients, ``conv`` itself."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not _pointwise(conv):
            raise ValueError(f"Conv1x1NCHW takes a 1x1 stride-1 convolution, got {conv}")
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        weight = self.conv.weight
        if not _cpu_fp32_inference(x, weight):
            return self.conv(x)
        n, _, h, w = x.shape
        weight = weight.reshape(weight.shape[0], -1)
        inputs = x.flatten(2)
        # one matmul per image: a batched one rounds otherwise than a single image's on some CPUs
        # (AVX512, 2048 channels: up to 3e-6), and an image's result must not depend on its batch
        out = x.new_empty(n, weight.shape[0], h * w)
        for i in range(n):
            torch.mm(weight, inputs[i], out=out[i])
        if self.conv.bias is not None:
            out += self.conv.bias[:, None]
        return out.view(n, -1, h, w)


def _replace_convs(parent: nn.Module, make) -> int:
    """Each Conv2d below ``parent`` (the FPN, the RPN head, a head of convs) replaced by
    ``make(conv)`` where that gives another module; returns how many were. Convolutions already
    wrapped stay as they are."""
    changed = 0
    for name, child in parent.named_children():
        if isinstance(child, (WinogradConv2d, Conv1x1NCHW)):
            continue
        if not isinstance(child, nn.Conv2d):
            changed += _replace_convs(child, make)
        else:
            new = make(child)
            if new is not child:
                setattr(parent, name, new)
                changed += 1
    return changed


def use_winograd(model: nn.Module) -> int:
    """Swaps in the Winograd convolutions (and the NCHW 1x1s around them) in an FPN model for
    inference on the CPU: the FPN's 1x1 laterals and 3x3 outputs, the RPN head's 3x3 convs and
    1x1 predictors, and the mask and keypoint heads' 3x3 convs. Returns how many modules changed (0 for a model
    without those parts, such as C4's)."""
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

    def image_conv(conv: nn.Conv2d) -> nn.Module:
        if _eligible(conv):
            return WinogradConv2d(conv, per_image=True)
        return Conv1x1NCHW(conv) if _pointwise(conv) else conv

    def roi_conv(conv: nn.Conv2d) -> nn.Module:
        return WinogradConv2d(conv, per_image=False) if _eligible(conv) else conv

    fpn = getattr(getattr(model, "backbone", None), "fpn", None)
    if not isinstance(fpn, FeaturePyramidNetwork):
        return 0
    # the FPN's laterals and outputs; the RPN head's convs and its 1x1 predictors, which read
    # NCHW levels 4-6x faster as a matmul than through oneDNN
    changed = _replace_convs(fpn, image_conv) + _replace_convs(model.rpn.head, image_conv)
    for head_name in ("mask_head", "keypoint_head"):
        head = getattr(model.roi_heads, head_name, None)
        if isinstance(head, nn.Sequential):
            changed += _replace_convs(head, roi_conv)
    return changed
