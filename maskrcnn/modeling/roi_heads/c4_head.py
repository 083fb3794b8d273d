"""The paper's ResNet-C4 RoI head (its Figure 4, left): res5 runs on every RoI.

Shapes: R RoIs; C4, C5 the channels of res4 and res5; 2S x 2S the pooled RoI size (14), S x S
res5's output (7; its first block has stride 2).

- box branch: RoIs pooled from res4 at 2S x 2S -> res5 -> (R, C5, S, S) -> average pool ->
  (R, C5), the box predictor's input (``Res5BoxHead``);
- mask branch: the same res5, shared with the box branch (one set of weights, as in the paper
  and detectron), on the mask RoIs: ``Res5MaskFeatures`` pools and runs res5, so the RoI heads
  see an (R, C5, S, S) "pooled" feature and the predictor's 2x deconv gives 2S x 2S (14x14)
  masks. In training the mask RoIs (the positive ones) pass through res5 a second time instead
  of reusing the box branch's activations: the values and gradients are the same with frozen
  BN or GroupNorm (per-RoI statistics; with trainable ``bn`` the batch statistics of the two
  passes differ), at the cost of res5 on <= positive_fraction of the RoIs once more.
"""

from __future__ import annotations

from torch import Tensor, nn


class Res5BoxHead(nn.Module):
    """res5 on pooled res4 RoI features, then a global average pool: (R, C4, 2S, 2S) -> (R, C5)."""

    def __init__(self, res5: nn.Module, out_channels: int):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels

    def features(self, x: Tensor) -> Tensor:
        """(R, C4, 2S, 2S) -> (R, C5, S, S)."""
        return self.res5(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class Res5MaskFeatures(nn.Module):
    """The C4 mask branch's RoI features: pool from res4, then the box head's res5.

    Holds the box head without registering it, so res5's weights live (and are saved) once,
    under ``box_head``; ``.to()``, ``.train()``, DDP and deepcopy reach them through the box
    head. ``output_size`` is res5's output size (half the pooled size), which the RoI heads
    read to size the mask targets (twice it, after the predictor's deconv).
    """

    def __init__(self, pooler: nn.Module, box_head: Res5BoxHead):
        super().__init__()
        self.pooler = pooler
        self._box_head = (box_head,)
        self.output_size = (pooler.output_size[0] // 2, pooler.output_size[1] // 2)

    def forward(self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        return self._box_head[0].features(self.pooler(features, boxes, image_sizes))
