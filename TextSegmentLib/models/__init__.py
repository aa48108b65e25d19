"""Text-guided segmentation models, built by name (``create_model``)."""

from .base import ImageFeatures, ModelOutput, TextFeatures, TextSegmentationModel
from .registry import create_model, get_model_config, list_models, register_builder, register_model

__all__ = [
    "ImageFeatures",
    "ModelOutput",
    "TextFeatures",
    "TextSegmentationModel",
    "create_model",
    "get_model_config",
    "list_models",
    "register_builder",
    "register_model",
]
