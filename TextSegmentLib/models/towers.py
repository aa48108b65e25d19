"""CLIP vision and text towers (open_clip) and where their weights come from.

``load_clip(source)`` returns an open_clip model with its tokenizer attached; ``VisionTower`` and
``TextTower`` wrap its two halves behind the few operations our families need. Sources:

* ``"hf-hub:org/name"``: the Hugging Face Hub (BiomedCLIP at a pinned revision). In offline mode
  (``TEXTSEGMENT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) only the local cache is read, never the network.
* ``"local-dir:/path"``: a folder holding ``open_clip_config.json`` and a checkpoint, as open_clip
  >= 3.0 loads it, plus tokenizer files and, for a Hugging Face text tower, that model's
  ``config.json`` (see the AutoConfig trap below).
* ``"random:<name>"``: random weights for an open_clip model name or a config registered here with
  ``register_clip_config``; used by tiny presets and tests, and only ever when asked for.

The BiomedBERT AutoConfig trap: open_clip's HF text tower calls
``AutoConfig.from_pretrained(hf_model_name)``, which goes to the network for a hub name. When the
folder holds a ``config.json`` we point ``hf_model_name`` at the folder; offline we look the name up
in the cache; when neither has it we stop with a ``WeightsError`` saying what to put where.

Heavy imports (open_clip, transformers, huggingface_hub) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError, WeightsError
from ..weights_manifest import OFFLINE_VARIABLES, is_offline
from .base import TextFeatures

logger = logging.getLogger(__name__)

BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_REVISION = "9f341de24bfb00180f1b847274256e9b65a3a32e"
"""Hub commit we pin BiomedCLIP downloads to (the snapshot public projects pin as well)."""
BIOMEDCLIP_SOURCE = f"hf-hub:{BIOMEDCLIP_HUB_ID}"
BIOMEDCLIP_TEXT_MODEL = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDCLIP_TERMS = (
    "BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is released under the MIT licence "
    "for research use only: its model card states that any deployed use case, commercial or not, is out of "
    "scope. Models built on it are research tools, not for diagnosis or clinical decisions."
)
PINNED_REVISIONS = {BIOMEDCLIP_HUB_ID: BIOMEDCLIP_REVISION}

# What open_clip's local-dir loader reads; it builds a random model, with only a log warning, from a
# folder whose weights are in any other file (e.g. ``model.pt``)
_CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "*.pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_HUB_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "open_clip_*.bin", "open_clip_*.safetensors"]
_terms_shown = False


# --------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ClipConfig:
    """An open_clip model config as data, plus the HF text config it needs to be built offline."""

    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    hf_text_config: Optional[dict[str, Any]] = None  # e.g. transformers.BertConfig(...).to_dict()


_CLIP_CONFIGS: dict[str, ClipConfig] = {}


def register_clip_config(
    name: str,
    model_cfg: dict[str, Any],
    *,
    preprocess_cfg: Optional[dict[str, Any]] = None,
    hf_text_config: Optional[dict[str, Any]] = None,
) -> None:
    """Make ``"random:<name>"`` build this config (later registrations replace earlier ones)."""
    if "text_cfg" not in model_cfg or "vision_cfg" not in model_cfg:
        raise ModelError(f"CLIP config {name!r} needs 'vision_cfg' and 'text_cfg'")
    if model_cfg["text_cfg"].get("hf_model_name") and hf_text_config is None:
        raise ModelError(f"CLIP config {name!r} has a Hugging Face text tower: pass its hf_text_config")
    _CLIP_CONFIGS[name] = ClipConfig(dict(model_cfg), dict(preprocess_cfg or {}), hf_text_config)


def list_clip_configs() -> list[str]:
    return sorted(_CLIP_CONFIGS)


def _biomedbert_config() -> dict[str, Any]:
    """BiomedBERT-base's shape (BERT-base, uncased, 30522 word pieces), for random builds offline."""
    return dict(
        model_type="bert",
        architectures=["BertForMaskedLM"],
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )


register_clip_config(
    "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": BIOMEDCLIP_TEXT_MODEL,
            "hf_tokenizer_name": BIOMEDCLIP_TEXT_MODEL,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    hf_text_config=_biomedbert_config(),
)

def _tiny_clip(*, text_width: int, text_heads: int, context_length: int) -> dict:
    """A ViT-Ti/16 vision tower built the way BiomedCLIP's is (timm trunk, CLS token, linear
    projection) and a small causal text transformer using open_clip's bundled BPE tokenizer."""
    return {
        "embed_dim": 256,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 128,
        },
        "text_cfg": {
            "context_length": context_length, "vocab_size": 49408, "width": text_width, "heads": text_heads,
            "layers": 4,
        },
        "custom_text": True,
    }


# The tiny presets' towers, as the shipped weights use them: the vocabulary-sized token table
# dominates a tiny model; at width 32 a whole FreqMedCLIP-tiny checkpoint stays under 25 MB in fp16.
# 77 tokens, because TGC-Net's DATE descriptions need them.
TINY_CLIP = "textsegment-vit-ti16-text32"
register_clip_config(TINY_CLIP, _tiny_clip(text_width=32, text_heads=2, context_length=77))
# The presets' first, wider text towers; kept so that checkpoints made with them still load.
register_clip_config("textsegment-vit-ti16-text256", _tiny_clip(text_width=256, text_heads=4, context_length=32))
register_clip_config("textsegment-tgcnet-tiny-clip", _tiny_clip(text_width=256, text_heads=4, context_length=77))


# --------------------------------------------------------------------------------------- loading


def load_clip(source: str, *, image_size: Optional[int] = None, cache_dir: Optional[str | Path] = None) -> nn.Module:
    """Build an open_clip model from ``source``; its tokenizer is attached as ``model.tokenizer``.

    ``image_size`` resizes the vision tower (open_clip's ``force_image_size``: position embeddings
    are resampled, e.g. BiomedCLIP 14x14 -> 22x22 at 352 px). ``cache_dir`` is the Hugging Face
    cache (default: the standard one).
    """
    scheme, _, identifier = source.partition(":")
    if not identifier or scheme not in ("hf-hub", "local-dir", "random"):
        raise ModelError(
            f"CLIP source {source!r} is not understood; use 'hf-hub:org/name', 'local-dir:/path' or "
            f"'random:<name>' (registered: {', '.join(list_clip_configs())})"
        )
    if scheme == "random":
        model = _load_random(identifier, image_size=image_size)
    elif scheme == "local-dir":
        folder = Path(identifier).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise WeightsError(f"CLIP folder {folder} {what}; 'local-dir:' takes the folder holding the "
                               "model's open_clip_config.json and weights")
        model = _load_folder(folder, image_size=image_size, cache_dir=cache_dir)
        model.clip_source = source
    else:
        model = _load_folder(_hub_snapshot(identifier, cache_dir=cache_dir), image_size=image_size, cache_dir=cache_dir)
        model.clip_source = source
    _check_image_size(model, image_size, source)
    return model


def _check_image_size(model: nn.Module, image_size, source: str) -> None:
    """A ViT resized to a size its patches do not tile would silently skip the image's last rows and columns."""
    if image_size is None:
        return
    visual = getattr(model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", None) if trunk is not None else None
    if patch is None and trunk is None:
        patch = getattr(visual, "patch_size", None)
    if patch is None:
        return
    patch = tuple(int(p) for p in (patch if isinstance(patch, (tuple, list)) else (patch, patch)))
    sizes = tuple(int(s) for s in (image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)))
    for size, step in zip(sizes, patch):
        if size % step:
            raise ModelError(
                f"image size {image_size} for CLIP {source!r} is not a multiple of its ViT patch size {step}: the "
                f"ViT would leave out the image's last {size % step} pixel rows or columns; use e.g. "
                f"{size // step * step} or {(size // step + 1) * step}"
            )


def _load_folder(folder: Path, *, image_size: Optional[int], cache_dir, allow_random: bool = False) -> nn.Module:
    """The one path every real checkpoint takes: an open_clip ``local-dir:`` folder."""
    import open_clip
    from safetensors import SafetensorError

    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing; a CLIP folder needs open_clip_config.json and a checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {config_path}: {exc}") from exc
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise WeightsError(f"{config_path} has no 'model_cfg'; is it an open_clip config?")
    if not allow_random and not _checkpoints(folder):
        unread = sorted(p.name for p in folder.glob("*.pt"))
        raise WeightsError(
            f"no CLIP weights in {folder} (expected e.g. open_clip_pytorch_model.bin or open_clip_model.safetensors; "
            "open_clip reads .safetensors, .bin and .pth files)"
            + (f"; rename {', '.join(unread)} to .pth" if unread else "")
        )

    overrides: dict[str, Any] = {}
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    hf_name = text_cfg.get("hf_model_name")
    if hf_name:
        text_cfg["hf_model_name"] = _resolve_hf_files(hf_name, folder, ("config.json",), cache_dir=cache_dir)
        text_cfg["hf_model_pretrained"] = False  # the CLIP checkpoint holds the text weights
        overrides["text_cfg"] = text_cfg
    if not allow_random:
        _show_terms_if_biomedclip(str(folder), hf_name)

    try:
        with _quiet_random_init_warnings(allow_random):
            model = open_clip.create_model(
                f"local-dir:{folder}",
                force_image_size=image_size,
                force_custom_text=True,
                pretrained_text=False,
                pretrained_image=False,
                **overrides,
            )
    except StopIteration as exc:  # open_clip reads the first key of the state dict
        raise WeightsError(f"the CLIP checkpoint in {folder} holds no weights") from exc
    except SafetensorError as exc:  # not a subclass of the errors below
        raise WeightsError(f"could not read the CLIP checkpoint in {folder}: {exc}; the file is corrupt") from exc
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"could not build the CLIP model in {folder}: {exc}") from exc
    model.tokenizer = _make_tokenizer(folder, text_cfg, cache_dir=cache_dir)
    return model


def _load_random(name: str, *, image_size: Optional[int]) -> nn.Module:
    import open_clip

    if name in _CLIP_CONFIGS:
        with tempfile.TemporaryDirectory(prefix="textsegment-clip-") as tmp:
            folder = Path(tmp)
            _write_random_folder(folder, _CLIP_CONFIGS[name])
            model = _load_folder(folder, image_size=image_size, cache_dir=None, allow_random=True)
    elif name in open_clip.list_models():
        # A Hugging Face text tower or tokenizer needs hub files (the text model's config.json, the
        # tokenizer): read from the cache, never the network, in offline mode.
        text_cfg = dict(open_clip.get_model_config(name).get("text_cfg", {}))
        overrides: dict[str, Any] = {}
        if text_cfg.get("hf_model_name"):
            text_cfg["hf_model_name"] = _resolve_hf_files(text_cfg["hf_model_name"], None, ("config.json",), cache_dir=None)
            text_cfg["hf_model_pretrained"] = False
            overrides["text_cfg"] = text_cfg
        if text_cfg.get("hf_tokenizer_name"):
            tokenizer = _make_tokenizer(None, text_cfg, cache_dir=None)
        else:
            tokenizer = open_clip.get_tokenizer(name)
        model = open_clip.create_model(
            name, pretrained=None, force_image_size=image_size, force_custom_text=True, pretrained_text=False,
            **overrides,
        )
        model.tokenizer = tokenizer
    else:
        raise ModelError(
            f"'random:{name}' names no CLIP config; registered: {', '.join(list_clip_configs())} "
            "(or any name in open_clip.list_models())"
        )
    logger.info("built CLIP %r with random weights", name)
    model.clip_source = f"random:{name}"
    return model


@contextlib.contextmanager
def _quiet_random_init_warnings(active: bool):
    """Hide open_clip's "initialized randomly" warnings when random weights are what was asked for."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("no CLIP weights found" in message or "initialized randomly" in message)

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        if active:
            root.removeFilter(keep)


def _write_random_folder(folder: Path, config: ClipConfig) -> None:
    """Lay out a weight-less CLIP folder so random builds go through the same loader as real ones.

    A Hugging Face text tower gets its explicit config and a character-level WordPiece vocabulary:
    the real tokenizer cannot be had offline, and random weights do not need it; different prompts
    still give different token ids.
    """
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config.model_cfg, "preprocess_cfg": config.preprocess_cfg}), encoding="utf-8"
    )
    if config.hf_text_config is None:
        return
    (folder / "config.json").write_text(json.dumps(config.hf_text_config), encoding="utf-8")
    characters = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *string.punctuation]
    vocab += [f"##{c}" for c in characters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8"
    )


def _make_tokenizer(folder: Optional[Path], text_cfg: dict[str, Any], *, cache_dir) -> Any:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    context_length = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_tokenizer = text_cfg.get("hf_tokenizer_name")
    if not hf_tokenizer:
        return SimpleTokenizer(context_length=context_length, **kwargs)
    source = _resolve_hf_files(hf_tokenizer, folder, _TOKENIZER_FILES, cache_dir=cache_dir)
    try:
        return HFTokenizer(
            source, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
        )
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not load the tokenizer {hf_tokenizer!r} (looked in {source}): {exc}") from exc


def _resolve_hf_files(name: str, folder: Optional[Path], filenames: Sequence[str], *, cache_dir) -> str:
    """Where transformers should read ``name``'s files from: the CLIP folder, the cache, or the hub.

    Returns a local folder whenever one has the files; returns ``name`` itself only when online.
    ``folder`` None: there is no CLIP folder (an open_clip model built by name).
    """
    if folder is not None and any((folder / f).is_file() for f in filenames):
        return str(folder)
    if Path(name).is_dir():
        return name
    cached = _cached_folder(name, filenames, cache_dir=cache_dir)
    if cached is not None:
        return cached
    if is_offline():
        if folder is None:
            raise WeightsError(
                f"{name!r} is needed by the CLIP text tower but is not in the Hugging Face cache, and offline mode "
                f"is on ({' / '.join(OFFLINE_VARIABLES)}). Run once online to fill the cache."
            )
        raise WeightsError(
            f"{name!r} is needed by the CLIP text tower but is neither in {folder} nor in the Hugging Face cache, "
            f"and offline mode is on ({' / '.join(OFFLINE_VARIABLES)}). Copy its {' / '.join(filenames[:3])} into "
            f"{folder}, or run once online to fill the cache."
        )
    return name


def _cached_folder(repo_id: str, filenames: Sequence[str], *, cache_dir, revisions=(None,)) -> Optional[str]:
    """A cache snapshot folder of ``repo_id`` holding one of ``filenames``; reads the disk only."""
    from huggingface_hub import try_to_load_from_cache

    for revision in revisions:
        for filename in filenames:
            try:
                found = try_to_load_from_cache(
                    repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir), revision=revision
                )
            except ValueError:  # not a valid repo id: nothing cached under that name
                return None
            if isinstance(found, str):
                return str(Path(found).parent)
    return None


def _hub_snapshot(repo_id: str, *, cache_dir) -> Path:
    """A local folder with ``repo_id``'s CLIP files: from the cache, or downloaded when online."""
    revision = PINNED_REVISIONS.get(repo_id)
    cached = _cached_folder(repo_id, ("open_clip_config.json",), cache_dir=cache_dir, revisions=(revision, None))
    if cached is not None and _checkpoints(Path(cached)):
        return Path(cached)
    if is_offline():
        raise WeightsError(
            f"hf-hub:{repo_id} is not in the Hugging Face cache{f' ({cache_dir})' if cache_dir else ''} and offline "
            f"mode is on ({' / '.join(OFFLINE_VARIABLES)}). Download it once while online, or copy its files "
            "(open_clip_config.json, the checkpoint, the tokenizer files and the text model's config.json) into a "
            "folder and use 'local-dir:/that/folder'."
        )
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (revision %s) from the Hugging Face Hub", repo_id, revision or "main")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=_HUB_FILE_PATTERNS,
        )
    except Exception as exc:  # network, authentication, missing repo: all end the same way for the user
        raise WeightsError(
            f"could not download hf-hub:{repo_id}: {exc}. Check the connection, or use 'local-dir:/path'."
        ) from exc
    return Path(path)


def _checkpoints(folder: Path) -> list[Path]:
    return [p for pattern in _CHECKPOINT_PATTERNS for p in folder.glob(pattern)]


def _show_terms_if_biomedclip(where: str, hf_text_model: Optional[str]) -> None:
    global _terms_shown
    markers = ("biomedclip", "biomednlp", "biomedbert", "pubmedbert")
    text = f"{where} {hf_text_model or ''}".lower()
    if not _terms_shown and any(marker in text for marker in markers):
        _terms_shown = True
        logger.warning(BIOMEDCLIP_TERMS)


# --------------------------------------------------------------------------------------- towers


class VisionTower(nn.Module):
    """The image half of an open_clip model (timm trunk or open_clip's own ViT), as our families use it.

    ``forward_intermediates`` gives block outputs as ``(B, width, gh, gw)`` maps plus the pooled CLS
    feature in the joint space; ``project_tokens`` sends any token map through the tower's final
    norm and projection (exact for the last block, an approximation for earlier ones).
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        visual = clip_model.visual
        self.visual = visual
        self.is_timm = hasattr(visual, "trunk")
        if self.is_timm:
            trunk = visual.trunk
            if not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
                raise ModelError(f"vision trunk {type(trunk).__name__} is not a ViT; VisionTower needs one")
            self.width = int(trunk.embed_dim)
            self.patch_size = int(trunk.patch_embed.patch_size[0])
            self.grid_size = tuple(int(g) for g in trunk.patch_embed.grid_size)
            self.embed_dim = int([m for m in visual.head.modules() if isinstance(m, nn.Linear)][-1].out_features)
        else:
            if not hasattr(visual, "transformer") or getattr(visual, "attn_pool", None) is not None:
                raise ModelError(f"vision tower {type(visual).__name__} is not a plain open_clip ViT")
            self.width = int(visual.conv1.out_channels)
            self.patch_size = int(visual.patch_size[0])
            self.grid_size = tuple(int(g) for g in visual.grid_size)
            self.embed_dim = int(visual.output_dim)
        self.num_blocks = len(self.blocks)
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        mean = preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks if self.is_timm else self.visual.transformer.resblocks

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied before the projection (trainable in FreqMedCLIP)."""
        if self.is_timm:
            trunk = self.visual.trunk
            fc_norm = getattr(trunk, "fc_norm", None)
            return fc_norm if fc_norm is not None and not isinstance(fc_norm, nn.Identity) else trunk.norm
        return self.visual.ln_post

    def normalise(self, images01: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images to the tower's training statistics (CLIP mean/std)."""
        return (images01 - self.mean.to(images01.dtype)) / self.std.to(images01.dtype)

    def forward_intermediates(
        self, images_normalised: torch.Tensor, indices: Sequence[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Block ``indices``' outputs, in the order asked for (repeats allowed), and the pooled feature."""
        bad = [i for i in indices if not 0 <= int(i) < self.num_blocks]
        if bad:
            raise ModelError(f"ViT block indices {bad} out of range; this tower has {self.num_blocks} blocks")
        wanted = [int(i) for i in indices]
        blocks = sorted(set(wanted))  # timm and open_clip return block order, one map per block
        out = self.visual.forward_intermediates(images_normalised, indices=blocks, output_fmt="NCHW")
        by_block = dict(zip(blocks, out["image_intermediates"]))
        return [by_block[i] for i in wanted], out["image_features"]

    def forward(self, images_normalised: torch.Tensor) -> torch.Tensor:
        """Pooled image feature in the joint space, ``(B, embed_dim)``."""
        return self.visual(images_normalised)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, width, gh, gw)`` token map → ``(B, embed_dim, gh, gw)`` through final norm + projection."""
        batch, _, height, width = tokens.shape
        x = tokens.flatten(2).transpose(1, 2)
        if self.is_timm:
            trunk = self.visual.trunk
            x = trunk.norm(x)
            x = getattr(trunk, "fc_norm", nn.Identity())(x)
            x = getattr(trunk, "head", nn.Identity())(x)
            x = self.visual.head(x)
        else:
            x = self.visual.ln_post(x)
            if self.visual.proj is not None:
                x = x @ self.visual.proj
        return x.transpose(1, 2).reshape(batch, x.shape[-1], height, width)  # explicit: batch may be 0


class TextTower(nn.Module):
    """The text half of an open_clip model: ``tokenize`` then ``forward`` to ``TextFeatures``.

    ``pooled`` is the prompt in the joint space (what CLIP compares with images), ``tokens`` the last
    hidden states and ``mask`` which of them are real words. Hugging Face towers drop the all-padding
    tail first (the results do not change), so their ``L`` is the longest prompt in the batch.
    """

    def __init__(self, clip_model: nn.Module, *, tokenizer: Any = None):
        super().__init__()
        text = getattr(clip_model, "text", None)
        if text is None:
            raise ModelError("the CLIP model has no separate text tower; build it with load_clip()")
        tokenizer = tokenizer if tokenizer is not None else getattr(clip_model, "tokenizer", None)
        if tokenizer is None:
            raise ModelError("the CLIP model has no tokenizer attached; build it with load_clip()")
        self.text = text
        self._tokenizer = tokenizer
        self.is_hf = hasattr(text, "config") and hasattr(text, "pooler")
        self.width = int(text.config.hidden_size if self.is_hf else text.width)
        self.embed_dim = int(text.output_dim)
        self.context_length = int(getattr(tokenizer, "context_length", 0) or getattr(text, "context_length", 0))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._tokenizer(list(prompts)).long()

    def forward(self, token_ids: torch.Tensor) -> TextFeatures:
        token_ids = token_ids.to(self._device())
        if self.is_hf:
            return self._forward_hf(token_ids)
        return self._forward_open_clip(token_ids)

    def _forward_hf(self, token_ids: torch.Tensor) -> TextFeatures:
        text = self.text
        mask = token_ids != text.config.pad_token_id
        length = max(int(mask.sum(1).max()), 1)
        # Trailing padding is masked out anyway; dropping it makes a 256-token context cheap.
        token_ids, mask = token_ids[:, :length], mask[:, :length]
        out = text.transformer(input_ids=token_ids, attention_mask=mask.long())
        pooled = text.proj(text.pooler(out, mask.long()))
        return TextFeatures(pooled=pooled, tokens=out.last_hidden_state, mask=mask)

    def _forward_open_clip(self, token_ids: torch.Tensor) -> TextFeatures:
        text = self.text
        out = text.forward_intermediates(token_ids, indices=1, normalize_intermediates=True, output_fmt="NLC")
        tokens = out["text_intermediates"][-1]
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        if text.pool_type == "argmax":  # SimpleTokenizer: the end-of-text token has the largest id
            mask = positions[None, :] <= token_ids.argmax(dim=1, keepdim=True)
        else:
            mask = token_ids != text.pad_id
        return TextFeatures(pooled=out["text_features"], tokens=tokens, mask=mask)

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """``tokenize`` + ``forward`` in one call."""
        return self(self.tokenize(prompts))

    def _device(self) -> torch.device:
        return next(self.text.parameters()).device


def load_towers(
    source: str, *, image_size: Optional[int] = None, cache_dir: Optional[str | Path] = None
) -> tuple[VisionTower, TextTower]:
    """``load_clip`` + both wrappers; the CLIP logit scale is dropped (no family uses it)."""
    clip_model = load_clip(source, image_size=image_size, cache_dir=cache_dir)
    return VisionTower(clip_model), TextTower(clip_model)


class ViTJointTaps:
    """Mixin for models with a CLIP ``vision`` tower: their ``vit.<i>`` taps map into the joint space.

    Through the tower's own final norm + projection — exact for the last block (what CLIP was
    trained on), an approximation for earlier blocks, whose tokens were never trained to live there.
    """

    joint_projection_shared = True  # every vit.<i> goes through the same norm + projection

    @property
    def joint_tap_names(self) -> tuple[str, ...]:
        return tuple(f"vit.{i}" for i in self.config.vit_taps)

    def project_to_joint(self, name: str, features: "torch.Tensor") -> "torch.Tensor":
        if name not in self.joint_tap_names:
            raise ModelError(f"tap {name!r} has no map to the joint space; these do: {list(self.joint_tap_names)}")
        return self.vision.project_tokens(features)
