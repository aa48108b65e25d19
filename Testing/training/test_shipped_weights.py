"""The weights we ship: registered, bundled, the default, small, and loadable without a network."""

import pytest

from TextSegmentLib import weights
from TextSegmentLib.weights import load_manifest, load_model

SHIPPED = ("freqmedclip-tiny", "tgcnet-tiny")


@pytest.mark.parametrize("model_name", SHIPPED)
def test_shipped_weights_are_the_bundled_default(model_name, monkeypatch, tmp_path):
    monkeypatch.setenv(weights.ENV_HOME, str(tmp_path))  # an empty cache: the file must come from the package
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    entry = load_manifest(weights.PACKAGE_DATA / "weights_manifest.json").default_for(model_name)
    assert entry is not None and entry.bundled and entry.licence == "Apache-2.0"
    path = weights.bundled_path(entry)
    assert path.stat().st_size == entry.size <= 25_000_000
    model = load_model(model_name, device="cpu")
    source = model.weights_source
    assert source.origin == "bundled" and source.verified and source.entry.id == entry.id
    assert source.info.metadata["stored_dtype"] == "float16"
    assert next(model.parameters()).dtype.is_floating_point and not model.training
