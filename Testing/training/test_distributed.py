import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    import torch
    from TextSegmentLib.training import TrainConfig, build_pool, phantom_cases, train
    out = sys.argv[1]
    pool = build_pool(phantom_cases([3], shape=(4, 48, 48)), size=128, pyramid_seeds=(0,))
    config = TrainConfig(model="freqmedclip-tiny", overrides={"clip_source": "random:textsegment-vit-ti16-text32",
                         "train_vision_tower": True, "train_text_tower": True}, sources=(), val_sources=(),
                         steps=2, batch_size=2, warmup_steps=1, lr_new=1e-3, lr_backbone=1e-3, threads=1, out_dir=out)
    rank = os.environ["RANK"]
    result = train(config, pools=(pool, None))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
    open(os.path.join(out, f"rank{rank}.txt"), "w").write(f"{os.environ['WORLD_SIZE']} {result.step} {digest}")
    """
)


def test_two_process_ddp_on_cpu_with_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [r[:2] for r in ranks] == [["2", "2"], ["2", "2"]]
    assert ranks[0][2] == ranks[1][2]  # gradients were averaged: the replicas stayed identical
    assert (out / "last.pt").is_file()  # rank 0 saved


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from TextSegmentLib.training import TrainConfig, build_pool, phantom_cases, train
    from TextSegmentLib.training.data import SlicePool
    out, log, stop_after, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
    rank = os.environ["RANK"]
    draw = SlicePool.sample

    def sample(self, rng, batch_size, **options):  # write down each rank's training batches
        picks = draw(self, rng, batch_size, **options)
        if options.get("level_weights") and len(options["level_weights"]) > 1:
            with open(f"{log}.rank{rank}", "a") as f:
                f.write(json.dumps([[i, p.text] for i, p in picks]) + "\\n")
        return picks

    SlicePool.sample = sample
    pool = build_pool(phantom_cases([3], shape=(4, 48, 48)), size=128, pyramid_seeds=(0,))
    config = TrainConfig(model="freqmedclip-tiny", overrides={"clip_source": "random:textsegment-vit-ti16-text32"},
                         sources=(), val_sources=(), steps=3, batch_size=2, warmup_steps=1, threads=1, out_dir=out,
                         hard_mining=0.5, stop_after=stop_after or None)
    train(config, resume=resume, pools=(pool, None))
    """
)


def _torchrun(script, *args):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_resumed_ddp_run_continues_each_ranks_own_batches(tmp_path):
    script = tmp_path / "ddp_resume.py"
    script.write_text(RESUME_SCRIPT)
    _torchrun(script, tmp_path / "whole", tmp_path / "whole", 0, "fresh")
    _torchrun(script, tmp_path / "parts", tmp_path / "parts", 1, "fresh")
    _torchrun(script, tmp_path / "parts", tmp_path / "parts", 0, "resume")
    whole = [(tmp_path / f"whole.rank{r}").read_text().splitlines() for r in (0, 1)]
    parts = [(tmp_path / f"parts.rank{r}").read_text().splitlines() for r in (0, 1)]
    assert whole[0] != whole[1] and len(whole[0]) == 3  # each rank draws its own batches
    assert parts == whole  # rank 1 too continues its own draws after the resume, not rank 0's


def test_a_cuda_process_group_also_carries_cpu_values(monkeypatch):
    """Logged losses, the stop decision and the samplers are CPU values, which NCCL alone cannot carry."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from TextSegmentLib.training import distributed

    asked = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: asked.append(backend))
    monkeypatch.setattr(dist, "get_backend", lambda: asked[-1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for device in ("cuda", "cpu"):
        info = distributed.init_distributed(device=torch.device(device))
        assert (info.rank, info.world_size) == (1, 2)
        devices = BackendConfig(Backend(asked[-1])).get_device_backend_map()
        assert "cpu" in devices and (device == "cpu" or devices["cuda"] == "nccl")


STOP_SCRIPT = textwrap.dedent(
    """
    import itertools, os, sys, types
    from TextSegmentLib.training import TrainConfig, build_pool, phantom_cases, train, trainer
    out = sys.argv[1]
    rank = os.environ["RANK"]
    if rank == "1":  # this rank's clock says the time is up after its first step; rank 0's does not
        clock = itertools.chain([0.0], itertools.repeat(1e9))
        trainer.time = types.SimpleNamespace(monotonic=lambda: next(clock))
    pool = build_pool(phantom_cases([3], shape=(4, 48, 48)), size=128, pyramid_seeds=(0,))
    config = TrainConfig(model="freqmedclip-tiny", overrides={"clip_source": "random:textsegment-vit-ti16-text32"},
                         sources=(), val_sources=(), steps=3, batch_size=2, warmup_steps=1, threads=1, out_dir=out,
                         max_minutes=1.0)
    result = train(config, pools=(pool, None))
    open(os.path.join(out, f"rank{rank}.txt"), "w").write(str(result.step))
    """
)


def test_when_one_ranks_time_is_up_every_rank_stops_at_that_step(tmp_path):
    script = tmp_path / "ddp_stop.py"
    script.write_text(STOP_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    _torchrun(script, out)  # without one decision, rank 0 waits forever for rank 1's gradients
    assert [(out / f"rank{r}.txt").read_text() for r in (0, 1)] == ["1", "1"]
