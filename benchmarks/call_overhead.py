"""What one ff.sdpa call costs beyond its kernel, on torch tensors: the eager call in one step
(`_C.sdpa_torch`; numpy arrays take `_C.sdpa_numpy` the same way), the general path it skips
(check_args, then native_sdpa's descriptors), and torch's own F.scaled_dot_product_attention,
in alternating rounds on the same inputs.

    python benchmarks/call_overhead.py [--rounds N]

Shapes: a tiny one (the kernel's own time is a microsecond or two, so the rest is the call),
and decode steps as a model takes them (one token against a short cache); the last with
return_lse (torch's SDPA has no lse: no torch column there). Each measurement
times a loop of BATCH calls, so the clock's own cost per call drops out. Prints a table of
median microseconds per call; writes nothing.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.harness import measure_in_rounds
from fusedformer.ops_attention import check_args, native_sdpa

BATCH = 100  # calls per timed loop
CASES = [  # name, q shape, k/v shape, bool padding mask (transformers' [B, 1, Lq, Lk]) or not, lse
    ("tiny B1 H2 Lq1 Lk4 D8", (1, 2, 1, 8), (1, 2, 4, 8), False, False),
    ("decode MHA 12/12 Lk 64 D64", (1, 12, 1, 64), (1, 12, 64, 64), False, False),
    ("decode GQA 32/4 Lk 257 D64", (1, 32, 1, 64), (1, 4, 257, 64), False, False),
    ("decode B2 GQA 8/2 Lk 257 D64, bool padding mask", (2, 8, 1, 64), (2, 2, 257, 64), True, False),
    ("decode GQA 32/4 Lk 257 D64, return_lse", (1, 32, 1, 64), (1, 4, 257, 64), False, True),
]


def general_path(q, k, v, mask, lse=False):
    """ff.sdpa's path before the one-step call: the checks, then the descriptors and kernel."""
    scale, window = check_args(q, k, v, mask)
    return native_sdpa(q, k, v, mask=mask, scale=scale, window=window, return_lse=lse)


def batched(fn):
    def run():
        for _ in range(BATCH):
            fn()

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ff.sdpa per call on torch fp32 tensors (us, medians over {args.rounds} rounds)")
    for col in ("case", "ff.sdpa (one step)", "general path", "torch SDPA", "ff / torch"):
        table.add_column(col, justify="left" if col == "case" else "right")
    g = torch.Generator().manual_seed(0)
    for name, qs, kvs, masked, lse in CASES:
        q, k, v = torch.randn(qs, generator=g), torch.randn(kvs, generator=g), torch.randn(kvs, generator=g)
        mask = torch.arange(kvs[2]).expand(qs[0], 1, qs[2], kvs[2]) >= 5 if masked else None  # 5 pad keys
        group = qs[1] // kvs[1]
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # torch's MHA form
        fns = {
            "ff": (batched(lambda: ff.sdpa(q, k, v, mask=mask, return_lse=lse)), {"min_runs": 20}),
            "general": (batched(lambda: general_path(q, k, v, mask, lse)), {"min_runs": 20}),
        }
        if not lse:
            fns["torch"] = (batched(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)), {"min_runs": 20})
        t = measure_in_rounds(fns, rounds=args.rounds, budget_s=0.3 * args.rounds)
        us = {n: t[n].median_ms * 1e3 / BATCH for n in fns}
        torch_us = f"{us['torch']:.1f}" if "torch" in us else "—"
        ratio = f"{us['ff'] / us['torch']:.2f}" if "torch" in us else "—"
        table.add_row(name, f"{us['ff']:.1f}", f"{us['general']:.1f}", torch_us, ratio)
    Console().print(table)


if __name__ == "__main__":
    main()
