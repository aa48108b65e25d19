"""The shipped recipes and the train command's options become the TrainConfig they say."""

import json
from pathlib import Path

import pytest

from TextSegmentLib.cli import build_parser
from TextSegmentLib.cli.train import build_config
from TextSegmentLib.errors import InputError
from TextSegmentLib.weights import load_manifest

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.json"))  # shipped ones and ablations/


def _config(*argv):
    return build_config(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    config = _config("--config", str(recipe))
    fields = json.loads(recipe.read_text())
    assert config.model == fields["model"] and config.steps == fields["steps"]
    assert config.sources == tuple(fields["sources"])
    # from scratch, or a second phase on shipped weights that are themselves one recipe from scratch
    if config.init_weights is not None:
        start = load_manifest().get(config.init_weights)
        assert start is not None and start.model == config.model, config.init_weights
        first_phases = [json.loads(r.read_text()) for r in RECIPES]
        assert any(f.get("init_weights") is None and f["model"] == start.model for f in first_phases)


def test_command_line_options_win_over_the_recipe(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"comment": "x", "model": "freqmedclip-tiny", "steps": 50, "presence_weight": 1.0}))
    config = _config("--config", str(recipe), "--steps", "7", "--init", "freqmedclip-tiny-v5", "--out", "runs/x")
    assert (config.steps, config.init_weights, config.out_dir, config.presence_weight) == (7, "freqmedclip-tiny-v5", "runs/x", 1.0)


def test_a_misspelt_recipe_field_is_named(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "freqmedclip-tiny", "presense_weight": 1.0}))
    with pytest.raises(InputError, match="presense_weight"):
        _config("--config", str(recipe))
