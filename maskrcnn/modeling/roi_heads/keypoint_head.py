"""Keypoint branch (He et al. 2017, section 5): K one-hot m x m masks per RoI, one per keypoint.

Shapes: R RoIs; C channels; S x S pooled size (14); M = 4S heatmap size (56); K keypoints.
The head is torchvision's KeypointRCNNHeads/KeypointRCNNPredictor (same key layout, so its
state dicts load as they are): ``len(layers)`` 3x3 convs with ReLU, a 4x4 stride-2 deconv to K
maps and a bilinear x2 upsampling. Each visible keypoint is trained as an M*M-way softmax over
its heatmap's positions (the paper's cross-entropy on a one-hot target), on positive RoIs only.
At inference each heatmap is resized to its box with bicubic interpolation and its argmax is
the keypoint, the heatmap's logit there its score (torchvision's ``heatmaps_to_keypoints``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KeypointRCNNConvHead(nn.Sequential):
    """``len(layers)`` 3x3 convs each followed by a ReLU (torchvision's KeypointRCNNHeads: keys "0.weight", "2.weight", ...)."""

    def __init__(self, in_channels: int, layers: tuple[int, ...]):
        blocks: list[nn.Module] = []
        for width in layers:
            blocks.append(nn.Conv2d(in_channels, width, 3, stride=1, padding=1))
            blocks.append(nn.ReLU(inplace=True))
            in_channels = width
        super().__init__(*blocks)
        for layer in self.children():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)


class KeypointRCNNPredictor(nn.Module):
    """4x4 stride-2 deconv to one logit map per keypoint, then bilinear x2: (R, C, S, S) -> (R, K, 4S, 4S)."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.kps_score_lowres.bias)
        self.up_scale = 2
        self.num_keypoints = num_keypoints

    def forward(self, x: Tensor) -> Tensor:
        x = self.kps_score_lowres(x)
        return F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False, recompute_scale_factor=False)


def keypoints_to_heatmap(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """Each RoI's ground-truth keypoints as the index of their heatmap cell.

    ``keypoints`` (P, K, 3) x, y, visibility and ``rois`` (P, 4) in the same pixels -> (P, K)
    int64 indices y * M + x into the M x M heatmap, and (P, K) bool: the keypoint is visible
    (visibility > 0) and inside its RoI. A keypoint on the RoI's right or bottom edge belongs to
    the last cell (torchvision's and Detectron's discretization).
    """
    offset_x, offset_y = rois[:, 0:1], rois[:, 1:2]
    scale_x = heatmap_size / (rois[:, 2] - rois[:, 0])[:, None]
    scale_y = heatmap_size / (rois[:, 3] - rois[:, 1])[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]
    x_on_edge = x == rois[:, 2][:, None]
    y_on_edge = y == rois[:, 3][:, None]
    x = ((x - offset_x) * scale_x).floor().long()
    y = ((y - offset_y) * scale_y).floor().long()
    x[x_on_edge] = heatmap_size - 1
    y[y_on_edge] = heatmap_size - 1
    inside = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size)
    valid = inside & (keypoints[..., 2] > 0)
    return (y * heatmap_size + x) * valid, valid


def keypoint_rcnn_loss(pred_keypoint_logits: Tensor, gt_heatmap_indices: Tensor, gt_valid: Tensor) -> Tensor:
    """Cross-entropy over the M*M positions of each valid keypoint's heatmap, averaged over the
    valid keypoints of all positive RoIs (torchvision's ``keypointrcnn_loss``). ``pred_keypoint_logits``
    (P, K, M, M); ``gt_heatmap_indices`` and ``gt_valid`` (P, K). No valid keypoint gives a
    zero that still reaches every weight."""
    num_rois, num_keypoints, height, width = pred_keypoint_logits.shape
    if height != width:
        raise ValueError(f"keypoint heatmaps must be square, got {height} x {width}")
    valid = torch.where(gt_valid.reshape(-1))[0]
    if valid.numel() == 0:
        return pred_keypoint_logits.sum() * 0
    logits = pred_keypoint_logits.reshape(num_rois * num_keypoints, height * width)
    return F.cross_entropy(logits[valid], gt_heatmap_indices.reshape(-1)[valid])


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """(D, K, M, M) logits and (D, 4) boxes -> (D, K, 3) x, y, 1 in the boxes' pixels and (D, K)
    scores (the logit at the keypoint).

    Each RoI's maps are resized (bicubic) to the box's size rounded up to whole pixels; the argmax
    cell d becomes the continuous coordinate d + 0.5 (Heckbert 1990), scaled back to the box.
    Equal, to the bit, to torchvision's ``heatmaps_to_keypoints``; the box sizes are read back
    from the device once, not once per RoI.
    """
    num_rois, num_keypoints = maps.shape[:2]
    offset_x, offset_y = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    # torchvision divides by the int size; float32 / float32 of the same whole number is the same
    width_correction = widths / widths_ceil
    height_correction = heights / heights_ceil
    sizes = torch.stack([heights_ceil, widths_ceil], dim=1).to("cpu", torch.int64).tolist()
    x_int = torch.zeros((num_rois, num_keypoints), dtype=torch.int64, device=maps.device)
    y_int = torch.zeros_like(x_int)
    scores = torch.zeros((num_rois, num_keypoints), dtype=torch.float32, device=maps.device)
    keypoint_index = torch.arange(num_keypoints, device=maps.device)
    for i, (height, width) in enumerate(sizes):
        roi_map = F.interpolate(maps[i][:, None], size=(height, width), mode="bicubic", align_corners=False)[:, 0]
        pos = roi_map.reshape(num_keypoints, -1).argmax(dim=1)
        x = pos % width
        y = torch.div(pos - x, width, rounding_mode="floor")
        x_int[i], y_int[i] = x, y
        scores[i] = roi_map[keypoint_index, y, x]
    xs = (x_int.float() + 0.5) * width_correction[:, None] + offset_x[:, None]
    ys = (y_int.float() + 0.5) * height_correction[:, None] + offset_y[:, None]
    keypoints = torch.stack([xs, ys, torch.ones_like(xs)], dim=2)
    return keypoints, scores


def keypoint_rcnn_inference(pred_keypoint_logits: Tensor, boxes: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per image: (D, K, 3) keypoints x, y, 1 and (D, K) scores, in the boxes' pixels. All images'
    RoIs at once (each RoI on its own, so the same values): one read of the box sizes a batch."""
    counts = [len(b) for b in boxes]
    if not counts:
        return []
    keypoints, scores = heatmaps_to_keypoints(pred_keypoint_logits, torch.cat(boxes))
    return list(zip(keypoints.split(counts), scores.split(counts)))
