"""`fusedformer bench qmatmul`: quantized matmuls y = x @ W.T per weight format.

Ours (the native kernel, W decoded inside it) per scheme against torch fp32 (the baseline of
every case), torch bf16, torch._weight_int8pack_mm and MLX's quantized_matmul on the CPU
(forced with mx.eval). GB/s count each implementation's own weight bytes (compressed for the
quantized ones) plus x and y, so % of bandwidth says how close a GEMV is to the memory limit.

Weights are read from memory, as in a model's decode step: each implementation cycles through
as many copies of its weight as it takes to stream twice the last-level cache per round
(harness.cold_copies; a 4-bit 4096x4096 weight is 10 MiB and would otherwise be timed from
the cache while torch's 64 MiB fp32 one is not). The ff.mlx rows use one copy.

Every case times its implementations in alternating rounds (harness.measure_in_rounds), with
the streaming-read probe and the fp32 FMA peak probe as two more contenders (the "read probe"
and "peak probe" rows): % BW is of what that probe read in the same rounds, since this VM's read
bandwidth swings 16-25 GB/s within seconds, and % peak of the FMA rate measured there (it moves
by 5%); torch bf16's % peak is of the bf16 dot / AMX tile peak where the CPU has one
(Report.peak_for), measured at the start of the run. The MLX rows say how many threads MLX's CPU
path kept busy (cpu_per_wall: one, where ours and torch's use the pool's), and where MLX cannot
be imported each case names its rows as not installed.
torch's _weight_int8pack_mm and MLX's quantized_matmul are reference loops at large M (seconds
per call): there they are timed once, after the rounds.

Our GEMV rows (M <= 8) whose weight fits in the last-level cache also time the same call on one
copy, cache-resident (`cached_gbs`): the kernel's own ceiling with no DRAM traffic. Where it is
not above the DRAM bandwidth, the kernel is bound by its compute, not by memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fusedformer.bench.harness import (
    MLX_INSTALL,
    PEAK_PROBE,
    READ_PROBE,
    PeakProbe,
    ReadProbe,
    add_rounds_argument,
    cold_copies,
    in_turn,
    last_level_cache_bytes,
    measure,
    measure_in_rounds,
    not_installed,
    parse_shape,
)
from fusedformer.bench.report import Report, track

MLX_QMATMUL = "mlx quantized_matmul q4 g64 (cpu)"
FULL_SHAPES = [(1, 4096, 4096), (1, 11008, 4096), (8, 4096, 4096), (512, 4096, 4096)]  # (M, N, K)
QUICK_SHAPES = [(1, 2048, 2048), (8, 2048, 2048), (128, 2048, 2048)]
BASELINE = "torch fp32"


def add_arguments(parser) -> None:
    parser.add_argument("--schemes", default="affine4,affine8,int8,palettize4,prune50-affine4",
                        help="comma-separated short names: int8, affineB (groups of 64), palettizeB or lutB, "
                        "lutB-grouped, pruneP, pruneP-<inner> (as `fusedformer export --weights`)")
    parser.add_argument("--shape", action="append", default=None, metavar="M,N,K",
                        help="time these shapes (x [M, K] @ W [N, K].T) instead of the built-in ones "
                        "(repeatable; the files are qmatmul_shapes.json/.png)")
    add_rounds_argument(parser)


def parse_shapes(specs: list[str]) -> list[tuple[int, int, int]]:
    """The (M, N, K) of `--shape M,N,K` arguments."""
    return [parse_shape(spec, "M,N,K", "qmatmul") for spec in specs]


def _scheme(name: str):
    from fusedformer.quant.names import scheme_from_name

    return scheme_from_name(name, "bench qmatmul")


def _copies(obj, nbytes: float, clone):
    """obj and clones of it, enough to be read from memory when used in turn (cold_copies)."""
    return in_turn([obj] + [clone(obj) for _ in range(cold_copies(nbytes) - 1)])


def _clone_weight(qw):
    """A copy of qw with its kernel arguments made, as a model's layer has them after its first
    call (a pruned weight's row offsets are counted then: not a cost of every call)."""
    from fusedformer.ops_quant import kernel_args
    from fusedformer.quant import QuantizedWeight

    clone = QuantizedWeight.from_dict({name: a.copy() for name, a in qw.to_dict().items()})
    kernel_args(clone)
    return clone


@dataclass
class Contender:
    """One implementation of a case: its call, the bytes one call must move, and its row's note
    and extra figures. ``once``: a slow reference loop, timed by a single call after the rounds;
    ``mlx``: MLX's, whose note says how many threads it used (MLX picks its own)."""

    fn: Callable[[], object]
    nbytes: float
    note: str = ""
    once: bool = False
    figures: dict = field(default_factory=dict)
    mlx: bool = False


SLOW_NOTE = "single run after the rounds (slow reference path)"
SLOW_ROWS = 64  # from this many x rows torch's int8pack_mm and MLX's CPU quantized_matmul are loops


def _torch_contenders(m: int, x, w, io: float) -> dict[str, Contender]:
    """torch fp32 (the baseline), torch bf16 and torch._weight_int8pack_mm, each weight in copies."""
    import torch

    n, k = w.shape
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    w32 = _copies(wt, 4.0 * n * k, torch.clone)
    xb = xt.bfloat16()
    w16 = _copies(wt.bfloat16(), 2.0 * n * k, torch.clone)
    scale = (wt.abs().amax(1) / 127).clamp_min(1e-12)
    w8 = _copies(torch.round(wt / scale[:, None]).to(torch.int8), 1.0 * n * k, torch.clone)
    slow = m >= SLOW_ROWS
    no_grad = torch.inference_mode()  # (as a decorator: each call runs without autograd records)
    return {
        BASELINE: Contender(no_grad(lambda: torch.nn.functional.linear(xt, w32())), 4.0 * n * k + io),
        "torch bf16": Contender(no_grad(lambda: torch.nn.functional.linear(xb, w16())), 2.0 * n * k + io / 2),
        "torch _weight_int8pack_mm": Contender(no_grad(lambda: torch._weight_int8pack_mm(xt, w8(), scale)),
                                               1.0 * n * k + 4 * n + io, SLOW_NOTE if slow else "", once=slow),
    }


def _mlx_contender(mx, m: int, x, w, io: float) -> Contender:
    """MLX's own quantized_matmul (4-bit, group 64) on MLX's CPU device, the weight in copies."""
    with mx.stream(mx.cpu):
        wq, sc, bi = mx.quantize(mx.array(w), group_size=64, bits=4)
        xm = mx.array(x)
        mx.eval(wq, sc, bi, xm)
    nbytes = wq.nbytes + sc.nbytes + bi.nbytes
    mw = _copies((wq, sc, bi), nbytes, lambda t: tuple(mx.array(np.array(a)) for a in t))

    def fn():
        with mx.stream(mx.cpu):
            wq_, sc_, bi_ = mw()
            mx.eval(mx.quantized_matmul(xm, wq_, sc_, bi_, transpose=True, group_size=64, bits=4))

    slow = m >= SLOW_ROWS
    return Contender(fn, nbytes + io, SLOW_NOTE if slow else "", once=slow, mlx=True)


def _ours(m: int, x, w, qw, io: float, budget: float) -> Contender:
    """The native kernel on scheme `qw`, in copies; GEMV rows whose weight fits in the cache also
    carry the cache-resident rate of one copy (cached_gbs)."""
    from fusedformer.ops_quant import qmatmul_numpy

    figures = {"bits_per_weight": float(qw.bits_per_weight)}
    if m <= 8 and qw.nbytes + io <= 0.6 * last_level_cache_bytes():
        cached = measure(lambda: qmatmul_numpy(x, qw), budget_s=budget / 2)
        figures["cached_gbs"] = (qw.nbytes + io) / cached.median_ms / 1e6
    in_turn_qw = _copies(qw, qw.nbytes, _clone_weight)
    return Contender(lambda: qmatmul_numpy(x, in_turn_qw()), qw.nbytes + io,
                     f"{qw.bits_per_weight:.2f} bits/weight, SNR {qw.snr_db(w):.1f} dB", figures=figures)


def run(args) -> Report:
    from fusedformer.quant import compress

    given = getattr(args, "shape", None)
    rep = Report("qmatmul_shapes" if given else "qmatmul",
                 description="y = x @ W.T with compressed W; ratios vs torch fp32 (same run)")
    shapes = parse_shapes(given) if given else QUICK_SHAPES if args.quick else FULL_SHAPES
    names = [s for s in getattr(args, "schemes", "affine4,int8,palettize4").split(",") if s]
    budget = args.budget
    rng = np.random.default_rng(0)
    weights = {}
    mlx_missing = not_installed("mlx.core", MLX_INSTALL)
    if not mlx_missing:
        import mlx.core as mx
    probe = ReadProbe.for_run(args.quick)
    rep.references.update((READ_PROBE, PEAK_PROBE))
    for m, n, k in track(shapes, "qmatmul"):
        case = f"{m}x{k} @ {n}x{k}.T"
        flops = 2.0 * m * n * k
        io = 4.0 * m * (n + k)
        if (n, k) not in weights:
            w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            weights[(n, k)] = (w, {s: compress(w, _scheme(s)) for s in names})
        w, qws = weights[(n, k)]
        x = rng.standard_normal((m, k)).astype(np.float32)
        contenders = _torch_contenders(m, x, w, io)
        if not mlx_missing:
            contenders[MLX_QMATMUL] = _mlx_contender(mx, m, x, w, io)
        contenders.update({f"fusedformer {s}": _ours(m, x, w, qws[s], io, budget) for s in names})
        peak = PeakProbe(rep, "float32")
        timings = _time(contenders, {READ_PROBE: probe.run, PEAK_PROBE: peak.run},
                        rounds=getattr(args, "rounds", 4), budget=budget)
        read, peak_timing = timings.pop(READ_PROBE), timings.pop(PEAK_PROBE)
        bandwidth, peak_gflops = probe.gbs(read), peak.gflops()
        for impl, timing in timings.items():
            c = contenders[impl]
            dtype = "bfloat16" if impl == "torch bf16" else "float32"  # (bf16 products: their own ceiling)
            row = rep.add(case=case, impl=impl, timing=timing, flops=flops, bytes=c.nbytes, baseline=BASELINE,
                          note=c.note, bandwidth_gbs=bandwidth, peak_gflops=rep.peak_for(dtype, peak_gflops),
                          **c.figures)
            if c.mlx:
                rep.note_threads(row)
        del contenders, timings
        if mlx_missing:
            for impl in [MLX_QMATMUL] + [f"fusedformer mlx {s}" for s in names]:
                rep.add_note(case=case, impl=impl, note=mlx_missing)
        else:  # ff.mlx's path on the same weights (MLX's kernel or op composition per format)
            from fusedformer.mlx import bench as mlx_bench

            first = len(rep.rows)
            mlx_bench.add_qmatmul_rows(rep, case=case, x=x, qws={s: qws[s] for s in names}, flops=flops, io_bytes=io,
                                       budget_s=budget)
            for row in rep.rows[first:]:
                rep.note_threads(row)
        probe.add_row(rep, case, read)
        peak.add_row(rep, case, peak_timing)
    return rep


def _time(contenders: dict[str, Contender], probes: dict[str, Callable[[], object]], *, rounds: int, budget: float):
    """Timings of every contender and of the probes: those not `once` in alternating rounds with
    the probes, the others by one call each after them."""
    in_rounds = {name: (c.fn, {}) for name, c in contenders.items() if not c.once}
    in_rounds.update({name: (fn, {}) for name, fn in probes.items()})
    timings = measure_in_rounds(in_rounds, rounds=rounds, budget_s=budget)
    for name, c in contenders.items():
        if c.once:
            timings[name] = measure(c.fn, warmup=0, min_runs=1, max_runs=1)
    return timings
