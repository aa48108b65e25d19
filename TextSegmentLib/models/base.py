"""The contract every text-guided segmentation model in TextSegment fulfils.

The engine, the saliency code and training only talk to models through this interface, so a
new family is a new file plus presets, and nothing else changes:

* input images are ``(B, 3, H, W)`` float tensors in ``[0, 1]`` (the three-HU-window composite
  at ``config.image_size``); each model normalises them itself (CLIP mean/std, DWT statistics),
  so preprocessing statistics travel with the weights;
* text goes through ``encode_text(prompts, aux_prompts=None)`` once per prompt and is reused
  for every slice (the engine caches it), then rows of it are paired with images by ``forward``;
* ``forward(images, text, taps=...)`` returns a ``ModelOutput`` whose ``logits`` are
  ``(B, 1, H, W)`` and whose ``taps`` hold the named intermediate feature maps asked for
  (``taps=True`` means all of ``tap_names``) — the one explicit door saliency uses; no hooks;
* ``forward`` is ``decode(encode_image(images), text)``: ``encode_image`` runs everything that
  does not depend on the prompt (the backbones), so the engine encodes a batch of slices once and
  decodes it for every prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

TapRequest = Union[bool, Sequence[str], None]


@dataclass
class TextFeatures:
    """Encoded prompts: one row per prompt (or per (prompt, aux) pair).

    ``pooled`` lives in the joint image–text space (``embed_dim``); ``tokens`` and ``mask`` keep the
    per-token sequence for models that attend over words (TGC-Net's DATE).
    """

    pooled: torch.Tensor  # (N, D)
    tokens: Optional[torch.Tensor] = None  # (N, L, Dt)
    mask: Optional[torch.Tensor] = None  # (N, L) bool, True = real token

    def index(self, rows: torch.Tensor | Sequence[int]) -> "TextFeatures":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.pooled.device)
        return TextFeatures(
            pooled=self.pooled.index_select(0, rows),
            tokens=None if self.tokens is None else self.tokens.index_select(0, rows),
            mask=None if self.mask is None else self.mask.index_select(0, rows),
        )

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "TextFeatures":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TextFeatures(pooled=move(self.pooled), tokens=move(self.tokens), mask=move(self.mask))

    def __len__(self) -> int:
        return int(self.pooled.shape[0])


@dataclass
class ImageFeatures:
    """What a model computes from the images alone, one row per image, reusable for any prompt.

    ``maps`` is model-specific: tensors or lists of tensors whose first dimension is the batch.
    """

    images: torch.Tensor  # (B, 3, H, W), the model's input
    maps: dict[str, object] = field(default_factory=dict)

    def index(self, rows: torch.Tensor | Sequence[int]) -> "ImageFeatures":
        """Rows picked (and repeated) along the batch, e.g. one copy of each slice per prompt."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.images.device)

        def pick(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, rows)
            if isinstance(value, (list, tuple)):
                return type(value)(pick(v) for v in value)
            return value

        return ImageFeatures(images=pick(self.images), maps={k: pick(v) for k, v in self.maps.items()})

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, 1, H, W), before the sigmoid
    taps: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, C, h, w)
    text_embedding: Optional[torch.Tensor] = None  # (B, D), prompt in the joint space
    image_embedding: Optional[torch.Tensor] = None  # (B, D), global image feature in the joint space
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. gate maps, SWAP vectors


class TextSegmentationModel(nn.Module):
    """Base class: subclasses set ``config`` and ``tap_names`` and implement the two methods."""

    config: object
    tap_names: tuple[str, ...] = ()
    # the taps saliency explains by default (a subset keeps whole-CT maps affordable); () = all
    saliency_layers: tuple[str, ...] = ()
    # taps ``encode_image`` computes: the same for every prompt, so saliency projects them once per image
    image_tap_names: tuple[str, ...] = ()
    # True when ``encode_text`` reads ``aux_prompts``; ``engine.segment`` refuses them for a model that ignores them
    uses_aux_prompts = False

    @property
    def image_size(self) -> int:
        return int(getattr(self.config, "image_size"))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_text(
        self, prompts: Sequence[str], aux_prompts: Optional[Sequence[Optional[str]]] = None
    ) -> TextFeatures:
        raise NotImplementedError

    # A family overrides either ``forward`` alone (no reuse across prompts) or both halves below.

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """The prompt-independent part of the forward pass (backbones), run once per batch of slices."""
        return ImageFeatures(images=images)

    def decode(self, features: ImageFeatures, text: TextFeatures, *, taps: TapRequest = None) -> ModelOutput:
        """The prompt-dependent part: one text row per image row (or one row for all)."""
        if type(self).forward is TextSegmentationModel.forward:
            raise NotImplementedError(f"{type(self).__name__} implements neither forward nor encode_image/decode")
        return self.forward(features.images, text, taps=taps)

    def forward(self, images: torch.Tensor, text: TextFeatures, *, taps: TapRequest = None) -> ModelOutput:
        return self.decode(self.encode_image(images), text, taps=taps)

    @property
    def joint_tap_names(self) -> tuple[str, ...]:
        """Taps ``project_to_joint`` can map into the joint image–text space (saliency stages 2–3)."""
        return ()

    # True when ``project_to_joint`` maps every joint tap alike, so taps of one shape may be stacked
    # along the batch and projected in one call (saliency does so)
    joint_projection_shared = False

    def project_to_joint(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """Map tap ``name``'s ``(B, C, h, w)`` features into the joint space ``(B, D, h, w)``."""
        from ..errors import ModelError

        raise ModelError(f"tap {name!r} has no map to the joint space; these do: {list(self.joint_tap_names)}")

    def resolve_taps(self, taps: TapRequest) -> tuple[str, ...]:
        """Turn a tap request into a validated tuple of names."""
        if not taps:
            return ()
        if taps is True:
            return self.tap_names
        unknown = [t for t in taps if t not in self.tap_names]
        if unknown:
            from ..errors import ModelError

            raise ModelError(f"unknown feature tap(s) {unknown}; this model has {list(self.tap_names)}")
        return tuple(taps)
