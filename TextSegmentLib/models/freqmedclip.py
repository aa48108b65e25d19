"""FreqMedCLIP: a CLIP semantic stream gating a Haar-wavelet frequency stream, decoded per prompt.

Read top to bottom, timm style: config → blocks → model → SWAP loss → builder → presets.

* Semantic stream: a CLIP ViT (BiomedCLIP ViT-B/16 at 352 px for ``freqmedclip-base``); blocks 3, 6,
  9, 11 and the final norm train, the rest stays frozen. Their tokens are the decoder's semantic skips.
* Frequency stream: one-level Haar DWT of the 3-channel slice → 12 band-major channels at H/2,
  standardised per band (statistics are buffers saved with the weights) → ConvNeXt with a 12-channel stem.
* E_sem is text-conditioned: the last tapped ViT tokens, FiLM-modulated by the prompt embedding, plus
  (option) the patch–text cosine map. Without this the gate could not tell two prompts apart.
* CMSG at every frequency level: ``E = resize(Conv1x1(E_sem)); G = σ(W_g(F ⊙ E)); F_refined = F ⊙ G``,
  with ``G ≈ 1`` at initialisation so training starts from the ungated network.
* Decoder: coarse-to-fine U-Net over ``[F_refined_l ‖ semantic skip_l]`` with FiLM(text) at every stage,
  a last stage at H/2 over the DWT bands themselves (boundaries), a 1x1 head, bilinear upsampling.
* SWAP: ``F_refined`` pooled with the mean gate map as weights, projected to the text space
  (``extras["swap_embedding"]``); ``swap_loss`` is its contrastive loss.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError, WeightsError
from .base import ImageFeatures, ModelOutput, TapRequest, TextFeatures, TextSegmentationModel
from .layers import ChannelLayerNorm, ConvBlock, ConvNormAct, FiLM, HaarDWT, resize_to
from .registry import register_builder, register_model
from .towers import BIOMEDCLIP_SOURCE, TINY_CLIP, TextTower, ViTJointTaps, VisionTower, is_offline, load_clip

logger = logging.getLogger(__name__)


@dataclass
class FreqMedCLIPConfig:
    """Everything that shapes a FreqMedCLIP model; presets at the bottom of this file fill it in.

    ``clip_source`` is any ``load_clip`` source ("hf-hub:...", "local-dir:...", "random:..."); trained
    checkpoints overwrite all weights later, whatever it was. ``freq_pretrained`` initialises the
    ConvNeXt: None (random), "timm" / "timm:<tag>" (timm's ImageNet weights, needs the network), or a
    local weights file (timm tiles its RGB stem over the 12 DWT channels). ``freq_last_stage``: on a
    176² DWT input ConvNeXt's last stage would be 5.5 px wide; "pad" pads the DWT input to a multiple of
    32 and keeps the stage (cropped back to the image), "drop" uses three stages only.
    ``decoder_channels`` go coarse to fine, one more than there are frequency levels (the last stage runs
    at H/2 on the DWT bands); with "drop" the first entry is left out.
    """

    name: str = "freqmedclip-base"
    image_size: int = 352
    clip_source: str = BIOMEDCLIP_SOURCE
    vit_taps: tuple[int, ...] = (3, 6, 9, 11)
    unfrozen_blocks: tuple[int, ...] = (3, 6, 9, 11)
    train_final_norm: bool = True
    train_vision_tower: bool = False  # True opens every ViT parameter
    train_text_tower: bool = False
    freq_encoder: str = "convnext_tiny"
    freq_pretrained: Optional[str] = None
    freq_last_stage: str = "pad"  # "pad" | "drop"
    gate: str = "channel"  # "channel": one gate per channel and pixel; "spatial": one per pixel
    gate_init_bias: float = 4.0  # σ(4) = 0.982: the gate starts (almost) open
    text_cosine_map: bool = True
    skip_channels: int = 64
    decoder_channels: tuple[int, ...] = (256, 128, 64, 64, 32)


# --------------------------------------------------------------------------------------- blocks


class FrequencyEncoder(nn.Module):
    """Haar DWT → per-band standardisation → ConvNeXt (``in_chans=12``) feature stages.

    Returns the standardised DWT tensor too: the decoder's last stage uses it as its boundary skip.
    """

    def __init__(
        self, backbone: str, *, pretrained: Optional[str] = None, last_stage: str = "pad", in_channels: int = 3
    ):
        super().__init__()
        if last_stage not in ("pad", "drop"):
            raise ModelError(f"freq_last_stage must be 'pad' or 'drop', not {last_stage!r}")
        bands = 4 * in_channels
        self.dwt = HaarDWT()
        self.register_buffer("band_mean", torch.zeros(bands))
        self.register_buffer("band_std", torch.ones(bands))
        out_indices = (0, 1, 2, 3) if last_stage == "pad" else (0, 1, 2)
        self.backbone = _create_convnext(backbone, in_chans=bands, out_indices=out_indices, pretrained=pretrained)
        self.channels = tuple(int(c) for c in self.backbone.feature_info.channels())
        self.reductions = tuple(int(r) for r in self.backbone.feature_info.reduction())  # on the DWT grid
        self.in_chans = bands

    def set_band_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training set's per-band statistics (see ``layers.band_statistics``)."""
        mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
        if mean.numel() != self.in_chans or std.numel() != self.in_chans or bool((std <= 0).any()):
            raise InputError(f"band statistics need {self.in_chans} means and {self.in_chans} positive stds")
        self.band_mean.copy_(mean)
        self.band_std.copy_(std)

    def forward(self, images01: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spectral = self.dwt(images01)
        spectral = (spectral - self.band_mean[:, None, None]) / self.band_std[:, None, None]
        height, width = spectral.shape[-2:]
        multiple = self.reductions[-1]
        pad_h, pad_w = -height % multiple, -width % multiple
        padded = F.pad(spectral, (0, pad_w, 0, pad_h)) if pad_h or pad_w else spectral
        stages = self.backbone(padded)
        stages = [
            s[..., : math.ceil(height / r), : math.ceil(width / r)] for s, r in zip(stages, self.reductions)
        ]
        return spectral, stages


def _create_convnext(name: str, *, in_chans: int, out_indices: tuple[int, ...], pretrained: Optional[str]) -> nn.Module:
    import timm

    kwargs = dict(in_chans=in_chans, features_only=True, out_indices=out_indices)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "timm" or pretrained.startswith("timm:"):
        tag = pretrained.partition(":")[2]
        if is_offline():
            raise WeightsError(
                f"freq_pretrained={pretrained!r} needs a download but offline mode is on; "
                "give a local weights file instead"
            )
        try:
            return timm.create_model(f"{name}.{tag}" if tag else name, pretrained=True, **kwargs)
        except Exception as exc:  # network or unknown tag
            raise WeightsError(f"could not get timm weights {pretrained!r} for {name}: {exc}") from exc
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"freq_pretrained file {path} does not exist (use None, 'timm[:tag]' or a weights file)")
    from safetensors import SafetensorError

    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        # timm loads a feature extractor's weights non-strictly (it drops the classifier), so weights
        # the file lacks would silently stay random
        missing = _weights_not_in_file(model, name, path, in_chans=in_chans)
    except (RuntimeError, KeyError, OSError, ValueError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"{path} does not hold {name} weights: {exc}") from exc
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(
            f"{path} does not hold all {name} weights: {len(missing)} of them are missing ({shown}); "
            f"they would stay random. Pass a complete {name} checkpoint, or freq_pretrained=None"
        )
    return model


def _weights_not_in_file(model: nn.Module, name: str, path: Path, *, in_chans: int) -> list[str]:
    """The feature extractor's state-dict keys that ``path`` (read and remapped as timm does) lacks.

    timm's feature extractors flatten the model's first-level ``nn.Sequential`` children into
    ``<child>_<index>`` modules (``stages.0`` → ``stages_0``), so both spellings are looked up.
    """
    import sys

    import timm
    from timm.models import load_state_dict, model_entrypoint

    state = load_state_dict(str(path))
    filter_fn = getattr(sys.modules.get(model_entrypoint(name).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        reference = timm.create_model(name, pretrained=False, in_chans=in_chans)
        try:
            state = filter_fn(state, reference)
        except TypeError:  # filters that take the state dict only, as timm allows
            state = filter_fn(state)

    def in_file(key: str) -> bool:
        if key in state:
            return True
        head, dot, rest = key.partition(".")
        parent, underscore, index = head.rpartition("_")
        return bool(underscore) and f"{parent}.{index}{dot}{rest}" in state

    return [key for key in model.state_dict() if not in_file(key)]


class TextConditionedSemantics(nn.Module):
    """E_sem: ViT tokens, layer-normalised, FiLM-modulated by the prompt (+ patch–text cosine map)."""

    def __init__(self, width: int, text_dim: int, *, cosine_map: bool):
        super().__init__()
        self.norm = ChannelLayerNorm(width)
        self.film = FiLM(width, text_dim)
        self.out_channels = width + int(cosine_map)

    def forward(
        self, tokens: torch.Tensor, condition: torch.Tensor, cosine: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        semantic = self.film(self.norm(tokens), condition)
        return semantic if cosine is None else torch.cat([semantic, cosine], dim=1)


class SemanticGate(nn.Module):
    """Cross-Modal Semantic Gating: ``F_refined = F ⊙ σ(W_g(F ⊙ resize(Conv1x1(E_sem))))``.

    A GroupNorm before ``W_g`` keeps the gate out of saturation whatever the feature scales are;
    ``W_g`` starts near zero and its bias at ``init_bias``, so ``G ≈ σ(init_bias) ≈ 1`` at first.
    """

    def __init__(self, channels: int, semantic_channels: int, *, mode: str = "channel", init_bias: float = 4.0):
        super().__init__()
        if mode not in ("channel", "spatial"):
            raise ModelError(f"gate must be 'channel' or 'spatial', not {mode!r}")
        self.project = nn.Conv2d(semantic_channels, channels, kernel_size=1)
        self.norm = nn.GroupNorm(1, channels)
        self.gate = nn.Conv2d(channels, channels if mode == "channel" else 1, kernel_size=1)
        nn.init.normal_(self.gate.weight, std=0.1 / math.sqrt(channels))
        nn.init.constant_(self.gate.bias, init_bias)

    def forward(self, features: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guide = resize_to(self.project(semantic), features.shape[-2:])
        gate = torch.sigmoid(self.gate(self.norm(features * guide)))
        return features * gate, gate


class DecoderStage(nn.Module):
    """ConvBlock then FiLM(text): the prompt steers every decoder stage."""

    def __init__(self, in_channels: int, out_channels: int, text_dim: int):
        super().__init__()
        self.block = ConvBlock(in_channels, out_channels)
        self.film = FiLM(out_channels, text_dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.film(self.block(x), condition)


class Decoder(nn.Module):
    """Coarse-to-fine U-Net over ``[gated level ‖ semantic skip]``, ending at H/2 on the DWT bands."""

    def __init__(
        self,
        level_channels: Sequence[int],
        *,
        skip_channels: int,
        spectral_channels: int,
        widths: Sequence[int],
        text_dim: int,
    ):
        super().__init__()
        if len(widths) != len(level_channels) + 1:
            raise ModelError(f"the decoder needs {len(level_channels) + 1} widths, got {list(widths)}")
        self.stages = nn.ModuleList()
        previous = 0
        for width, level in zip(widths, reversed(range(len(level_channels)))):
            self.stages.append(DecoderStage(previous + level_channels[level] + skip_channels, width, text_dim))
            previous = width
        self.stages.append(DecoderStage(previous + spectral_channels, widths[-1], text_dim))

    def forward(
        self,
        gated: Sequence[torch.Tensor],
        skips: Sequence[torch.Tensor],
        spectral: torch.Tensor,
        condition: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Every stage's output, coarsest first; the last one is the fused map the head reads."""
        outputs: list[torch.Tensor] = []
        x: Optional[torch.Tensor] = None
        for stage, level in zip(self.stages, reversed(range(len(gated)))):
            parts = [gated[level], skips[level]]
            if x is not None:
                parts.insert(0, resize_to(x, gated[level].shape[-2:]))
            x = stage(torch.cat(parts, dim=1), condition)
            outputs.append(x)
        outputs.append(self.stages[-1](torch.cat([resize_to(x, spectral.shape[-2:]), spectral], dim=1), condition))
        return outputs


class AttributePooling(nn.Module):
    """SWAP: ``Σ F_refined · A / Σ A`` per level (``A`` = mean gate map), concatenated, projected to text space."""

    def __init__(self, level_channels: Sequence[int], embed_dim: int):
        super().__init__()
        self.project = nn.Linear(sum(level_channels), embed_dim)

    def forward(self, refined: Sequence[torch.Tensor], gates: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for features, gate in zip(refined, gates):
            attention = gate.mean(dim=1, keepdim=True)
            pooled.append((features * attention).sum((2, 3)) / attention.sum((2, 3)).clamp_min(1e-6))
        return self.project(torch.cat(pooled, dim=1))


# --------------------------------------------------------------------------------------- model


class FreqMedCLIP(ViTJointTaps, TextSegmentationModel):
    """Text-prompted segmentation: ``model(images01, model.encode_text(prompts)).logits``.

    >>> from TextSegmentLib.models import create_model
    >>> model = create_model("freqmedclip-tiny").eval()
    >>> text = model.encode_text(["liver"])
    >>> out = model(torch.rand(2, 3, 128, 128), text, taps=["vit.11", "gated.0"])
    >>> out.logits.shape, out.taps["vit.11"].shape
    (torch.Size([2, 1, 128, 128]), torch.Size([2, 192, 8, 8]))
    """

    def __init__(self, config: FreqMedCLIPConfig, *, vision: VisionTower, text: TextTower):
        super().__init__()
        self.config = config
        self.vision = vision
        self.text = text
        _check_shapes(config, vision, text)
        self.frequency = FrequencyEncoder(
            config.freq_encoder, pretrained=config.freq_pretrained, last_stage=config.freq_last_stage
        )
        levels = len(self.frequency.channels)
        self.semantic = TextConditionedSemantics(vision.width, text.embed_dim, cosine_map=config.text_cosine_map)
        self.gates = nn.ModuleList(
            SemanticGate(c, self.semantic.out_channels, mode=config.gate, init_bias=config.gate_init_bias)
            for c in self.frequency.channels
        )
        self.skips = nn.ModuleList(
            ConvNormAct(vision.width, config.skip_channels, kernel_size=1) for _ in range(levels)
        )
        widths = tuple(config.decoder_channels)[-(levels + 1) :]
        self.decoder = Decoder(
            self.frequency.channels,
            skip_channels=config.skip_channels,
            spectral_channels=self.frequency.in_chans,
            widths=widths,
            text_dim=text.embed_dim,
        )
        self.head = nn.Conv2d(widths[-1], 1, kernel_size=1)
        self.swap = AttributePooling(self.frequency.channels, text.embed_dim)
        self._skip_taps = [min(level, len(config.vit_taps) - 1) for level in range(levels)]
        self.tap_names = (
            *(f"vit.{i}" for i in config.vit_taps),
            "semantic",
            *(f"freq.{level}" for level in range(levels)),
            *(f"gated.{level}" for level in range(levels)),
            *(f"decoder.{k}" for k in range(levels + 1)),
            "fused",
        )
        self.saliency_layers = (
            *(f"vit.{i}" for i in config.vit_taps),
            *(f"gated.{level}" for level in range(levels)),
            "fused",
        )
        self.image_tap_names = (*(f"vit.{i}" for i in config.vit_taps), *(f"freq.{level}" for level in range(levels)))
        self._set_trainable()
        self.train()

    # ---- training setup

    def _set_trainable(self) -> None:
        """Paper rule: the named ViT blocks + final norm + every new module train; the rest is frozen."""
        self.requires_grad_(True)
        if not self.config.train_vision_tower:
            self.vision.requires_grad_(False)
            for index in self.config.unfrozen_blocks:
                self.vision.blocks[index].requires_grad_(True)
            if self.config.train_final_norm:
                self.vision.final_norm.requires_grad_(True)
        if not self.config.train_text_tower:
            self.text.requires_grad_(False)

    def train(self, mode: bool = True) -> "FreqMedCLIP":
        super().train(mode)
        if not self.config.train_text_tower:
            self.text.eval()  # a frozen encoder keeps its dropout off: prompts encode the same every time
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``backbone`` (CLIP towers) and ``new`` (everything else)."""
        backbone = {id(p) for p in (*self.vision.parameters(), *self.text.parameters())}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "new": []}
        for parameter in self.parameters():
            if parameter.requires_grad:
                groups["backbone" if id(parameter) in backbone else "new"].append(parameter)
        return groups

    def set_band_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.frequency.set_band_statistics(mean, std)

    # ---- the contract

    def encode_text(
        self, prompts: Sequence[str], aux_prompts: Optional[Sequence[Optional[str]]] = None
    ) -> TextFeatures:
        """Encode prompts once; ``aux_prompts`` is accepted for the contract and not used by this family."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a non-empty list of strings, e.g. ['liver']")
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.text.parameters())
        with torch.set_grad_enabled(track):
            return self.text.encode(list(prompts))

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Both backbones and the ViT skips: everything the prompt does not change."""
        self._check_images(images)
        vit_maps, image_embedding = self.vision.forward_intermediates(self.vision.normalise(images), self.config.vit_taps)
        patches = None
        if self.config.text_cosine_map:
            patches = F.normalize(self.vision.project_tokens(vit_maps[-1]), dim=1)
        spectral, stages = self.frequency(images)
        skips = [
            resize_to(project(vit_maps[tap]), stage.shape[-2:])
            for project, tap, stage in zip(self.skips, self._skip_taps, stages)
        ]
        maps = dict(vit=list(vit_maps), image_embedding=image_embedding, patches=patches, spectral=spectral,
                    stages=list(stages), skips=skips)
        return ImageFeatures(images=images, maps=maps)

    def decode(self, features: ImageFeatures, text: TextFeatures, *, taps: TapRequest = None) -> ModelOutput:
        """Text-conditioned semantics → CMSG gates → decoder → logits, for one prompt row per image."""
        wanted = self.resolve_taps(taps)
        m = features.maps
        vit_maps, stages = m["vit"], m["stages"]
        prompt = _pair_rows(text, features.images)
        condition = F.normalize(prompt, dim=-1)
        cosine = None
        if m["patches"] is not None:
            cosine = (m["patches"] * condition[:, :, None, None]).sum(dim=1, keepdim=True)
        semantic = self.semantic(vit_maps[-1], condition, cosine)

        gated, gates = zip(*(gate(stage, semantic) for gate, stage in zip(self.gates, stages)))
        decoded = self.decoder(gated, m["skips"], m["spectral"], condition)
        logits = resize_to(self.head(decoded[-1]), features.images.shape[-2:])

        found = {f"vit.{i}": v for i, v in zip(self.config.vit_taps, vit_maps)}
        found["semantic"] = semantic
        found.update({f"freq.{level}": s for level, s in enumerate(stages)})
        found.update({f"gated.{level}": g for level, g in enumerate(gated)})
        found.update({f"decoder.{k}": d for k, d in enumerate(decoded)})
        found["fused"] = decoded[-1]
        extras = {"swap_embedding": self.swap(gated, gates)}
        extras.update({f"gate.{level}": g.mean(dim=1, keepdim=True) for level, g in enumerate(gates)})
        return ModelOutput(
            logits=logits,
            taps={name: found[name] for name in wanted},
            text_embedding=prompt,
            image_embedding=m["image_embedding"],
            extras=extras,
        )

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"{self.config.name} takes images of shape (B, 3, {size}, {size}) in [0, 1], got {shape}")


def _pair_rows(text: TextFeatures, images: torch.Tensor) -> torch.Tensor:
    """One prompt row per image (a single row is shared by the whole batch)."""
    pooled = text.pooled.to(device=images.device, dtype=images.dtype)
    if pooled.shape[0] == images.shape[0]:
        return pooled
    if pooled.shape[0] == 1:
        return pooled.expand(images.shape[0], -1)
    raise InputError(f"{pooled.shape[0]} prompt rows for {images.shape[0]} images; pair them with text.index(rows)")


def _check_shapes(config: FreqMedCLIPConfig, vision: VisionTower, text: TextTower) -> None:
    if config.image_size % 2 or config.image_size % vision.patch_size:
        raise ModelError(
            f"image_size {config.image_size} must be even and a multiple of the ViT patch {vision.patch_size}"
        )
    if tuple(vision.image_size) != (config.image_size, config.image_size):
        raise ModelError(f"the ViT was built for {vision.image_size}, the config says {config.image_size}")
    for name, indices in (("vit_taps", config.vit_taps), ("unfrozen_blocks", config.unfrozen_blocks)):
        bad = [i for i in indices if not 0 <= i < vision.num_blocks]
        if bad:
            raise ModelError(f"{name} {bad} out of range: the ViT has {vision.num_blocks} blocks")
    if not config.vit_taps:
        raise ModelError("vit_taps must name at least one ViT block")
    if config.text_cosine_map and vision.embed_dim != text.embed_dim:
        raise ModelError(
            f"text_cosine_map needs equal joint dims, got vision {vision.embed_dim} vs text {text.embed_dim}"
        )


# --------------------------------------------------------------------------------------- SWAP loss


def swap_loss(
    pooled: torch.Tensor, text: torch.Tensor, *, temperature: float = 0.07, groups: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Symmetric InfoNCE between SWAP vectors ``(B, D)`` and their attribute-phrase embeddings ``(B, D)``.

    Rows with equal phrases (equal ``text`` rows, or equal ``groups`` ids) are all positives of each
    other: phrases are merged into one column each, so a repeated phrase is never its own negative.
    With fewer than two distinct phrases there is nothing to contrast, and the loss falls back to
    the mean cosine distance ``1 - cos(pooled, text)``.
    """
    if pooled.ndim != 2 or pooled.shape != text.shape:
        shapes = f"{tuple(pooled.shape)} and {tuple(text.shape)}"
        raise InputError(f"swap_loss needs two (B, D) tensors of one shape, got {shapes}")
    if groups is not None and torch.as_tensor(groups).numel() != pooled.shape[0]:
        raise InputError(f"swap_loss got {torch.as_tensor(groups).numel()} group ids for {pooled.shape[0]} rows")
    image = F.normalize(pooled, dim=-1)
    phrase = F.normalize(text.to(pooled.dtype), dim=-1)
    keys = text.detach() if groups is None else torch.as_tensor(groups, device=text.device).reshape(-1, 1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    count = int(group.max()) + 1
    if count < 2:
        return (1 - (image * phrase).sum(-1)).mean()
    columns = torch.zeros(count, phrase.shape[1], dtype=phrase.dtype, device=phrase.device).index_add(0, group, phrase)
    logits = image @ F.normalize(columns, dim=-1).T / temperature  # (B, phrases)
    image_to_text = F.cross_entropy(logits, group)
    by_phrase = logits.T  # (phrases, B)
    positive = group[None, :] == torch.arange(count, device=group.device)[:, None]
    text_to_image = (by_phrase.logsumexp(1) - by_phrase.masked_fill(~positive, float("-inf")).logsumexp(1)).mean()
    return (image_to_text + text_to_image) / 2


# --------------------------------------------------------------------------------------- builder


@register_builder(FreqMedCLIPConfig)
def build_freqmedclip(config: FreqMedCLIPConfig) -> FreqMedCLIP:
    """Load the CLIP towers named by ``config.clip_source`` and build the model around them."""
    clip_model = load_clip(config.clip_source, image_size=config.image_size)
    model = FreqMedCLIP(config, vision=VisionTower(clip_model), text=TextTower(clip_model))
    logger.info(
        "built %s: %.1f M parameters, %.1f M trainable",
        config.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    return model


# --------------------------------------------------------------------------------------- presets


@register_model("freqmedclip-base")
def freqmedclip_base() -> FreqMedCLIPConfig:
    """The paper's model: BiomedCLIP ViT-B/16 at 352 px, ConvNeXt-Tiny on the 12-band DWT."""
    return FreqMedCLIPConfig(name="freqmedclip-base")


@register_model("freqmedclip-tiny")
def freqmedclip_tiny() -> FreqMedCLIPConfig:
    """Same architecture, CPU-sized: ViT-Ti/16 (12 blocks, width 192) at 128 px, ConvNeXt-Atto,
    a 4-layer width-32 text transformer with open_clip's bundled tokenizer (the shipped weights'
    towers); needs no download."""
    return FreqMedCLIPConfig(
        name="freqmedclip-tiny",
        image_size=128,
        clip_source=f"random:{TINY_CLIP}",
        freq_encoder="convnext_atto",
        skip_channels=32,
        decoder_channels=(96, 64, 48, 32, 16),
    )
