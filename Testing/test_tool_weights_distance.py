"""tools/weights_distance.py: the distance a reproduced checkpoint lies from the shipped one."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_tool
from safetensors.torch import save_file

tool = load_tool("weights_distance")


def test_relative_distance_is_the_norm_of_the_difference_over_all_tensors():
    shipped = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # ‖shipped‖ = 5
    moved = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[0.0, 4.0]])}  # ‖difference‖ = 1
    assert tool.relative_distance(shipped, shipped) == 0.0
    assert tool.relative_distance(moved, shipped) == pytest.approx(0.2)


def test_another_models_checkpoint_is_refused():
    with pytest.raises(ValueError, match="different tensors"):
        tool.relative_distance({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="different tensors"):
        tool.relative_distance({"a": torch.zeros(2)}, {"b": torch.zeros(2)})


def test_files_and_shipped_ids_load_and_errors_are_one_line(tmp_path, capsys):
    """A shipped id and its file give the same tensors (distance 0); a missing one exits 2 with one line."""
    shipped = tool.load_tensors("freqmedclip-tiny-v8")
    path = tmp_path / "copy.safetensors"
    save_file({name: t.half() for name, t in shipped.items()}, str(path))  # shipped weights are float16
    assert tool.main([str(path), "freqmedclip-tiny-v8", "--start", "freqmedclip-tiny-v7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "reproduced vs shipped: 0.00e+00"
    assert out[1].startswith("shipped vs start (the phase's own step): ") and float(out[1].split()[-1]) > 1e-3
    assert tool.main([str(tmp_path / "nothing.safetensors"), "freqmedclip-tiny-v8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("weights_distance: error:") and "neither a checkpoint file nor a known weights id" in err
    assert len(err.splitlines()) == 1
