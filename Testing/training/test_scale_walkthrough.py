"""A researcher's long jobs: stop, resume, torchrun, a full disk, Ctrl-C, reproduce again (recipes/README.md)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from TextSegmentLib.cli import main
from TextSegmentLib.errors import InputError, TextSegmentError
from TextSegmentLib.training import TrainConfig, TrainResult, train

TINY = {"clip_source": "random:textsegment-vit-ti16-text32", "train_vision_tower": True, "train_text_tower": True}


def _config(out_dir, **changes):
    base = dict(model="freqmedclip-tiny", overrides=TINY, sources=(), val_sources=(), steps=4, batch_size=2,
                warmup_steps=2, lr_new=1e-3, lr_backbone=1e-3, checkpoint_every=100, out_dir=str(out_dir), seed=3)
    return TrainConfig(**{**base, **changes})


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"textsegment {command}: error:") and len(err.splitlines()) == 1, err
    return err


def _recipe(path, **fields):
    base = {"model": "freqmedclip-tiny", "overrides": TINY, "sources": ["phantoms:3-4@6x64x64"],
            "val_sources": ["phantoms:5@6x64x64"], "steps": 2, "batch_size": 2, "warmup_steps": 1, "val_every": 2,
            "val_pairs_per_level": 2, "seed": 1, "out_dir": str(path.parent / "run")}
    path.write_text(json.dumps({**base, **fields}))
    return path


# train --resume ----------------------------------------------------------------------------------
def _no_training(monkeypatch):
    from TextSegmentLib import training

    def train(*args, **kwargs):
        pytest.fail("it trained")

    monkeypatch.setattr(training, "train", train)


def test_resume_of_a_folder_with_no_run_and_no_config_is_refused(tmp_path, capsys, monkeypatch):
    """A mistyped --out with --resume trained the default model (freqmedclip-tiny, 2000 steps) from step 0."""
    _no_training(monkeypatch)
    out = tmp_path / "runs" / "fmc-v4-typo"
    assert main(["train", "--resume", "--out", str(out), "--threads", "1", "--quiet"]) == 2
    assert "holds no run (no config.json)" in _one_line_error(capsys, "train")
    assert not out.exists()


def test_resume_from_the_runs_config_does_not_inherit_the_last_sessions_time_budget(tmp_path):
    """``train --resume --out X`` stopped again after the first session's --max-minutes, without being asked."""
    from TextSegmentLib.cli import build_parser
    from TextSegmentLib.cli.train import build_config

    saved = dataclasses.asdict(_config(tmp_path, max_minutes=0.1, stop_after=3))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    parser = build_parser()
    config = build_config(parser.parse_args(["train", "--resume", "--out", str(tmp_path)]))
    assert (config.max_minutes, config.stop_after, config.steps) == (None, None, 4)
    config = build_config(parser.parse_args(["train", "--resume", "--out", str(tmp_path), "--max-minutes", "60"]))
    assert config.max_minutes == 60.0


def test_resume_from_another_networks_or_a_damaged_checkpoint_is_one_line(tiny_pool, tmp_path):
    """A page of torch's missing-key names (another model's last.pt) or "Unsupported operand 103" (a damaged one)."""
    run = tmp_path / "run"
    train(_config(run, stop_after=1), pools=(tiny_pool, None))
    torch.save({"model": {"other.weight": torch.zeros(2)}, "optimizer": {}}, run / "last.pt")
    with pytest.raises(InputError, match=r"last.pt: it holds another network than freqmedclip-tiny"):
        train(_config(run), resume=True, pools=(tiny_pool, None))
    (run / "last.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"cannot resume from .*last.pt: not a training checkpoint"):
        train(_config(run), resume=True, pools=(tiny_pool, None))
    assert (run / "last.pt").read_bytes() == b"garbage"  # nothing replaced


def test_a_failed_checkpoint_write_keeps_the_last_good_one_and_says_so(tiny_pool, tmp_path, monkeypatch):
    """A full disk: torch's "unexpected pos 31943168" traceback, and its half-written last.tmp left on the disk."""
    from TextSegmentLib.training import trainer

    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(state, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(state, path)
        open(path, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 31943168 vs 31943120")

    monkeypatch.setattr(trainer.torch, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    with pytest.raises(TextSegmentError, match=r"could not write .*last.pt \(disk full.*the previous last.pt is kept"):
        train(_config(run, checkpoint_every=1), pools=(tiny_pool, None))
    monkeypatch.setattr(trainer.torch, "save", real_save)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1
    assert not [path.name for path in run.iterdir() if path.name.startswith(".")]  # no half-written temporary file


def test_a_run_stopped_and_resumed_picks_its_best_weights_as_one_run_straight_through(tiny_pool, tmp_path):
    """The stop validated too: a stop's weights could become best.safetensors, so the export differed."""
    options = dict(val_every=2, val_pairs_per_level=1)
    whole = train(_config(tmp_path / "whole", **options), pools=(tiny_pool, tiny_pool))
    train(_config(tmp_path / "parts", stop_after=1, **options), pools=(tiny_pool, tiny_pool))
    parts = train(_config(tmp_path / "parts", **options), resume=True, pools=(tiny_pool, tiny_pool))
    assert parts.history["val_step"] == whole.history["val_step"] == [2, 4]
    assert parts.history["val"] == whole.history["val"]


# train's report and export -----------------------------------------------------------------------
def _fake_train(tmp_path, *, finished: bool, is_main: bool):
    run = tmp_path / "run"

    def fake(config, *, resume=False, progress=None):
        run.mkdir(exist_ok=True)
        best = run / "best.safetensors"
        from TextSegmentLib.checkpoint import save_checkpoint
        from TextSegmentLib.models import create_model

        save_checkpoint(create_model("freqmedclip-tiny", **TINY), best, model_name="freqmedclip-tiny", overwrite=True)
        history = {"step": [1], "loss": [1.0], "lr": [1e-3], "val_step": [1], "val": [{"mean": 0.5}]}
        return TrainResult(1, finished, history, best, run, is_main=is_main)

    return fake


def test_only_rank_0_reports_and_exports_under_torchrun(tmp_path, capsys, monkeypatch):
    """Both ranks exported one file: rank 1 failed ("exists already") and torchrun called the job FAILED."""
    from TextSegmentLib import training

    monkeypatch.setattr(training, "train", _fake_train(tmp_path, finished=True, is_main=False))
    export = tmp_path / "made.safetensors"
    assert main(["train", "--config", str(_recipe(tmp_path / "r.json")), "--quiet", "--export", str(export)]) == 0
    assert capsys.readouterr().out == "" and not export.exists()


def test_a_stopped_run_exports_nothing_and_says_why_it_stopped(tmp_path, capsys, monkeypatch):
    """A stop wrote half-trained weights onto --export (the recipes': the shipped file); the resume was then refused."""
    from TextSegmentLib import training

    monkeypatch.setattr(training, "train", _fake_train(tmp_path, finished=False, is_main=True))
    export = tmp_path / "made.safetensors"
    recipe = _recipe(tmp_path / "r.json")
    assert main(["train", "--config", str(recipe), "--quiet", "--max-minutes", "5", "--export", str(export)]) == 0
    out = capsys.readouterr().out
    assert "stopped after its --max-minutes 5 (continue with --resume" in out and "not exported" in out
    assert not export.exists()


def test_an_out_folder_holding_files_of_the_users_is_refused(tmp_path, capsys, monkeypatch):
    """Its config.json and curves.png were replaced without a word."""
    _no_training(monkeypatch)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    recipe = _recipe(tmp_path / "r.json")
    assert main(["train", "--config", str(recipe), "--out", str(out), "--threads", "1", "--quiet"]) == 2
    assert "holds config.json" in _one_line_error(capsys, "train")
    assert (out / "config.json").read_text() == '{"my": "settings"}' and len(list(out.iterdir())) == 1


# reproduce ----------------------------------------------------------------------------------------
def _chain(folder):
    folder.mkdir()
    _recipe(folder / "freqmedclip-tiny-v1.json")
    _recipe(folder / "freqmedclip-tiny-v2.json", init_weights="freqmedclip-tiny-v1")
    return folder


def test_reproduce_under_torchrun_is_refused_before_training(tmp_path, monkeypatch):
    """Every rank exported phase 1's file; rank 1 failed and took the job down."""
    from TextSegmentLib.training import reproduce

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="reproduce runs in one process, not under torchrun"):
        reproduce("freqmedclip-tiny-v2", out_dir=tmp_path / "out", recipes_dir=_chain(tmp_path / "recipes"))
    assert not (tmp_path / "out").exists()


def test_reproduce_interrupted_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from TextSegmentLib import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "reproduce", interrupted)
    code = main(["reproduce", "freqmedclip-tiny-v2", "--recipes", str(_chain(tmp_path / "recipes")),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 130 and "run the same command again to continue" in capsys.readouterr().err


def test_reproduce_dry_run_shows_the_steps_it_would_train_and_what_out_holds(tmp_path, capsys):
    """It listed the recipes' 12,000 steps for a --steps 2 check, and not which phases --out already held."""
    out = tmp_path / "out"
    (out / "freqmedclip-tiny-v2").mkdir(parents=True)
    (out / "freqmedclip-tiny-v1.safetensors").write_bytes(b"phase 1's export")
    (out / "freqmedclip-tiny-v2" / "last.pt").write_bytes(b"phase 2's run")
    assert main(["reproduce", "freqmedclip-tiny-v2", "--recipes", str(_chain(tmp_path / "recipes")), "--out", str(out),
                 "--steps", "1", "--dry-run"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "kept (" in first and first.endswith("1 steps from random weights")
    assert "resumes " in second and second.endswith("1 steps from freqmedclip-tiny-v1")


@pytest.mark.parametrize("change, message", [
    ({"threads": 0}, "threads must be at least 1, got 0"),  # ran on every core of a shared machine, without a word
    ({"threads": -1}, "threads must be at least 1, got -1"),  # torch's RuntimeError traceback
    ({"max_minutes": -5.0}, "max_minutes must be more than 0"),  # stopped after one step, as if out of time
])
def test_a_thread_count_or_time_budget_that_means_nothing_is_refused(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        train(_config(tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_progress_of_a_resumed_run_says_the_time_left_at_this_sessions_pace(tiny_pool, tmp_path, monkeypatch):
    """After a resume the bar jumped to its fraction in a second and promised the remaining hours in no time."""
    import types

    from TextSegmentLib.training import trainer

    train(_config(tmp_path / "run", stop_after=2), pools=(tiny_pool, None))
    clock = iter([0.0, 0.0, 10.0, 20.0])  # the call, the first step's start, then each step: 10 s a step
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    said = []
    train(_config(tmp_path / "run"), resume=True, pools=(tiny_pool, None), progress=lambda f, m: said.append(m))
    assert said[0].startswith("step 3/4 loss") and said[0].endswith(", 10 s left")  # one step of 10 s to go
    assert said[1].startswith("step 4/4 loss") and "left" not in said[1]


def test_reproduce_continues_when_out_is_named_another_way(tmp_path, monkeypatch):
    """Run again with --out as an absolute path (a job script's $PWD/...), resuming was refused: init_weights differed."""
    from TextSegmentLib.training import reproduce
    from TextSegmentLib.training.recipes import phase_state, recipe_chain

    recipes = _chain(tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    made = reproduce("freqmedclip-tiny-v2", out_dir="made", recipes_dir=recipes, threads=1, report=lambda _: None)
    made.unlink()  # the last phase's run is there, its export is not: the next call resumes that run
    last_phase = recipe_chain("freqmedclip-tiny-v2", recipes_dir=recipes)[-1]
    assert phase_state(last_phase, out_dir="made").endswith("last.pt at step 2")  # what --dry-run prints
    said = []
    again = reproduce("freqmedclip-tiny-v2", out_dir=tmp_path / "made", recipes_dir=recipes, threads=1,
                      report=said.append)
    assert again == tmp_path / "made" / "freqmedclip-tiny-v2.safetensors" and again.is_file()
    assert "resuming at step 2 of 2 into" in said[1]  # the step it stood at, not only the phase's length


def test_a_resume_on_a_full_disk_keeps_the_runs_config_json(tiny_pool, tmp_path, monkeypatch):
    """config.json was rewritten in place: on a full disk it was left empty, and the run could not be resumed again."""
    from pathlib import Path

    run = tmp_path / "run"
    train(_config(run, stop_after=1), pools=(tiny_pool, None))
    saved = (run / "config.json").read_text()
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.parent == run and "config.json" in self.name:
            real_write(self, text[:10])
            raise OSError(28, "No space left on device")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(TextSegmentError, match=r"could not write .*config.json \(disk full"):
        train(_config(run), resume=True, pools=(tiny_pool, None))
    monkeypatch.setattr(Path, "write_text", real_write)
    assert (run / "config.json").read_text() == saved and sorted(p.name for p in run.iterdir()) == [
        "config.json", "curves.png", "last.pt"]
    assert train(_config(run), resume=True, pools=(tiny_pool, None)).finished  # room again: it continues


def test_the_time_budget_counts_from_the_start_of_the_run_loading_included(tiny_pool, tmp_path, monkeypatch):
    """The clock started after the data and model were loaded: a job with a 60-minute limit and --max-minutes 55
    was killed when loading took more than five minutes, past its last checkpoint."""
    import types

    from TextSegmentLib.training import trainer

    clock = iter([0.0] + [6 * 60.0] * 10)  # the call; then six minutes have gone by, on loading
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    result = train(_config(tmp_path / "run", max_minutes=5.0), pools=(tiny_pool, None))
    assert (result.step, result.finished) == (1, False)


def test_reproduces_progress_names_the_phase(tmp_path):
    """The bar went from 0 to 100 % once per phase, saying only "step 1/2": which of eight phases was it?"""
    from TextSegmentLib.training import reproduce

    said = []
    reproduce("freqmedclip-tiny-v2", out_dir=tmp_path / "made", recipes_dir=_chain(tmp_path / "recipes"), threads=1,
              steps=1, report=lambda _: None, progress=lambda fraction, message: said.append(message))
    assert [m.split(" loss")[0] for m in said] == ["1/2 freqmedclip-tiny-v1: step 1/1", "2/2 freqmedclip-tiny-v2: step 1/1"]


def test_a_run_of_two_processes_resumed_in_one_is_refused(tiny_pool, tmp_path):
    """It went on at half the batch, with rank 0's sampler alone, as if it were the same run (rank 1's was dropped)."""
    run = tmp_path / "run"
    train(_config(run, stop_after=1), pools=(tiny_pool, None))
    state = torch.load(run / "last.pt", weights_only=True)
    ranks = json.loads(state["rank_rng"])
    state["rank_rng"] = json.dumps(ranks * 2)  # as torchrun --nproc-per-node 2 saves it: one sampler per process
    torch.save(state, run / "last.pt")
    with pytest.raises(InputError, match=r"in one process: it was trained by 2 torchrun processes \(--nproc-per-node 2\)"):
        train(_config(run), resume=True, pools=(tiny_pool, None))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1  # nothing trained, nothing replaced


# two runs in one folder --------------------------------------------------------------------------
def test_a_second_run_into_a_folder_another_live_run_writes_is_refused(tiny_pool, tmp_path):
    """A command started twice put two runs into one --out: both wrote its last.pt and best weights."""
    import os
    import socket

    from TextSegmentLib.training.run_lock import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process: pytest's parent
    with pytest.raises(InputError, match=r"another training run \(process \d+ on .*\) is writing there"):
        train(_config(run, stop_after=1), pools=(tiny_pool, None))
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing of the refused run, the lock not taken


def test_the_lock_of_a_run_killed_outright_is_taken_over_and_released_at_the_end(tiny_pool, tmp_path, caplog):
    import socket
    import subprocess
    import sys

    from TextSegmentLib.training.run_lock import LOCK_NAME

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{socket.gethostname()} {gone.stdout.strip()}")
    result = train(_config(run, stop_after=1), pools=(tiny_pool, None))
    assert result.step == 1 and not (run / LOCK_NAME).exists()
    assert "no longer runs" in caplog.text


def test_a_run_refused_before_it_wrote_anything_leaves_no_new_folder(tmp_path):
    from TextSegmentLib.training.run_lock import run_lock

    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with run_lock(out):
            raise RuntimeError("refused while loading its data")
    assert not (tmp_path / "new").exists()


def test_reproduce_dry_run_says_when_the_run_would_refuse_out(tmp_path, capsys):
    """After a --steps 1 check, --dry-run without --steps said "kept" for every phase; the run then refused --out."""
    from TextSegmentLib.training import reproduce

    recipes, out = _chain(tmp_path / "recipes"), tmp_path / "out"
    reproduce("freqmedclip-tiny-v2", out_dir=out, recipes_dir=recipes, threads=1, steps=1, report=lambda _: None)
    command = ["reproduce", "freqmedclip-tiny-v2", "--recipes", str(recipes), "--out", str(out), "--dry-run"]
    assert main(command) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "refused (" in first and "made with 1 steps per phase, not the recipes' steps" in first
    assert main([*command, "--steps", "1"]) == 0 and "kept (" in capsys.readouterr().out.splitlines()[0]

    (out / "freqmedclip-tiny-v1.safetensors").unlink()  # phase 1's run folder, of 1 step, is left
    assert main(command) == 0
    assert "holds a run of 1 steps, not 2: give another --out folder" in capsys.readouterr().out.splitlines()[0]


def test_reproduce_dry_run_refuses_steps_the_run_refuses(tmp_path, capsys):
    """--dry-run --steps 0 listed "0 steps" for every phase and exited 0; the run itself refused --steps 0."""
    code = main(["reproduce", "freqmedclip-tiny-v2", "--recipes", str(_chain(tmp_path / "recipes")),
                 "--out", str(tmp_path / "out"), "--steps", "0", "--dry-run"])
    assert code == 2 and "steps per phase must be at least 1, got 0" in _one_line_error(capsys, "reproduce")
