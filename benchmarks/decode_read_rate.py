"""Cold decode's read rate against the streaming-read probe, on 1 thread and on all threads.

    python benchmarks/decode_read_rate.py [--rounds N]

GQA 32/8 Lk 16384 D128 decode in fp32 and bf16 with K/V read from memory (isa_ab's cold
cases), and the read probe of `fusedformer bench attention`, in alternating rounds at each pool
size: says whether decode's share of the probe's GB/s is lost within a thread or between
threads. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from fusedformer import _C
from fusedformer.bench.harness import ReadProbe, measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa_ab import sdpa_case  # noqa: E402

SHAPES = [(1, 32, 1, 128), (1, 8, 16384, 128), (1, 8, 16384, 128)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [(dt, sdpa_case(dt, SHAPES, False, rng, dt, cold=True)[1]) for dt in ("float32", "bfloat16")]
    kv_bytes = {dt: 2 * int(np.prod(SHAPES[1])) * (4 if dt == "float32" else 2) for dt, _ in cases}
    probe = ReadProbe.for_run(False)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cold decode GQA 32/8 Lk 16384 D128 vs the read probe: medians of {args.rounds} rounds")
    for col in ("threads", "probe GB/s", *(f"{dt} GB/s (% probe)" for dt, _ in cases)):
        table.add_column(col, justify="right")
    full = _C.num_threads()
    try:
        for threads in sorted({1, full}):
            _C.set_num_threads(threads)
            ms = {dt: [] for dt, _ in cases}
            probe_gbs = []
            for _ in range(args.rounds):
                for dt, fn in cases:
                    ms[dt].append(measure(fn, budget_s=0.3).median_ms)
                probe_gbs.append(probe.gbs(measure(probe.run, budget_s=0.3)))
            p = statistics.median(probe_gbs)
            cells = []
            for dt, _ in cases:
                gbs = kv_bytes[dt] / statistics.median(ms[dt]) / 1e6
                cells.append(f"{gbs:.1f} ({100 * gbs / p:.0f}%)")
            table.add_row(str(threads), f"{p:.1f}", *cells)
    finally:
        _C.set_num_threads(full)
    Console().print(table)


if __name__ == "__main__":
    main()
