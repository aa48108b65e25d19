import json
import math

import numpy as np
import pytest
import torch

from TextSegmentLib.checkpoint import load_checkpoint, save_checkpoint
from TextSegmentLib.models import create_model
from TextSegmentLib.training import (
    TrainConfig, export_weights, lr_factor, per_image_dice_loss, presence_loss, segmentation_loss, soft_dice_loss, train,
)
from TextSegmentLib.training.trainer import build_optimizer

TINY_OVERRIDES = {"clip_source": "random:textsegment-vit-ti16-text32", "train_vision_tower": True, "train_text_tower": True}


def test_dice_loss_edges():
    truth = torch.zeros(2, 1, 8, 8)
    truth[0, :, 2:5, 2:5] = 1
    perfect = truth * 40 - 20
    assert soft_dice_loss(perfect, truth) < 1e-3
    # wrong everywhere; only the non-empty image counts: 55 false pixels, 9 missed, smoothing 1
    assert float(soft_dice_loss(-perfect, truth)) == pytest.approx(1 - 1 / (55 + 9 + 1), rel=1e-4)
    assert float(soft_dice_loss(torch.full((2, 1, 8, 8), 5.0), torch.zeros(2, 1, 8, 8))) == 0.0  # empty: BCE's job
    parts = segmentation_loss(perfect, truth)
    assert math.isclose(float(parts.total), float(parts.dice + parts.bce), rel_tol=1e-6)


def test_per_image_dice_loss_is_nan_where_there_is_nothing_to_score():
    truth = torch.zeros(3, 1, 8, 8)
    truth[0, :, 2:5, 2:5] = 1
    truth[2, :, 0:2, 0:2] = 1
    logits = torch.randn(3, 1, 8, 8)
    per_image = per_image_dice_loss(logits, truth)
    assert torch.isnan(per_image[1]) and not torch.isnan(per_image[[0, 2]]).any()
    assert float(soft_dice_loss(logits, truth)) == pytest.approx(float(per_image[[0, 2]].mean()), rel=1e-6)
    probs = torch.sigmoid(logits[2, 0])
    by_hand = 1 - (2 * probs[0:2, 0:2].sum() + 1) / (probs.sum() + 4 + 1)
    assert float(per_image[2]) == pytest.approx(float(by_hand), rel=1e-5)


def test_presence_term_scores_each_image_once():
    # 10 x 50 = 500 pixels: k = round(0.002 * 500) = 1, so the pooled logit is the maximum
    logits = torch.full((2, 1, 10, 50), -6.0)
    masks = torch.zeros(2, 1, 10, 50)
    masks[0, :, 2:4, 2:4] = 1  # image 0 shows the target, image 1 does not
    logits[0, :, 2:4, 2:4] = 2.0
    logits[1, :, 5, 7] = 3.0  # a confident false pixel where the target is absent
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(3.0))) / 2
    assert float(presence_loss(logits, masks)) == pytest.approx(expected, rel=1e-5)
    # a false region costs the same per image however few pixels it has: pixel-mean BCE does not
    clean = logits.clone()
    clean[1, :, 5, 7] = -6.0
    assert float(presence_loss(logits, masks)) > float(presence_loss(clean, masks)) + 1.0
    # 1000 pixels: k = 2, the mean of the two largest
    wide = torch.full((1, 1, 20, 50), -4.0)
    wide[0, 0, 0, :2] = torch.tensor([1.0, 3.0])
    assert float(presence_loss(wide, torch.zeros(1, 1, 20, 50))) == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-5)
    # off by default; when on, it adds to the total with its weight
    assert segmentation_loss(logits, masks).presence is None
    parts = segmentation_loss(logits, masks, presence_weight=0.5)
    assert float(parts.total) == pytest.approx(float(parts.dice + parts.bce + 0.5 * parts.presence), rel=1e-6)


def test_lr_schedule_warms_up_then_decays():
    values = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert math.isclose(lr_factor(100, total=100, warmup=10, min_ratio=0.1), 0.1)


def test_parameter_groups_get_their_learning_rates():
    model = create_model("freqmedclip-tiny", clip_source="random:textsegment-vit-ti16-text32")  # towers mostly frozen
    optimizer = build_optimizer(model, TrainConfig(lr_new=1e-4, lr_backbone=1e-5))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"new": 1e-4, "backbone": 1e-5}
    backbone = next(g for g in optimizer.param_groups if g["name"] == "backbone")["params"]
    assert {id(p) for p in backbone} == {id(p) for p in model.parameter_groups()["backbone"]}


def test_a_few_steps_lower_the_loss_on_a_tiny_batch(tiny_pool):
    torch.manual_seed(0)
    model = create_model("freqmedclip-tiny", **TINY_OVERRIDES).train()
    optimizer = build_optimizer(model, TrainConfig(lr_new=1e-3, lr_backbone=1e-3))
    rng = np.random.default_rng(0)
    picks = [p for p in tiny_pool.sample(rng, 40) if p[1].level == "L1" and tiny_pool.mask(*p).any()][:2]
    batch = tiny_pool.batch(picks)
    losses = []
    for _ in range(6):
        loss = segmentation_loss(model(batch.images, model.encode_text(batch.prompts)).logits, batch.masks).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def _config(out_dir, **changes):
    base = dict(model="freqmedclip-tiny", overrides=TINY_OVERRIDES, sources=(), val_sources=(), steps=4, batch_size=2,
                warmup_steps=2, lr_new=1e-3, lr_backbone=1e-3, checkpoint_every=100, out_dir=str(out_dir), seed=3)
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.parametrize("hard_mining", [0.0, 0.9])
def test_resume_continues_the_schedule(tiny_pool, tmp_path, hard_mining):
    whole = train(_config(tmp_path / "whole", hard_mining=hard_mining), pools=(tiny_pool, None))
    learnt = dict(tiny_pool.difficulty)
    first = train(_config(tmp_path / "parts", stop_after=2, hard_mining=hard_mining), pools=(tiny_pool, None))
    assert (first.step, first.finished) == (2, False)
    tiny_pool.difficulty = {"not this run's": 1.0}  # resume must bring back the run's own difficulties
    second = train(_config(tmp_path / "parts", hard_mining=hard_mining), resume=True, pools=(tiny_pool, None))
    assert tiny_pool.difficulty == learnt and (hard_mining == 0) == (not learnt)
    assert (second.step, second.finished) == (4, True)
    assert second.history["step"] == [1, 2, 3, 4]
    assert second.history["lr"] == whole.history["lr"]  # the very same warm-up + cosine
    np.testing.assert_allclose(second.history["loss"], whole.history["loss"], rtol=1e-3)  # same batches too
    assert (tmp_path / "parts" / "curves.png").stat().st_size > 0

    # the shipped form: fp16 on disk (about half the bytes), fp32 again once loaded
    full = tmp_path / "full.safetensors"
    save_checkpoint(second.model, full, model_name="freqmedclip-tiny")
    small = export_weights(full, tmp_path / "small.safetensors", metadata={"licence": "test"})
    assert small.path.stat().st_size < 0.55 * full.stat().st_size
    loaded, info = load_checkpoint(small.path)
    assert info.metadata["stored_dtype"] == "float16" and info.metadata["licence"] == "test"
    for (key, value), trained in zip(loaded.state_dict().items(), second.model.state_dict().values()):
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, trained, atol=2e-3, rtol=2e-3)


def test_a_run_writes_the_files_the_module_docstring_names_and_no_other(tiny_pool, tmp_path):
    # the docstring named a history.json that no run wrote (the history lives in last.pt)
    import re

    from TextSegmentLib.training import trainer

    files_paragraph = trainer.__doc__.split("Files in ``out_dir``:")[1]
    named = set(re.findall(r"``(\w+\.(?:pt|safetensors|json|png))``", files_paragraph))
    result = train(_config(tmp_path / "run", steps=1, val_pairs_per_level=1), pools=(tiny_pool, tiny_pool))
    assert result.best_path is not None
    assert named == {p.name for p in (tmp_path / "run").iterdir()}
    assert "history" in torch.load(tmp_path / "run" / "last.pt", weights_only=True)


def test_history_records_the_learning_rate_each_step_used(tiny_pool, tmp_path):
    result = train(_config(tmp_path / "run"), pools=(tiny_pool, None))
    expected = [1e-3 * lr_factor(s, total=4, warmup=2, min_ratio=0.02) for s in range(4)]
    assert result.history["lr"] == pytest.approx(expected)  # step 1 trained at half the rate: warm-up


def test_resume_with_another_config_is_refused_and_config_json_kept(tiny_pool, tmp_path):
    from TextSegmentLib.errors import InputError

    train(_config(tmp_path / "run", stop_after=1), pools=(tiny_pool, None))
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(InputError, match=r"lr_new: saved 0.001, now 0.01; seed: saved 3, now 4\).* another out_dir "
                                         r"\(CLI: --out\)"):
        train(_config(tmp_path / "run", lr_new=1e-2, seed=4), resume=True, pools=(tiny_pool, None))
    assert (tmp_path / "run" / "config.json").read_text() == saved
    # how long and with how many threads it runs may change; config.json then records what this part used
    result = train(_config(tmp_path / "run", max_minutes=30.0, threads=1), resume=True, pools=(tiny_pool, None))
    assert result.finished
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_minutes"] == 30.0


def test_resume_without_the_runs_config_json_is_refused(tiny_pool, tmp_path):
    """A last.pt copied into a folder without its config.json resumed under any settings, unchecked."""
    from TextSegmentLib.errors import InputError

    train(_config(tmp_path / "run", stop_after=1), pools=(tiny_pool, None))
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(InputError, match="last.pt has no config.json beside it"):
        train(_config(tmp_path / "run", lr_new=1e-2), resume=True, pools=(tiny_pool, None))
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json is not readable JSON"):
        train(_config(tmp_path / "run"), resume=True, pools=(tiny_pool, None))


def test_resume_restores_torchs_rng_and_the_grad_scaler(tiny_pool, tmp_path, monkeypatch):
    from TextSegmentLib.training import trainer

    draws, scalers = [], []

    class CountingScaler:  # AMP's GradScaler runs on CUDA only; this one counts its updates anywhere
        def __init__(self, *args, **kwargs):
            self.updates = 0
            scalers.append(self)

        def is_enabled(self):
            return True

        def scale(self, loss):
            return loss

        def unscale_(self, optimizer):
            pass

        def step(self, optimizer):
            optimizer.step()

        def update(self):
            self.updates += 1

        def state_dict(self):
            return {"updates": self.updates}

        def load_state_dict(self, state):
            self.updates = state["updates"]

    plain_augment = trainer.augment

    def drawing_augment(batch, rng, **options):  # stands for dropout and the like: torch's generator
        draws.append(float(torch.rand(())))
        return plain_augment(batch, rng, **options)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    monkeypatch.setattr(trainer, "augment", drawing_augment)
    train(_config(tmp_path / "whole"), pools=(tiny_pool, None))
    whole = list(draws)
    draws.clear()
    train(_config(tmp_path / "parts", stop_after=2), pools=(tiny_pool, None))
    train(_config(tmp_path / "parts"), resume=True, pools=(tiny_pool, None))
    assert draws == whole and scalers[-1].updates == scalers[0].updates == 4

    # a checkpoint from before these were saved still resumes (torch's generator from the seed)
    train(_config(tmp_path / "old", stop_after=2), pools=(tiny_pool, None))
    state = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    del state["rank_torch_rng"], state["scaler"]
    torch.save(state, tmp_path / "old" / "last.pt")
    assert train(_config(tmp_path / "old"), resume=True, pools=(tiny_pool, None)).finished


def test_degenerate_level_weights_are_refused_before_training(tiny_pool, tmp_path):
    from TextSegmentLib.errors import InputError

    with pytest.raises(InputError, match="all zero"):
        train(_config(tmp_path / "run", level_weights={"L1": 0.0, "L2": 0.0, "L3": 0.0, "negative": 0.0}),
              pools=(tiny_pool, None))
    with pytest.raises(InputError, match=r"unknown level\(s\) \['l1'\]"):
        train(_config(tmp_path / "run", level_weights={"l1": 1.0}), pools=(tiny_pool, None))
    with pytest.raises(InputError, match=r"real_fraction must lie in \[0, 1\], got 1.5"):
        train(_config(tmp_path / "run", real_fraction=1.5), pools=(tiny_pool, None))
    with pytest.raises(InputError, match="overlap: phantom seed 5 at 32x128x128"):
        train(_config(tmp_path / "run", sources=("phantoms:0-5",), val_sources=("phantoms:5@32x128x128",)))
    assert not (tmp_path / "run").exists()


def test_fine_tuning_starts_from_the_given_weights(tiny_pool, tmp_path):
    torch.manual_seed(11)
    start = create_model("freqmedclip-tiny", **TINY_OVERRIDES)
    start.set_band_statistics(torch.full((12,), 0.25), torch.full((12,), 2.0))
    path = tmp_path / "start.safetensors"
    save_checkpoint(start, path, model_name="freqmedclip-tiny")
    # learning rates of zero: after the steps the model is still exactly the one it started from
    result = train(_config(tmp_path / "ft", steps=2, lr_new=0.0, lr_backbone=0.0, init_weights=str(path)),
                   pools=(tiny_pool, None))
    for (key, value), tuned in zip(start.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(value, tuned.cpu()), key  # band statistics included: fine-tuning keeps the model's own
    fresh = train(_config(tmp_path / "fresh", steps=2, lr_new=0.0, lr_backbone=0.0), pools=(tiny_pool, None))
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(start.state_dict().values(), fresh.model.state_dict().values()))


def test_export_can_mix_the_trained_weights_with_the_starting_ones(tmp_path):
    torch.manual_seed(1)
    trained, start = (create_model("freqmedclip-tiny", **TINY_OVERRIDES) for _ in range(2))
    save_checkpoint(trained, tmp_path / "trained.safetensors", model_name="freqmedclip-tiny")
    save_checkpoint(start, tmp_path / "start.safetensors", model_name="freqmedclip-tiny")
    mixed = export_weights(tmp_path / "trained.safetensors", tmp_path / "mixed.safetensors",
                           mix_with=str(tmp_path / "start.safetensors"), mix=0.25)
    assert mixed.metadata["mixed_with"] == {"weights": str(tmp_path / "start.safetensors"), "share_of_trained": 0.25}
    loaded, _ = load_checkpoint(mixed.path)
    a, b = trained.state_dict(), start.state_dict()
    floats = [key for key, value in loaded.state_dict().items() if value.is_floating_point()]
    assert any(not torch.equal(a[key], b[key]) for key in floats)  # the two really differ
    for key in floats:
        torch.testing.assert_close(loaded.state_dict()[key], 0.25 * a[key] + 0.75 * b[key], atol=2e-3, rtol=2e-3)


def test_a_mix_that_cannot_be_made_fails_with_the_reason(tmp_path, tiny_pool):
    from TextSegmentLib.errors import InputError, WeightsError

    torch.manual_seed(2)
    save_checkpoint(create_model("freqmedclip-tiny", **TINY_OVERRIDES), tmp_path / "a.safetensors", model_name="freqmedclip-tiny")
    other = create_model("freqmedclip-tiny", clip_source="random:textsegment-vit-ti16-text256")
    save_checkpoint(other, tmp_path / "b.safetensors", model_name="freqmedclip-tiny")
    with pytest.raises(WeightsError, match="not the same freqmedclip-tiny network"):
        export_weights(tmp_path / "a.safetensors", tmp_path / "x.safetensors", mix_with=str(tmp_path / "b.safetensors"), mix=0.5)
    with pytest.raises(InputError, match="needs the weights to mix with"):
        export_weights(tmp_path / "a.safetensors", tmp_path / "x.safetensors", mix=0.5)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        export_weights(tmp_path / "a.safetensors", tmp_path / "x.safetensors", mix_with=str(tmp_path / "a.safetensors"), mix=0.0)
    assert not (tmp_path / "x.safetensors").exists()
    # a recipe that could not be exported fails before a single step is trained
    with pytest.raises(InputError, match=r"set init_weights \(CLI: --init\) too"):
        train(_config(tmp_path / "run", export_mix=0.5), pools=(tiny_pool, None))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"steps": "2"}, r"steps must be a whole number, got '2'"),  # TypeError at the first comparison
    ({"steps": 2.5}, r"steps must be a whole number, got 2.5"),  # ran 3 steps, "finished at step 3/2.5"
    ({"augment": "false"}, r"augment must be true or false, got 'false'"),  # a non-empty string: augmented
    ({"lr_new": "1e-4"}, r"lr_new must be a number"),  # TypeError in the scheduler
    ({"level_weights": {"L1": "1"}}, r"level_weights must be an object of numbers"),
    ({"real_fraction": "0.2"}, r"real_fraction must be a number or null"),
    ({"steps": 0}, r"steps must be at least 1, got 0"),  # "finished at step 0/0"
    ({"batch_size": 0}, r"batch_size must be at least 1"),  # ValueError in np.stack
    ({"val_every": 0}, r"val_every must be at least 1"),  # ZeroDivisionError after the first step
    ({"checkpoint_every": 0}, r"checkpoint_every must be at least 1"),
    ({"warmup_steps": -1}, r"warmup_steps must be 0 or more"),
])
def test_a_config_of_the_wrong_type_or_a_count_below_one_is_refused_before_training(tiny_pool, tmp_path, change, message):
    from TextSegmentLib.errors import InputError

    with pytest.raises(InputError, match=message):
        train(_config(tmp_path / "run", **change), pools=(tiny_pool, tiny_pool))
    assert not (tmp_path / "run").exists()


def test_a_run_without_sources_is_refused_before_training(tmp_path):
    from TextSegmentLib.errors import InputError

    with pytest.raises(InputError, match="no training data: sources is empty"):  # was torch.cat's ValueError
        train(_config(tmp_path / "run", sources=()))


def test_a_run_that_never_validated_reports_no_best_weights_of_an_earlier_run(tiny_pool, tmp_path):
    """best_path pointed at the best.safetensors an earlier run left in the folder, as if this run made it."""
    first = train(_config(tmp_path / "run", steps=1, val_pairs_per_level=1), pools=(tiny_pool, tiny_pool))
    assert first.best_path is not None
    again = train(_config(tmp_path / "run", steps=1), pools=(tiny_pool, None))
    assert again.best_path is None
