"""The benchmark scripts as a researcher reruns them: options, mistakes, what they write, the docs' commands.

No benchmark runs here: every measurement is replaced by a stub that fails the test if it is reached,
or by a few made-up records; what is tested is each script's own logic around the measuring.
"""

from __future__ import annotations

import builtins
import io
import json
import re
import shlex
import sys
from types import SimpleNamespace

import pytest

from bench_scripts import REPO, load_bench

sys.path.insert(0, str(REPO))
from bench import common  # noqa: E402

SCRIPTS = ("inference", "saliency", "saliency_ab", "post_hoc", "cpu_kernels")
PUBLISHED = tuple(REPO / "docs" / name for name in ("performance.md", "explainability.md", "results.md", "design.md"))
DOC = "intro ×\n<!-- bench:{name}:start -->\nold table\n<!-- bench:{name}:end -->\noutro —\n"


def not_measured(*args, **kwargs):
    raise AssertionError("a mistake in the options was found only after measuring")


def refused(capsys, run) -> str:
    """The one-line message of a run refused with exit status 2 (argparse's usage line aside)."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, exit_info.value.code
    return err[-1]


# ------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option(script, capsys):
    parser = load_bench(script).build_parser()
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or action.dest == "help":
            continue
        assert action.help, f"{script} {action.option_strings}: no help"
        if action.default not in (None, False, []) and action.required is False:
            assert "default" in action.help, f"{script} {action.option_strings}: default {action.default!r} not stated"


# ------------------------------------------------------------------------------ doc and JSON files
def test_doc_block_replacement_keeps_the_rest_byte_for_byte_crlf_included(tmp_path):
    doc = tmp_path / "performance.md"
    original = DOC.format(name="inference").replace("\n", "\r\n").encode("utf-8")
    doc.write_bytes(original)
    common.replace_doc_block(doc, "inference", "| new |\n|---|")
    after = doc.read_bytes()
    assert b"old table" not in after and b"| new |" in after
    assert after.startswith(original[: original.index(b"<!--")])
    assert after.endswith(b"<!-- bench:inference:end -->\r\noutro \xe2\x80\x94\r\n")
    assert b"\n" not in after.replace(b"\r\n", b"")  # no bare LF line in a CRLF file


def test_a_doc_whose_markers_are_in_the_wrong_order_is_refused_not_left_as_it_was_silently(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("<!-- bench:inference:end -->\nx\n<!-- bench:inference:start -->\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no <!-- bench:inference:start -->"):
        common.replace_doc_block(doc, "inference", "new")


class _Interrupted(io.StringIO):
    """A file that takes half of what is written to it, then gets Ctrl-C."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def write(self, text):
        self.real.write(text[: len(text) // 2])
        self.real.close()
        raise KeyboardInterrupt


@pytest.mark.parametrize("what", ["doc", "json"])
def test_ctrl_c_while_writing_leaves_the_earlier_file_whole(tmp_path, monkeypatch, what):
    path = tmp_path / ("performance.md" if what == "doc" else "bench.json")
    before = DOC.format(name="inference") if what == "doc" else '{"earlier": "results"}\n'
    path.write_text(before, encoding="utf-8")
    real_open = builtins.open

    def interrupted_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _Interrupted(handle) if "w" in mode and str(tmp_path) in str(file) else handle

    monkeypatch.setattr(builtins, "open", interrupted_open)
    monkeypatch.setattr(io, "open", interrupted_open)  # what pathlib opens with
    with pytest.raises(KeyboardInterrupt):
        if what == "doc":
            common.replace_doc_block(path, "inference", "new table " * 100)
        else:
            common.write_json(path, {"new": list(range(100))})
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


# --------------------------------------------------------------------------------- inference.py
@pytest.fixture
def inference(monkeypatch):
    bench = load_bench("inference")
    monkeypatch.setattr(bench, "run_benchmark", not_measured)
    return bench


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--slices", "0"], "--slices: 0 is less than 1"),
        (["--repeats", "-1"], "--repeats: -1 is less than 1"),
        (["--threads", "0"], "--threads: 0 is less than 1"),
        (["--size", "0"], "--size: 0 is less than 1"),
        (["--batch-size", "0"], "--batch-size: 0 is less than 1"),
        (["--slices", "two"], "'two' is not a whole number"),
        (["--presets", ","], "--presets names no preset"),
        (["--presets", "freqmedclip-huge"], "unknown preset(s) ['freqmedclip-huge']"),
        (["--prompts", " , "], "--prompts names no prompt"),
        (["--devices", "gpu"], "--devices: 'gpu' is not a device of this machine"),
    ],
)
def test_inference_refuses_bad_options_before_measuring(inference, capsys, tmp_path, options, problem):
    line = refused(capsys, lambda: inference.main([*options, "--json", str(tmp_path / "x.json")]))
    assert problem in line


def test_inference_refuses_unusable_outputs_before_measuring(inference, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    no_block = tmp_path / "no_block.md"
    no_block.write_text("# nothing to replace\n")
    assert "is a folder" in refused(capsys, lambda: inference.main(["--json", str(tmp_path)]))
    assert "is a file, not a folder" in refused(capsys, lambda: inference.main(["--json", str(tmp_path / "file" / "x.json")]))
    ok = str(tmp_path / "x.json")
    assert "no such file" in refused(capsys, lambda: inference.main(["--json", ok, "--doc", str(tmp_path / "none.md")]))
    assert "no <!-- bench:inference:start -->" in refused(capsys, lambda: inference.main(["--json", ok, "--doc", str(no_block)]))
    assert "no <!-- bench:other:start -->" in refused(
        capsys, lambda: inference.main(["--json", ok, "--doc", str(no_block), "--doc-block", "other"])
    )
    assert no_block.read_text() == "# nothing to replace\n"


def _fake_records(preset="freqmedclip-tiny"):
    base = dict(preset=preset, device="cpu", slices=1, prompts=3, threads=1, matmul_flops_per_s=1e11,
                delta_rss_mb=10.0, floor_target=False, cuda_delta_mb=None)
    return [
        dict(base, method="engine", seconds_per_slice=0.02, flops_per_slice=10**9, scaling=2.0),
        dict(base, method="naive", seconds_per_slice=0.04),
        dict(base, method="sliceinferer", seconds_per_slice=0.03, delta_rss_mb=30.0),
    ]


def test_inference_records_a_command_that_pastes_back_and_every_setting(monkeypatch, tmp_path, capsys):
    bench = load_bench("inference")
    seen = {}
    monkeypatch.setattr(bench, "run_benchmark", lambda **kwargs: seen.update(kwargs) or _fake_records())
    doc = tmp_path / "performance.md"
    doc.write_text(DOC.format(name="inference-3"), encoding="utf-8")
    out = tmp_path / "new" / "folder" / "inference.json"  # a folder that does not exist yet is made
    argv = ["--presets", "freqmedclip-tiny", "--prompts", "liver,spleen,right kidney", "--slices", "1", "--repeats", "1",
            "--threads", "1", "--quick", "--size", "64", "--json", str(out), "--doc", str(doc), "--doc-block", "inference-3"]
    assert bench.main(argv) == 0
    assert seen["size"] == 64  # --quick no longer overrides an explicit --size
    result = json.loads(out.read_text())
    command = shlex.split(result["command"])
    assert command[0] == "bench/inference.py"
    assert bench.build_parser().parse_args(command[1:]).prompts == "liver,spleen,right kidney"
    settings = result["settings"]
    assert (settings["slices"], settings["repeats"], settings["threads"], settings["size"]) == (1, 1, 1, 64)
    assert settings["prompts"] == ["liver", "spleen", "right kidney"] and settings["doc_block"] == "inference-3"
    assert result["machine_before"]["torch"] and result["machine_before"]["cpu_count"]
    text = doc.read_text(encoding="utf-8")
    assert "--prompts 'liver,spleen,right kidney'" in text and "old table" not in text
    assert text.startswith("intro ×\n<!-- bench:inference-3:start -->\n`.venv/bin/python bench/inference.py ")
    assert text.endswith("\n<!-- bench:inference-3:end -->\noutro —\n")


# ---------------------------------------------------------------------------------- saliency.py
@pytest.fixture
def saliency(monkeypatch):
    import TextSegmentLib.weights

    monkeypatch.setattr(TextSegmentLib.weights, "load_model", not_measured)
    return load_bench("saliency")


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--repeats", "0"], "--repeats: 0 is less than 1"),
        (["--slices-per-prompt", "0"], "--slices-per-prompt: 0 is less than 1"),
        (["--phantoms", "-1"], "--phantoms: -1 is less than 0"),
        (["--threads", "0"], "--threads: 0 is less than 1"),
        (["--stages", "x"], "--stages 'x': give stages 1, 2 or 3"),
        (["--stages", "4"], "--stages '4': give stages 1, 2 or 3"),
        (["--grids", "fine"], "--grids 'fine': give compact and/or source"),
        (["--phantoms", "0"], "no case to measure"),
    ],
)
def test_saliency_refuses_bad_options_before_measuring(saliency, capsys, tmp_path, options, problem):
    line = refused(capsys, lambda: saliency.main([*options, "--json", str(tmp_path / "x.json")]))
    assert problem in line


def test_saliency_refuses_unusable_outputs_before_measuring(saliency, capsys, tmp_path):
    assert "is a folder" in refused(capsys, lambda: saliency.main(["--json", str(tmp_path)]))
    ok = str(tmp_path / "x.json")
    assert "no such file" in refused(capsys, lambda: saliency.main(["--json", ok, "--doc", str(tmp_path / "none.md")]))
    doc = tmp_path / "explainability.md"
    doc.write_text(DOC.format(name="saliency"))
    assert "no <!-- bench:saliency-tgcnet:start -->" in refused(
        capsys, lambda: saliency.main(["--json", ok, "--doc", str(doc), "--doc-block", "saliency-tgcnet"])
    )


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--model", "nope"], "error: unknown model 'nope'"),
        (["--weights", "no-such-weights"], "error: weights 'no-such-weights' for freqmedclip-tiny: no such file"),
    ],
)
def test_saliency_says_in_one_line_that_a_model_or_weights_do_not_exist(tmp_path, options, problem):
    bench = load_bench("saliency")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*options, "--phantoms", "1", "--threads", "1", "--json", str(tmp_path / "x.json")])
    assert str(exit_info.value.code).startswith(problem) and "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "x.json").exists()


def test_saliency_json_says_how_and_where_it_was_measured(monkeypatch, tmp_path):
    import TextSegmentLib.weights

    bench = load_bench("saliency")
    monkeypatch.setattr(TextSegmentLib.weights, "load_model", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(bench, "phantom_cases", lambda count, **k: [SimpleNamespace(name=f"p{i}") for i in range(count)])
    monkeypatch.setattr(bench, "run_benchmark", lambda model, cases, **k: {"summary": [], "overhead": [], "targets": {}})
    monkeypatch.setattr(bench, "format_tables", lambda *a, **k: "table")
    monkeypatch.setattr(bench, "format_targets", lambda *a, **k: "targets")
    out = tmp_path / "saliency.json"
    bench.main(["--phantoms", "1", "--repeats", "1", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"].startswith("bench/saliency.py --phantoms 1 --repeats 1")
    assert result["machine"]["torch"] and result["settings"]["repeats"] == 1 and result["settings"]["slices_per_prompt"] == 4


# -------------------------------------------------------------------------------- saliency_ab.py
def test_saliency_ab_refuses_an_unknown_revision_and_zero_runs_before_measuring(monkeypatch, capsys, tmp_path):
    bench = load_bench("saliency_ab")
    monkeypatch.setattr(bench, "sink_at", not_measured)
    monkeypatch.setattr(bench, "compare", not_measured)
    assert "--before 'no-such-revision': no such git revision" in refused(
        capsys, lambda: bench.main(["--before", "no-such-revision"])
    )
    assert "--runs: 0 is less than 1" in refused(capsys, lambda: bench.main(["--before", "HEAD", "--runs", "0"]))
    assert "is a folder" in refused(capsys, lambda: bench.main(["--before", "HEAD", "--json", str(tmp_path)]))


# ----------------------------------------------------------------------------------- post_hoc.py
@pytest.mark.parametrize(
    "options, problem",
    [
        ([], "nothing to score"),
        (["--thresholds", "0.5", "--threads", "0"], "--threads: 0 is less than 1"),
        (["--thresholds", "1.5"], "1.5 is no probability threshold"),
        (["--smoothing", "a,b,c"], "'a,b,c': write slice weights"),
        (["--smoothing", "0.5,0.5"], "'0.5,0.5': give an odd number of weights"),
        (["--shifts", "2"], "'2': write a shift as ROWS,COLUMNS"),
    ],
)
def test_post_hoc_refuses_bad_options_before_measuring(monkeypatch, capsys, options, problem):
    import TextSegmentLib.training.data

    bench = load_bench("post_hoc")
    monkeypatch.setattr(TextSegmentLib.training.data, "load_source", not_measured)
    assert problem in refused(capsys, lambda: bench.main(options))


def test_post_hoc_says_in_one_line_that_weights_or_phantoms_are_wrong(tmp_path):
    bench = load_bench("post_hoc")
    for options, problem in [
        (["--phantoms", "3-1"], "error: backwards seed range"),
        (["--phantoms", "1000", "--shape", "2x16x16", "--weights", "no-such-weights"], "error: weights 'no-such-weights'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*options, "--thresholds", "0.5", "--json", str(tmp_path / "x.json")])
        assert str(exit_info.value.code).startswith(problem), exit_info.value.code
    assert not (tmp_path / "x.json").exists()


def test_post_hoc_json_says_how_and_where_it_was_measured(monkeypatch, tmp_path):
    import TextSegmentLib.training.data
    import TextSegmentLib.weights

    bench = load_bench("post_hoc")
    monkeypatch.setattr(TextSegmentLib.training.data, "load_source", lambda spec: [])
    monkeypatch.setattr(bench, "score", lambda model, cases, variants, **k: {
        name: {"negatives": 1, "marked": 0, "L1": [0.9], "L2": [0.8], "L3": [0.7]} for name in variants})
    monkeypatch.setattr(TextSegmentLib.weights, "load_model",
                        lambda *a, **k: SimpleNamespace(weights_source=SimpleNamespace(label="tgcnet-tiny-v9")))
    out = tmp_path / "post_hoc.json"
    bench.main(["--thresholds", "0.6", "--shifts", "1,-1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "bench/post_hoc.py --thresholds 0.6 --shifts 1,-1 --json " + str(out)
    assert result["weights"] == "tgcnet-tiny-v9" and result["shape"] == "32x128x128" and result["threads"] == 1
    assert result["machine"]["torch"] and result["settings"]["shifts"] == [[1, -1]]


# -------------------------------------------------------------------------------- cpu_kernels.py
def test_cpu_kernels_refuses_zero_repeats_and_a_doc_without_its_block_before_measuring(monkeypatch, capsys, tmp_path):
    bench = load_bench("cpu_kernels")
    monkeypatch.setattr(bench, "call_rows", not_measured)
    doc = tmp_path / "performance.md"
    doc.write_text(DOC.format(name="inference"))
    ok = str(tmp_path / "x.json")
    assert "--repeats: 0 is less than 1" in refused(capsys, lambda: bench.main(["--repeats", "0", "--json", ok]))
    assert "no such file" in refused(capsys, lambda: bench.main(["--json", ok, "--doc", str(tmp_path / "none.md")]))
    assert "no <!-- bench:cpu-kernels:start -->" in refused(capsys, lambda: bench.main(["--json", ok, "--doc", str(doc)]))


def test_cpu_kernels_doc_note_names_the_command_that_was_run(monkeypatch, tmp_path):
    import bench.saliency
    import TextSegmentLib.weights

    cpu_kernels = load_bench("cpu_kernels")
    monkeypatch.setattr(bench.saliency, "real_cases", lambda root: [SimpleNamespace()])
    monkeypatch.setattr(TextSegmentLib.weights, "load_model", lambda *a, **k: None)
    for name in ("call_rows", "segment_rows"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: [])
    monkeypatch.setattr(cpu_kernels, "training_rows", lambda **k: [])
    doc = tmp_path / "performance.md"
    doc.write_text(DOC.format(name="cpu-kernels"), encoding="utf-8")
    out = tmp_path / "kernels.json"
    cpu_kernels.main(["--threads", "1", "--repeats", "1", "--json", str(out), "--doc", str(doc)])
    text = doc.read_text(encoding="utf-8")
    assert f"`.venv/bin/python bench/cpu_kernels.py --threads 1 --repeats 1 --json {out} --doc {doc}` on " in text
    result = json.loads(out.read_text())
    assert result["settings"]["repeats"] == 1 and result["command"].startswith("bench/cpu_kernels.py --threads 1")


# ------------------------------------------------------------------------------ the docs' commands
def published_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, script, arguments) of every `bench/SCRIPT.py ...` command in the published docs."""
    found = []
    for doc in PUBLISHED:
        text = doc.read_text(encoding="utf-8")
        spans = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        spans += re.findall(r"`([^`]*bench/\w+\.py[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for span in spans:
            match = re.search(r"bench/(\w+)\.py(.*)$", span.replace("\n", " "))
            if match:
                arguments = match.group(2).split(" # ")[0].replace("<trained id>", "TRAINED_ID")
                found.append((doc.name, match.group(1), shlex.split(arguments)))
    return found


def test_the_published_rerun_commands_parse_with_todays_scripts():
    commands = published_commands()
    assert {script for _, script, _ in commands} == set(SCRIPTS)
    assert len(commands) >= 15
    broken = []
    for doc, script, arguments in commands:
        try:
            load_bench(script).build_parser().parse_args(arguments)
        except SystemExit:
            broken.append(f"{doc}: bench/{script}.py {shlex.join(arguments)}")
    assert not broken, "\n".join(broken)


def test_a_doc_behind_a_link_is_updated_through_it_and_keeps_its_permissions(tmp_path):
    real = tmp_path / "real.md"
    real.write_text(DOC.format(name="inference"), encoding="utf-8")
    real.chmod(0o640)
    link = tmp_path / "performance.md"
    link.symlink_to(real)
    common.replace_doc_block(link, "inference", "new table")
    assert link.is_symlink() and "new table" in real.read_text(encoding="utf-8")
    assert real.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "options, presets",
    [(["--quick"], ["freqmedclip-tiny", "tgcnet-tiny"]), (["--quick", "--presets", "tgcnet-base"], ["tgcnet-base"])],
)
def test_quick_runs_the_presets_asked_for_and_says_which_it_ran(monkeypatch, tmp_path, options, presets):
    bench = load_bench("inference")
    seen = {}
    monkeypatch.setattr(bench, "run_benchmark",
                        lambda **kwargs: seen.update(kwargs) or [r for p in kwargs["presets"] for r in _fake_records(p)])
    bench.main([*options, "--json", str(tmp_path / "x.json")])
    assert seen["presets"] == presets and (seen["slices"], seen["repeats"], seen["size"]) == (4, 1, 256)
    assert json.loads((tmp_path / "x.json").read_text())["settings"]["presets"] == presets
