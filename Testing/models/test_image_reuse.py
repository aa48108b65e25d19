"""The backbones run once per slice: ``decode(encode_image(x))`` is ``forward(x)``, and the engine reuses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from TextSegmentLib.engine import segment
from TextSegmentLib.models import create_model
from TextSegmentLib.phantom import make_phantom


@pytest.fixture(scope="module", params=["freqmedclip-tiny", "tgcnet-tiny"])
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


def test_decoding_shared_image_features_equals_the_full_forward(model):
    size = model.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    text = model.encode_text(["liver", "left kidney", "spleen"])
    image_rows, text_rows = [0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]
    with torch.inference_mode():
        reused = model.decode(model.encode_image(images).index(image_rows), text.index(text_rows), taps=True)
        full = model(images[image_rows], text.index(text_rows), taps=True)
    torch.testing.assert_close(reused.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert reused.taps.keys() == full.taps.keys() == set(model.tap_names)
    for name in model.tap_names:
        torch.testing.assert_close(reused.taps[name], full.taps[name], rtol=1e-5, atol=1e-5, msg=name)
    # and the prompts still matter after the shared part
    assert not torch.allclose(reused.logits[0], reused.logits[2])


def test_engine_encodes_each_slice_once_for_all_prompts(model, monkeypatch):
    volume = make_phantom(seed=4, shape=(6, 64, 64)).ct
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images: calls.append(images.shape[0]) or encode(images))
    prompts = ["liver", "spleen", "right kidney"]
    together = segment(volume, prompts, model=model, device="cpu", batch_size=2, skip_empty_slices=False)
    assert calls == [2, 2, 2]  # three batches of two slices, not once per prompt
    for i, prompt in enumerate(prompts):
        alone = segment(volume, [prompt], model=model, device="cpu", batch_size=2, skip_empty_slices=False)
        np.testing.assert_allclose(together[i].probability.array, alone[0].probability.array, atol=1e-5)


def test_the_decoder_runs_a_few_images_at_a_time_with_the_same_result(model, monkeypatch):
    """Full-resolution stages dominate peak memory: on the CPU the engine encodes and decodes in small groups."""
    import TextSegmentLib.engine as engine

    volume = make_phantom(seed=5, shape=(4, 64, 64)).ct
    prompts = ["liver", "spleen"]
    exact = dict(model=model, device="cpu", batch_size=4, skip_empty_slices=False, probability_dtype="float32")
    whole = segment(volume, prompts, **exact)
    sizes, encoded = [], []
    decode, encode = model.decode, model.encode_image
    monkeypatch.setattr(model, "decode", lambda features, text, taps=None: sizes.append(len(features)) or
                        decode(features, text, taps=taps))
    monkeypatch.setattr(model, "encode_image", lambda images: encoded.append(len(images)) or encode(images))
    monkeypatch.setattr(engine, "GROUP_PIXELS", model.image_size ** 2)  # one image per network call
    grouped = segment(volume, prompts, **exact)
    assert encoded == [1] * 4  # on the CPU the encoders too see one image at a time, each image once
    assert sizes == [1] * 8  # 4 slices × 2 prompts, one batch
    for a, b in zip(whole, grouped):
        np.testing.assert_allclose(a.probability.array, b.probability.array, atol=1e-5)
