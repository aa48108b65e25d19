"""A user's walk through the weights with a real model: import, list, use by id and by path, and the refusals.

Everything happens in a private TEXTSEGMENT_HOME, offline from the network.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from TextSegmentLib import cli, weights
from TextSegmentLib.checkpoint import save_checkpoint
from TextSegmentLib.models.registry import create_model
from TextSegmentLib.weights import load_model

MODEL = "freqmedclip-tiny"


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in weights.OFFLINE_VARIABLES + (weights.ENV_MANIFEST,):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(weights.ENV_HOME, str(tmp_path / "home"))

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(cli, "COMMANDS", ("weights",))  # other commands are not under test here
    return tmp_path / "home"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A random freqmedclip-tiny saved by the project's own save_checkpoint: no training needed."""
    folder = tmp_path_factory.mktemp("made")
    torch.manual_seed(3)
    model = create_model(MODEL)
    save_checkpoint(model, folder / "mine.safetensors", model_name=MODEL, metadata={"licence": "CC-BY-4.0"})
    torch.save(model.state_dict(), folder / "mine.pt")
    return model.state_dict(), folder


def _listed(capsys) -> dict:
    assert cli.main(["weights", "list", "--json"]) == 0
    return {row["id"]: row for row in json.loads(capsys.readouterr().out)}


def test_import_list_and_use_by_id_and_by_path(made, home, capsys):
    state, folder = made
    checkpoint = folder / "mine.safetensors"
    assert cli.main(["weights", "import", str(checkpoint)]) == 0
    assert "use --weights mine" in capsys.readouterr().out
    row = _listed(capsys)["mine"]
    assert (row["model"], row["status"], row["size"], row["licence"]) == (MODEL, "cached", checkpoint.stat().st_size, "CC-BY-4.0")

    by_id = load_model(MODEL, weights="mine", device="cpu")
    by_path = load_model(MODEL, weights=str(checkpoint), device="cpu")
    assert (by_id.weights_source.origin, by_path.weights_source.origin) == ("cache", "path")
    for model in (by_id, by_path):
        loaded = model.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in state.items())

    assert cli.main(["weights", "import", str(checkpoint)]) == 0  # again: the same entry, no second one
    capsys.readouterr()
    assert [e.id for e in weights.known_weights() if e.origin == "imported"] == ["mine"]


def test_a_pickle_file_is_refused_with_how_to_convert_it_and_nothing_is_cached(made, home, capsys):
    _, folder = made
    assert cli.main(["weights", "import", str(folder / "mine.pt")]) == 2
    err = capsys.readouterr().err
    assert "is a PyTorch pickle file" in err and "save_checkpoint(model, 'out.safetensors', model_name=NAME)" in err
    assert not (home / "weights").exists()


def test_a_broken_registry_leaves_the_shipped_default_usable(made, home, capsys):
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "imported.json").write_text('{"weights": [')
    model = load_model(MODEL, device="cpu")
    assert model.weights_source.origin == "bundled" and model.weights_source.verified
    assert cli.main(["weights", "list"]) == 2
    assert "deleting it forgets the imported ids" in capsys.readouterr().err


def test_cli_list_names_the_presets_that_load_a_backbone_not_its_hub_id(capsys):
    """The backbone row's MODEL was its 64-character hub id: every row of the table grew that wide."""
    assert cli.main(["weights", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("biomedclip-vit-b16-224"))
    assert "freqmedclip-base, tgcnet-base (backbone)" in row and "hf-hub:" not in row
    assert cli.main(["weights", "list", "--json"]) == 0  # the machine-readable list keeps the id
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["biomedclip-vit-b16-224"]["model"].startswith("hf-hub:")
