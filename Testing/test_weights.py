"""Weights: manifest, cache, download, import, verify, offline mode and the ``weights`` command."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from TextSegmentLib import checkpoint, cli, weights, weights_cache, weights_manifest
from TextSegmentLib.checkpoint import save_checkpoint
from TextSegmentLib.errors import Cancelled, InputError, WeightsError
from TextSegmentLib.models import registry
from TextSegmentLib.models.base import TextSegmentationModel
from TextSegmentLib.weights import (
    cache_path,
    import_weights,
    list_weights,
    load_manifest,
    load_model,
    resolve_weights,
    textsegment_home,
    verify_weights,
)


@dataclass
class WeeConfig:
    width: int = 4
    image_size: int = 8


class WeeNet(TextSegmentationModel):
    def __init__(self, config: WeeConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(3, config.width, 3, padding=1)
        self.norm = nn.BatchNorm2d(config.width)
        self.head = nn.Conv2d(config.width, 1, 1)


@pytest.fixture(autouse=True)
def wee_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILY_MODULES", ())
    registry.register_model("wee")(WeeConfig)
    registry.register_model("wee-wide")(lambda: WeeConfig(width=6))
    registry.register_builder(WeeConfig)(WeeNet)
    yield
    for name in ("wee", "wee-wide"):
        registry._PRESETS.pop(name, None)
    registry._BUILDERS.pop(WeeConfig, None)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private TEXTSEGMENT_HOME and an online environment unless a test says otherwise."""
    for name in weights.OFFLINE_VARIABLES + (weights.ENV_MANIFEST,):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    path = tmp_path / "home"
    monkeypatch.setenv(weights.ENV_HOME, str(path))
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _checkpoint(path, model_name: str = "wee", seed: int = 0):
    torch.manual_seed(seed)
    model = registry.create_model(model_name)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) if tensor.is_floating_point() else torch.full_like(tensor, 3))
    save_checkpoint(model, path, model_name=model_name, metadata={"licence": "CC0-1.0", "version": "2"})
    return model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(tmp_path, *entries) -> str:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format_version": 1, "weights": list(entries)}))
    return str(path)


def _entry(file_path, **extra) -> dict:
    entry = {"id": "wee-v1", "model": "wee", "version": "1", "file": file_path.name, "sha256": _sha(file_path),
             "size": file_path.stat().st_size, "licence": "CC0-1.0", "default": True}
    entry.update(extra)
    return entry


@pytest.fixture
def published(tmp_path):
    """A trained checkpoint as it would sit on a server, and a manifest that knows it."""
    folder = tmp_path / "published"
    folder.mkdir()
    model = _checkpoint(folder / "wee-v1.safetensors")
    return model, folder / "wee-v1.safetensors"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _place_in_cache(file_path, manifest_path):
    entry = load_manifest(manifest_path).get("wee-v1")
    dest = cache_path(entry)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(file_path.read_bytes())
    return dest


# --------------------------------------------------------------------------- resolving and loading


def test_default_weights_come_from_the_cache_without_network(tmp_path, published, no_network):
    trained, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path))
    dest = _place_in_cache(file_path, manifest)

    model = load_model("wee", manifest=manifest, device="cpu")

    assert _same_weights(model, trained) and not model.training
    assert model.weights_source.origin == "cache" and model.weights_source.path == dest
    assert model.weights_source.licence == "CC0-1.0"


def test_bundled_file_wins_and_is_checked(tmp_path, published, monkeypatch, no_network):
    trained, file_path = published
    package_data = tmp_path / "package_data"
    (package_data / "weights").mkdir(parents=True)
    (package_data / "weights" / file_path.name).write_bytes(file_path.read_bytes())
    monkeypatch.setattr(weights_manifest, "PACKAGE_DATA", package_data)
    manifest = _manifest(tmp_path, _entry(file_path, bundled=True))

    source = resolve_weights(None, model_name="wee", manifest=manifest)
    assert source.origin == "bundled" and source.verified
    assert list_weights(manifest=manifest)[0].status == "bundled"

    _flip_byte(package_data / "weights" / file_path.name)
    with pytest.raises(WeightsError, match="tampered with or corrupt"):
        resolve_weights(None, model_name="wee", manifest=manifest)


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_cache_file_is_refused_and_left_alone(tmp_path, published, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path))
    dest = _place_in_cache(file_path, manifest)
    _flip_byte(dest)
    before = dest.read_bytes()

    with pytest.raises(WeightsError, match="tampered with or corrupt and was not used"):
        load_model("wee", manifest=manifest)
    assert dest.read_bytes() == before


@pytest.mark.parametrize("variable", ["TEXTSEGMENT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_and_missing_says_what_to_do_and_never_touches_the_network(tmp_path, published, monkeypatch, no_network, variable):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path, urls=["http://127.0.0.1:9/wee-v1.safetensors"]))
    monkeypatch.setenv(variable, "1")

    with pytest.raises(WeightsError) as err:
        load_model("wee", manifest=manifest)
    message = str(err.value)
    assert "textsegment weights import FILE" in message and f"{variable}=1" in message
    assert "unset TEXTSEGMENT_OFFLINE" in message and "wee-v1" in message


def test_offline_keyword_overrides_the_environment(tmp_path, published, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path, urls=["http://127.0.0.1:9/x"]))
    with pytest.raises(WeightsError, match="offline mode is on"):
        resolve_weights("wee-v1", model_name="wee", manifest=manifest, offline=True)


def test_no_known_default_is_an_error_not_a_random_model(tmp_path, published, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path, default=False))
    with pytest.raises(WeightsError, match="no trained weights are known for wee; pass --weights PATH.*--weights random"):
        load_model("wee", manifest=manifest)


def test_random_only_when_asked_and_loudly(tmp_path, caplog, no_network):
    manifest = _manifest(tmp_path)
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.weights"):
        model = load_model("wee", weights="random", manifest=manifest, device="cpu")
    assert model.weights_source.is_random and not model.training
    assert "meaningless" in caplog.text


def test_a_checkpoint_path_is_loaded_and_its_data_checked(tmp_path, published, no_network):
    trained, file_path = published
    manifest = _manifest(tmp_path)
    model = load_model("wee", weights=str(file_path), manifest=manifest)
    assert _same_weights(model, trained) and model.weights_source.origin == "path"

    with pytest.raises(WeightsError, match="not 'wee-wide'"):
        load_model("wee-wide", weights=file_path, manifest=manifest)
    _flip_byte(file_path)
    with pytest.raises(WeightsError, match="tampered"):
        load_model("wee", weights=file_path, manifest=manifest)
    with pytest.raises(WeightsError, match="no such file, and not a known weights id"):
        load_model("wee", weights=str(tmp_path / "nope.safetensors"), manifest=manifest)


def test_ids_for_another_model_or_a_backbone_are_refused(tmp_path, published, no_network):
    _, file_path = published
    backbone = {"id": "clip", "kind": "backbone", "model": "hf-hub:org/clip", "urls": ["hf-hub:org/clip"], "file": "m.bin"}
    manifest = _manifest(tmp_path, _entry(file_path), backbone)
    with pytest.raises(WeightsError, match="'wee-v1' are for model 'wee', not 'wee-wide'"):
        resolve_weights("wee-v1", model_name="wee-wide", manifest=manifest)
    with pytest.raises(WeightsError, match="'clip' is a backbone"):
        resolve_weights("clip", model_name="wee", manifest=manifest)


# --------------------------------------------------------------------------- downloading


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a folder; records the paths it was asked for."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_is_verified_cached_and_reused(tmp_path, published, server, monkeypatch):
    trained, file_path = published
    url, root, requests = server
    (root / file_path.name).write_bytes(file_path.read_bytes())
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/missing.safetensors", f"{url}/{file_path.name}"]))
    seen = []

    model = load_model("wee", manifest=manifest, progress=lambda f, m: seen.append(f))

    assert _same_weights(model, trained) and model.weights_source.origin == "download"
    dest = cache_path(load_manifest(manifest).get("wee-v1"))
    assert _sha(dest) == _sha(file_path) and seen[-1] == 1.0 and seen == sorted(seen)
    assert [p.name for p in dest.parent.iterdir()] == [file_path.name]  # no temp file left
    asked = len(requests)
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    assert load_model("wee", manifest=manifest).weights_source.origin == "cache"
    assert len(requests) == asked


def test_served_file_with_the_wrong_hash_is_refused_and_not_cached(tmp_path, published, server):
    _, file_path = published
    url, root, _ = server
    served = bytearray(file_path.read_bytes())
    served[-3] ^= 0x01
    (root / file_path.name).write_bytes(bytes(served))
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/{file_path.name}"]))

    with pytest.raises(WeightsError, match="does not match the manifest's.*refused and not cached"):
        load_model("wee", manifest=manifest)
    folder = cache_path(load_manifest(manifest).get("wee-v1")).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_cancelled_download_leaves_nothing_behind(tmp_path, published, server):
    _, file_path = published
    url, root, _ = server
    (root / file_path.name).write_bytes(file_path.read_bytes())
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/{file_path.name}"]))

    with pytest.raises(Cancelled):
        resolve_weights(None, model_name="wee", manifest=manifest, cancel=lambda: True)
    folder = cache_path(load_manifest(manifest).get("wee-v1")).parent
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------- import and verify


def test_import_copies_without_touching_the_source(tmp_path, home, no_network):
    source = tmp_path / "my model.safetensors"
    trained = _checkpoint(source, seed=5)
    before = (source.read_bytes(), os.stat(source).st_mtime_ns)
    manifest = _manifest(tmp_path)

    entry = import_weights(source, manifest=manifest)

    assert (source.read_bytes(), os.stat(source).st_mtime_ns) == before
    assert entry.id == "my-model" and entry.origin == "imported" and entry.version == "2"
    copy = cache_path(entry)
    assert copy.is_relative_to(home) and copy.read_bytes() == before[0]
    assert [(s.entry.id, s.status) for s in list_weights(manifest=manifest)] == [("my-model", "cached")]
    assert _same_weights(load_model("wee", weights="my-model", manifest=manifest), trained)
    assert import_weights(source, manifest=manifest) == entry  # importing again is harmless

    other = tmp_path / "my model.other"  # same stem, so the same default id, other contents
    _checkpoint(other, seed=6)
    with pytest.raises(InputError, match="imported before with other contents"):
        import_weights(other, manifest=manifest)


def test_import_of_a_known_file_fills_its_cache_slot(tmp_path, published, no_network, monkeypatch):
    trained, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path, urls=["http://127.0.0.1:9/x"]))
    copy = tmp_path / "downloaded elsewhere.safetensors"
    copy.write_bytes(file_path.read_bytes())

    entry = import_weights(copy, manifest=manifest)

    assert entry.id == "wee-v1" and entry.origin == "manifest"
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    assert _same_weights(load_model("wee", manifest=manifest), trained)


def test_import_refuses_what_is_not_a_checkpoint(tmp_path, home):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        import_weights(junk, manifest=_manifest(tmp_path))
    assert not (home / "weights").exists()


def test_verify_reports_ok_missing_and_tampered(tmp_path, published, no_network):
    _, file_path = published
    missing = dict(_entry(file_path), id="wee-v0", default=False)
    manifest = _manifest(tmp_path, _entry(file_path), missing)
    dest = _place_in_cache(file_path, manifest)

    assert {r.entry.id: r.status for r in verify_weights(manifest=manifest)} == {"wee-v1": "ok", "wee-v0": "missing"}
    _flip_byte(dest)
    results = {r.entry.id: r for r in verify_weights(manifest=manifest)}
    assert results["wee-v1"].status == "tampered" and "expected" in results["wee-v1"].message


# --------------------------------------------------------------------------- places, manifests


def test_home_follows_the_environment(tmp_path, monkeypatch):
    assert textsegment_home() == (tmp_path / "home").resolve()
    monkeypatch.delenv(weights.ENV_HOME)
    monkeypatch.setattr(weights_manifest.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert textsegment_home() == tmp_path / "xdg" / "textsegment"
    assert textsegment_home(tmp_path / "explicit") == (tmp_path / "explicit").resolve()


@pytest.mark.parametrize(
    "entries, expected",
    [
        ([{"id": "a", "model": "wee", "file": "a.st", "sha256": "0" * 64}] * 2, "appears twice"),
        ([{"id": "a", "model": "wee", "file": "a.st", "sha256": "xyz"}], "sha256"),
        ([{"id": "a", "model": "wee", "file": "../a.st", "sha256": "0" * 64}], "plain file name"),
        ([{"id": i, "model": "wee", "file": "a.st", "sha256": "0" * 64, "default": True} for i in "ab"], "more than one default"),
        ([{"model": "wee"}], "lacks the required key 'id'"),
        ([{"id": "a", "model": "wee", "kind": "zip"}], "kind must be one of"),
        ([{"id": "a", "model": "wee", "file": "a.st", "sha256": "0" * 64, "default": "false"}], "'default' must be true or false"),
        ([{"id": "a", "model": "wee", "file": "a.st", "sha256": "0" * 64, "bundled": "false"}], "'bundled' must be true or false"),
        ([{"id": "a", "model": "wee", "file": "a.st", "sha256": "0" * 64, "default": 1}], "'default' must be true or false"),
    ],
    ids=["duplicate", "bad-sha", "path-in-file", "two-defaults", "no-id", "bad-kind", "quoted-default", "quoted-bundled",
         "numeric-default"],
)
def test_bad_manifests_name_the_file_and_the_problem(tmp_path, entries, expected):
    path = _manifest(tmp_path, *entries)
    with pytest.raises(WeightsError, match=expected) as err:
        load_manifest(path)
    assert "manifest.json" in str(err.value)


def test_manifest_can_come_from_the_environment(tmp_path, published, monkeypatch):
    _, file_path = published
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path, _entry(file_path)))
    assert [e.id for e in load_manifest().entries] == ["wee-v1"]


def test_shipped_manifest_lists_the_biomedclip_backbone_with_its_licence(monkeypatch, no_network):
    manifest = load_manifest(weights.PACKAGE_DATA / "weights_manifest.json")
    backbone = manifest.get("biomedclip-vit-b16-224")
    assert backbone.kind == "backbone" and not backbone.default
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in backbone.model
    assert "research use only" in backbone.licence and "MIT" in backbone.licence
    monkeypatch.setenv("HF_HUB_CACHE", str(textsegment_home() / "empty-hf-cache"))
    assert {s.entry.id: s.status for s in list_weights(manifest=manifest)}["biomedclip-vit-b16-224"] == "remote"


# --------------------------------------------------------------------------- the command


def _cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr(cli, "COMMANDS", ("weights",))  # other commands are not under test here
    return cli.main(list(argv))


def test_cli_list_import_verify(tmp_path, published, monkeypatch, capsys, no_network):
    _, file_path = published
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path, _entry(file_path, urls=["https://example.org/w"])))

    assert _cli(monkeypatch, "weights", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["id"], row["status"]) for row in listed] == [("wee-v1", "remote")]

    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=9)
    assert _cli(monkeypatch, "weights", "import", str(source), "--id", "mine-v1") == 0
    assert "mine-v1" in capsys.readouterr().out
    assert _cli(monkeypatch, "weights", "list") == 0
    table = capsys.readouterr().out
    assert "mine-v1" in table and "cached" in table and "remote" in table

    assert _cli(monkeypatch, "weights", "verify") == 0
    capsys.readouterr()
    _flip_byte(cache_path(import_weights(source, weights_id="mine-v1")))
    assert _cli(monkeypatch, "weights", "verify", "--json") == 1
    assert {r["id"]: r["status"] for r in json.loads(capsys.readouterr().out)}["mine-v1"] == "tampered"

    assert _cli(monkeypatch, "weights", "import", str(tmp_path / "absent.safetensors")) == 2
    err = capsys.readouterr().err
    assert err.startswith("textsegment weights: error:") and "absent.safetensors" in err


def test_manifest_with_a_malformed_format_version_is_refused_by_name(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format_version": "one", "weights": []}))
    with pytest.raises(WeightsError, match="format_version") as err:
        load_manifest(path)
    assert "manifest.json" in str(err.value)


def test_urls_given_as_one_string_are_refused_not_split_into_letters(tmp_path, published):
    _, file_path = published
    path = _manifest(tmp_path, _entry(file_path, urls="https://example.org/wee-v1.safetensors"))
    with pytest.raises(WeightsError, match="'urls' must be a list") as err:
        load_manifest(path)
    assert "manifest.json" in str(err.value)


def test_a_folder_given_as_weights_is_called_a_folder(tmp_path, no_network):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    manifest = _manifest(tmp_path)
    with pytest.raises(WeightsError, match="is a folder") as err:
        resolve_weights(str(folder), model_name="wee", manifest=manifest)
    assert "no such file" not in str(err.value)
    with pytest.raises(InputError, match="is a folder") as err:
        import_weights(folder, manifest=manifest)
    assert "no such file" not in str(err.value)


def test_import_into_a_home_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch, capsys, no_network):
    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=4)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(weights.ENV_HOME, str(blocker / "home"))
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path))

    with pytest.raises(WeightsError, match=weights.ENV_HOME):
        import_weights(source)
    assert _cli(monkeypatch, "weights", "import", str(source)) == 2
    err = capsys.readouterr().err
    assert err.startswith("textsegment weights: error:") and weights.ENV_HOME in err
    assert len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "a file where the cache folder should be"


def test_an_import_whose_copy_fails_leaves_no_file_in_the_cache(tmp_path, monkeypatch, no_network):
    """The copy goes through a temp file: a read error mid-import leaves neither it nor a cached file."""
    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=5)
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path))
    real_open = open
    broken = [True]

    def failing(file, *args, **kwargs):  # hashing the source works; the copy's own read of it fails
        if broken[0] and os.fspath(file) == os.fspath(source):
            raise OSError(5, "Input/output error", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(weights_cache, "open", failing, raising=False)
    with pytest.raises(WeightsError, match=r"cannot copy .*mine\.safetensors into the weights cache .*Input/output error.*; nothing was imported"):
        import_weights(source, weights_id="mine-v1")
    folder = textsegment_home() / "weights" / "mine-v1"
    assert list(folder.iterdir()) == []  # the temp file is gone, and no half-copied file took its place
    assert not weights.imported_registry_path().exists()  # nor is the id recorded
    broken[0] = False
    assert import_weights(source, weights_id="mine-v1").id == "mine-v1"  # the next try succeeds


def _deny_reading(monkeypatch, path) -> None:
    """``open`` raises PermissionError for ``path`` in the weights and checkpoint code (the tests run as root)."""
    real_open = open

    def guarded(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    for module in (weights_manifest, weights_cache, checkpoint):
        monkeypatch.setattr(module, "open", guarded, raising=False)


def test_unreadable_weights_files_are_weights_errors_naming_them(tmp_path, published, monkeypatch, capsys, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path))
    cached = _place_in_cache(file_path, manifest)
    _deny_reading(monkeypatch, cached)
    with pytest.raises(WeightsError, match="cannot read this weights file \\(Permission denied\\)") as err:
        load_model("wee", manifest=manifest)  # the cached default: hashed before use
    assert str(cached) in str(err.value)

    _deny_reading(monkeypatch, file_path)
    with pytest.raises(WeightsError, match="cannot read this weights file") as err:
        load_model("wee", weights=str(file_path), manifest=manifest)  # a path: its header is read first
    assert str(file_path) in str(err.value)
    monkeypatch.setenv(weights.ENV_MANIFEST, manifest)
    assert _cli(monkeypatch, "weights", "import", str(file_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("textsegment weights: error:") and str(file_path) in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- review: defaults, recovery advice, downloads


def test_list_marks_the_weights_each_model_uses_by_default(tmp_path, published, monkeypatch, capsys, home, no_network):
    _, file_path = published
    older = dict(_entry(file_path), id="wee-v0", version="0", default=False)
    wide = {"id": "wide-v1", "model": "wee-wide", "file": "w.safetensors", "sha256": "0" * 64, "default": True}
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path, older, _entry(file_path), wide))
    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=3)
    import_weights(source)
    registry_file = weights.imported_registry_path()  # a hand-edited "default" in imported.json is never used
    data = json.loads(registry_file.read_text())
    data["weights"][0]["default"] = True
    registry_file.write_text(json.dumps(data))
    _place_in_cache(file_path, os.environ[weights.ENV_MANIFEST])
    assert resolve_weights(None, model_name="wee").entry.id == "wee-v1"

    assert _cli(monkeypatch, "weights", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert "DEFAULT" in header
    column = {row.split()[0]: row.split()[header.index("DEFAULT")] for row in lines[1:]}
    assert column == {"wee-v0": "-", "wee-v1": "yes", "wide-v1": "yes", "mine": "-"}

    assert _cli(monkeypatch, "weights", "list", "--json") == 0
    listed = {row["id"]: row["default"] for row in json.loads(capsys.readouterr().out)}
    assert listed == {"wee-v0": False, "wee-v1": True, "wide-v1": True, "mine": False}


def test_a_tampered_bundled_file_is_not_to_be_re_downloaded_and_a_good_imported_copy_is_used(
    tmp_path, published, monkeypatch, caplog, no_network
):
    trained, file_path = published
    package_data = tmp_path / "package_data"
    (package_data / "weights").mkdir(parents=True)
    bundled = package_data / "weights" / file_path.name
    bundled.write_bytes(file_path.read_bytes())
    monkeypatch.setattr(weights_manifest, "PACKAGE_DATA", package_data)
    manifest = _manifest(tmp_path, _entry(file_path, bundled=True))  # like every shipped checkpoint: no URL
    _flip_byte(bundled)

    with pytest.raises(WeightsError) as err:
        load_model("wee", manifest=manifest)
    assert "reinstall TextSegment" in str(err.value) and "re-download" not in str(err.value)
    [result] = verify_weights(manifest=manifest)
    assert result.status == "tampered" and "reinstall TextSegment" in result.message

    import_weights(file_path, manifest=manifest)  # the advice: import a good copy
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.weights"):
        model = load_model("wee", manifest=manifest)
    assert _same_weights(model, trained) and model.weights_source.origin == "cache"
    assert str(bundled) in caplog.text  # the bad bundled file is still reported, not silently ignored


def test_a_tampered_imported_file_says_how_to_import_it_again(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setenv(weights.ENV_MANIFEST, _manifest(tmp_path))
    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=7)
    entry = import_weights(source, weights_id="mine-v1")
    _flip_byte(cache_path(entry))

    assert _cli(monkeypatch, "weights", "verify") == 1
    out = capsys.readouterr().out
    assert "tampered" in out and "textsegment weights import FILE --id mine-v1" in out and "re-download" not in out
    assert _cli(monkeypatch, "weights", "import", str(source), "--id", "mine-v1") == 0  # following the advice mends it
    capsys.readouterr()
    assert _cli(monkeypatch, "weights", "verify") == 0


def test_an_imported_file_gone_from_the_cache_comes_back_by_importing_it_under_any_name(tmp_path, no_network):
    manifest = _manifest(tmp_path)
    source = tmp_path / "mine.safetensors"
    trained = _checkpoint(source, seed=8)
    entry = import_weights(source, manifest=manifest)
    cache_path(entry).unlink()

    [result] = verify_weights(manifest=manifest)
    assert result.status == "missing" and f"import FILE --id {entry.id}" in result.message
    with pytest.raises(WeightsError, match="textsegment weights import FILE"):
        resolve_weights(entry.id, model_name="wee", manifest=manifest)

    copy = tmp_path / "mine (1).safetensors"  # the copy the user finds has another name
    copy.write_bytes(source.read_bytes())
    assert import_weights(copy, manifest=manifest).id == entry.id
    assert [(s.entry.id, s.status) for s in list_weights(manifest=manifest)] == [(entry.id, "cached")]
    assert _same_weights(load_model("wee", weights=entry.id, manifest=manifest), trained)
    assert import_weights(copy, weights_id="alias", manifest=manifest).id == "alias"  # an explicit --id still wins


@pytest.mark.parametrize("served_as", ["login.html", "wee-v1.safetensors"])
def test_a_web_page_served_instead_of_the_weights_is_called_one(tmp_path, published, server, served_as):
    _, file_path = published
    url, root, _ = server
    (root / served_as).write_text("<!DOCTYPE html>\n<html><body><form>Sign in</form></body></html>\n")
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/{served_as}"]))

    with pytest.raises(WeightsError, match="sent a web page, not the weights file.*refused and not cached") as err:
        load_model("wee", manifest=manifest)
    assert "corrupt or tampered" not in str(err.value)
    folder = cache_path(load_manifest(manifest).get("wee-v1")).parent
    assert list(folder.iterdir()) == []


def test_a_cut_off_download_is_called_incomplete(tmp_path, published, server):
    _, file_path = published
    url, root, _ = server
    (root / file_path.name).write_bytes(file_path.read_bytes()[:1000])
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/{file_path.name}"]))

    with pytest.raises(WeightsError, match=f"incomplete: 1000 of {file_path.stat().st_size} bytes; try again"):
        load_model("wee", manifest=manifest)
    folder = cache_path(load_manifest(manifest).get("wee-v1")).parent
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------- review: unreadable files, killed downloads, ignored ids


def test_verify_reports_an_unreadable_file_and_checks_the_rest(tmp_path, published, monkeypatch, capsys, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path), dict(_entry(file_path), id="wee-v2", default=False))
    unreadable = _place_in_cache(file_path, manifest)
    other = cache_path(load_manifest(manifest).get("wee-v2"))
    other.parent.mkdir(parents=True)
    other.write_bytes(file_path.read_bytes())
    _deny_reading(monkeypatch, unreadable)

    results = {r.entry.id: r for r in verify_weights(manifest=manifest)}
    assert {i: r.status for i, r in results.items()} == {"wee-v1": "unreadable", "wee-v2": "ok"}
    assert "Permission denied" in results["wee-v1"].message and str(unreadable) in results["wee-v1"].message
    monkeypatch.setenv(weights.ENV_MANIFEST, manifest)
    assert _cli(monkeypatch, "weights", "verify") == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and "Permission denied" in out and str(other) in out


def test_a_killed_downloads_stale_part_files_are_removed_by_the_next_download(
    tmp_path, published, server, monkeypatch, capsys
):
    _, file_path = published
    url, root, _ = server
    (root / file_path.name).write_bytes(file_path.read_bytes())
    manifest = _manifest(tmp_path, _entry(file_path, urls=[f"{url}/{file_path.name}"]))
    folder = cache_path(load_manifest(manifest).get("wee-v1")).parent
    folder.mkdir(parents=True)
    stale, fresh = folder / f".{file_path.name}.killed.part", folder / f".{file_path.name}.running.part"
    for part in (stale, fresh):
        part.write_bytes(b"half a download")
    two_days_ago = os.stat(stale).st_mtime - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))

    monkeypatch.setenv(weights.ENV_MANIFEST, manifest)
    assert _cli(monkeypatch, "weights", "verify") == 0  # leftovers are worth a mention, not a failure
    out = capsys.readouterr().out
    assert "leftover" in out and str(stale) in out and str(fresh) in out

    assert load_model("wee", manifest=manifest).weights_source.origin == "download"
    assert sorted(p.name for p in folder.iterdir()) == sorted([file_path.name, fresh.name])  # another process's stays
    assert [(r.status, r.path) for r in verify_weights(manifest=manifest)] == [("ok", folder / file_path.name), ("leftover", fresh)]


def test_import_under_another_id_of_a_known_file_says_it_was_imported_as_the_known_id(
    tmp_path, published, monkeypatch, capsys, caplog, no_network
):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path))
    monkeypatch.setenv(weights.ENV_MANIFEST, manifest)

    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.weights"):
        assert _cli(monkeypatch, "weights", "import", str(file_path), "--id", "mine") == 0
    assert "as wee-v1" in capsys.readouterr().out
    [notice] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "known weights wee-v1" in notice and "'mine'" in notice and "\n" not in notice

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.weights"):
        assert import_weights(file_path, weights_id="wee-v1").id == "wee-v1"  # the known id itself: nothing to say
        assert import_weights(file_path).id == "wee-v1"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- a user's walk through the weights


def _break_registry(home) -> None:
    registry_path = home / "weights" / "imported.json"
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    registry_path.write_text('{"weights": [')  # a hand edit cut short


def test_a_broken_imported_registry_does_not_stop_shipped_weights_or_a_path(tmp_path, published, home, no_network):
    _, file_path = published
    manifest = _manifest(tmp_path, _entry(file_path))
    _place_in_cache(file_path, manifest)
    _break_registry(home)

    assert resolve_weights(None, model_name="wee", manifest=manifest).entry.id == "wee-v1"
    assert resolve_weights("wee-v1", model_name="wee", manifest=manifest).origin == "cache"
    assert resolve_weights(str(file_path), model_name="wee", manifest=manifest).path == file_path
    with pytest.raises(WeightsError, match=r"cannot be read .*deleting it forgets the imported ids, not their files"):
        resolve_weights("mine", model_name="wee", manifest=manifest)


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_weights_option_is_called_empty_not_a_folder(tmp_path, published, spec, no_network):
    with pytest.raises(WeightsError, match="the weights option is empty; leave it out for the model's default"):
        resolve_weights(spec, model_name="wee", manifest=_manifest(tmp_path, _entry(published[1])))


def test_an_import_records_the_whole_path_it_came_from(tmp_path, monkeypatch, no_network):
    (tmp_path / "in").mkdir()
    _checkpoint(tmp_path / "in" / "mine.safetensors")
    monkeypatch.chdir(tmp_path)
    entry = import_weights("in/mine.safetensors", manifest=_manifest(tmp_path))
    assert entry.description == f"imported from {(tmp_path / 'in' / 'mine.safetensors').resolve()}"


def test_verify_says_how_to_get_a_missing_backbone(tmp_path, monkeypatch, no_network):
    backbone = {"id": "clip", "kind": "backbone", "model": "hf-hub:org/clip", "file": "open_clip_model.safetensors",
                "urls": ["hf-hub:org/clip"], "licence": "MIT"}
    monkeypatch.setattr(weights, "_hub_cached_file", lambda entry: None)
    [result] = verify_weights(manifest=_manifest(tmp_path, backbone))
    assert result.status == "missing"
    assert "not in the Hugging Face cache" in result.message and "'local-dir:FOLDER'" in result.message


def test_an_id_imported_before_with_other_contents_is_replaced_only_when_asked(tmp_path, monkeypatch, capsys, no_network):
    first, second = tmp_path / "a" / "mine.safetensors", tmp_path / "b" / "mine.safetensors"
    first.parent.mkdir(), second.parent.mkdir()
    _checkpoint(first, seed=1)
    _checkpoint(second, seed=2)
    entry = import_weights(first)
    cached = cache_path(entry)

    assert _cli(monkeypatch, "weights", "import", str(second)) == 2
    err = capsys.readouterr().err
    assert f"imported from {first}" in err and _sha(first) in err and "pass --replace to replace them" in err
    assert _sha(cached) == _sha(first)  # nothing was overwritten by the refused import

    assert _cli(monkeypatch, "weights", "import", str(second), "--replace") == 0
    assert _sha(cached) == _sha(second) and _sha(first) == entry.sha256  # the user's own file is untouched
    [replaced] = weights.known_weights(manifest=_manifest(tmp_path), home=None)
    assert (replaced.id, replaced.sha256, replaced.file) == ("mine", _sha(second), entry.file)
    assert resolve_weights("mine", model_name="wee", manifest=_manifest(tmp_path)).path == cached


def test_an_import_never_takes_the_id_random_which_names_a_random_model(tmp_path, home, no_network):
    _checkpoint(tmp_path / "random.safetensors")
    for weights_id in (None, "random"):
        with pytest.raises(InputError, match="the weights id 'random' is reserved for a meaningless random model"):
            import_weights(tmp_path / "random.safetensors", weights_id=weights_id, manifest=_manifest(tmp_path))
    assert not (home / "weights").exists()
    assert import_weights(tmp_path / "random.safetensors", weights_id="random-v1", manifest=_manifest(tmp_path)).id == "random-v1"


def test_an_imported_id_shadowed_by_the_manifest_says_how_to_use_it_again(tmp_path, published, caplog, no_network):
    source = tmp_path / "mine.safetensors"
    _checkpoint(source, seed=5)
    imported = import_weights(source, weights_id="wee-v1", manifest=_manifest(tmp_path))  # before the manifest knew it
    manifest = _manifest(tmp_path, _entry(published[1]))
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.weights"):
        assert [e.origin for e in weights.known_weights(manifest=manifest)] == ["manifest"]
    assert str(cache_path(imported)) in caplog.text and "textsegment weights import FILE --id NEW" in caplog.text


def test_weights_missing_offline_name_only_the_weights_that_are_here(tmp_path, published, monkeypatch, no_network):
    _, file_path = published
    other = tmp_path / "other.safetensors"
    _checkpoint(other, seed=4)
    manifest = _manifest(tmp_path, _entry(file_path, urls=["http://127.0.0.1:9/wee-v1.safetensors"]),
                         _entry(other, id="wee-v2", file="wee-v2.safetensors", default=False, urls=["http://127.0.0.1:9/v2"]))
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        resolve_weights("wee-v1", model_name="wee", manifest=manifest)
    assert str(err.value).endswith(". No weights for wee are on this machine")

    import_weights(other, manifest=manifest)  # now wee-v2 is in the cache
    with pytest.raises(WeightsError) as err:
        resolve_weights("wee-v1", model_name="wee", manifest=manifest)
    assert str(err.value).endswith(". Weights for wee on this machine: wee-v2")
