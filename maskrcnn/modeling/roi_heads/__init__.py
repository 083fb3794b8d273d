from maskrcnn.modeling.roi_heads.box_head import ConvFCHead, FastRCNNPredictor, TwoMLPHead, fast_rcnn_inference, fast_rcnn_loss
from maskrcnn.modeling.roi_heads.keypoint_head import (
    KeypointRCNNConvHead, KeypointRCNNPredictor, heatmaps_to_keypoints, keypoint_rcnn_inference, keypoint_rcnn_loss, keypoints_to_heatmap,
)
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNConvHead, MaskRCNNPredictor, mask_rcnn_inference, mask_rcnn_loss
from maskrcnn.modeling.roi_heads.roi_heads import RoIHeads

__all__ = [
    "ConvFCHead", "FastRCNNPredictor", "TwoMLPHead", "fast_rcnn_inference", "fast_rcnn_loss",
    "MaskRCNNConvHead", "MaskRCNNPredictor", "mask_rcnn_inference", "mask_rcnn_loss", "RoIHeads",
    "KeypointRCNNConvHead", "KeypointRCNNPredictor", "heatmaps_to_keypoints", "keypoint_rcnn_inference",
    "keypoint_rcnn_loss", "keypoints_to_heatmap",
]
