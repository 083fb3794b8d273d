"""Mask R-CNN (He et al., 2017): the model, its data, evaluation and checkpoints. No Ray here."""

from maskrcnn.config import ModelConfig, get_preset, PRESETS

__all__ = ["ModelConfig", "get_preset", "PRESETS"]
