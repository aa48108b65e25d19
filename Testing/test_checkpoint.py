"""Checkpoints: bitwise round trip, and every kind of mismatch or damage refused with a clear message."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from TextSegmentLib import checkpoint, weights_manifest
from TextSegmentLib.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint, verify_checkpoint_data
from TextSegmentLib.errors import ModelError, OutputExistsError, WeightsError
from TextSegmentLib.models import registry
from TextSegmentLib.models.base import TextSegmentationModel
from TextSegmentLib.weights_manifest import load_manifest


@dataclass
class TinyConfig:
    widths: tuple[int, ...] = (3, 4, 5)
    image_size: int = 16
    scale: float = 1.0
    head: "HeadConfig" = None  # nested dataclass, set by the preset
    spare: tuple[int, ...] = None  # None in the preset, a tuple when stored


@dataclass
class HeadConfig:
    kernel: tuple[int, int] = (1, 1)


class TinyNet(TextSegmentationModel):
    """A few convs plus the awkward parts: BatchNorm buffers, a frozen layer, a non-persistent buffer."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        layers = []
        for c_in, c_out in zip(config.widths[:-1], config.widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(config.widths[-1], 1, config.head.kernel)
        self.body[0].requires_grad_(False)  # frozen by architecture
        self.register_buffer("mean", torch.full((3,), 0.5))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


@pytest.fixture
def tiny_family(monkeypatch):
    """Register the test family through the public decorators, isolated from the real families."""
    monkeypatch.setattr(registry, "_FAMILY_MODULES", ())
    registry.register_model("ckpt-tiny")(lambda: TinyConfig(head=HeadConfig()))
    registry.register_model("ckpt-other")(lambda: TinyConfig(widths=(3, 6), head=HeadConfig()))
    registry.register_builder(TinyConfig)(TinyNet)
    yield
    for name in ("ckpt-tiny", "ckpt-other"):
        registry._PRESETS.pop(name, None)
    registry._BUILDERS.pop(TinyConfig, None)


def _trained(name: str = "ckpt-tiny", **overrides) -> TinyNet:
    """A model whose every tensor differs from a fresh init, so a load that does nothing is caught."""
    torch.manual_seed(1)
    model = registry.create_model(name, **overrides)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
            else:
                tensor.fill_(7)
    return model


def _flip_byte(path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_is_bitwise_and_keeps_config_and_metadata(tiny_family, tmp_path):
    model = _trained(widths=(3, 8, 2), spare=(1, 2))
    path = tmp_path / "tiny.safetensors"
    saved = save_checkpoint(model, path, model_name="ckpt-tiny", metadata={"licence": "CC-BY-4.0", "metrics": {"dice": 0.5}})

    loaded, info = load_checkpoint(path, expected_model="ckpt-tiny")

    original, restored = model.state_dict(), loaded.state_dict()
    assert restored.keys() == original.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype, key
        assert torch.equal(original[key], restored[key]), key
    assert loaded.config == model.config  # tuples and the nested dataclass come back as such
    assert isinstance(loaded.config.widths, tuple) and isinstance(loaded.config.head, HeadConfig)
    assert loaded.config.spare == (1, 2)
    assert info.metadata == {"licence": "CC-BY-4.0", "metrics": {"dice": 0.5}}
    assert info.model_name == "ckpt-tiny" and info.data_sha256 == saved.data_sha256
    assert not loaded.body[0].weight.requires_grad and loaded.head.weight.requires_grad


def test_saving_never_overwrites_unless_asked(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match="exists already"):
        save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    assert path.read_bytes() == b"user data"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny", overwrite=True)
    assert read_checkpoint_info(path).model_name == "ckpt-tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temp file left behind


def test_a_saved_checkpoint_gets_the_usual_file_mode(tiny_family, tmp_path):
    """Not mkstemp's private 0600: exported weights are meant to be shared and shipped."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = save_checkpoint(_trained(), tmp_path / "shared.safetensors", model_name="ckpt-tiny").path
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_checkpoint_for_another_model_is_refused(tiny_family, tmp_path):
    path = tmp_path / "other.safetensors"
    save_checkpoint(_trained("ckpt-other"), path, model_name="ckpt-other")
    with pytest.raises(WeightsError, match="'ckpt-other', not 'ckpt-tiny'"):
        load_checkpoint(path, expected_model="ckpt-tiny")


def _rewrite_header(path, edit) -> None:
    """Edit the JSON header in place (as a buggy exporter or an older version would have written it)."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + size :])


def test_config_that_does_not_fit_the_weights_names_the_shape_mismatch(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")

    def widen(header):
        config = json.loads(header["__metadata__"]["config"])
        config["widths"] = [3, 4, 6]
        header["__metadata__"]["config"] = json.dumps(config)

    _rewrite_header(path, widen)
    with pytest.raises(WeightsError, match=r"shape mismatches \[body\.2\.bias \(file \(5,\), model \(6,\)\)") as err:
        load_checkpoint(path)
    assert "'ckpt-tiny'" in str(err.value)


def test_missing_and_unexpected_keys_are_named(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"

    class Extra(TinyNet):
        def __init__(self, config):
            super().__init__(config)
            self.extra = nn.Linear(2, 2)

    model = Extra(registry.get_model_config("ckpt-tiny"))
    del model.head  # now "head.*" is missing and "extra.*" unexpected
    save_checkpoint(model, path, model_name="ckpt-tiny")
    with pytest.raises(WeightsError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "missing keys [head.bias, head.weight]" in message
    assert "unexpected keys [extra.bias, extra.weight]" in message


def test_stored_option_unknown_to_this_version_is_refused(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")

    def add_option(header):
        config = json.loads(header["__metadata__"]["config"])
        config["depth"] = 12
        header["__metadata__"]["config"] = json.dumps(config)

    _rewrite_header(path, add_option)
    with pytest.raises(WeightsError, match=r"option\(s\) \['depth'\]"):
        load_checkpoint(path, verify=False)


def test_flipped_tensor_byte_is_caught_by_the_data_checksum(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    _flip_byte(path)
    with pytest.raises(WeightsError, match="tampered with or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda blob: blob[:8] + b"#" + blob[9:], "header is corrupt"),
        (lambda blob: (10**12).to_bytes(8, "little") + blob[8:], "bad header length"),
        (lambda blob: blob[:-40], "truncated"),
        (lambda blob: b"", "bad header length"),
    ],
    ids=["not-json", "absurd-length", "truncated", "empty"],
)
def test_corrupt_header_is_refused(tiny_family, tmp_path, damage, expected):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=expected):
        load_checkpoint(path)


def test_plain_safetensors_file_is_not_taken_for_a_checkpoint(tiny_family, tmp_path):
    import safetensors.torch

    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(WeightsError, match="not a TextSegment checkpoint"):
        read_checkpoint_info(path)


def test_saving_under_a_preset_of_another_family_is_refused(tiny_family, tmp_path):
    @dataclass
    class OtherConfig:
        image_size: int = 8

    registry.register_model("ckpt-foreign")(OtherConfig)
    try:
        with pytest.raises(ModelError, match="builds a OtherConfig"):
            save_checkpoint(_trained(), tmp_path / "x.safetensors", model_name="ckpt-foreign")
        assert not (tmp_path / "x.safetensors").exists()
    finally:
        registry._PRESETS.pop("ckpt-foreign", None)


def test_overrides_apply_on_top_of_the_stored_config(tiny_family, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    loaded, _ = load_checkpoint(path, overrides={"image_size": 32})
    assert loaded.config.image_size == 32
    assert dataclasses.replace(loaded.config, image_size=16) == _trained().config


@pytest.mark.parametrize("offsets", [["0", "12"], [None, 12], [0.0, 12.5]], ids=["strings", "null", "floats"])
def test_tensor_offsets_that_are_not_whole_numbers_are_refused(tiny_family, tmp_path, offsets):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")

    def damage(header):
        header["head.bias"]["data_offsets"] = offsets

    _rewrite_header(path, damage)
    with pytest.raises(WeightsError, match=r"tensor 'head\.bias' is corrupt"):
        read_checkpoint_info(path)


@pytest.mark.parametrize(
    "key, value",
    [("widths", [3, "four", 5]), ("head", 5), ("widths", [3, -4, 5])],
    ids=["string-width", "scalar-for-nested-config", "negative-width"],
)
def test_edited_config_that_cannot_build_the_model_is_a_weights_error(tiny_family, tmp_path, key, value):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")

    def edit(header):  # the header is outside the data checksum, so this passes verification
        config = json.loads(header["__metadata__"]["config"])
        config[key] = value
        header["__metadata__"]["config"] = json.dumps(config)

    _rewrite_header(path, edit)
    with pytest.raises(WeightsError, match="cannot build model 'ckpt-tiny'"):
        load_checkpoint(path)


def _deny_reading(monkeypatch, module, path) -> None:
    """Make ``open`` in ``module`` raise PermissionError for ``path`` (the tests run as root)."""
    real_open = open

    def guarded(file, *args, **kwargs):
        if Path(file) == Path(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", guarded, raising=False)


@pytest.mark.parametrize("call", [read_checkpoint_info, load_checkpoint, verify_checkpoint_data])
def test_unreadable_checkpoint_is_a_weights_error_naming_it(tiny_family, tmp_path, monkeypatch, call):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    _deny_reading(monkeypatch, checkpoint, path)
    with pytest.raises(WeightsError, match="cannot read this weights file \\(Permission denied\\)") as info:
        call(path)
    assert str(path) in str(info.value)


def test_the_tiny_presets_build_the_shipped_weights_architecture():
    """Training a preset on one's own data gives the shipped model's shape and size (the presets once
    had 256-wide text towers: a from-scratch export of 52 MB beside the shipped 24 MB)."""
    manifest = load_manifest(weights_manifest.PACKAGE_DATA / "weights_manifest.json")
    shipped = [e for e in manifest.entries if e.kind == "checkpoint"]
    assert {e.model for e in shipped} == {"freqmedclip-tiny", "tgcnet-tiny"}
    for entry in shipped:
        stored = read_checkpoint_info(weights_manifest.bundled_path(entry)).config
        preset = checkpoint.config_from_dict(entry.model, {})
        trained = checkpoint.config_from_dict(entry.model, {k: v for k, v in stored.items() if not k.startswith("train_")})
        assert trained == preset, entry.id


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_a_pytorch_pickle_file_is_named_one_and_how_to_convert_it_is_said(tiny_family, tmp_path, zipped):
    path = tmp_path / "model.pt"
    torch.save(_trained().state_dict(), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(WeightsError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "PyTorch pickle file" in message and "never loads pickle files" in message
    assert "torch.load(FILE, weights_only=True)" in message and "save_checkpoint(model" in message


@pytest.mark.parametrize("keep", [0, 4, 100, -40], ids=["empty", "cut-in-length", "cut-in-header", "cut-in-data"])
def test_a_cut_off_checkpoint_says_to_get_a_whole_copy(tiny_family, tmp_path, keep):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(_trained(), path, model_name="ckpt-tiny")
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(WeightsError, match="copy or download it again in full, or re-export it"):
        read_checkpoint_info(path)
