"""What one ff.sdpa call costs beyond its kernel, on torch tensors: the eager call in one step
(`_C.sdpa_torch`; numpy arrays take `_C.sdpa_numpy` the same way), the general path it skips
(check_args, then native_sdpa's descriptors), and torch's own F.scaled_dot_product_attention,
in alternating rounds on the same inputs. Then the same for ff.torch's QuantizedLinear (4-bit
affine, group 64): its call through the weight described once (`_C.QMatmulPlan`), the same
module's call without the plan (qmatmul_tensor: _C.qmatmul's arguments and numpy views of x
and y on every call, as before it), and nn.Linear with the dense fp32 weight.

    python benchmarks/call_overhead.py [--rounds N]

Shapes: a tiny one (the kernel's own time is a microsecond or two, so the rest is the call),
and decode steps as a model takes them (one token against a short cache); the last with
return_lse (torch's SDPA has no lse: no torch column there). Each measurement
times a loop of BATCH calls, so the clock's own cost per call drops out. Prints a table of
median microseconds per call; writes nothing.
"""

from __future__ import annotations

import argparse
import copy

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


LINEAR_CASES = [  # name, x shape, (out, in) features
    ("tiny 256 x 256, one token", (1, 1, 256), (256, 256)),
    ("2048 x 2048, one token", (1, 1, 2048), (2048, 2048)),
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
        gqa = qs[1] != kvs[1]  # (torch's own GQA path: K/V expanded to every query head cost it ~12%)
        fns = {
            "ff": (batched(lambda: ff.sdpa(q, k, v, mask=mask, return_lse=lse)), {"min_runs": 20}),
            "general": (batched(lambda: general_path(q, k, v, mask, lse)), {"min_runs": 20}),
        }
        if not lse:
            fns["torch"] = (batched(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)), {"min_runs": 20})
        t = measure_in_rounds(fns, rounds=args.rounds, budget_s=0.3 * args.rounds)
        us = {n: t[n].median_ms * 1e3 / BATCH for n in fns}
        torch_us = f"{us['torch']:.1f}" if "torch" in us else "—"
        ratio = f"{us['ff'] / us['torch']:.2f}" if "torch" in us else "—"
        table.add_row(name, f"{us['ff']:.1f}", f"{us['general']:.1f}", torch_us, ratio)
    Console().print(table)
    Console().print(linear_table(args.rounds))


def linear_table(rounds: int):
    """QuantizedLinear's call: through _C.QMatmulPlan, the general path, and nn.Linear."""
    from rich.table import Table

    from fusedformer.torch.quantized_linear import QuantizedLinear

    table = Table(title=f"QuantizedLinear (4-bit affine) per call on torch fp32 (us, medians over {rounds} rounds)")
    for col in ("case", "QuantizedLinear", "without the plan", "nn.Linear (fp32)", "ql / linear"):
        table.add_column(col, justify="left" if col == "case" else "right")
    g = torch.Generator().manual_seed(1)
    for name, xs, (n, k) in LINEAR_CASES:
        linear = torch.nn.Linear(k, n, bias=False)
        ql = QuantizedLinear.from_linear(linear, ff.quant.Affine(bits=4, group_size=64))
        no_plan = copy.deepcopy(ql)  # (before either has run: no plan to copy yet)
        args, _ = no_plan._cached_kernel(no_plan._parts())
        no_plan._kernel_cache = (no_plan._kernel_cache[0], (args, None))  # forward: qmatmul_tensor
        x = torch.randn(xs, generator=g)
        with torch.no_grad():
            fns = {
                "ql": (batched(lambda: ql(x)), {"min_runs": 20}),
                "general": (batched(lambda: no_plan(x)), {"min_runs": 20}),
                "linear": (batched(lambda: linear(x)), {"min_runs": 20}),
            }
            t = measure_in_rounds(fns, rounds=rounds, budget_s=0.3 * rounds)
        us = {name_: t[name_].median_ms * 1e3 / BATCH for name_ in fns}
        table.add_row(name, f"{us['ql']:.1f}", f"{us['general']:.1f}", f"{us['linear']:.1f}",
                      f"{us['ql'] / us['linear']:.2f}")
    return table


if __name__ == "__main__":
    main()
