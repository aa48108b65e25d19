"""The shipped recipes and the train command's options become the TrainConfig they say."""

import json
from pathlib import Path

import pytest

from TextSegmentLib.cli import build_parser
from TextSegmentLib.cli.train import build_config
from TextSegmentLib.errors import InputError
from TextSegmentLib.training import load_recipe, recipe_chain, reproduce
from TextSegmentLib.training.data import check_sources
from TextSegmentLib.weights import load_manifest

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.json"))  # shipped ones and ablations/
SHIPPED = [entry for entry in load_manifest().entries if entry.kind == "checkpoint" and entry.bundled]


TINY = {"clip_source": "random:textsegment-vit-ti16-text32", "train_vision_tower": True, "train_text_tower": True}


def _config(*argv):
    return build_config(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_is_a_valid_config(recipe, caplog):
    config = _config("--config", str(recipe))
    with caplog.at_level("WARNING"):
        check_sources(config.sources, config.val_sources)  # apart, and off the bench's held-out seeds
    assert not caplog.records
    fields = json.loads(recipe.read_text())
    assert config.model == fields["model"] and config.steps == fields["steps"]
    assert config.sources == tuple(fields["sources"])
    if config.init_weights is not None:  # a later phase starts from shipped weights of the same model
        start = load_manifest().get(config.init_weights)
        assert start is not None and start.model == config.model, config.init_weights


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.id)
def test_every_shipped_model_has_one_chain_of_recipes_back_to_random_weights(entry):
    made_by = entry.recipes_of or entry.id  # weights made by running another id's chain again: that chain
    assert load_manifest().get(made_by).model == entry.model
    chain = recipe_chain(made_by, recipes_dir=RECIPES_DIR)
    assert chain[-1].weights_id == made_by and chain[0].starts_from is None
    assert [phase.starts_from for phase in chain[1:]] == [phase.weights_id for phase in chain[:-1]]
    assert {load_recipe(phase.recipe).model for phase in chain} == {entry.model}


def test_command_line_options_win_over_the_recipe(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"comment": "x", "model": "freqmedclip-tiny", "steps": 50, "presence_weight": 1.0}))
    config = _config("--config", str(recipe), "--steps", "7", "--init", "freqmedclip-tiny-v5", "--out", "runs/x")
    assert (config.steps, config.init_weights, config.out_dir, config.presence_weight) == (7, "freqmedclip-tiny-v5", "runs/x", 1.0)


def test_resume_without_a_recipe_takes_the_runs_saved_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "tgcnet-tiny", "steps": 50, "out_dir": "elsewhere"}))
    config = _config("--out", str(tmp_path), "--resume", "--max-minutes", "5")
    assert (config.model, config.steps, config.out_dir, config.max_minutes) == ("tgcnet-tiny", 50, str(tmp_path), 5.0)
    assert _config("--out", str(tmp_path)).steps == 2000  # a new run: the defaults


def test_a_misspelt_recipe_field_is_named(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "freqmedclip-tiny", "presense_weight": 1.0}))
    with pytest.raises(InputError, match="presense_weight"):
        _config("--config", str(recipe))


def _recipe(folder, name, **fields):
    base = {"comment": "a tiny phase for the tests", "model": "freqmedclip-tiny", "overrides": TINY,
            "sources": ["phantoms:3-4@6x64x64"], "val_sources": ["phantoms:5@6x64x64"], "steps": 2, "batch_size": 2,
            "warmup_steps": 1, "val_every": 2, "val_pairs_per_level": 2, "seed": 1, "out_dir": "runs/not-here"}
    (folder / f"{name}.json").write_text(json.dumps({**base, **fields}))


def test_reproduce_trains_each_phase_from_the_previous_export_and_continues_where_it_stopped(tmp_path):
    from TextSegmentLib.checkpoint import load_checkpoint

    recipes, out = tmp_path / "recipes", tmp_path / "made"
    recipes.mkdir()
    _recipe(recipes, "freqmedclip-tiny-v1")
    _recipe(recipes, "freqmedclip-tiny-v2", init_weights="freqmedclip-tiny-v1", export_mix=0.5, seed=2)
    said = []
    made = reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, report=said.append)
    assert made == out / "freqmedclip-tiny-v2.safetensors"
    first = out / "freqmedclip-tiny-v1.safetensors"
    assert first.is_file() and not (tmp_path / "runs").exists()  # nothing outside out_dir
    _, info = load_checkpoint(made)
    # the second phase started from (and was mixed with) the first phase's own export, not a shipped file
    assert info.metadata["training"]["config"]["init_weights"] == str(first)
    assert info.metadata["mixed_with"]["weights"] == str(first)
    assert info.metadata["reproduces"] == "freqmedclip-tiny-v2"
    assert json.loads((out / "freqmedclip-tiny-v2" / "config.json").read_text())["out_dir"] == str(out / "freqmedclip-tiny-v2")

    # again, after the last export was lost: the first phase is kept, the second's finished run exported again
    made.unlink()
    stamp = first.stat().st_mtime_ns
    said.clear()
    assert reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, report=said.append) == made
    assert first.stat().st_mtime_ns == stamp and made.is_file()
    assert "kept" in said[0] and "resuming" in said[1]


def test_a_quick_check_with_fewer_steps_is_marked_and_never_continued_as_the_real_run(tmp_path):
    from TextSegmentLib.checkpoint import read_checkpoint_info

    recipes, out = tmp_path / "recipes", tmp_path / "check"
    recipes.mkdir()
    _recipe(recipes, "freqmedclip-tiny-v1")
    _recipe(recipes, "freqmedclip-tiny-v2", init_weights="freqmedclip-tiny-v1", seed=2)
    made = reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, steps=1, report=lambda _: None)
    for phase in ("freqmedclip-tiny-v1", "freqmedclip-tiny-v2"):
        assert json.loads((out / phase / "config.json").read_text())["steps"] == 1  # the recipes say 2
        assert read_checkpoint_info(out / f"{phase}.safetensors").metadata["steps_per_phase"] == 1
    with pytest.raises(InputError, match="was made with 1 steps per phase, not the recipes' steps: give another --out"):
        reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, report=lambda _: None)
    made.unlink()
    (out / "freqmedclip-tiny-v1.safetensors").unlink()  # only the run folders are left
    with pytest.raises(InputError, match="holds a run of 1 steps, not 2"):
        reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, report=lambda _: None)
    with pytest.raises(InputError, match="at least 1"):
        reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, steps=0)


def test_broken_chains_are_named(tmp_path):
    _recipe(tmp_path, "a-v2", init_weights="a-v1")
    with pytest.raises(InputError, match=r"no recipe for a-v1 \(the recipe of a-v2 starts from it\)"):
        recipe_chain("a-v2", recipes_dir=tmp_path)
    _recipe(tmp_path, "a-v1", init_weights="a-v2")
    with pytest.raises(InputError, match="loop back to a-v2"):
        recipe_chain("a-v2", recipes_dir=tmp_path)
    _recipe(tmp_path, "a-v1", init_weights="runs/mine.safetensors")
    with pytest.raises(InputError, match="starts from the file"):
        recipe_chain("a-v2", recipes_dir=tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")


def test_reproduce_dry_run_lists_the_shipped_chain(capsys):
    from TextSegmentLib.cli import main

    assert main(["reproduce", "tgcnet-tiny-v9", "--out", "unused", "--recipes", str(RECIPES_DIR), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1. tgcnet-tiny-v2: ") and lines[0].endswith("from random weights")
    assert lines[-1].startswith(f"{len(lines)}. tgcnet-tiny-v9: ") and lines[-1].endswith("from tgcnet-tiny-v8")
    assert not Path("unused").exists()


@pytest.mark.parametrize("field, value, message", [
    ("augment", "false", "augment must be true or false, got 'false'"),
    ("steps", 2.5, "steps must be a whole number, got 2.5"),
    ("sources", "phantoms:0-3", "sources must be a list of texts, got 'phantoms:0-3'"),  # was a source per letter
])
def test_a_recipe_value_of_the_wrong_type_is_named_with_the_recipe(tmp_path, field, value, message):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "freqmedclip-tiny", field: value}))
    with pytest.raises(InputError, match=f"recipe {recipe}: {message}"):
        _config("--config", str(recipe))


def test_a_misspelt_recipe_field_names_the_field_it_resembles(tmp_path):
    # the error listed the unknown field alone: which of TrainConfig's thirty fields was meant?
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "freqmedclip-tiny", "step": 10, "qqq": 1}))
    with pytest.raises(InputError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "unknown field(s) ['qqq', 'step']" in message and "'step': did you mean 'steps'?" in message
    assert "'qqq': did you mean" not in message and "val_every" in message  # the fields there are


def test_a_recipe_from_a_pipe_is_read_not_called_a_folder(tmp_path):
    # `train --config <(jq ... recipe.json)`: the pipe is no regular file, and was refused as "is a folder"
    import os
    import threading

    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)
    recipe = json.dumps({"model": "tgcnet-tiny", "steps": 7})
    writer = threading.Thread(target=lambda: fifo.write_text(recipe), daemon=True)
    writer.start()
    config = load_recipe(fifo)
    writer.join()
    assert (config.model, config.steps) == ("tgcnet-tiny", 7)
    with pytest.raises(InputError, match="is a folder"):
        load_recipe(tmp_path)


def test_weights_made_by_running_another_chain_again_reproduce_that_chain(capsys):
    """freqmedclip-tiny-v9 is freqmedclip-tiny-v8's recipes rerun from scratch: `reproduce` said "no recipe"."""
    from TextSegmentLib.cli import main

    rerun = next(entry for entry in SHIPPED if entry.recipes_of)
    assert main(["reproduce", rerun.id, "--out", "runs/nowhere", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"made by running the recipes of {rerun.recipes_of} again" in captured.err
    lines = captured.out.splitlines()
    assert lines[-1].startswith(f"{len(lines)}. {rerun.recipes_of}: ") and "from random weights" in lines[0]
