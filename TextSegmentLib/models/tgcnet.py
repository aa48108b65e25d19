"""TGC-Net (arXiv 2512.21135): a frozen CLIP plus ~10 M trainable parameters for text-guided segmentation.

Read top to bottom: blocks → the four parts of the paper → the model → presets.

* **SSE** (semantic–structural synergy encoder): the frozen CLIP ViT sees the image at its own size
  (336 px for BiomedCLIP); a small trainable CNN sees it at full size (768 px) for boundaries.
  The CLIP map is added to every CNN level, then a multi-scale deformable-attention encoder lets
  the stride 8/16/32 levels read each other and the CLIP map; an FPN step adds stride 4. The
  result is the hybrid pyramid.
* **DATE** (domain-augmented text encoder): the prompt and an auxiliary knowledge text (see
  ``aux_prompts``) go through the frozen text tower; the auxiliary tokens are queries that
  cross-attend to the prompt's tokens (residual, LayerNorm, FFN). The prompt's pooled CLIP
  embedding is kept as a first token, so the prompt itself always speaks.
* **VLCM** (vision–language calibration): K learned context queries read the pyramid and text
  tokens together, a sigmoid gate filters what they keep, and both modalities then cross-attend
  to that shared context (residual) instead of to each other.
* **Cost-aggregating decoder**: per level, grouped cosine costs between pixel embeddings and the
  text vector, aggregated by conv blocks guided by the pyramid, FiLM by the text, from stride 32
  up to stride 4 in ×2 steps, then a 1×1 head and a bilinear ×4 to the input size.

Feature taps (for saliency, no hooks): ``vit.<i>`` (CLIP blocks), ``cnn.<l>`` and ``pyramid.<l>``
(l = 0..3 at strides 4, 8, 16, 32), ``decoder.<n>`` (n = 0..3 from coarse to fine) and ``fused``
(the last decoder map, what the head reads).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError
from .base import ImageFeatures, ModelOutput, TapRequest, TextFeatures, TextSegmentationModel
from .deformable_attention import (
    MultiScaleDeformableAttention,
    flatten_levels,
    level_reference_points,
    unflatten_levels,
)
from .layers import ConvBlock, ConvNormAct, FiLM, resize_to
from .registry import register_builder, register_model
from .towers import TINY_CLIP, ViTJointTaps

log = logging.getLogger(__name__)

NUM_LEVELS = 4  # CNN / pyramid strides 4, 8, 16, 32
STRIDES = (4, 8, 16, 32)
NORM_EPS = 1e-12  # F.normalize's default


@dataclass
class TGCNetConfig:
    """Everything that shapes a TGC-Net; presets at the bottom of this file fill it in."""

    name: str = "tgcnet-base"
    image_size: int = 768  # model input = CNN branch input; a multiple of 32
    clip_source: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    clip_image_size: int = 336  # the ViT sees the image resized to this
    vit_taps: tuple[int, ...] = (3, 6, 9, 11)
    cnn_widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    cnn_depth: int = 2  # residual blocks per CNN stage
    dim: int = 256  # hybrid pyramid, DATE and VLCM width
    sse_layers: int = 3  # deformable encoder layers
    deform_heads: int = 8
    deform_points: int = 4
    attention_heads: int = 8  # DATE and VLCM cross-attention
    mlp_ratio: float = 4.0
    context_tokens: int = 16  # VLCM's K
    cost_groups: int = 8
    decoder_widths: tuple[int, int, int, int] = (128, 96, 64, 32)  # stride 32 → 4
    use_date: bool = True  # False: the prompt's own tokens stand in for the auxiliary text (ablation)
    use_vlcm: bool = True
    aux_use_llm: bool = True  # ask an LLM for auxiliary text when the user configured one (aux_prompts)
    # True: an exclusion prompt is described by what it keeps ("liver without the gallbladder" → the
    # liver); False, as the shipped tiny weights were trained: by the longest name anywhere in it
    aux_kept_only: bool = False
    # The paper freezes both CLIP towers: they arrive pretrained. A tower trained from random
    # weights (our CPU-trained tiny model) knows no words and sees no organs, so it may open them.
    train_text_tower: bool = False
    train_vision_tower: bool = False


# ----------------------------------------------------------------------------------------- blocks


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """Two 3×3 convs with GroupNorm and an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), _norm(out_channels), nn.GELU()
    )


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttentionBlock(nn.Module):
    """``x ← LN(x + Attn(x, memory))``, optionally ``x ← LN(x + FFN(x))`` (post-norm, as in DETR)."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: Optional[float] = None) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_ratio) if mlp_ratio else None
        self.ffn_norm = nn.LayerNorm(dim) if mlp_ratio else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = None if memory_mask is None else ~memory_mask
        x = self.norm(x + self.attention(x, memory, memory, key_padding_mask=padding, need_weights=False)[0])
        if self.ffn is not None:
            x = self.ffn_norm(x + self.ffn(x))
        return x


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


# -------------------------------------------------------------------------------------------- SSE


class CNNBranch(nn.Module):
    """The structural branch: a stride-4 stem and four stages of residual blocks (strides 4–32)."""

    def __init__(self, widths: Sequence[int], *, depth: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_down(3, widths[0] // 2), _down(widths[0] // 2, widths[0]))
        stages = []
        for i, width in enumerate(widths):
            layers = [] if i == 0 else [_down(widths[i - 1], width)]
            stages.append(nn.Sequential(*layers, *[ResidualBlock(width) for _ in range(depth)]))
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, levels = self.stem(images), []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels


class DeformableEncoderLayer(nn.Module):
    """Pyramid tokens attend (deformably) to the pyramid plus the CLIP map, then an FFN."""

    def __init__(self, dim: int, *, levels: int, heads: int, points: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attention = MultiScaleDeformableAttention(dim, num_heads=heads, num_levels=levels, num_points=points)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_ratio)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, tokens, *, position, reference, clip_tokens, shapes) -> torch.Tensor:
        value = torch.cat([tokens, clip_tokens], dim=1)
        tokens = self.norm(tokens + self.attention(tokens + position, reference, value, shapes))
        return self.ffn_norm(tokens + self.ffn(tokens))


class SemanticStructuralEncoder(nn.Module):
    """Fuses the CLIP map into the CNN levels (addition + deformable attention) → hybrid pyramid."""

    def __init__(self, config: TGCNetConfig, *, vit_width: int) -> None:
        super().__init__()
        dim, widths = config.dim, config.cnn_widths
        self.tap_mix = nn.Parameter(torch.zeros(len(config.vit_taps)))  # softmax weights over ViT taps
        self.clip_norm = nn.LayerNorm(vit_width)
        self.clip_proj = nn.Linear(vit_width, dim)
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(w, dim, 1, bias=False), _norm(dim)) for w in widths)
        self.level_embed = nn.Parameter(torch.randn(NUM_LEVELS - 1, dim) * 0.02)  # the stride 8/16/32 queries
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                dim, levels=NUM_LEVELS, heads=config.deform_heads, points=config.deform_points, mlp_ratio=config.mlp_ratio
            )
            for _ in range(config.sse_layers)
        )
        self.fpn_out = ConvNormAct(dim, dim)

    def clip_map(self, vit_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """A learned mix of the tapped ViT blocks, normalised and projected: ``(B, dim, g, g)``."""
        weights = self.tap_mix.softmax(0)
        mixed = sum(w * m for w, m in zip(weights, vit_maps))
        tokens = self.clip_proj(self.clip_norm(mixed.permute(0, 2, 3, 1)))
        return tokens.permute(0, 3, 1, 2)

    def forward(self, cnn_levels: Sequence[torch.Tensor], vit_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        semantic = self.clip_map(vit_maps)
        levels = [lateral(c) + resize_to(semantic, c.shape[-2:]) for lateral, c in zip(self.lateral, cnn_levels)]
        tokens, shapes = flatten_levels(levels[1:])
        clip_tokens, clip_shape = flatten_levels([semantic])
        all_shapes = torch.cat([shapes, clip_shape])
        sizes = [int(h) * int(w) for h, w in shapes.tolist()]
        position = torch.cat([embed.expand(n, -1) for embed, n in zip(self.level_embed, sizes)])[None]
        reference = level_reference_points(shapes, device=tokens.device, dtype=tokens.dtype)
        reference = reference[None].expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, position=position, reference=reference, clip_tokens=clip_tokens, shapes=all_shapes)
        fused = unflatten_levels(tokens, shapes)
        finest = self.fpn_out(levels[0] + resize_to(fused[0], levels[0].shape[-2:]))
        return [finest, *fused]


# ------------------------------------------------------------------------------------------- DATE


class DomainAugmentedTextEncoder(nn.Module):
    """Auxiliary tokens (queries) cross-attend to the prompt's tokens; the prompt's pooled embedding leads."""

    def __init__(self, config: TGCNetConfig, *, text_width: int, embed_dim: int) -> None:
        super().__init__()
        self.token_proj = nn.Linear(text_width, config.dim)
        self.pooled_proj = nn.Linear(embed_dim, config.dim)
        self.cross = CrossAttentionBlock(config.dim, config.attention_heads, mlp_ratio=config.mlp_ratio)

    def forward(self, primary: TextFeatures, aux: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_tokens = self.token_proj(primary.tokens)
        aux_tokens = self.token_proj(aux.tokens)
        enriched = self.cross(aux_tokens, prompt_tokens, memory_mask=primary.mask)
        lead = self.pooled_proj(primary.pooled)[:, None]
        tokens = torch.cat([lead, enriched], dim=1)
        mask = torch.cat([torch.ones_like(aux.mask[:, :1]), aux.mask], dim=1)
        return tokens, mask


# ------------------------------------------------------------------------------------------- VLCM


class VisionLanguageCalibration(nn.Module):
    """K context queries distil [visual ‖ text] through a sigmoid gate; both modalities read them back."""

    def __init__(self, config: TGCNetConfig) -> None:
        super().__init__()
        dim, heads = config.dim, config.attention_heads
        self.context = nn.Parameter(torch.randn(config.context_tokens, dim) * 0.02)
        self.distil = CrossAttentionBlock(dim, heads)
        self.gate = nn.Linear(dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 2.0)  # gate ≈ 0.88 at start: context passes, training can close it
        self.visual_read = CrossAttentionBlock(dim, heads)
        self.text_read = CrossAttentionBlock(dim, heads)

    def forward(self, visual, text, text_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = visual.shape[0]
        memory = torch.cat([visual, text], dim=1)
        memory_mask = torch.cat([torch.ones_like(visual[..., 0], dtype=torch.bool), text_mask], dim=1)
        context = self.distil(self.context[None].expand(batch, -1, -1), memory, memory_mask=memory_mask)
        gate = torch.sigmoid(self.gate(context))
        context = gate * context
        return self.visual_read(visual, context), self.text_read(text, context), gate


# ---------------------------------------------------------------------------------------- decoder


def grouped_cosine(pixels: torch.Tensor, text: torch.Tensor, groups: int) -> torch.Tensor:
    """Cosine between each pixel and the text vector per channel group: ``(B, C, h, w), (B, C) → (B, G, h, w)``.

    A multiply-and-sum over each group's channels divided by the pixels' lengths, from sums of
    squares. ``F.normalize`` along the group-channel axis (a middle axis of 8) took ~10 ms per
    64 × 64 level on the CPU, a fifth of tgcnet-tiny's forward pass; this takes 0.5 ms. Lengths are
    clamped at ``NORM_EPS`` as ``F.normalize`` clamps them (and below it get no gradient rather than
    an infinite one); they are summed in float32, so float16 under AMP cannot overflow.
    """
    batch, channels, height, width = pixels.shape
    grouped = pixels.reshape(batch, groups, channels // groups, height, width)
    text = F.normalize(text.reshape(batch, groups, channels // groups), dim=2, eps=NORM_EPS)
    dots = (grouped * text[..., None, None]).sum(dim=2)
    lengths = grouped.float().square().sum(dim=2).clamp_min(NORM_EPS**2).sqrt()
    return dots / lengths


class CostAggregationDecoder(nn.Module):
    """Text–pixel cost volumes per level, aggregated coarse to fine with pyramid guidance and FiLM."""

    def __init__(self, config: TGCNetConfig) -> None:
        super().__init__()
        dim, groups, widths = config.dim, config.cost_groups, config.decoder_widths
        if dim % groups:
            raise ModelError(f"dim {dim} must be divisible by cost_groups {groups}")
        self.groups = groups
        self.pixel_embed = nn.Conv2d(dim, dim, 1)
        self.text_embed = nn.Linear(dim, dim)
        self.guidance = nn.ModuleList(nn.Conv2d(dim, w, 1) for w in widths)
        self.stages = nn.ModuleList(
            ConvBlock(groups + widths[i] + (widths[i - 1] if i else 0), widths[i]) for i in range(len(widths))
        )
        self.film = nn.ModuleList(FiLM(w, dim) for w in widths)
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, pyramid_coarse_to_fine: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        text_vector = self.text_embed(text)
        x, stages = None, []
        for i, level in enumerate(pyramid_coarse_to_fine):
            cost = grouped_cosine(self.pixel_embed(level), text_vector, self.groups)
            parts = [cost, self.guidance[i](level)]
            if x is not None:
                parts.append(resize_to(x, level.shape[-2:]))
            x = self.film[i](self.stages[i](torch.cat(parts, dim=1)), text)
            stages.append(x)
        return stages


# ------------------------------------------------------------------------------------------ model


class TGCNet(ViTJointTaps, TextSegmentationModel):
    """Text-prompted segmentation on frozen CLIP towers: ``model(images01, model.encode_text(prompts)).logits``.

    >>> from TextSegmentLib.models import create_model
    >>> model = create_model("tgcnet-tiny").eval()
    >>> text = model.encode_text(["liver"])  # auxiliary text: the curated description of "liver"
    >>> out = model(torch.rand(2, 3, 256, 256), text, taps=["vit.11", "pyramid.1"])
    >>> out.logits.shape, out.taps["pyramid.1"].shape
    (torch.Size([2, 1, 256, 256]), torch.Size([2, 64, 32, 32]))

    The towers (``VisionTower``/``TextTower`` or stand-ins with the same attributes) are frozen
    and kept in eval mode; every other module trains. ``train_text_tower`` and
    ``train_vision_tower`` open a tower (as the ``backbone`` group) for a model whose towers start
    from random weights.
    """

    uses_aux_prompts = True  # DATE's auxiliary text

    def __init__(self, config: TGCNetConfig, *, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        _check_config(config, vision)
        self.config = config
        self.vision = vision
        self.text = text
        for tower in (self.vision, self.text):
            tower.requires_grad_(False)
            tower.eval()
        self.text.requires_grad_(config.train_text_tower)
        self.vision.requires_grad_(config.train_vision_tower)

        self.cnn = CNNBranch(config.cnn_widths, depth=config.cnn_depth)
        self.sse = SemanticStructuralEncoder(config, vit_width=vision.width)
        self.date = DomainAugmentedTextEncoder(config, text_width=text.width, embed_dim=text.embed_dim)
        self.vlcm = VisionLanguageCalibration(config) if config.use_vlcm else None
        self.decoder = CostAggregationDecoder(config)
        self.tap_names = (
            *(f"vit.{i}" for i in config.vit_taps),
            *(f"cnn.{level}" for level in range(NUM_LEVELS)),
            *(f"pyramid.{level}" for level in range(NUM_LEVELS)),
            *(f"decoder.{n}" for n in range(len(config.decoder_widths))),
            "fused",
        )
        self.saliency_layers = (
            *(f"vit.{i}" for i in config.vit_taps),
            *(f"pyramid.{level}" for level in range(NUM_LEVELS)),
            "fused",
        )
        self.image_tap_names = (
            *(f"vit.{i}" for i in config.vit_taps),
            *(f"cnn.{level}" for level in range(NUM_LEVELS)),
            *(f"pyramid.{level}" for level in range(NUM_LEVELS)),
        )

    def train(self, mode: bool = True) -> "TGCNet":
        super().train(mode)
        if not self.config.train_vision_tower:
            self.vision.eval()  # frozen towers never switch on dropout: prompts encode the same every time
        if not self.config.train_text_tower:
            self.text.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters as ``backbone`` (the towers opened, else none) and ``new``."""
        tower = {id(p) for p in (*self.text.parameters(), *self.vision.parameters())}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return {"backbone": [p for p in trainable if id(p) in tower], "new": [p for p in trainable if id(p) not in tower]}

    # ------------------------------------------------------------------------------------ text

    def encode_text(
        self, prompts: Sequence[str], aux_prompts: Optional[Sequence[Optional[str]]] = None
    ) -> TextFeatures:
        """Prompt + auxiliary text → DATE tokens; ``pooled`` stays the prompt's CLIP embedding.

        An ``aux_prompts`` entry of ``None`` is looked up by ``aux_prompts.resolve_aux_prompt``
        (LLM if configured → curated table → template → the prompt itself).
        """
        from ..aux_prompts import resolve_aux_prompts

        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a non-empty list of strings, e.g. ['liver']")
        prompts = list(prompts)
        count, texts = len(prompts), list(prompts)
        if self.config.use_date:
            resolved = resolve_aux_prompts(prompts, aux_prompts, use_llm=self.config.aux_use_llm,
                                           kept_only=self.config.aux_kept_only)
            for prompt, aux in zip(prompts, resolved):
                log.debug("auxiliary text for %r from %s %s", prompt, aux.source, aux.detail)
            texts += [aux.text for aux in resolved]
        encoded = self.text(self.text.tokenize(texts).to(self.device))  # one batch: equal token lengths
        primary = encoded.index(range(count))
        aux = encoded.index(range(count, 2 * count)) if self.config.use_date else primary
        tokens, mask = self.date(primary, aux)
        return TextFeatures(pooled=primary.pooled, tokens=tokens, mask=mask)

    # ---------------------------------------------------------------------------------- images

    def forward_clip(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen ViT on the image resized to its own size: tapped block maps and the pooled feature."""
        size = self.config.clip_image_size
        resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.vision.forward_intermediates(self.vision.normalise(resized), self.config.vit_taps)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen ViT, CNN branch and SSE fusion: the hybrid pyramid the prompt does not change."""
        _check_images(images)
        vit_maps, image_embedding = self.forward_clip(images)
        cnn_levels = self.cnn(images)
        pyramid = self.sse(cnn_levels, vit_maps)
        maps = dict(vit=list(vit_maps), image_embedding=image_embedding, cnn=list(cnn_levels), pyramid=list(pyramid))
        return ImageFeatures(images=images, maps=maps)

    def decode(self, features: ImageFeatures, text: TextFeatures, *, taps: TapRequest = None) -> ModelOutput:
        """VLCM calibration and the cost-aggregating decoder, for one prompt row per image."""
        wanted = self.resolve_taps(taps)
        text = _pair_text(text, len(features))
        m = features.maps
        pyramid = m["pyramid"]

        text_tokens, text_mask = text.tokens, text.mask
        calibrated, extras = list(pyramid), {}
        if self.vlcm is not None:
            visual, shapes = flatten_levels(pyramid[1:])
            visual, text_tokens, gate = self.vlcm(visual, text_tokens, text_mask)
            calibrated[1:] = unflatten_levels(visual, shapes)
            extras["vlcm_gate"] = gate
        text_vector = _masked_mean(text_tokens, text_mask)
        stages = self.decoder(calibrated[::-1], text_vector)
        size = features.images.shape[-2:]
        logits = F.interpolate(self.decoder.head(stages[-1]), size=size, mode="bilinear", align_corners=False)

        available = {
            **{f"vit.{i}": v for i, v in zip(self.config.vit_taps, m["vit"])},
            **{f"cnn.{level}": v for level, v in enumerate(m["cnn"])},
            **{f"pyramid.{level}": v for level, v in enumerate(pyramid)},
            **{f"decoder.{n}": v for n, v in enumerate(stages)},
            "fused": stages[-1],
        }
        return ModelOutput(
            logits=logits,
            taps={name: available[name] for name in wanted},
            text_embedding=text.pooled,
            image_embedding=m["image_embedding"],
            extras=extras,
        )



def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"TGC-Net needs (B, 3, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[-2] % 32 or images.shape[-1] % 32:
        raise InputError(f"TGC-Net needs sizes that are multiples of 32, got {tuple(images.shape[-2:])}")


def _pair_text(text: TextFeatures, batch: int) -> TextFeatures:
    """One text row per image (a single row is shared by the whole batch)."""
    if text.tokens is None or text.mask is None:
        raise InputError("TGC-Net needs the token sequence of its own encode_text(), not pooled text only")
    if len(text) == 1 and batch > 1:
        text = text.index([0] * batch)
    if len(text) != batch:
        raise InputError(f"{len(text)} text rows for {batch} images; pair them row by row")
    return text


def _check_config(config: TGCNetConfig, vision: nn.Module) -> None:
    if config.image_size % 32:
        raise ModelError(f"TGC-Net image_size must be a multiple of 32, got {config.image_size}")
    if len(config.cnn_widths) != NUM_LEVELS or len(config.decoder_widths) != NUM_LEVELS:
        raise ModelError(f"cnn_widths and decoder_widths need {NUM_LEVELS} entries (strides {STRIDES})")
    if not config.vit_taps:
        raise ModelError("vit_taps must name at least one ViT block")
    bad = [i for i in config.vit_taps if not 0 <= i < vision.num_blocks]
    if bad:
        raise ModelError(f"vit_taps {bad} out of range: the ViT has {vision.num_blocks} blocks")


@register_builder(TGCNetConfig)
def build_tgcnet(config: TGCNetConfig) -> TGCNet:
    """Load the CLIP towers named by ``config.clip_source`` (at ``clip_image_size``) and build around them."""
    from .towers import load_towers

    vision, text = load_towers(config.clip_source, image_size=config.clip_image_size)
    model = TGCNet(config, vision=vision, text=text)
    log.info(
        "built %s: %.1f M parameters, %.1f M trainable",
        config.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    return model


# ---------------------------------------------------------------------------------------- presets




@register_model("tgcnet-base")
def tgcnet_base() -> TGCNetConfig:
    """The paper's setting: BiomedCLIP ViT-B/16 at 336 px, CNN at 768 px (512 also works)."""
    return TGCNetConfig()


@register_model("tgcnet-tiny")
def tgcnet_tiny() -> TGCNetConfig:
    """CPU-trainable, no download: random ViT-Ti CLIP at 128 px, CNN at 256 px."""
    return TGCNetConfig(
        name="tgcnet-tiny",
        image_size=256,
        clip_source=f"random:{TINY_CLIP}",
        clip_image_size=128,
        cnn_widths=(16, 32, 64, 128),
        cnn_depth=1,
        dim=64,
        sse_layers=1,
        deform_heads=4,
        deform_points=4,
        attention_heads=4,
        mlp_ratio=2.0,
        context_tokens=8,
        cost_groups=8,
        decoder_widths=(64, 48, 32, 16),
    )
