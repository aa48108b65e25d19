"""TGC-Net: shapes and taps, the text actually steering the mask, frozen towers, the parameter budget."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from TextSegmentLib.aux_prompts import find_description
from TextSegmentLib.errors import InputError, ModelError
from TextSegmentLib.models import TextFeatures, create_model, get_model_config, list_models
from TextSegmentLib.models.tgcnet import TGCNet, grouped_cosine

PAPER_TRAINABLE = 10.3e6
BIOMEDCLIP_RANDOM = "random:BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
TINY_TAPS = {
    "vit.3": (192, 8, 8), "vit.6": (192, 8, 8), "vit.9": (192, 8, 8), "vit.11": (192, 8, 8),
    "cnn.0": (16, 64, 64), "cnn.1": (32, 32, 32), "cnn.2": (64, 16, 16), "cnn.3": (128, 8, 8),
    "pyramid.0": (64, 64, 64), "pyramid.1": (64, 32, 32), "pyramid.2": (64, 16, 16), "pyramid.3": (64, 8, 8),
    "decoder.0": (64, 8, 8), "decoder.1": (48, 16, 16), "decoder.2": (32, 32, 32), "decoder.3": (16, 64, 64),
    "fused": (16, 64, 64),
}


@pytest.fixture(autouse=True)
def no_llm(monkeypatch):
    for name in ("TEXTSEGMENT_LLM_URL", "TEXTSEGMENT_LLM_KEY", "TEXTSEGMENT_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny() -> TGCNet:
    torch.manual_seed(0)
    return create_model("tgcnet-tiny").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StandInVision(nn.Module):
    """BiomedCLIP's ViT-B/16 shapes (width 768, 12 blocks, joint dim 512) without its 86 M weights."""

    def __init__(self, *, image_size: int, width: int = 768, blocks: int = 12, embed_dim: int = 512, patch: int = 16):
        super().__init__()
        self.width, self.patch_size, self.embed_dim, self.num_blocks = width, patch, embed_dim, blocks
        self.grid_size = (image_size // patch, image_size // patch)
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.scales = nn.Parameter(torch.ones(blocks, width))
        self.proj = nn.Linear(width, embed_dim)
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def normalise(self, images01):
        return (images01 - self.mean) / self.std

    def forward_intermediates(self, images, indices):
        x, maps = self.patch_embed(images), []
        for i, scale in enumerate(self.scales):
            x = torch.tanh(x * scale[None, :, None, None])
            if i in indices:
                maps.append(x)
        return maps, self.proj(x.mean((2, 3)))

    def project_tokens(self, tokens):
        return self.proj(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class StandInText(nn.Module):
    """A BERT-base-shaped text tower (width 768, joint dim 512) that tokenises bytes."""

    def __init__(self, *, width: int = 768, embed_dim: int = 512, context: int = 24):
        super().__init__()
        self.width, self.embed_dim, self.context = width, embed_dim, context
        self.embedding = nn.Embedding(257, width)
        self.proj = nn.Linear(width, embed_dim)

    def tokenize(self, prompts):
        ids = torch.zeros(len(prompts), self.context, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode())[: self.context]
            ids[row, : len(data)] = torch.tensor(data) + 1
        return ids

    def forward(self, token_ids):
        tokens, mask = self.embedding(token_ids), token_ids != 0
        pooled = self.proj((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
        return TextFeatures(pooled=pooled, tokens=tokens, mask=mask)


def base_with_stand_ins(**overrides) -> TGCNet:
    config = get_model_config("tgcnet-base", **overrides)
    return TGCNet(config, vision=StandInVision(image_size=config.clip_image_size), text=StandInText())


# --------------------------------------------------------------------------------------- presets


def test_presets_are_registered_with_their_backbone_sources():
    assert {"tgcnet-base", "tgcnet-tiny"} <= set(list_models())
    base, tiny = get_model_config("tgcnet-base"), get_model_config("tgcnet-tiny")
    assert (base.image_size, base.clip_image_size) == (768, 336)
    assert base.clip_source == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert tiny.clip_source.startswith("random:") and tiny.image_size == 256
    assert get_model_config("tgcnet-base", image_size=512).image_size == 512
    with pytest.raises(ModelError, match="no option"):
        get_model_config("tgcnet-base", image_sise=512)


def test_base_trainable_parameters_are_within_25_percent_of_the_paper():
    model = base_with_stand_ins()
    count = trainable(model)
    assert abs(count - PAPER_TRAINABLE) <= 0.25 * PAPER_TRAINABLE, f"{count / 1e6:.2f} M trainable"
    assert all(not p.requires_grad for p in (*model.vision.parameters(), *model.text.parameters()))


def test_base_widths_run_at_a_reduced_resolution():
    model = base_with_stand_ins(image_size=128, clip_image_size=64).eval()
    text = model.encode_text(["liver", "spleen"])
    assert text.tokens.shape[-1] == 256
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 128, 128), text, taps=["vit.11", "pyramid.0", "pyramid.3", "fused"])
    assert out.logits.shape == (2, 1, 128, 128)
    assert out.taps["vit.11"].shape == (2, 768, 4, 4)
    assert out.taps["pyramid.0"].shape == (2, 256, 32, 32) and out.taps["pyramid.3"].shape == (2, 256, 4, 4)
    assert out.taps["fused"].shape == (2, 32, 32, 32)
    assert out.text_embedding.shape == out.image_embedding.shape == (2, 512)


def test_base_on_random_biomedclip_towers_matches_the_stand_in_count():
    model = create_model("tgcnet-base", clip_source=BIOMEDCLIP_RANDOM, image_size=128, clip_image_size=224).eval()
    assert trainable(model) == trainable(base_with_stand_ins())
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 150e6  # ViT-B + BERT-base, frozen
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 128, 128), model.encode_text(["spleen"]), taps=["vit.11"])
    assert out.taps["vit.11"].shape == (1, 768, 14, 14)
    assert out.logits.shape == (1, 1, 128, 128) and torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------------- tiny model


def test_outputs_and_every_tap_have_the_documented_shapes(tiny, images):
    text = tiny.encode_text(["liver", "left kidney"])
    with torch.inference_mode():
        out = tiny(images, text, taps=True)
    assert out.logits.shape == (2, 1, 256, 256) and torch.isfinite(out.logits).all()
    assert set(out.taps) == set(tiny.tap_names) == set(TINY_TAPS)
    assert {name: tuple(t.shape[1:]) for name, t in out.taps.items()} == TINY_TAPS
    assert out.text_embedding.shape == out.image_embedding.shape == (2, 256)
    assert out.extras["vlcm_gate"].shape == (2, 8, 64)
    assert tiny(images, text).taps == {}


def test_text_pooled_stays_the_prompts_clip_embedding(tiny):
    text = tiny.encode_text(["liver", "spleen"])
    torch.testing.assert_close(text.pooled, tiny.text.encode(["liver", "spleen"]).pooled)
    assert text.tokens.shape[:2] == text.mask.shape and text.mask[:, 0].all()


def test_two_prompts_give_different_masks_even_with_the_same_aux_text(tiny, images):
    same = ["a bright structure", "a bright structure"]
    text = tiny.encode_text(["liver", "spleen"], same)
    with torch.inference_mode():
        out = tiny(images[:1].expand(2, -1, -1, -1), text)
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-3


def test_auxiliary_text_changes_the_mask_and_defaults_to_the_curated_description(tiny, images):
    fluid = tiny.encode_text(["liver"], ["a dark fluid-filled sac"])
    bone = tiny.encode_text(["liver"], ["a bright ring of cortical bone"])
    with torch.inference_mode():
        difference = (tiny(images, fluid).logits - tiny(images, bone).logits).abs().max()
    assert difference > 1e-3
    curated = find_description("liver").text
    torch.testing.assert_close(tiny.encode_text(["liver"], [None]).tokens, tiny.encode_text(["liver"], [curated]).tokens)
    torch.testing.assert_close(tiny.encode_text(["liver"]).tokens, tiny.encode_text(["liver"], [curated]).tokens)


def test_the_engine_passes_auxiliary_prompts_to_tgcnet(tiny):
    # the engine refuses them for a model that does not declare it reads them (FreqMedCLIP ignored them)
    from TextSegmentLib.engine import check_aux_prompts

    assert tiny.uses_aux_prompts
    check_aux_prompts(tiny, ["a dark fluid-filled sac"])


@pytest.mark.parametrize("kept_only, described", [(False, "gallbladder"), (True, "liver")])
def test_exclusion_prompts_are_described_as_the_config_says(tiny, kept_only, described):
    """aux_kept_only False (the shipped weights' training): the gallbladder's text; True: the liver's."""
    config = dataclasses.replace(tiny.config, aux_kept_only=kept_only)
    model = TGCNet(config, vision=tiny.vision, text=tiny.text).eval()
    expected = model.encode_text(["liver without the gallbladder"], [find_description(described).text])
    torch.testing.assert_close(model.encode_text(["liver without the gallbladder"]).tokens, expected.tokens)


def test_without_date_the_auxiliary_text_is_ignored(tiny, images):
    config = dataclasses.replace(tiny.config, use_date=False, use_vlcm=False)
    model = TGCNet(config, vision=tiny.vision, text=tiny.text).eval()
    assert model.vlcm is None
    with torch.inference_mode():
        a = model(images[:1].expand(2, -1, -1, -1), model.encode_text(["liver", "liver"], ["fluid", "bone"]))
    torch.testing.assert_close(a.logits[0], a.logits[1])


def test_frozen_towers_stay_frozen_through_an_optimiser_step(tiny, images):
    model = copy.deepcopy(tiny).train()
    towers = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith(("vision.", "text."))}
    assert towers and all(not p.requires_grad for n, p in model.named_parameters() if n in towers)
    assert not model.vision.training and not model.text.training and model.cnn.training
    new = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert set(new).isdisjoint(towers) and model.parameter_groups()["backbone"] == []

    optimiser = torch.optim.AdamW(model.parameter_groups()["new"], lr=1e-2)
    target = (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = model(images[..., :128, :128], model.encode_text(["liver", "spleen"]))  # any multiple of 32 works
    F.binary_cross_entropy_with_logits(out.logits, target).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without a gradient: {missing}"
    optimiser.step()

    for name, p in model.named_parameters():
        if name in towers:
            assert torch.equal(p, towers[name]), name
    assert sum(not torch.equal(p, new[n]) for n, p in model.named_parameters() if n in new) == len(new)


@pytest.mark.parametrize("opened, frozen", [("text", "vision"), ("vision", "text")])
def test_an_opened_tower_trains_as_the_backbone_group(tiny, images, opened, frozen):
    config = dataclasses.replace(tiny.config, **{f"train_{opened}_tower": True})
    model = TGCNet(config, vision=copy.deepcopy(tiny.vision), text=copy.deepcopy(tiny.text)).train()
    tower, other = getattr(model, opened), getattr(model, frozen)
    ids = {id(p) for p in tower.parameters()}
    groups = model.parameter_groups()
    assert {id(p) for p in groups["backbone"]} == ids
    assert ids.isdisjoint(id(p) for p in groups["new"])
    assert all(not p.requires_grad for p in other.parameters())  # the other tower stays frozen
    assert tower.training and not other.training
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    optimiser = torch.optim.AdamW(groups["backbone"], lr=1e-2)
    out = model(images[..., :128, :128], model.encode_text(["liver", "spleen"]))
    out.logits.square().mean().backward()
    optimiser.step()
    assert any(not torch.equal(p, before[n]) for n, p in tower.named_parameters())


def test_taps_are_on_the_gradient_path_for_grad_cam(tiny, images):
    pixels = images.clone().requires_grad_(True)
    names = ["vit.3", "cnn.0", "pyramid.2", "decoder.1", "fused"]
    out = tiny(pixels, tiny.encode_text(["liver"]).index([0, 0]), taps=names)
    grads = torch.autograd.grad(out.logits.sum(), [out.taps[n] for n in names], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_only_vit_taps_project_into_the_joint_space(tiny, images):
    with torch.inference_mode():
        out = tiny(images, tiny.encode_text(["liver", "liver"]), taps=["vit.11", "pyramid.1"])
        joint = tiny.project_to_joint("vit.11", out.taps["vit.11"])
        pooled = tiny.vision.project_tokens(out.taps["vit.11"])
    assert joint.shape == (2, 256, 8, 8)
    torch.testing.assert_close(joint, pooled)
    assert "pyramid.1" not in tiny.joint_tap_names
    with pytest.raises(ModelError, match="no map to the joint space"):
        tiny.project_to_joint("pyramid.1", out.taps["pyramid.1"])


def test_bad_inputs_are_refused_with_a_clear_error(tiny, images):
    text = tiny.encode_text(["liver"])
    with torch.inference_mode():
        assert tiny(images, text).logits.shape == (2, 1, 256, 256)  # one prompt row is shared by the batch
        with pytest.raises(InputError, match="multiples of 32"):
            tiny(torch.rand(1, 3, 250, 250), text)
        with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
            tiny(torch.rand(1, 1, 256, 256), text)
        with pytest.raises(InputError, match="row by row"):
            tiny(torch.rand(3, 3, 256, 256), tiny.encode_text(["liver", "spleen"]))
        with pytest.raises(InputError, match="token sequence"):
            tiny(images, TextFeatures(pooled=text.pooled))
        with pytest.raises(ModelError, match="unknown feature tap"):
            tiny(images, text, taps=["vit.4"])
    with pytest.raises(InputError, match="list of strings"):
        tiny.encode_text("liver")


def test_inconsistent_configs_are_refused(tiny):
    with pytest.raises(ModelError, match="multiple of 32"):
        TGCNet(dataclasses.replace(tiny.config, image_size=250), vision=tiny.vision, text=tiny.text)
    with pytest.raises(ModelError, match="out of range"):
        TGCNet(dataclasses.replace(tiny.config, vit_taps=(3, 12)), vision=tiny.vision, text=tiny.text)


def test_grouped_cosine_is_the_cosine_per_channel_group_and_zero_safe():
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 12, 5, 7, generator=generator)
    pixels[0, 4:8, 2, 3] = 0.0  # one pixel with an all-zero group: cosine 0, finite gradient
    pixels.requires_grad_(True)
    text = torch.randn(2, 12, generator=generator)
    cost = grouped_cosine(pixels, text, 3)
    assert cost.shape == (2, 3, 5, 7)
    for g in range(3):
        channels = slice(4 * g, 4 * g + 4)
        expected = F.cosine_similarity(pixels[:, channels], text[:, channels, None, None], dim=1, eps=1e-12)
        torch.testing.assert_close(cost[:, g], expected, atol=1e-6, rtol=0)
    assert float(cost[0, 1, 2, 3].detach()) == 0.0
    cost.sum().backward()
    assert bool(torch.isfinite(pixels.grad).all())
