"""Training: data pools from phantoms and labelled CT, losses, the loop, and torchrun DDP."""

from .data import Batch, LabelledCase, SlicePool, augment, build_pool, load_source, mirror_prompt, phantom_cases
from .losses import per_image_dice_loss, presence_loss, segmentation_loss, soft_dice_loss, swap_term
from .recipes import Phase, load_recipe, recipe_chain, reproduce
from .trainer import TrainConfig, TrainResult, export_weights, lr_factor, plot_curves, train, validate

__all__ = [
    "Batch",
    "LabelledCase",
    "Phase",
    "SlicePool",
    "TrainConfig",
    "TrainResult",
    "augment",
    "build_pool",
    "export_weights",
    "load_recipe",
    "load_source",
    "lr_factor",
    "mirror_prompt",
    "phantom_cases",
    "plot_curves",
    "per_image_dice_loss",
    "presence_loss",
    "recipe_chain",
    "reproduce",
    "segmentation_loss",
    "soft_dice_loss",
    "swap_term",
    "train",
    "validate",
]
