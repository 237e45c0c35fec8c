"""`fusedformer bench qmatmul`: quantized matmuls y = x @ W.T per weight format.

Ours (the native kernel, W decoded inside it) per scheme against torch fp32 (the baseline of
every case), torch bf16, torch._weight_int8pack_mm and MLX's quantized_matmul on the CPU
(forced with mx.eval). GB/s count each implementation's own weight bytes (compressed for the
quantized ones) plus x and y, so % of bandwidth says how close a GEMV is to the memory limit.

Weights are read from memory, as in a model's decode step: each implementation cycles through
as many copies of its weight as it takes to stream twice the last-level cache per round
(harness.cold_copies; a 4-bit 4096x4096 weight is 10 MiB and would otherwise be timed from
the cache while torch's 64 MiB fp32 one is not). The ff.mlx rows use one copy.

Our GEMV rows (M <= 8) whose weight fits in the last-level cache also time the same call on one
copy, cache-resident (`cached_gbs`): the kernel's own ceiling with no DRAM traffic. Where it is
not above the measured DRAM bandwidth, the kernel is bound by its compute, not by memory.
"""

from __future__ import annotations

import numpy as np

from fusedformer.bench.harness import cold_copies, in_turn, last_level_cache_bytes, measure
from fusedformer.bench.report import Report, track

FULL_SHAPES = [(1, 4096, 4096), (1, 11008, 4096), (8, 4096, 4096), (512, 4096, 4096)]  # (M, N, K)
QUICK_SHAPES = [(1, 2048, 2048), (8, 2048, 2048), (128, 2048, 2048)]
BASELINE = "torch fp32"


def add_arguments(parser) -> None:
    parser.add_argument("--schemes", default="affine4,affine8,int8,palettize4,prune50-affine4",
                        help="comma-separated: affineB (group 64), int8, palettizeB, prune50-affine4")


def _scheme(name: str):
    from fusedformer.quant import Affine, Int8, Palettize, Prune

    if name == "int8":
        return Int8()
    if name.startswith("affine"):
        return Affine(int(name[6:]), 64)
    if name.startswith("palettize"):
        return Palettize(int(name[9:]))
    if name == "prune50-affine4":
        return Prune(0.5, then=Affine(4, 64))
    raise ValueError(f"[bench qmatmul] unknown scheme {name!r}")


def _copies(obj, nbytes: float, clone):
    """obj and clones of it, enough to be read from memory when used in turn (cold_copies)."""
    return in_turn([obj] + [clone(obj) for _ in range(cold_copies(nbytes) - 1)])


def _clone_weight(qw):
    from fusedformer.quant import QuantizedWeight

    return QuantizedWeight.from_dict({name: a.copy() for name, a in qw.to_dict().items()})


def run(args) -> Report:
    import torch

    from fusedformer.ops_quant import qmatmul_numpy
    from fusedformer.quant import compress

    rep = Report("qmatmul", description="y = x @ W.T with compressed W; ratios vs torch fp32 (same run)")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    names = [s for s in getattr(args, "schemes", "affine4,int8,palettize4").split(",") if s]
    budget = args.budget
    rng = np.random.default_rng(0)
    weights = {}
    try:
        import mlx.core as mx
    except ImportError:
        mx = None
    for m, n, k in track(shapes, "qmatmul"):
        case = f"{m}x{k} @ {n}x{k}.T"
        # torch's int8pack_mm and MLX's CPU quantized_matmul are reference loops (seconds per
        # call at large M): time them once there.
        slow = dict(warmup=0, min_runs=1, max_runs=1) if m >= 64 else dict(budget_s=budget)
        slow_note = "single run (slow reference path)" if m >= 64 else ""
        flops = 2.0 * m * n * k
        io = 4.0 * m * (n + k)
        if (n, k) not in weights:
            w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            weights[(n, k)] = (w, {s: compress(w, _scheme(s)) for s in names})
        w, qws = weights[(n, k)]
        x = rng.standard_normal((m, k)).astype(np.float32)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        with torch.inference_mode():
            w32 = _copies(wt, 4.0 * n * k, torch.clone)
            rep.add(case=case, impl=BASELINE, timing=measure(lambda: torch.nn.functional.linear(xt, w32()), budget_s=budget),
                    flops=flops, bytes=4.0 * n * k + io, baseline=BASELINE)
            del w32
            xb = xt.bfloat16()
            w16 = _copies(wt.bfloat16(), 2.0 * n * k, torch.clone)
            rep.add(case=case, impl="torch bf16", timing=measure(lambda: torch.nn.functional.linear(xb, w16()), budget_s=budget),
                    flops=flops, bytes=2.0 * n * k + io / 2, baseline=BASELINE)
            del w16
            scale = (wt.abs().amax(1) / 127).clamp_min(1e-12)
            w8 = _copies(torch.round(wt / scale[:, None]).to(torch.int8), 1.0 * n * k, torch.clone)
            rep.add(case=case, impl="torch _weight_int8pack_mm", baseline=BASELINE, flops=flops, bytes=1.0 * n * k + 4 * n + io,
                    timing=measure(lambda: torch._weight_int8pack_mm(xt, w8(), scale), **slow), note=slow_note)
            del w8
        if mx is not None:
            with mx.stream(mx.cpu):
                wq, sc, bi = mx.quantize(mx.array(w), group_size=64, bits=4)
                xm = mx.array(x)
                mx.eval(wq, sc, bi, xm)
                mw = _copies((wq, sc, bi), wq.nbytes + sc.nbytes + bi.nbytes,
                             lambda t: tuple(mx.array(np.array(a)) for a in t))

                def fn():
                    wq_, sc_, bi_ = mw()
                    mx.eval(mx.quantized_matmul(xm, wq_, sc_, bi_, transpose=True, group_size=64, bits=4))

                rep.add(case=case, impl="mlx quantized_matmul q4 g64 (cpu)", timing=measure(fn, **slow),
                        flops=flops, bytes=wq.nbytes + sc.nbytes + bi.nbytes + io, baseline=BASELINE, note=slow_note)
        for s in names:
            qw = qws[s]
            qw_in_turn = _copies(qw, qw.nbytes, _clone_weight)
            figures = {"bits_per_weight": float(qw.bits_per_weight)}
            if m <= 8 and qw.nbytes + io <= 0.6 * last_level_cache_bytes():
                cached = measure(lambda: qmatmul_numpy(x, qw), budget_s=budget / 2)
                figures["cached_gbs"] = (qw.nbytes + io) / cached.median_ms / 1e6
            rep.add(case=case, impl=f"fusedformer {s}", timing=measure(lambda: qmatmul_numpy(x, qw_in_turn()), budget_s=budget),
                    flops=flops, bytes=qw.nbytes + io, baseline=BASELINE,
                    note=f"{qw.bits_per_weight:.2f} bits/weight, SNR {qw.snr_db(w):.1f} dB", **figures)
        if mx is not None:  # ff.mlx's path on the same weights (MLX's kernel or op composition per format)
            from fusedformer.mlx import bench as mlx_bench

            mlx_bench.add_qmatmul_rows(rep, case=case, x=x, qws={s: qws[s] for s in names}, flops=flops, io_bytes=io,
                                       baseline=BASELINE, budget_s=budget)
    return rep
