"""Inference benchmark: the engine beside a naive per-slice loop and MONAI's SliceInferer, on the same network.

    .venv/bin/python bench/inference.py --threads 1 --doc docs/performance.md   # full run, ~10 min on 2 cores
    .venv/bin/python bench/inference.py --threads 1 --presets freqmedclip-tiny,freqmedclip-base \
        --prompts "liver,spleen,right kidney" --doc docs/performance.md --doc-block inference-3-prompts
    .venv/bin/python bench/inference.py --quick                                  # smoke run: tiny presets, few slices

For each preset (random weights; base presets get BiomedCLIP-shaped towers built randomly, offline)
and each device (the CPU; CUDA with AMP when present), three ways of getting probability maps on the
volume grid from a 512×512 phantom:

* **engine**: ``segment`` (batched, text encoded once and cached, backbones run once per slice
  for all prompts), on N and on 2N slices;
* **naive**: per slice and prompt: window, fit, encode the prompt again, forward at batch 1, inverse fit;
* **sliceinferer**: the volume windowed and fitted to the model size as one (1, 3, S, S, N) tensor,
  run by ``monai.inferers.SliceInferer`` (``spatial_dim=2``: one S×S window per slice,
  ``sw_batch_size`` = the engine's batch) through ``lambda x: model(x, text).logits``, then mapped
  back to the slice grid. The windowing, fitting and mapping back are timed too: every method is
  timed from the HU volume to probabilities on its grid.

Each runner returns one probability array per prompt, as the engine hands them out (float16, the
engine's default ``probability_dtype``; float32 for the other two), so the harness adds no copy.
``--probability-grid compact`` has the engine keep its maps on the compact grid over the volume's
extent (``TextSegmentLib/grid.py``); the masks stay on the source grid, and "max |Δp|" compares the
others with the engine's maps resampled back onto it.

Each method runs in its own subprocess, so peak memory is its own: "Δ RSS" is the peak resident
memory during warm-up and the first timed run minus the process's RSS once the model and the volume
exist; "peak RSS" is that peak itself (on CUDA also "Δ CUDA", from ``max_memory_allocated``, which
the CUDA memory target uses). The three processes stay alive and take turns, one timed repeat each
per round, the order rotating, so a change in the machine's load reaches all methods alike. The **FLOP floor** of a slice is its counted FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions, attention; one image with one prompt) divided
by the rate of a large dense matmul timed in the same process with the same threads (fp32 on the
CPU, fp16 on CUDA, where the model runs under AMP). "× floor" is measured seconds per slice over that.
Times are medians over ``--repeats``; the engine's N and 2N runs alternate. The matmul rate is
sampled after every timed run, in the same process and with the same threads.

Prints Markdown tables, writes JSON (``--json``) and, with ``--doc``, replaces the
``<!-- bench:inference:start/end -->`` block of that file. Random weights: the numbers are about
speed and memory only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    check_outputs,
    command_line,
    machine_info,
    markdown_table,
    median,
    peak_rss_mb,
    positive_int,
    process_peak_rss_mb,
    replace_doc_block,
    reset_peak_rss,
    rss_mb,
    timed,
    trim_heap,
    write_json,
)

log = logging.getLogger("bench.inference")

BIOMEDCLIP_RANDOM = "random:BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
METHODS = ("engine", "naive", "sliceinferer")
FLOOR_TARGET = 1.5  # base presets on the CPU: at most this many times the FLOP floor per slice
SPEEDUP_TARGET = 1.5  # at least this much faster than SliceInferer ...
MEMORY_TARGET = 0.5  # ... at most this fraction of its memory
SCALING_RANGE = (1.9, 2.1)  # t(2N) / t(N)


@dataclass(frozen=True)
class Preset:
    overrides: dict = field(default_factory=dict)
    slices: int = 16  # N; the engine also runs 2N
    repeats: int = 3
    floor_target: bool = False  # whether the FLOP-floor target applies (base presets)


PRESETS = {
    "freqmedclip-tiny": Preset(slices=32, repeats=3),
    "tgcnet-tiny": Preset(slices=32, repeats=3),
    "freqmedclip-base": Preset({"clip_source": BIOMEDCLIP_RANDOM}, slices=4, repeats=2, floor_target=True),
    "tgcnet-base": Preset({"clip_source": BIOMEDCLIP_RANDOM}, slices=4, repeats=2, floor_target=True),
}
QUICK = {"presets": ("freqmedclip-tiny", "tgcnet-tiny"), "slices": 4, "repeats": 1, "size": 256}


# ------------------------------------------------------------------------------- inputs and model
def build_model(name: str, *, device: str, overrides: Optional[dict] = None) -> Any:
    """The preset with random weights, seeded: every subprocess builds the very same network."""
    import torch

    from TextSegmentLib.weights import load_model

    torch.manual_seed(0)
    return load_model(name, weights="random", device=device, **(overrides or {}))


def make_volume(slices: int, size: int, *, seed: int = 0):
    """A CT phantom of ``slices`` × ``size`` × ``size``; every slice holds body, so no method skips one."""
    from TextSegmentLib.phantom import make_phantom

    return make_phantom(seed=seed, shape=(slices, size, size)).ct


def first_slices(volume, n: int):
    from TextSegmentLib.volume import Volume

    return Volume(array=volume.array[:n], spacing=volume.spacing, origin=volume.origin, direction=volume.direction)


# ---------------------------------------------------------------------------------- the three ways
# Each way returns one probability array per prompt, as it made them: stacking them here would be a
# copy of the outputs that the harness, not the method, adds to the peak memory.
def run_engine(
    model, volume, prompts: Sequence[str], *, device: str, batch_size: int, probability_grid: str = "source"
) -> list[np.ndarray]:
    from TextSegmentLib.engine import segment

    run = segment(volume, list(prompts), model=model, device=device, batch_size=batch_size, skip_empty_slices=False,
                  probability_grid=probability_grid)
    return [r.probability.array for r in run.results]


def run_naive(model, volume, prompts: Sequence[str], *, device: str) -> list[np.ndarray]:
    """What a first script does: one slice and one prompt at a time, the prompt encoded every time."""
    import torch

    from TextSegmentLib.preprocess import fit_to_square, inverse_fit, slice_plan, window_composite

    target = torch.device(device)
    plan = slice_plan(volume, axis="axial")
    hu = plan.extract(volume.array)
    out = np.zeros((len(prompts),) + hu.shape, dtype=np.float32)
    with torch.no_grad():
        for k in range(hu.shape[0]):
            for p, prompt in enumerate(prompts):
                image = torch.from_numpy(window_composite(hu[k : k + 1]))
                image, fit = fit_to_square(image, size=model.image_size, pixel_spacing=plan.pixel_spacing)
                text = model.encode_text([prompt])
                with torch.autocast(device_type=target.type, enabled=target.type == "cuda"):
                    logits = model(image.to(target), text).logits
                prob = torch.sigmoid(logits.float())[:, 0].cpu()
                out[p, k] = inverse_fit(prob, fit).clamp_(0, 1).numpy()[0]
    return [plan.restore(o) for o in out]


def run_slice_inferer(model, volume, prompts: Sequence[str], *, device: str, sw_batch_size: int) -> list[np.ndarray]:
    """MONAI's way: the whole volume pre-windowed and pre-resized, slices taken along the last spatial dim."""
    import torch
    from monai.inferers import SliceInferer

    from TextSegmentLib.preprocess import fit_to_square, inverse_fit, slice_plan, window_composite

    target = torch.device(device)
    size = model.image_size
    plan = slice_plan(volume, axis="axial")
    hu = plan.extract(volume.array)
    images, fit = fit_to_square(torch.from_numpy(window_composite(hu)), size=size, pixel_spacing=plan.pixel_spacing)
    stack = images.permute(1, 2, 3, 0)[None].to(target)  # (1, 3, S, S, N)
    inferer = SliceInferer(roi_size=(size, size), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            text = model.encode_text([prompt])

            def network(x, text=text):
                with torch.autocast(device_type=target.type, enabled=target.type == "cuda"):
                    return model(x, text.index([0] * len(x))).logits.float()

            logits = inferer(stack, network)  # (1, 1, S, S, N)
            probs = torch.sigmoid(logits[0, 0].permute(2, 0, 1)).cpu()
            out.append(plan.restore(inverse_fit(probs, fit).clamp_(0, 1).numpy()))
    return out


# ------------------------------------------------------------------------------- FLOPs and the floor
def matmul_rate(*, device: str, n: int = 2048, repeats: int = 5) -> list[float]:
    """FLOP/s of an n×n dense matmul, one value per repeat (fp16 on CUDA, as under AMP; fp32 on the CPU)."""
    import torch

    target = torch.device(device)
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=target, dtype=dtype)
    b = torch.randn(n, n, device=target, dtype=dtype)
    sync = torch.cuda.synchronize if target.type == "cuda" else None
    a @ b  # warm-up
    return [2.0 * n**3 / timed(lambda: a @ b, sync=sync)[0] for _ in range(repeats)]


def flops_per_slice(model, *, device: str) -> int:
    """FLOPs of one forward pass for one image and one prompt (the text is encoded once, not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # torch's table lacks the CPU flash-attention kernel that SDPA picks on the CPU
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    size = model.image_size
    images = torch.rand(1, 3, size, size, device=device)
    # grad mode on: the counter's module tracker breaks on parameter views under no_grad/inference_mode
    with torch.enable_grad():
        text = model.encode_text(["liver"])
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(images, text)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------- one method
class MethodSession:
    """One method on one model and volume, measured in steps so that methods can take turns.

    Built in a fresh process, its memory is the method's own: the baseline is the RSS once the
    model and volume exist (free heap handed back first), the peak covers the warm-up and the first
    timed run. Each ``step`` times the first ``slices`` slices (and, for the engine, twice as many),
    then samples the matmul rate in the same process, so the floor tracks the machine's load.
    """

    def __init__(
        self, method: str, model, volume, prompts: Sequence[str], *, device: str, slices: int, batch_size: int,
        matmul_size: int = 2048, probability_grid: str = "source",
    ):
        import torch

        runners = {
            "engine": lambda v: run_engine(model, v, prompts, device=device, batch_size=batch_size,
                                           probability_grid=probability_grid),
            "naive": lambda v: run_naive(model, v, prompts, device=device),
            "sliceinferer": lambda v: run_slice_inferer(model, v, prompts, device=device, sw_batch_size=batch_size),
        }
        if method not in runners:
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        if volume.shape[0] < (2 * slices if method == "engine" else slices):
            raise ValueError(f"the volume has {volume.shape[0]} slices; {method} on N={slices} needs more")
        self.method, self.model, self.device, self.prompts = method, model, device, list(prompts)
        self.slices, self.batch_size, self.run = slices, batch_size, runners[method]
        self.cuda = torch.device(device).type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else None
        self.matmul_size = max(matmul_size, 8192) if self.cuda else matmul_size
        self.small, self.large = first_slices(volume, slices), first_slices(volume, 2 * slices)
        self.seconds: list[float] = []
        self.seconds_2n: list[float] = []
        self.probabilities: Optional[list[np.ndarray]] = None
        self.peak: Optional[float] = None
        self.cuda_peak: Optional[float] = None

        # every method's libraries are loaded before the baseline: importing MONAI is not inference memory
        import monai.inferers  # noqa: F401

        import TextSegmentLib.engine  # noqa: F401
        import TextSegmentLib.preprocess.resize  # noqa: F401

        self.rates = matmul_rate(device=device, n=self.matmul_size)
        trim_heap()
        self.baseline = rss_mb()
        self.cuda_baseline = torch.cuda.memory_allocated() / 2**20 if self.cuda else None
        self.peak_reset = reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        # first-call costs (kernels, allocator, the engine's text cache) stay out of the timing
        self.run(first_slices(volume, 1 if method == "naive" else min(batch_size, slices)))

    def step(self) -> None:
        import torch

        trim_heap()  # every timed run starts from a trimmed heap, the 2N run too (else N alone pays the page faults)
        elapsed, result = timed(lambda: self.run(self.small), sync=self.sync)
        self.seconds.append(elapsed)
        if self.probabilities is None:
            self.probabilities, self.peak = result, peak_rss_mb()
            self.cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        del result
        if self.method == "engine":
            trim_heap()
            self.seconds_2n.append(timed(lambda: self.run(self.large), sync=self.sync)[0])
        self.rates += matmul_rate(device=self.device, n=self.matmul_size, repeats=3)

    def record(self, *, count_flops: bool = False) -> dict:
        import torch

        per_slice = median(self.seconds) / self.slices
        record = {
            "method": self.method,
            "device": self.device,
            "slices": self.slices,
            "prompts": len(self.prompts),
            "repeats": len(self.seconds),
            "batch_size": 1 if self.method == "naive" else self.batch_size,
            "threads": torch.get_num_threads(),
            "seconds": self.seconds,
            "seconds_per_slice": per_slice,
            "slices_per_s": 1.0 / per_slice,
            "matmul_flops_per_s": median(self.rates),
            "matmul_gflops": median(self.rates) / 1e9,
            "matmul_flops_per_s_samples": self.rates,
            "baseline_rss_mb": self.baseline,
            "peak_rss_mb": self.peak,
            "delta_rss_mb": self.peak - self.baseline,
            "process_peak_rss_mb": process_peak_rss_mb(),
            "peak_reset": self.peak_reset,
            "cuda_peak_mb": self.cuda_peak,
            "cuda_delta_mb": self.cuda_peak - self.cuda_baseline if self.cuda else None,
        }
        if self.method == "engine":
            record.update(slices_2n=2 * self.slices, seconds_2n=self.seconds_2n)
            record["scaling"] = median(self.seconds_2n) / median(self.seconds)
        if count_flops:
            record["flops_per_slice"] = flops_per_slice(self.model, device=self.device)
        return record


def measure(
    method: str, model, volume, prompts: Sequence[str], *, device: str, slices: int, repeats: int, batch_size: int,
    count_flops: bool = False, matmul_size: int = 2048,
) -> tuple[dict, np.ndarray]:
    """All of one method's steps in this process: its record and the maps (prompt, z, y, x) of its first timed run."""
    session = MethodSession(
        method, model, volume, prompts, device=device, slices=slices, batch_size=batch_size, matmul_size=matmul_size
    )
    for _ in range(repeats):
        session.step()
    return session.record(count_flops=count_flops), session.probabilities


# ------------------------------------------------------------------------------------ the summary
def summarise(records: Sequence[dict]) -> list[dict]:
    """One row per (preset, device): the engine against its FLOP floor, SliceInferer and the naive loop.

    Each record gets its own ``floor_ratio`` (its seconds per slice over its process's floor) and
    ``max_abs_diff`` where the caller set ``max_abs_diff``; the rows carry the targets' verdicts.
    """
    rows = []
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        groups.setdefault((record["preset"], record["device"]), {})[record["method"]] = record
    for (preset, device), by_method in groups.items():
        engine = by_method["engine"]
        flops = engine["flops_per_slice"]
        for record in by_method.values():
            record["flops_per_slice"] = flops
            floor = flops * record["prompts"] / record["matmul_flops_per_s"]
            record["floor_s_per_slice"] = floor
            record["floor_ratio"] = record["seconds_per_slice"] / floor
        inferer, naive = by_method.get("sliceinferer"), by_method.get("naive")
        row = {
            "preset": preset,
            "device": device,
            "slices": engine["slices"],
            "gflop_per_slice": flops / 1e9,
            "engine_s_per_slice": engine["seconds_per_slice"],
            "floor_s_per_slice": engine["floor_s_per_slice"],
            "floor_ratio": engine["floor_ratio"],
            "speedup_vs_sliceinferer": inferer["seconds_per_slice"] / engine["seconds_per_slice"] if inferer else None,
            "memory_vs_sliceinferer": _ratio(engine["delta_rss_mb"], inferer["delta_rss_mb"]) if inferer else None,
            "speedup_vs_naive": naive["seconds_per_slice"] / engine["seconds_per_slice"] if naive else None,
            "scaling": engine["scaling"],
            "floor_target_applies": bool(engine.get("floor_target", False)) and device == "cpu",
        }
        if device != "cpu" and inferer and engine.get("cuda_delta_mb") is not None:
            row["memory_vs_sliceinferer"] = _ratio(engine["cuda_delta_mb"], inferer["cuda_delta_mb"])
        row.update(verdicts(row))
        rows.append(row)
    return rows


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


def verdicts(row: dict) -> dict:
    """Pass/fail of each target for one summary row (None where a target does not apply or was not measured)."""

    def check(value, ok):
        return None if value is None or not math.isfinite(value) else bool(ok(value))

    low, high = SCALING_RANGE
    return {
        "floor_ok": check(row["floor_ratio"], lambda v: v <= FLOOR_TARGET) if row["floor_target_applies"] else None,
        "speedup_ok": check(row["speedup_vs_sliceinferer"], lambda v: v >= SPEEDUP_TARGET),
        "memory_ok": check(row["memory_vs_sliceinferer"], lambda v: v <= MEMORY_TARGET),
        "scaling_ok": check(row["scaling"], lambda v: low <= v <= high),
    }


def format_tables(records: Sequence[dict], summary: Sequence[dict], *, title: str) -> str:
    columns = [
        ("preset", "preset"), ("device", "device"), ("method", "method"), ("N", "slices"),
        ("batch", "batch_size"), ("s/slice", "seconds_per_slice"), ("slices/s", "slices_per_s"),
        ("matmul GFLOP/s", "matmul_gflops"), ("× FLOP floor", "floor_ratio"),
        ("Δ RSS MB", "delta_rss_mb"), ("peak RSS MB", "peak_rss_mb"), ("max |Δp| vs engine", "max_abs_diff"),
    ]
    if any(r.get("cuda_delta_mb") is not None for r in records):
        columns.insert(-1, ("Δ CUDA MB", "cuda_delta_mb"))
    methods = markdown_table(records, columns)
    low, high = SCALING_RANGE
    targets = markdown_table(
        [dict(r, floor_cell=_with_verdict(r["floor_ratio"], r["floor_ok"])) for r in summary],
        [
            ("preset", "preset"), ("device", "device"), ("GFLOP/slice", "gflop_per_slice"),
            ("engine s/slice", "engine_s_per_slice"), ("floor s/slice", "floor_s_per_slice"),
            (f"× floor (≤ {FLOOR_TARGET}, base, CPU)", "floor_cell"),
            (f"speed-up vs SliceInferer (≥ {SPEEDUP_TARGET})", "speedup_vs_sliceinferer"), ("ok", "speedup_ok"),
            (f"memory vs SliceInferer (≤ {MEMORY_TARGET})", "memory_vs_sliceinferer"), ("ok ", "memory_ok"),
            ("speed-up vs naive", "speedup_vs_naive"),
            (f"t(2N)/t(N) ({low}–{high})", "scaling"), ("ok  ", "scaling_ok"),
        ],
    )
    return f"{title}\n\n{methods}\n\n{targets}"


def _with_verdict(value: float, ok: Optional[bool]) -> str:
    return f"{value:.3g}" + ("" if ok is None else (" ✓" if ok else " ✗"))


# --------------------------------------------------------------------------------- the subprocesses
def worker(spec_path: str) -> None:
    """One (preset, device, method) in this process, stepped by the parent through stdin/stdout.

    The parent sends ``step`` (one timed repeat) or ``finish`` (write the record, exit) and waits for
    the answer, so only one method runs at any time and the methods' repeats alternate.
    """
    protocol, sys.stdout = sys.stdout, sys.stderr  # stray prints must not break the protocol
    spec = json.loads(Path(spec_path).read_text())
    import torch

    logging.getLogger().setLevel(logging.WARNING)  # the parent already says what runs and that weights are random
    logging.getLogger("TextSegmentLib.weights").setLevel(logging.ERROR)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from TextSegmentLib.volume import Volume

    array = np.load(spec["volume"])
    volume = Volume(array=array, spacing=spec["spacing"], origin=spec["origin"], direction=np.asarray(spec["direction"]))
    model = build_model(spec["preset"], device=spec["device"], overrides=spec["overrides"])
    session = MethodSession(
        spec["method"], model, volume, spec["prompts"], device=spec["device"], slices=spec["slices"],
        batch_size=spec["batch_size"], probability_grid=spec["probability_grid"],
    )
    print("ready", file=protocol, flush=True)
    for command in sys.stdin:
        if command.strip() == "step":
            session.step()
            print("ok", file=protocol, flush=True)
        elif command.strip() == "finish":
            np.savez(spec["probabilities"], *session.probabilities)
            write_json(spec["result"], session.record(count_flops=spec["method"] == "engine"))
            print("done", file=protocol, flush=True)
            return


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, spec: dict, folder: Path):
        self.name = f"{spec['preset']}-{spec['device'].replace(':', '')}-{spec['method']}"
        self.spec = dict(spec, result=str(folder / f"{self.name}.json"), probabilities=str(folder / f"{self.name}.npz"))
        spec_path = folder / f"{self.name}.spec.json"
        spec_path.write_text(json.dumps(self.spec))
        env = dict(os.environ)
        if spec["threads"]:
            env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        log.info("%s: build, warm up", self.name)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, answer: str) -> None:
        line = self.process.stdout.readline().strip()
        if line != answer:
            self.process.kill()
            raise SystemExit(f"{self.name} failed (said {line!r}, expected {answer!r}); its error is printed above")

    def send(self, command: str, answer: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect(answer)

    def finish(self) -> tuple[dict, list[np.ndarray]]:
        self.send("finish", "done")
        self.process.wait()
        with np.load(self.spec["probabilities"]) as saved:
            return json.loads(Path(self.spec["result"]).read_text()), [saved[k] for k in saved.files]


def run_benchmark(
    *,
    presets: Sequence[str],
    devices: Sequence[str],
    prompts: Sequence[str],
    size: int,
    slices: Optional[int],
    repeats: Optional[int],
    threads: Optional[int],
    batch_size: Optional[int],
    probability_grid: str = "source",
) -> list[dict]:
    """Per preset and device, one live worker per method; their timed repeats take turns (the order rotates)."""
    from TextSegmentLib.engine import CPU_BATCH, CUDA_BATCH
    from TextSegmentLib.grid import on_grid_of

    chosen = {name: PRESETS[name] for name in presets}
    most = max(2 * (slices or p.slices) for p in chosen.values())
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        folder = Path(tmp)
        volume = make_volume(most, size)
        np.save(folder / "volume.npy", volume.array)
        geometry = {
            "volume": str(folder / "volume.npy"), "spacing": list(volume.spacing), "origin": list(volume.origin),
            "direction": volume.direction.tolist(),
        }
        for device in devices:
            batch = batch_size or (CUDA_BATCH if device.startswith("cuda") else CPU_BATCH)
            for name, preset in chosen.items():
                spec = dict(
                    geometry, preset=name, overrides=preset.overrides, device=device, prompts=list(prompts),
                    slices=slices or preset.slices, threads=threads, batch_size=batch,
                    probability_grid=probability_grid,
                )
                workers = [Worker(dict(spec, method=method), folder) for method in METHODS]
                rounds = repeats or preset.repeats
                for r in range(rounds):
                    log.info("%s on %s: repeat %d/%d", name, device, r + 1, rounds)
                    for w in workers[r % len(workers):] + workers[: r % len(workers)]:
                        w.send("step", "ok")
                outputs = {}
                for method, w in zip(METHODS, workers):
                    record, outputs[method] = w.finish()
                    record.update(preset=name, floor_target=preset.floor_target)
                    records.append(record)
                shapes = [naive.shape for naive in outputs["naive"]]  # every map on the volume's grid (compact ones resampled)
                on_volume = {m: [on_grid_of(a.astype(np.float32), sh) for a, sh in zip(outputs[m], shapes)] for m in outputs}
                for record in records[-len(METHODS):]:
                    record["probability_grid"] = probability_grid if record["method"] == "engine" else "source"
                    record["max_abs_diff"] = max(
                        float(np.abs(mine - ours).max()) for mine, ours in zip(on_volume[record["method"]], on_volume["engine"])
                    )
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=None, help=f"comma-separated presets (default: {','.join(PRESETS)}; "
                                                        f"with --quick: {','.join(QUICK['presets'])})")
    parser.add_argument("--devices", default=None, help="comma-separated; default: cpu, plus cuda when present")
    parser.add_argument("--prompts", default="liver", help="comma-separated prompts (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="in-plane size of the phantom's slices (default: 512; 256 with --quick)")
    parser.add_argument("--slices", type=positive_int, default=None, help="N for every preset (default: 32 tiny, 4 base)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default: 3 tiny, 2 base)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="engine batch = sw_batch_size (default: the engine's)")
    parser.add_argument("--probability-grid", choices=("source", "compact"), default="source",
                        help="the engine's probability maps: on the CT's grid, or compact (grid.py; the others: source; "
                             "default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny presets, 4 slices of 256², 1 repeat (options given beside it win)")
    parser.add_argument("--json", default=str(REPO / "out" / "bench_inference.json"),
                        help="where the results go (default: out/bench_inference.json in the repository)")
    parser.add_argument("--doc", default=None, help="Markdown file whose bench:BLOCK block gets the tables")
    parser.add_argument("--doc-block", default="inference",
                        help="BLOCK for --doc (one per prompt count, say; default: %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        worker(args.worker)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    named = args.presets if args.presets is not None else ",".join(PRESETS)
    presets = [p.strip() for p in named.split(",") if p.strip()]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {list(PRESETS)}")
    if not presets:
        parser.error(f"--presets names no preset; known: {list(PRESETS)}")
    slices, repeats, size = args.slices, args.repeats, args.size or 512
    if args.quick:
        presets = presets if args.presets is not None else list(QUICK["presets"])
        slices, repeats, size = slices or QUICK["slices"], repeats or QUICK["repeats"], args.size or QUICK["size"]
    here = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else here
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    if not prompts:
        parser.error("--prompts names no prompt")
    for device in devices or [""]:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind not in here:
            parser.error(f"--devices: {device!r} is not a device of this machine ({', '.join(here)})")
    check_outputs(parser, json_path=args.json, doc=args.doc, block=args.doc_block)

    before = machine_info()
    started = time.perf_counter()
    records = run_benchmark(
        presets=presets, devices=devices, prompts=prompts, size=size, slices=slices, repeats=repeats,
        threads=args.threads, batch_size=args.batch_size, probability_grid=args.probability_grid,
    )
    summary = summarise(records)
    after = machine_info()
    command = command_line("bench/inference.py", argv)
    title = (
        f"`.venv/bin/python {command.strip()}` — {time.strftime('%Y-%m-%d')}, {before['cpu']}, "
        f"{before['cpu_count']} CPU(s), torch {before['torch']} ({records[0]['threads']} thread(s)), "
        f"MONAI {before['monai']}, {size}×{size} phantom slices, prompts: {', '.join(prompts)}, "
        f"load average {before['load_average'][0]:.1f} before → {after['load_average'][0]:.1f} after, "
        f"{time.perf_counter() - started:.0f} s in all. Random weights."
        + (" The engine keeps its probability maps on the compact grid." if args.probability_grid == "compact" else "")
    )
    tables = format_tables(records, summary, title=title)
    print(tables)
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command.strip(),
        "machine_before": before,
        "machine_after": after,
        "settings": {
            "presets": presets, "devices": devices, "prompts": prompts, "size": size, "slices": slices,
            "repeats": repeats, "threads": args.threads, "batch_size": args.batch_size,
            "probability_grid": args.probability_grid, "quick": args.quick, "doc": args.doc,
            "doc_block": args.doc_block if args.doc else None,
        },
        "targets": {
            "floor_ratio_max": FLOOR_TARGET, "speedup_vs_sliceinferer_min": SPEEDUP_TARGET,
            "memory_vs_sliceinferer_max": MEMORY_TARGET, "scaling_range": list(SCALING_RANGE),
        },
        "summary": summary,
        "records": records,
    }
    print(f"wrote {write_json(args.json, result)}")
    if args.doc:
        replace_doc_block(args.doc, args.doc_block, tables)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
