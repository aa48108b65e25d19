"""What shapes the saliency maps: one frozen, validated config that the sink, `explain` and the CLI share."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..errors import InputError
from ..grid import GRIDS
from .maths import Stage3Weights

ENCODINGS = ("uint8", "float16")
STAGE3_WITHOUT_TEXT = ("image-terms", "stage-1")


@dataclass(frozen=True)
class SaliencyConfig:
    """Everything that shapes the maps; the defaults are those of docs/explainability.md."""

    stage: int = 1
    alpha: float = 0.5  # stage 2: weight of the prototype against the prompt
    weights: Stage3Weights = Stage3Weights()
    sigma_scale: float = 1.0  # stage 3: Gaussian σ as a multiple of the box size
    prior_floor: float = 0.25  # stage 3: the prior never drops below this far from the target
    ring_margin: float = 0.5  # stage 3: context ring width as a multiple of the box size
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    threshold: float = 0.5  # predicted-mask threshold when no ROI is given
    encoding: str = "uint8"
    combine: bool = True
    max_map_size: int = 128  # finer maps are area-pooled to this before being kept
    # "compact": in-plane at most max_map_size voxels over the input's extent (grid.py says why: 16×
    # fewer voxels at 512², no detail lost; slices up to that size keep their grid); "source": the
    # input's own voxel grid
    grid: str = "compact"
    # stage 3 on a layer with no text-space projection: keep prototype, global image, context and
    # prior and drop only the prompt term ("image-terms"), or fall back to stage 1 ("stage-1")
    stage3_without_text: str = "image-terms"

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise InputError(f"saliency stage must be 1, 2 or 3, got {self.stage!r}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"saliency encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.grid not in GRIDS:
            raise InputError(f"saliency grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.stage3_without_text not in STAGE3_WITHOUT_TEXT:
            raise InputError(
                f"stage3_without_text must be one of {', '.join(STAGE3_WITHOUT_TEXT)}, got {self.stage3_without_text!r}"
            )
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise InputError("saliency percentiles need 0 <= low < high <= 100")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"saliency threshold must lie strictly between 0 and 1, got {self.threshold}")
        # out of range these do not fail later, they quietly give wrong maps (0 or less: 1×1 maps)
        for name in ("alpha", "prior_floor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"saliency {name} must lie between 0 and 1, got {getattr(self, name)}")
        if not 0.0 < self.sigma_scale < math.inf:
            raise InputError(f"saliency sigma_scale must be positive and finite, got {self.sigma_scale}")
        if not 0.0 <= self.ring_margin < math.inf:
            raise InputError(f"saliency ring_margin must be 0 or more and finite, got {self.ring_margin}")
        for name, value in vars(self.weights).items():
            if not 0.0 <= value < math.inf:
                raise InputError(f"saliency stage 3 weight {name} is a magnitude: 0 or more and finite, got {value}")
        size = self.max_map_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise InputError(f"saliency max_map_size must be a whole number of voxels, 1 or more, got {size!r}")
