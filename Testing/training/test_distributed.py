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
