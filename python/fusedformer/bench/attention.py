"""`fusedformer bench attention`: fused SDPA vs torch's SDPA, unfused torch and MLX.

Every case runs each implementation on the same inputs in the same process, in alternating
rounds (harness.measure_in_rounds: a shared machine's slow minutes fall on all of them alike);
ratios are time / time of "torch sdpa" in that case. FLOPs count only the unmasked score entries:
    flops = 4 * B * Hq * D * pairs,   pairs = #(i, j) with key j visible to query i
(Lq * Lk without a mask; Lq * Lk - Lq * (Lq - 1) / 2 for causal with Lq <= Lk, i.e. about
half), covering QK^T and PV at 2 flops per multiply-add. Bytes are what one call must move at
least: q, k, v in and out once (decode is bound by reading K and V). Decode cases cycle through
copies of K and V (harness.cold_copies) so each call reads them from memory, not the cache, and
their % BW refers to the streaming-read probe timed in the same rounds (the "read probe" row);
likewise prefill cases' % peak refers to the peak probe of their dtype run in their rounds (the
"peak probe" row: fp32 FMAs, or the bf16 dot / AMX tiles as Report.peak_for picks). This VM's
read bandwidth swings 16-25 GB/s within seconds and its FMA rate by 5%, so limits measured once
at the start of the run would move every row's share by as much.

Every row records the threads its impl kept busy (cpu_per_wall: CPU time / wall time of its timed
calls), and the MLX rows' note says it: MLX's CPU path runs on one thread where ours and torch's
use the pool's. Where MLX cannot be imported, the cases that would time it say so in a row that
was not timed ("not installed").

Implementations are (name, maker) entries in IMPLS; a maker returns a zero-argument callable
for a case or None when it does not apply. Another backend adds one entry (e.g. the MLX
helper's "fusedformer (mlx)").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fusedformer.bench.harness import (
    MLX_INSTALL,
    PEAK_PROBE,
    READ_PROBE,
    PeakProbe,
    ReadProbe,
    add_rounds_argument,
    cold_copies,
    in_turn,
    measure_in_rounds,
    not_installed,
    parse_shape,
)
from fusedformer.bench.report import Report, track

BASELINE = "torch sdpa"


@dataclass(frozen=True)
class Case:
    kind: str  # "prefill" or "decode"
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool
    dtype: str  # "float32" or "bfloat16"
    mlx: bool = False  # MLX's CPU path is slow: only where it finishes in reasonable time

    @property
    def name(self) -> str:
        heads = f"H{self.hq}" if self.hq == self.hkv else f"GQA {self.hq}q/{self.hkv}kv"
        mask = " causal" if self.causal else ""
        if self.kind == "prefill" and self.lq == self.lk:
            shape = f"B{self.b} {heads} L{self.lq} D{self.d}"
        elif self.kind == "decode" and self.lq == 1:
            shape = f"B{self.b} {heads} Lk {self.lk} D{self.d}"
        else:  # (--shape cases)
            shape = f"B{self.b} {heads} Lq {self.lq} Lk {self.lk} D{self.d}"
        return f"{self.kind}{mask} {shape} {'fp32' if self.dtype == 'float32' else 'bf16'}"

    @property
    def pairs(self) -> float:
        if not self.causal:
            return float(self.lq * self.lk)
        return float(self.lq * self.lk - self.lq * (self.lq - 1) / 2)

    @property
    def flops(self) -> float:
        return 4.0 * self.b * self.hq * self.d * self.pairs

    @property
    def bytes(self) -> float:
        item = 4 if self.dtype == "float32" else 2
        return float(item * self.d * (2 * self.b * self.hq * self.lq + 2 * self.b * self.hkv * self.lk))


def cases(quick: bool) -> list[Case]:
    if quick:
        shapes = [
            ("prefill", 1, 8, 8, 512, 512, 128, True, False),
            ("prefill", 1, 8, 8, 256, 256, 64, True, True),
            ("decode", 1, 32, 8, 1, 1024, 128, False, True),
            ("decode", 1, 32, 32, 1, 1024, 128, False, False),
        ]
    else:
        shapes = [
            ("prefill", 1, 32, 32, 2048, 2048, 128, True, False),
            ("prefill", 4, 12, 12, 1024, 1024, 64, True, False),
            ("prefill", 1, 8, 8, 512, 512, 64, True, True),  # DESIGN's MLX comparison
            ("decode", 1, 32, 8, 1, 4096, 128, False, True),
            ("decode", 1, 32, 8, 1, 16384, 128, False, True),
            ("decode", 1, 32, 32, 1, 4096, 128, False, True),
        ]
    return [Case(*s[:8], dtype=dt, mlx=s[8]) for dt in ("float32", "bfloat16") for s in shapes]


# --shape cases: decode rows (K/V read from memory, % of bandwidth) up to this many query rows,
# prefill rows (% of peak) above; MLX's CPU path only up to MLX_MAX_FLOPS (its prefill runs at
# about 1% of ours: B1 H8 L512 D64 causal took 151 ms).
SHAPE_DECODE_ROWS = 16
MLX_MAX_FLOPS = 1e10


def shape_cases(specs: list[str], causal: bool) -> list[Case]:
    """Cases of `--shape B,HQ,HKV,LQ,LK,D` (each in fp32 and bf16)."""
    out = []
    for spec in specs:
        b, hq, hkv, lq, lk, d = parse_shape(spec, "B,HQ,HKV,LQ,LK,D", "attention")
        if hq % hkv:
            raise ValueError(f"[bench attention] --shape {spec!r}: HKV must divide HQ")
        if causal and lq != lk:
            raise ValueError(f"[bench attention] --causal with --shape {spec!r} needs LQ == LK: torch's is_causal "
                             "is top-left aligned, ours bottom-right, so they would compute different masks")
        kind = "decode" if lq <= SHAPE_DECODE_ROWS else "prefill"
        for dt in ("float32", "bfloat16"):
            case = Case(kind, b, hq, hkv, lq, lk, d, causal, dt)
            out.append(replace(case, mlx=case.flops <= MLX_MAX_FLOPS))
    return out


def torch_inputs(case: Case):
    import torch

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, case.dtype)
    q = torch.randn(case.b, case.hq, case.lq, case.d, generator=g).to(dt)
    k = torch.randn(case.b, case.hkv, case.lk, case.d, generator=g).to(dt)
    v = torch.randn(case.b, case.hkv, case.lk, case.d, generator=g).to(dt)
    return q, k, v


# ---- implementations ----------------------------------------------------------------------


def make_fusedformer(case, q, k, v):
    import fusedformer as ff

    return lambda: ff.sdpa(q, k, v, causal=case.causal)


def make_torch_sdpa(case, q, k, v):
    import torch.nn.functional as F

    gqa = case.hq != case.hkv
    # torch's is_causal is top-left aligned: equal to ours only when Lq == Lk (all prefill cases)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)


def make_torch_unfused(case, q, k, v):
    import torch

    group = case.hq // case.hkv
    scale = 1.0 / math.sqrt(case.d)
    mask = None
    if case.causal:
        mask = torch.ones(case.lq, case.lk, dtype=torch.bool).tril(case.lk - case.lq).logical_not()

    def run():
        kk = k.repeat_interleave(group, 1) if group > 1 else k
        vv = v.repeat_interleave(group, 1) if group > 1 else v
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), vv)

    return run


def _mlx_inputs(case, q, k, v):
    """q, k, v as MLX arrays on MLX's CPU device (None where MLX is absent or too slow)."""
    if not case.mlx:
        return None
    try:
        import mlx.core as mx
    except ImportError:
        return None
    mx.set_default_device(mx.cpu)
    dt = mx.float32 if case.dtype == "float32" else mx.bfloat16
    arrays = [mx.array(t.float().numpy()).astype(dt) for t in (q, k, v)]
    mx.eval(*arrays)
    return arrays


def make_mlx_sdpa(case, q, k, v):
    """MLX's own op, mx.fast.scaled_dot_product_attention."""
    arrays = _mlx_inputs(case, q, k, v)
    if arrays is None:
        return None
    import mlx.core as mx

    scale = 1.0 / math.sqrt(case.d)
    mask = "causal" if case.causal else None
    return lambda: mx.fast.scaled_dot_product_attention(*arrays, scale=scale, mask=mask)


def make_fusedformer_mlx(case, q, k, v):
    """ff.sdpa on MLX arrays: our MLX path (mx.fast with fusedformer's semantics)."""
    arrays = _mlx_inputs(case, q, k, v)
    if arrays is None:
        return None
    import fusedformer as ff

    return lambda: ff.sdpa(*arrays, causal=case.causal)


def _mlx_sync(out):
    import mlx.core as mx

    mx.eval(out)


# name -> (maker, measure options, note). Makers return None where an impl does not apply.
MLX_NOTE = "MLX CPU backend (Linux); Metal on Apple GPUs"  # (the rows also say how many threads MLX used)
IMPLS = {
    "fusedformer": (make_fusedformer, {}, ""),
    BASELINE: (make_torch_sdpa, {}, ""),
    "torch unfused": (make_torch_unfused, {"min_runs": 3}, ""),
    "mlx sdpa": (make_mlx_sdpa, {"min_runs": 3, "sync": _mlx_sync}, MLX_NOTE),
    "fusedformer (mlx)": (make_fusedformer_mlx, {"min_runs": 3, "sync": _mlx_sync}, MLX_NOTE),
}
MLX_IMPLS = [name for name, (_, _, note) in IMPLS.items() if note == MLX_NOTE]


def _in_turn_calls(fns):
    """One callable that calls fns[0], fns[1], ... in turn."""
    if len(fns) == 1:
        return fns[0]
    next_fn = in_turn(fns)
    return lambda: next_fn()()


def add_arguments(parser) -> None:
    parser.add_argument("--dtype", choices=["all", "float32", "bfloat16"], default="all", help="dtypes to run")
    parser.add_argument("--case", default="", help="only cases whose name contains this text")
    parser.add_argument("--impl", action="append", default=None, choices=list(IMPLS), help="only these impls (repeatable)")
    parser.add_argument("--shape", action="append", default=None, metavar="B,HQ,HKV,LQ,LK,D",
                        help="time these shapes instead of the built-in cases (repeatable; the files are "
                        f"attention_shapes.json/.png): decode rows (K/V from memory, %% of bandwidth) up to LQ "
                        f"{SHAPE_DECODE_ROWS}, prefill rows (%% of peak) above; MLX where a call is at most "
                        f"{MLX_MAX_FLOPS:.0e} FLOPs")
    parser.add_argument("--causal", action="store_true", help="the --shape cases causal (they need LQ == LK)")
    add_rounds_argument(parser)


def run(args) -> Report:
    shapes = getattr(args, "shape", None)
    rep = Report(
        "attention_shapes" if shapes else "attention",
        description="fused SDPA (flash prefill, split-KV decode) vs torch F.sdpa, unfused torch, MLX CPU",
    )
    built = shape_cases(shapes, getattr(args, "causal", False)) if shapes else cases(args.quick)
    selected = [
        c
        for c in built
        if getattr(args, "dtype", "all") in ("all", c.dtype) and getattr(args, "case", "") in c.name
    ]
    if not selected:
        raise ValueError(f"[bench attention] no case matches --case {getattr(args, 'case', '')!r} and --dtype "
                         f"{getattr(args, 'dtype', 'all')!r}; nothing run, nothing written")
    impls = getattr(args, "impl", None) or list(IMPLS)
    # the read probe streams at least twice the last-level cache, as the decode cases' K/V
    # copies do (a 64 MiB probe read 47 GB/s here, out of cache)
    probe = ReadProbe.for_run(args.quick)
    rep.references.update((READ_PROBE, PEAK_PROBE))
    wants_mlx = any(c.mlx for c in selected) and any(name in MLX_IMPLS for name in impls)
    mlx_missing = not_installed("mlx.core", MLX_INSTALL) if wants_mlx else None  # (imported only if used)
    for case in track(selected, "attention"):
        q, k, v = torch_inputs(case)
        # Decode reads the KV cache from memory (a model reads every layer's in turn): cycle
        # through enough copies of it to stream twice the last-level cache per round.
        copies = cold_copies(k.nbytes + v.nbytes) if case.kind == "decode" else 1
        inputs = [(q, k, v)] + [(q, k.clone(), v.clone()) for _ in range(copies - 1)]
        contenders = {}
        # the MLX rows of a case that has them, where MLX cannot be imported: named, not timed
        untimed = [name for name in impls if name in MLX_IMPLS and case.mlx and mlx_missing]
        for name in impls:
            maker, opts, note = IMPLS[name]
            if name in untimed:
                continue
            fns = [maker(case, *qkv) for qkv in inputs]
            if fns[0] is not None:
                contenders[name] = (_in_turn_calls(fns), opts)
        peak = PeakProbe(rep, case.dtype) if case.kind == "prefill" else None
        if case.kind == "decode":
            contenders[READ_PROBE] = (probe.run, {})
        else:
            contenders[PEAK_PROBE] = (peak.run, {})
        timings = measure_in_rounds(contenders, rounds=getattr(args, "rounds", 4), budget_s=args.budget)
        read = timings.pop(READ_PROBE, None)
        bandwidth = probe.gbs(read) if read else None
        peak_timing = timings.pop(PEAK_PROBE, None)
        peak_gflops = peak.gflops() if peak_timing else rep.peak_for(case.dtype)
        for name, timing in timings.items():
            row = rep.add(
                case=case.name,
                impl=name,
                timing=timing,
                flops=case.flops,
                bytes=case.bytes,
                baseline=BASELINE if BASELINE in impls else None,
                note=IMPLS[name][2],
                peak_gflops=peak_gflops,
                bandwidth_gbs=bandwidth,
            )
            if name in MLX_IMPLS:
                rep.note_threads(row)
        for name in untimed:
            rep.add_note(case=case.name, impl=name, note=mlx_missing)
        if read:
            probe.add_row(rep, case.name, read)
        if peak_timing:
            peak.add_row(rep, case.name, peak_timing)
    return rep
