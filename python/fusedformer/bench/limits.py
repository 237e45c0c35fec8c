"""`fusedformer bench limits`: the machine's measured limits, per thread count.

FMA throughput and streaming-read bandwidth of the native probes on 1..N threads, next to what
numpy's BLAS sgemm and numpy's sum reach on the same machine: the ceilings every other
benchmark reports its share of.
"""

from __future__ import annotations

import numpy as np

from fusedformer import _C
from fusedformer.bench.harness import measure, positive_int, quick_or
from fusedformer.bench.report import Report, track


def add_arguments(parser) -> None:
    parser.add_argument("--mib", type=positive_int, default=None, help="buffer size of the read probe (MiB; default 512, 64 with --quick)")


def run(args) -> Report:
    rep = Report("limits", description="fp32 FMA peak and streaming-read bandwidth per thread count")
    budget = args.budget
    mib = quick_or(args, "mib", 64, 512)
    buf = np.random.default_rng(0).standard_normal(mib << 18, dtype=np.float32)
    most = _C.num_threads()
    thread_counts = sorted({1, most})
    iters = 2_000_000 if not args.quick else 200_000
    steps = [(t, what) for t in thread_counts for what in ("fma", "read")]
    try:
        for t, what in track(steps, "limits"):
            _C.set_num_threads(t)
            impl = f"fusedformer probe, {t} thread{'s' if t > 1 else ''}"
            base = f"fusedformer probe, {most} threads" if most > 1 else None
            if what == "fma":
                flops = _C.fma_work(1)  # flops per iteration on all threads
                timing = measure(lambda: _C.fma_work(iters), budget_s=budget)
                # each thread runs `iters`: the work grows with the threads, so compare GFLOP/s, not times
                rep.add(case="fp32 FMA throughput", impl=impl, timing=timing, flops=flops * iters)
            else:
                timing = measure(lambda: _C.stream_sum(buf), budget_s=budget)
                rep.add(case=f"streaming read {mib} MiB", impl=impl, timing=timing, bytes=buf.nbytes, baseline=base)
    finally:
        _C.set_num_threads(most)
    n = 512 if args.quick else 1024
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    rep.add(
        case=f"sgemm {n}³",
        impl="numpy BLAS",
        timing=measure(lambda: a @ a, budget_s=budget),
        flops=2.0 * n**3,
        note="what a tuned library reaches",
    )
    rep.add(
        case=f"streaming read {mib} MiB",
        impl="numpy sum (1 thread)",
        timing=measure(lambda: buf.sum(), budget_s=budget),
        bytes=buf.nbytes,
        baseline=f"fusedformer probe, {most} threads" if most > 1 else None,
    )
    return rep
