"""Prompt pyramids and targets: text → mask-algebra target → ground truth on any label map.

Imports numpy only. See ``targets`` (the algebra), ``names`` (typed text → canonical names and
targets), ``table`` (the curated JSON) and ``pyramid`` (L1/L2/L3 prompts and negative controls).
"""

from .names import canonical_target_name, display_name, find_target_name, resolve_target
from .pyramid import build_prompt_pyramid
from .table import prompt_table
from .targets import GROUPS, LEVELS, Prompt, Target, expand, ground_truth

__all__ = [
    "GROUPS",
    "LEVELS",
    "Prompt",
    "Target",
    "build_prompt_pyramid",
    "canonical_target_name",
    "display_name",
    "expand",
    "find_target_name",
    "ground_truth",
    "prompt_table",
    "resolve_target",
]
