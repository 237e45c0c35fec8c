"""The ISA variants of the native kernels against each other, on the same inputs in one process.

    python benchmarks/isa_ab.py [--rounds N]

Each case alternates between the variants this CPU runs (generic is left out: it is the
portable fallback, not a contender), one short measurement each per round, and reports the
median over the rounds, so that a noisy machine moves all variants alike. The quantized-matmul
weights cycle through copies that stream 2x the last-level cache (read from memory, as in
`fusedformer bench qmatmul`). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import fusedformer as ff
from fusedformer import _C
from fusedformer.bench.harness import measure
from fusedformer.bench.qmatmul import _clone_weight, _copies
from fusedformer.quant import Affine, Int8, Palettize, Prune, compress


def qmatmul_case(scheme, n: int, k: int, rng, m: int = 1):
    """The weight and its copies are made at the first call, so that only the cases that run
    hold them (each streams 2x the last-level cache)."""
    seed = int(rng.integers(2**31))
    state = {}

    def call():
        if not state:
            r = np.random.default_rng(seed)
            qw = compress((r.standard_normal((n, k)) * 0.05).astype(np.float32), scheme)
            state["next_weight"] = _copies(qw, qw.nbytes, _clone_weight)
            state["x"] = r.standard_normal((m, k)).astype(np.float32)
        return ff.qmatmul(state["x"], state["next_weight"]())

    return f"qmatmul {m}x{k} @ {n}x{k} {scheme!r}", call


def sdpa_case(name: str, shapes, causal: bool, rng, dtype: str = "float32", mask=None, cold: bool = False,
              hf: bool = False):
    """cold: K and V cycle through copies that stream 2x the last-level cache (read from memory,
    as in `fusedformer bench attention`'s decode rows); else the same K/V every call. hf: the
    [B, H, L, D] inputs are views of [B, L, H, D] tensors (x.transpose(1, 2), as Hugging Face
    models pass them: rows H D elements apart)."""
    import torch  # bf16 inputs need torch tensors (numpy has no bfloat16)

    def make(s):
        b, h, l, d = s
        x = torch.from_numpy(rng.standard_normal((b, l, h, d) if hf else s).astype(np.float32))
        return (x.transpose(1, 2) if hf else x).to(getattr(torch, dtype))

    q, k, v = (make(s) for s in shapes)
    copies = []  # (cold) made at the first call, so that only the cases that run hold them

    def call():
        if cold and not copies:
            copies.append(_copies((k, v), k.nbytes + v.nbytes, lambda kv: (kv[0].clone(), kv[1].clone())))
        kc, vc = copies[0]() if cold else (k, v)
        return ff.sdpa(q, kc, vc, causal=causal, mask=mask)

    return name, call


def padded_mask(b: int, lq: int, lk: int, pad: int, causal: bool = True, additive: bool = False):
    """A 4-D mask as transformers builds for a left-padded batch: the last batch row's first
    `pad` keys masked (each padded query keeps itself), causal or not; bool, or additive."""
    import torch

    keep = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if causal:
        keep = keep.tril(lk - lq)
    keep[-1, :, :, :pad] = False
    keep[-1, :, :pad, :pad] |= torch.eye(pad, dtype=torch.bool)
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) if additive else keep


def default_cases(rng) -> list:
    """(name, fn) pairs: the GEMV shapes and schemes of the model decode, and attention."""
    gqa = [(1, 32, 1, 128), (1, 8, 4096, 128), (1, 8, 4096, 128)]
    verify = [(1, 32, 16, 128), (1, 8, 4096, 128), (1, 8, 4096, 128)]
    gqa_long = [(1, 32, 1, 128), (1, 8, 16384, 128), (1, 8, 16384, 128)]
    return [
        qmatmul_case(Affine(4, 64), 4096, 4096, rng),
        qmatmul_case(Affine(4, 32), 4096, 4096, rng),
        qmatmul_case(Affine(4, 128), 4096, 4096, rng),
        qmatmul_case(Palettize(4), 4096, 4096, rng),
        qmatmul_case(Int8(), 4096, 4096, rng),
        qmatmul_case(Affine(4, 64), 4096, 4096, rng, m=512),  # prefill: the GEMM
        # pruned GEMVs (one and two rows: x compacted to each row's survivors)
        *(qmatmul_case(s, 4096, 4096, rng, m=m) for s in (Prune(0.5, then=Affine(4, 64)), Prune(0.5)) for m in (1, 2)),
        # a few rows (speculative decoding, small batches): one pass, then x beyond L1 (passes)
        *(qmatmul_case(s, n, k, rng, m=m) for s in (Affine(4, 64), Palettize(4), Int8(), Affine(8, 64))
          for n, k, m in ((4096, 4096, 3), (4096, 4096, 8), (2048, 5632, 8))),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D128", [(1, 8, 1024, 128)] * 3, True, rng),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D128 bf16", [(1, 8, 1024, 128)] * 3, True, rng, "bfloat16"),
        # the same causality as a bool mask (transformers' form with padding): the key tiles it
        # excludes are skipped as causal=True's are
        sdpa_case("sdpa prefill B1 H8 L1024 D128 bf16 causal as a bool mask", [(1, 8, 1024, 128)] * 3, False, rng,
                  "bfloat16", mask=padded_mask(1, 1024, 1024, 0)),
        sdpa_case("sdpa prefill causal B4 H12 L1024 D64", [(4, 12, 1024, 64)] * 3, True, rng),
        sdpa_case("sdpa prefill causal B1 H32 L2048 D128 fp32", [(1, 32, 2048, 128)] * 3, True, rng),
        sdpa_case("sdpa prefill causal B1 H32 L2048 D128 bf16", [(1, 32, 2048, 128)] * 3, True, rng, "bfloat16"),
        sdpa_case("sdpa prefill causal B4 H12 L1024 D64 bf16", [(4, 12, 1024, 64)] * 3, True, rng, "bfloat16"),
        # an encoder's (or a prefill without causal) full blocks
        sdpa_case("sdpa prefill non-causal B4 H12 L1024 D64", [(4, 12, 1024, 64)] * 3, False, rng),
        sdpa_case("sdpa prefill non-causal B1 H8 L2048 D128", [(1, 8, 2048, 128)] * 3, False, rng),
        # a short prefill (few blocks for the pool) and the largest head dim
        sdpa_case("sdpa prefill causal B1 H8 L512 D64 fp32", [(1, 8, 512, 64)] * 3, True, rng),
        sdpa_case("sdpa prefill causal B1 H16 L1024 D256 fp32", [(1, 16, 1024, 256)] * 3, True, rng),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D128 fp16", [(1, 8, 1024, 128)] * 3, True, rng, "float16"),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D128 fp32 HF layout", [(1, 8, 1024, 128)] * 3, True, rng, hf=True),
        sdpa_case("sdpa prefill causal B1 H12 L1024 D64 fp32 HF layout", [(1, 12, 1024, 64)] * 3, True, rng, hf=True),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D96 fp32", [(1, 8, 1024, 96)] * 3, True, rng),
        sdpa_case("sdpa decode GQA 32/8 Lk 4096 D128", gqa, False, rng),
        sdpa_case("sdpa decode GQA 32/8 Lk 4096 D128 bf16", gqa, False, rng, "bfloat16"),
        sdpa_case("sdpa decode GQA 32/8 Lk 4096 D128 fp16", gqa, False, rng, "float16"),
        sdpa_case("sdpa decode MHA 32/32 Lk 4096 D128 bf16", [(1, 32, 1, 128), (1, 32, 4096, 128), (1, 32, 4096, 128)],
                  False, rng, "bfloat16"),
        # decode with K/V read from memory (as a model's layers read theirs)
        sdpa_case("sdpa cold decode GQA 32/8 Lk 4096 D128", gqa, False, rng, cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 4096 D128 bf16", gqa, False, rng, "bfloat16", cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 16384 D128", gqa_long, False, rng, cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 16384 D128 bf16", gqa_long, False, rng, "bfloat16", cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 16384 D128 fp16", gqa_long, False, rng, "float16", cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 4096 D128 fp16", gqa, False, rng, "float16", cold=True),
        sdpa_case("sdpa cold decode MHA 32/32 Lk 4096 D128 bf16", [(1, 32, 1, 128), (1, 32, 4096, 128), (1, 32, 4096, 128)],
                  False, rng, "bfloat16", cold=True),
        sdpa_case("sdpa cold decode MHA 32/32 Lk 4096 D128 fp32", [(1, 32, 1, 128), (1, 32, 4096, 128), (1, 32, 4096, 128)],
                  False, rng, cold=True),
        # decode blocks shorter than 1024 keys (split-KV chunks of 512 at Lk 1024 bf16; whole
        # blocks of 200 and 1500 keys): where each stream block's row requests (StreamAhead)
        # replaced the whole-tile burst
        sdpa_case("sdpa decode GQA 32/8 Lk 1024 D128 bf16", [(1, 32, 1, 128), (1, 8, 1024, 128), (1, 8, 1024, 128)],
                  False, rng, "bfloat16"),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 1500 D128 bf16", [(1, 32, 1, 128), (1, 8, 1500, 128), (1, 8, 1500, 128)],
                  False, rng, "bfloat16", cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 4096 D96 fp32", [(1, 32, 1, 96), (1, 8, 4096, 96), (1, 8, 4096, 96)],
                  False, rng, cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 1500 D128 fp32", [(1, 32, 1, 128), (1, 8, 1500, 128), (1, 8, 1500, 128)],
                  False, rng, cold=True),
        sdpa_case("sdpa cold decode GQA 32/8 Lk 200 D128 bf16", [(1, 32, 1, 128), (1, 8, 200, 128), (1, 8, 200, 128)],
                  False, rng, "bfloat16", cold=True),
        sdpa_case("sdpa cold decode MHA 32/32 Lk 200 D64", [(1, 32, 1, 64), (1, 32, 200, 64), (1, 32, 200, 64)], False,
                  rng, cold=True),
        # the model benchmark's decode step (TinyLlama's heads, a 257-token cache: K/V in L2)
        sdpa_case("sdpa decode GQA 32/4 Lk 257 D64", [(1, 32, 1, 64), (1, 4, 257, 64), (1, 4, 257, 64)], False, rng),
        sdpa_case("sdpa decode MHA 32/32 Lk 257 D64", [(1, 32, 1, 64), (1, 32, 257, 64), (1, 32, 257, 64)], False, rng),
        # ... and with K/V from memory, as in the model, where a layer's K/V are evicted by the
        # other layers' weights between its calls
        sdpa_case("sdpa cold decode GQA 32/4 Lk 257 D64", [(1, 32, 1, 64), (1, 4, 257, 64), (1, 4, 257, 64)], False, rng,
                  cold=True),
        sdpa_case("sdpa cold decode MHA 32/32 Lk 257 D64", [(1, 32, 1, 64), (1, 32, 257, 64), (1, 32, 257, 64)], False,
                  rng, cold=True),
        # 16 new tokens against a 4096-token cache (speculative decoding's verify step, chunked
        # prefill): 64 rows per kv head, too many to stream K/V, too few to be compute-bound
        sdpa_case("sdpa verify GQA 32/8 Lq 16 Lk 4096 D128", verify, True, rng),
        sdpa_case("sdpa verify GQA 32/8 Lq 16 Lk 4096 D128 bf16", verify, True, rng, "bfloat16"),
        # prefill of a left-padded batch (a 4-D mask, as transformers passes), and MiniLM's
        # attention (16 sentences of 23 tokens, 12 heads of 32, a padding mask)
        sdpa_case("sdpa padded prefill GQA 32/8 B2 L512 D64 bool mask", [(2, 32, 512, 64), (2, 8, 512, 64), (2, 8, 512, 64)],
                  False, rng, mask=padded_mask(2, 512, 512, 100)),
        sdpa_case("sdpa padded prefill GQA 32/8 B2 L512 D64 additive mask", [(2, 32, 512, 64), (2, 8, 512, 64), (2, 8, 512, 64)],
                  False, rng, mask=padded_mask(2, 512, 512, 100, additive=True)),
        sdpa_case("sdpa padded prefill GQA 32/8 B2 L512 D64 bf16 bool mask", [(2, 32, 512, 64), (2, 8, 512, 64), (2, 8, 512, 64)],
                  False, rng, "bfloat16", mask=padded_mask(2, 512, 512, 100)),
        sdpa_case("sdpa MiniLM B16 H12 L23 D32 bool mask", [(16, 12, 23, 32)] * 3, False, rng,
                  mask=padded_mask(16, 23, 23, 5, causal=False)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    isas = [isa for isa in _C.supported_isas() if isa != "generic"]
    if len(isas) < 2:
        raise SystemExit(f"[bench isa] this CPU runs only {_C.supported_isas()}: nothing to compare")
    cases = default_cases(np.random.default_rng(0))
    before = _C.isa()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ISA variants, median of {args.rounds} alternating rounds ({_C.num_threads()} threads)")
    table.add_column("case")
    for isa in isas:
        table.add_column(f"{isa} ms", justify="right")
    table.add_column(f"{isas[-1]} / {isas[0]}", justify="right")
    try:
        for name, fn in cases:
            samples = {isa: [] for isa in isas}
            for _ in range(args.rounds):
                for isa in isas:
                    _C._set_isa(isa)
                    samples[isa].append(measure(fn, budget_s=0.2).median_ms)
            medians = [statistics.median(samples[isa]) for isa in isas]
            table.add_row(name, *(f"{m:.3f}" for m in medians), f"{medians[-1] / medians[0]:.2f}")
    finally:
        _C._set_isa(before)
    Console().print(table)


if __name__ == "__main__":
    main()
