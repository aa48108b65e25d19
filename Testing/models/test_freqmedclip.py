"""FreqMedCLIP is the paper's architecture: 12-channel band-major stem, trainable set, gates, text that matters."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from TextSegmentLib.errors import InputError, ModelError, WeightsError
from TextSegmentLib.models import create_model, get_model_config, list_models
from TextSegmentLib.models.freqmedclip import FreqMedCLIP, FrequencyEncoder, SemanticGate, swap_loss
from TextSegmentLib.models.layers import haar_dwt

TINY_TAPS = {
    **{f"vit.{i}": (192, 8, 8) for i in (3, 6, 9, 11)},
    "semantic": (193, 8, 8),  # FiLM-ed tokens + the patch-text cosine map
    "freq.0": (40, 16, 16),
    "freq.1": (80, 8, 8),
    "freq.2": (160, 4, 4),
    "freq.3": (320, 2, 2),
    "gated.0": (40, 16, 16),
    "gated.1": (80, 8, 8),
    "gated.2": (160, 4, 4),
    "gated.3": (320, 2, 2),
    "decoder.0": (96, 2, 2),
    "decoder.1": (64, 4, 4),
    "decoder.2": (48, 8, 8),
    "decoder.3": (32, 16, 16),
    "decoder.4": (16, 64, 64),
    "fused": (16, 64, 64),
}


@pytest.fixture(scope="module")
def tiny() -> FreqMedCLIP:
    torch.manual_seed(0)
    return create_model("freqmedclip-tiny").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import huggingface_hub

    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _expected_trainable(model: FreqMedCLIP) -> set[int]:
    """ViT blocks named in the config + the final ViT norm + every parameter outside the two towers."""
    towers = {id(p) for p in (*model.vision.parameters(), *model.text.parameters())}
    expected = {id(p) for p in model.parameters() if id(p) not in towers}
    for index in model.config.unfrozen_blocks:
        expected |= {id(p) for p in model.vision.blocks[index].parameters()}
    expected |= {id(p) for p in model.vision.final_norm.parameters()}
    return expected


def test_presets_are_registered_with_the_papers_choices():
    assert {"freqmedclip-base", "freqmedclip-tiny"} <= set(list_models())
    base = get_model_config("freqmedclip-base")
    assert base.image_size == 352 and base.freq_encoder == "convnext_tiny"
    assert base.vit_taps == (3, 6, 9, 11) and base.unfrozen_blocks == (3, 6, 9, 11)
    assert base.clip_source.startswith("hf-hub:microsoft/BiomedCLIP")
    assert get_model_config("freqmedclip-tiny").clip_source.startswith("random:")


def test_frequency_stream_is_a_twelve_channel_stem_on_standardised_band_major_dwt(tiny, images):
    assert _first_conv(tiny.frequency.backbone).in_channels == 12
    mean, std = torch.linspace(-0.5, 0.5, 12), torch.linspace(0.5, 2.0, 12)
    encoder = FrequencyEncoder("convnext_atto")
    encoder.set_band_statistics(mean, std)
    spectral, _ = encoder(images)
    torch.testing.assert_close(spectral, (haar_dwt(images) - mean[:, None, None]) / std[:, None, None])
    assert {"band_mean", "band_std"} <= set(encoder.state_dict())
    with pytest.raises(InputError):
        encoder.set_band_statistics(mean, -std)


def test_misaligned_last_stage_is_padded_or_dropped_at_the_base_geometry():
    images = torch.rand(1, 3, 352, 352)  # DWT 176²: ConvNeXt's stride-32 stage would be 5.5 px
    with torch.no_grad():
        _, padded = FrequencyEncoder("convnext_atto", last_stage="pad")(images)
        _, dropped = FrequencyEncoder("convnext_atto", last_stage="drop")(images)
    assert [s.shape[-1] for s in padded] == [44, 22, 11, 6]
    assert [s.shape[-1] for s in dropped] == [44, 22, 11]


def test_convnext_weights_from_a_local_file_tile_the_rgb_stem_band_major(tmp_path, no_network):
    import timm

    rgb = timm.create_model("convnext_atto", pretrained=False)
    torch.save(rgb.state_dict(), tmp_path / "convnext_atto.pth")
    encoder = FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "convnext_atto.pth"))
    stem = _first_conv(encoder.backbone).weight
    for band in range(4):  # each band's three channels get the RGB filters, scaled by 3/12
        torch.testing.assert_close(stem[:, 3 * band : 3 * band + 3], rgb.stem[0].weight * 0.25)
    with pytest.raises(WeightsError, match="offline"):
        FrequencyEncoder("convnext_atto", pretrained="timm")
    with pytest.raises(WeightsError, match="does not exist"):
        FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "missing.pth"))


def test_convnext_file_missing_weights_is_an_error_not_a_partly_random_encoder(tmp_path, no_network):
    """timm loads feature extractors non-strictly: a file lacking weights (even an empty one) used to
    leave them random without a word."""
    import timm

    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("stages.3.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing .*stages_3"):
        FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "partial.pth"))
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="missing"):
        FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "empty.pth"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(WeightsError, match="corrupt.safetensors"):
        FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "corrupt.safetensors"))
    # the last stage is not needed when it is dropped; the classifier is never needed
    encoder = FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "partial.pth"), last_stage="drop")
    torch.testing.assert_close(encoder.backbone.stages_2.blocks[0].conv_dw.weight, state["stages.2.blocks.0.conv_dw.weight"])
    headless = {k: v for k, v in state.items() if not k.startswith("head.fc")}
    torch.save(headless, tmp_path / "headless.pth")
    FrequencyEncoder("convnext_atto", pretrained=str(tmp_path / "headless.pth"))


def test_trainable_parameters_are_exactly_the_named_blocks_and_new_modules(tiny):
    trainable = {id(p) for p in tiny.parameters() if p.requires_grad}
    assert trainable == _expected_trainable(tiny)
    assert not any(p.requires_grad for p in tiny.text.parameters())
    frozen_block = tiny.vision.blocks[0]
    assert not any(p.requires_grad for p in frozen_block.parameters())
    groups = tiny.parameter_groups()
    assert len(groups["backbone"]) + len(groups["new"]) == len(trainable)


def test_a_config_override_opens_every_parameter():
    model = create_model("freqmedclip-tiny", train_vision_tower=True, train_text_tower=True)
    assert all(p.requires_grad for p in model.parameters())


def test_gates_start_open_and_have_channel_or_spatial_shape():
    features, semantic = torch.randn(2, 40, 16, 16) * 5, torch.randn(2, 193, 8, 8) * 5
    for mode, channels in (("channel", 40), ("spatial", 1)):
        gate = SemanticGate(40, 193, mode=mode, init_bias=4.0)
        refined, g = gate(features, semantic)
        assert g.shape == (2, channels, 16, 16) and refined.shape == features.shape
        assert g.min() > 0.95 and g.max() < 1
        torch.testing.assert_close(refined, features * g)
        assert abs(g.mean().item() - 1 / (1 + math.exp(-4.0))) < 0.01


def test_taps_have_the_documented_names_and_shapes(tiny, images):
    text = tiny.encode_text(["liver"])
    with torch.no_grad():
        out = tiny(images, text, taps=True)
    assert tiny.tap_names == tuple(TINY_TAPS)
    assert {name: tuple(t.shape[1:]) for name, t in out.taps.items()} == TINY_TAPS
    assert all(t.shape[0] == 3 for t in out.taps.values())
    assert out.logits.shape == (3, 1, 128, 128)
    assert out.image_embedding.shape == (3, 256) and out.text_embedding.shape == (3, 256)
    assert out.extras["swap_embedding"].shape == (3, 256)
    gate_shapes = [tuple(out.extras[f"gate.{i}"].shape[1:]) for i in range(4)]
    assert gate_shapes == [(1, 16, 16), (1, 8, 8), (1, 4, 4), (1, 2, 2)]
    assert all(out.extras[f"gate.{i}"].min() > 0.95 for i in range(4))
    with torch.no_grad():
        assert tiny(images, text, taps=["gated.0"]).taps.keys() == {"gated.0"}
    with pytest.raises(ModelError, match="unknown feature tap"):
        tiny(images, text, taps=["vit.12"])


def test_two_prompts_give_different_masks_and_gates(tiny, images):
    text = tiny.encode_text(["liver", "necrotic core of the tumour"])
    with torch.no_grad():
        first = tiny(images, text.index([0, 0, 0]), taps=["gated.0", "semantic"])
        second = tiny(images, text.index([1, 1, 1]), taps=["gated.0", "semantic"])
    assert (first.logits - second.logits).abs().max() > 1e-3
    assert (first.taps["semantic"] - second.taps["semantic"]).abs().max() > 1e-3
    assert (first.extras["gate.0"] - second.extras["gate.0"]).abs().max() > 1e-6


def test_eval_forward_is_deterministic_and_one_prompt_row_serves_a_batch(tiny, images):
    text = tiny.encode_text(["spleen"])
    with torch.no_grad():
        a = tiny(images, text).logits
        b = tiny(images, text.index([0, 0, 0])).logits
        c = tiny(images, tiny.encode_text(["spleen"])).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_inputs_are_clear_errors(tiny, images):
    text = tiny.encode_text(["liver", "spleen"])
    with pytest.raises(InputError, match="128"):
        tiny(torch.rand(1, 3, 64, 64), text.index([0]))
    with pytest.raises(InputError, match="prompt rows"):
        tiny(images, text)
    with pytest.raises(InputError, match="prompts"):
        tiny.encode_text("liver")


def test_swap_embedding_pools_gated_features_by_the_mean_gate_map(tiny, images):
    text = tiny.encode_text(["kidney"])
    with torch.no_grad():
        out = tiny(images, text, taps=[f"gated.{i}" for i in range(4)])
        pooled = []
        for level in range(4):
            features, weights = out.taps[f"gated.{level}"], out.extras[f"gate.{level}"]
            pooled.append((features * weights).sum((2, 3)) / weights.sum((2, 3)))
        expected = tiny.swap.project(torch.cat(pooled, dim=1))
    torch.testing.assert_close(out.extras["swap_embedding"], expected)


def test_vit_taps_map_to_the_joint_space(tiny, images):
    with torch.no_grad():
        out = tiny(images, tiny.encode_text(["liver"]), taps=["vit.11", "freq.0"])
        joint = tiny.project_to_joint("vit.11", out.taps["vit.11"])
    assert joint.shape == (3, 256, 8, 8)
    assert tiny.joint_tap_names == ("vit.3", "vit.6", "vit.9", "vit.11")
    with pytest.raises(ModelError, match="joint space"):
        tiny.project_to_joint("freq.0", out.taps["freq.0"])


def test_training_step_reaches_the_open_blocks_and_new_modules_only(tiny, images):
    tiny.train()
    try:
        text = tiny.encode_text(["liver", "spleen", "liver"])
        out = tiny(images, text)
        loss = F.binary_cross_entropy_with_logits(out.logits, torch.zeros_like(out.logits))
        loss = loss + 0.1 * swap_loss(out.extras["swap_embedding"], text.pooled)
        loss.backward()
        assert text.pooled.grad_fn is None  # the frozen text tower built no graph
        assert not tiny.text.training  # and keeps its dropout off in training mode
        assert tiny.vision.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0
        assert tiny.gates[0].project.weight.grad.abs().sum() > 0
        assert tiny.frequency.backbone.stem_0.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in tiny.vision.blocks[0].parameters())
    finally:
        tiny.zero_grad(set_to_none=True)
        tiny.eval()


# --------------------------------------------------------------------------------------- swap_loss


def _reference_swap_loss(pooled, text, temperature):
    """Symmetric multi-positive InfoNCE written out term by term."""
    p, t = F.normalize(pooled, dim=-1), F.normalize(text, dim=-1)
    phrases = []
    for row in t:
        if not any(torch.equal(row, q) for q in phrases):
            phrases.append(row)
    owner = [next(j for j, q in enumerate(phrases) if torch.equal(row, q)) for row in t]
    total_i2t = total_t2i = 0.0
    for i in range(len(p)):
        scores = torch.stack([p[i] @ q / temperature for q in phrases])
        total_i2t += -(scores[owner[i]] - torch.logsumexp(scores, 0))
    for j, q in enumerate(phrases):
        scores = torch.stack([p[i] @ q / temperature for i in range(len(p))])
        positive = torch.stack([scores[i] for i in range(len(p)) if owner[i] == j])
        total_t2i += -(torch.logsumexp(positive, 0) - torch.logsumexp(scores, 0))
    return (total_i2t / len(p) + total_t2i / len(phrases)) / 2


def test_swap_loss_is_multi_positive_infonce():
    generator = torch.Generator().manual_seed(3)
    phrases = torch.randn(3, 8, generator=generator)
    text = phrases[[0, 1, 0, 2, 1]]
    pooled = torch.randn(5, 8, generator=generator)
    torch.testing.assert_close(swap_loss(pooled, text, temperature=0.1), _reference_swap_loss(pooled, text, 0.1))
    groups = torch.tensor([5, 7, 5, 9, 7])
    by_ids = swap_loss(pooled, text, temperature=0.1, groups=groups)
    torch.testing.assert_close(by_ids, swap_loss(pooled, text, temperature=0.1))
    with pytest.raises(InputError, match="group ids"):
        swap_loss(pooled, text, groups=groups[:2])


def test_swap_loss_prefers_aligned_pairs_and_falls_back_to_cosine():
    generator = torch.Generator().manual_seed(4)
    text = torch.randn(4, 16, generator=generator)
    aligned = swap_loss(text + 0.01 * torch.randn(4, 16, generator=generator), text)
    shuffled = swap_loss(text[[1, 2, 3, 0]], text)
    assert aligned < shuffled
    one_pooled, one_text = torch.randn(1, 16, generator=generator), text[:1]
    torch.testing.assert_close(swap_loss(one_pooled, one_text), 1 - F.cosine_similarity(one_pooled, one_text).mean())
    same = text[[0, 0, 0]]
    pooled = torch.randn(3, 16, generator=generator, requires_grad=True)
    loss = swap_loss(pooled, same)
    torch.testing.assert_close(loss, (1 - F.cosine_similarity(pooled, same)).mean())
    loss.backward()
    assert pooled.grad.abs().sum() > 0
    with pytest.raises(InputError):
        swap_loss(torch.randn(2, 4), torch.randn(3, 4))


# --------------------------------------------------------------------------------------- base


def test_base_builds_offline_with_random_towers_and_runs_at_352(no_network):
    """The paper's geometry end to end: BiomedCLIP-shaped towers at 352 px, ConvNeXt-Tiny on 176² bands."""
    torch.manual_seed(0)
    model = create_model(
        "freqmedclip-base", clip_source="random:BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    ).eval()
    assert _first_conv(model.frequency.backbone).in_channels == 12
    assert model.frequency.channels == (96, 192, 384, 768)
    assert {id(p) for p in model.parameters() if p.requires_grad} == _expected_trainable(model)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 352, 352), model.encode_text(["liver"]), taps=True)
    shapes = {name: tuple(t.shape[1:]) for name, t in out.taps.items()}
    assert shapes["vit.11"] == (768, 22, 22) and shapes["semantic"] == (769, 22, 22)
    assert [shapes[f"freq.{i}"] for i in range(4)] == [(96, 44, 44), (192, 22, 22), (384, 11, 11), (768, 6, 6)]
    assert shapes["fused"] == (32, 176, 176)
    assert out.logits.shape == (1, 1, 352, 352) and torch.isfinite(out.logits).all()
    assert out.image_embedding.shape == (1, 512) and out.extras["swap_embedding"].shape == (1, 512)
