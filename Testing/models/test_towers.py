"""CLIP towers and backbone loading: shapes, exact projections, and offline loading with no network."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch

from TextSegmentLib.errors import ModelError, WeightsError
from TextSegmentLib.models import towers
from TextSegmentLib.models.towers import (
    BIOMEDCLIP_HUB_ID,
    BIOMEDCLIP_REVISION,
    BIOMEDCLIP_SOURCE,
    BIOMEDCLIP_TERMS,
    BIOMEDCLIP_TEXT_MODEL,
    TextTower,
    VisionTower,
    load_clip,
    register_clip_config,
)

SMALL_BERT = dict(
    model_type="bert",
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
    pad_token_id=0,
)
# BiomedCLIP's layout (timm ViT trunk + CLS + linear proj, HF BERT text tower + MLP proj, CLS pooling)
# at reduced sizes, pointing at BiomedBERT's hub name exactly as the real config does.
SMALL_BIOMEDCLIP = {
    "embed_dim": 24,
    "vision_cfg": {
        "timm_model_name": "vit_tiny_patch16_224",
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
        "context_length": 64,
    },
}
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
NATIVE_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "custom_text": True,
}


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode on, and every way out (sockets, hub downloads) raises if anything tries it."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for module, name in [
        (huggingface_hub, "snapshot_download"),
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub.file_download, "hf_hub_download"),
        (open_clip.pretrained, "download_pretrained_from_hf"),
        (open_clip.factory, "download_pretrained_from_hf"),
    ]:
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def tiny_clip():
    model = load_clip("random:textsegment-vit-ti16-text256", image_size=128).eval()
    return model


@pytest.fixture(scope="module")
def saved_biomedclip(tmp_path_factory):
    """A random BiomedCLIP-shaped model saved the way a user's download lays it out."""
    register_clip_config(
        "test-small-biomedclip", SMALL_BIOMEDCLIP, preprocess_cfg=PREPROCESS, hf_text_config=SMALL_BERT
    )
    model = load_clip("random:test-small-biomedclip").eval()
    folder = tmp_path_factory.mktemp("biomedclip")
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": SMALL_BIOMEDCLIP, "preprocess_cfg": PREPROCESS}), encoding="utf-8"
    )
    (folder / "config.json").write_text(json.dumps(SMALL_BERT), encoding="utf-8")
    model.tokenizer.tokenizer.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model, folder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_vision_tower_geometry_and_intermediates(tiny_clip):
    vision = VisionTower(tiny_clip)
    assert (vision.width, vision.patch_size, vision.grid_size) == (192, 16, (8, 8))
    assert (vision.embed_dim, vision.num_blocks, vision.image_size) == (256, 12, (128, 128))
    images = vision.normalise(torch.rand(2, 3, 128, 128))
    with torch.no_grad():
        maps, pooled = vision.forward_intermediates(images, [3, 6, 9, 11])
        torch.testing.assert_close(pooled, tiny_clip.encode_image(images))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 4
    assert not torch.allclose(maps[0], maps[-1])
    with pytest.raises(ModelError, match="out of range"):
        vision.forward_intermediates(images, [12])


def test_vision_tower_normalises_with_clip_statistics(tiny_clip):
    vision = VisionTower(tiny_clip)
    images = torch.rand(1, 3, 128, 128)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(vision.normalise(images), (images - mean) / std)


@pytest.mark.parametrize("config", ["textsegment-vit-ti16-text256", "test-native-vit"])
def test_project_tokens_is_the_towers_own_norm_and_projection(config, tiny_clip):
    """The last block's CLS token through ``project_tokens`` is exactly CLIP's pooled image feature."""
    if config == "test-native-vit":
        register_clip_config(config, NATIVE_VIT)
        clip_model = load_clip(f"random:{config}").eval()
    else:
        clip_model = tiny_clip
    vision = VisionTower(clip_model)
    images = vision.normalise(torch.rand(2, 3, *vision.image_size))
    last = vision.num_blocks - 1
    with torch.no_grad():
        out = clip_model.visual.forward_intermediates(images, indices=[last], output_extra_tokens=True)
        cls = out["image_intermediates_prefix"][0][:, :1]  # (B, 1, width)
        projected = vision.project_tokens(cls.transpose(1, 2).reshape(2, -1, 1, 1))
        maps, pooled = vision.forward_intermediates(images, [last])
        dense = vision.project_tokens(maps[0])
    torch.testing.assert_close(projected[:, :, 0, 0], pooled, rtol=1e-4, atol=1e-5)
    assert dense.shape == (2, vision.embed_dim, *vision.grid_size)


def test_text_tower_matches_open_clip_and_masks_padding(tiny_clip):
    text = TextTower(tiny_clip)
    assert (text.width, text.embed_dim, text.context_length) == (256, 256, 32)
    ids = text.tokenize(["liver", "left kidney with a cyst"])
    assert ids.dtype == torch.long and ids.shape == (2, 32)
    with torch.no_grad():
        features = text(ids)
        torch.testing.assert_close(features.pooled, tiny_clip.encode_text(ids))
    assert features.tokens.shape == (2, 32, 256)
    real = (ids != 0).sum(1)  # start + words + end tokens
    assert features.mask.sum(1).tolist() == real.tolist()
    assert not torch.allclose(features.pooled[0], features.pooled[1])


def test_local_dir_loads_a_biomedclip_shaped_model_offline(saved_biomedclip, no_network, tmp_path, caplog, monkeypatch):
    """The AutoConfig trap: the config names BiomedBERT on the hub; the folder's config.json must win."""
    original, folder = saved_biomedclip
    monkeypatch.setattr(towers, "_terms_shown", False)
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.models.towers"):
        loaded = load_clip(f"local-dir:{folder}", cache_dir=tmp_path).eval()
    assert BIOMEDCLIP_TERMS in caplog.text
    _same_weights(original, loaded)
    vision, text = VisionTower(loaded), TextTower(loaded)
    assert text.width == SMALL_BERT["hidden_size"] and text.embed_dim == 24
    torch.testing.assert_close(vision.mean.flatten(), torch.tensor(PREPROCESS["mean"]))
    prompts = ["liver", "hypodense lesion in segment iv"]
    ids = text.tokenize(prompts)
    assert torch.equal(ids, TextTower(original).tokenize(prompts))
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        features = text(ids)
        torch.testing.assert_close(features.pooled, original.encode_text(ids), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vision(vision.normalise(images)), original.encode_image(vision.normalise(images)))
    assert features.mask.sum(1).tolist() == (ids != 0).sum(1).tolist()
    assert features.tokens.shape[:2] == features.mask.shape


def test_local_dir_resizes_the_vit_like_biomedclip_at_352(saved_biomedclip, no_network, tmp_path):
    _, folder = saved_biomedclip
    vision = VisionTower(load_clip(f"local-dir:{folder}", image_size=64, cache_dir=tmp_path))
    assert vision.grid_size == (4, 4) and vision.image_size == (64, 64)
    maps, pooled = vision.forward_intermediates(vision.normalise(torch.rand(1, 3, 64, 64)), [1])
    assert maps[0].shape == (1, 192, 4, 4) and pooled.shape == (1, 24)


def test_offline_hub_source_reads_the_pinned_cache_snapshot(saved_biomedclip, no_network, tmp_path):
    """A primed Hugging Face cache (BiomedCLIP at the pinned revision, BiomedBERT's config) loads offline."""
    original, folder = saved_biomedclip
    repo = tmp_path / f"models--{BIOMEDCLIP_HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / BIOMEDCLIP_REVISION
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name != "config.json":  # the real BiomedCLIP repo has no BERT config.json either
            shutil.copy(path, snapshot / path.name)
    bert = tmp_path / f"models--{BIOMEDCLIP_TEXT_MODEL.replace('/', '--')}"
    commit = "0" * 40
    (bert / "snapshots" / commit).mkdir(parents=True)
    (bert / "refs").mkdir()
    (bert / "refs" / "main").write_text(commit)
    shutil.copy(folder / "config.json", bert / "snapshots" / commit / "config.json")

    loaded = load_clip(BIOMEDCLIP_SOURCE, cache_dir=tmp_path)
    _same_weights(original, loaded)
    assert loaded.clip_source == BIOMEDCLIP_SOURCE


def test_offline_hub_source_missing_from_cache_is_a_clear_error(no_network, tmp_path):
    with pytest.raises(WeightsError, match="offline") as info:
        load_clip(BIOMEDCLIP_SOURCE, cache_dir=tmp_path)
    assert "local-dir:" in str(info.value)


def test_offline_local_dir_without_the_text_config_says_what_to_copy(saved_biomedclip, no_network, tmp_path):
    _, folder = saved_biomedclip
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json") as info:
        load_clip(f"local-dir:{partial}", cache_dir=tmp_path / "empty-cache")
    assert BIOMEDCLIP_TEXT_MODEL in str(info.value)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not understood"):
        load_clip("BiomedCLIP")
    with pytest.raises(ModelError, match="names no CLIP config"):
        load_clip("random:no-such-clip")
    with pytest.raises(WeightsError, match="does not exist"):
        load_clip(f"local-dir:{tmp_path / 'missing'}")
    weights_file = tmp_path / "download" / "weights.bin"  # the weights file, not its folder: it "did not exist"
    weights_file.parent.mkdir()
    weights_file.write_bytes(b"0")
    with pytest.raises(WeightsError, match="weights.bin is a file, not a folder; 'local-dir:' takes the folder"):
        load_clip(f"local-dir:{weights_file}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_BIOMEDCLIP}))
    with pytest.raises(WeightsError, match="no CLIP weights"):
        load_clip(f"local-dir:{tmp_path}")


def test_random_biomedclip_builds_offline_with_biomedberts_shape(no_network):
    """Random init only when asked for; BiomedBERT's shape comes from an explicit config, not the hub."""
    clip_model = load_clip("random:BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", image_size=352)
    vision, text = VisionTower(clip_model), TextTower(clip_model)
    assert (vision.width, vision.grid_size, vision.embed_dim) == (768, (22, 22), 512)
    assert (text.width, text.embed_dim, text.context_length) == (768, 512, 256)
    assert text.text.config.vocab_size == 30522 and text.text.config.num_hidden_layers == 12
    ids = text.tokenize(["liver", "spleen"])
    assert ids.shape == (2, 256) and not torch.equal(ids[0], ids[1])


def test_local_dir_weights_open_clip_cannot_read_are_an_error_not_a_random_model(saved_biomedclip, tmp_path):
    """open_clip reads .safetensors/.bin/.pth only; a model.pt beside the config used to give random weights."""
    _, folder = saved_biomedclip
    renamed = tmp_path / "clip"
    shutil.copytree(folder, renamed)
    (renamed / "open_clip_pytorch_model.bin").rename(renamed / "model.pt")
    with pytest.raises(WeightsError, match="no CLIP weights") as info:
        load_clip(f"local-dir:{renamed}", cache_dir=tmp_path)
    assert "model.pt" in str(info.value) and ".pth" in str(info.value)


@pytest.mark.parametrize(
    "name, contents",
    [
        ("open_clip_model.safetensors", b"not a safetensors file" * 4),
        ("open_clip_pytorch_model.bin", b"junk" * 8),
        ("open_clip_pytorch_model.bin", {"state_dict": {}, "saved_from": Path("/somewhere")}),
        ("open_clip_pytorch_model.bin", {}),
    ],
    ids=["corrupt-safetensors", "corrupt-bin", "pickled-objects", "empty-state-dict"],
)
def test_unreadable_local_dir_checkpoints_are_weights_errors_naming_the_folder(tmp_path, name, contents):
    """They used to escape as SafetensorError, UnpicklingError or a bare StopIteration."""
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": NATIVE_VIT}), encoding="utf-8")
    if isinstance(contents, bytes):
        (tmp_path / name).write_bytes(contents)
    else:
        torch.save(contents, tmp_path / name)
    with pytest.raises(WeightsError) as info:
        load_clip(f"local-dir:{tmp_path}")
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", ["nllb-clip-base", "ViT-B-16-SigLIP"], ids=["hf-text-tower", "hf-tokenizer"])
def test_random_open_clip_model_with_hub_text_files_never_goes_online_in_offline_mode(name, tmp_path, monkeypatch):
    """TEXTSEGMENT_OFFLINE alone (HF_HUB_OFFLINE unset): its text config and tokenizer come from the cache or
    nowhere; transformers used to ask the hub for them."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(WeightsError, match="offline mode is on"):
        load_clip(f"random:{name}")


def test_image_size_the_vit_patches_do_not_tile_is_refused(saved_biomedclip, tmp_path):
    """At 136 px a /16 ViT used to drop the image's last 8 rows and columns without a word."""
    register_clip_config("test-native-vit", NATIVE_VIT)
    with pytest.raises(ModelError, match="not a multiple of its ViT patch size 16"):
        load_clip("random:textsegment-vit-ti16-text32", image_size=136)
    with pytest.raises(ModelError, match="patch size 8"):
        load_clip("random:test-native-vit", image_size=36)
    _, folder = saved_biomedclip
    with pytest.raises(ModelError, match="use e.g. 336 or 352"):
        load_clip(f"local-dir:{folder}", image_size=350, cache_dir=tmp_path)
    assert VisionTower(load_clip("random:textsegment-vit-ti16-text32", image_size=144)).image_size == (144, 144)


@pytest.mark.parametrize("config", ["textsegment-vit-ti16-text256", "test-native-vit"], ids=["timm", "open_clip"])
def test_intermediates_come_back_in_the_order_asked_for(config):
    """timm and open_clip return block order with one map per block; a config's taps (11, 3) or (3, 3)
    used to get each other's maps, or too few."""
    register_clip_config("test-native-vit", NATIVE_VIT)
    vision = VisionTower(load_clip(f"random:{config}")).eval()
    images = vision.normalise(torch.rand(1, 3, *vision.image_size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        (first, last), pooled = vision.forward_intermediates(images, [0, 2])
        maps, pooled_again = vision.forward_intermediates(images, [2, 0, 2])
    assert len(maps) == 3
    assert torch.equal(maps[0], last) and torch.equal(maps[1], first) and torch.equal(maps[2], last)
    assert torch.equal(pooled, pooled_again)
