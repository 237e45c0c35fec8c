"""`fusedformer bench coreml PATH...`: Core ML ``MLModel.predict`` timings of exported packages.

Needs the Core ML runtime, i.e. macOS; elsewhere it says so and exits non-zero (nothing here
is ever estimated: every number is a measured predict). For each package: the prediction time
at --seq-len tokens (fused vs unfused, compressed vs not: export the variants, pass them all),
and for stateful (--kv-cache) exports the prefill, and a decode step with the state (timed
alone: a fresh state and the prefill run untimed before each run of --decode-steps steps). Rows of
the same case are compared with the first package given.

    fusedformer export tiny-llama --out fused.mlpackage
    fusedformer export tiny-llama --out unfused.mlpackage --attention unfused
    fusedformer bench coreml unfused.mlpackage fused.mlpackage --compute-units CPU_AND_GPU
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np

from fusedformer.bench.harness import Timing, measure, positive_int, quick_or
from fusedformer.bench.report import Report

COMPUTE_UNITS = ("CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE", "ALL")


def add_arguments(parser) -> None:
    parser.add_argument("packages", nargs="*", help=".mlpackage files written by fusedformer export")
    parser.add_argument("--compute-units", choices=COMPUTE_UNITS, default="CPU_AND_GPU")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per prediction (flexible inputs; default 128, 16 with --quick)")
    parser.add_argument("--decode-steps", type=positive_int, default=None,
                        help="decode steps timed for stateful packages (default 16; 4 with --quick)")


def runtime_missing_reason() -> str | None:
    """Why MLModel.predict cannot run here (None when it can)."""
    if platform.system() != "Darwin":
        return f"the Core ML runtime needs macOS (this is {platform.system()})"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return "coremltools is not installed (pip install fusedformer[coreml])"
    return None


def _inputs(spec, seq_len: int, total: int | None = None) -> dict:
    """Token-like inputs for a spec: ones for masks (of length ``total``), small ids otherwise."""
    rng = np.random.default_rng(0)
    out = {}
    for desc in spec.description.input:
        array = desc.type.multiArrayType
        shape = list(array.shape)
        if array.WhichOneof("ShapeFlexibility") == "shapeRange":
            shape = [int(r.lowerBound) if r.lowerBound == r.upperBound else seq_len
                     for r in array.shapeRange.sizeRanges]
        if "mask" in desc.name and total is not None:
            shape[-1] = total
        is_int = array.dataType == array.INT32
        if "mask" in desc.name:
            out[desc.name] = np.ones(shape, np.int32 if is_int else np.float32)
        else:
            out[desc.name] = rng.integers(0, 10, shape).astype(np.int32) if is_int else (
                rng.standard_normal(shape).astype(np.float32))
    return out


def _label(path: str, model) -> str:
    meta = model.user_defined_metadata
    parts = [os.path.basename(os.path.normpath(path))]
    if "fusedformer.attention" in meta:
        parts.append(f"{meta['fusedformer.attention']} attention, {meta.get('fusedformer.precision', '?')}")
    return " ".join([parts[0], f"({parts[1]})"] if len(parts) > 1 else parts)


def run(args) -> Report | None:
    reason = runtime_missing_reason()
    if reason is not None:
        print(f"fusedformer bench coreml: {reason}; export and verify work anywhere "
              "(fusedformer export / fusedformer verify), timing does not.", file=sys.stderr)
        return None
    if not args.packages:
        print("fusedformer bench coreml: give the .mlpackage files to time", file=sys.stderr)
        return None
    import coremltools as ct

    units = getattr(ct.ComputeUnit, args.compute_units)
    seq = quick_or(args, "seq_len", 16, 128)
    steps = quick_or(args, "decode_steps", 4, 16)
    rep = Report("coreml", description=f"MLModel.predict, compute units {args.compute_units}")
    baselines: dict[str, str] = {}
    for path in args.packages:
        model = ct.models.MLModel(path, compute_units=units)
        impl = _label(path, model)
        spec = model.get_spec()
        stateful = len(spec.description.state) > 0

        def add(case, timing):
            base = baselines.setdefault(case, impl)
            rep.add(case=case, impl=impl, timing=timing, baseline=base if base != impl else None)

        if not stateful:
            inputs = _inputs(spec, seq)
            add(f"predict {seq} tokens", measure(lambda: model.predict(inputs), budget_s=args.budget))
            continue
        prefill = _inputs(spec, seq, total=seq)
        decode = [_inputs(spec, 1, total=seq + i + 1) for i in range(steps)]
        add(f"stateful prefill {seq} tokens", time_with_fresh_state(model, [], [prefill], args.budget))
        add(f"stateful decode step after {seq} tokens ({steps} steps)",
            time_with_fresh_state(model, [prefill], decode, args.budget))
    return rep


def time_with_fresh_state(model, untimed: list[dict], timed: list[dict], budget_s: float,
                          clock=time.perf_counter) -> Timing:
    """ms per prediction of ``timed``, run in order on a fresh state after the ``untimed`` ones
    (a new state and the prefill are not what a decode step costs), repeated for ``budget_s``
    (at least 3 times); ``clock`` for tests."""
    samples = []
    end = clock() + budget_s
    while len(samples) < 3 or clock() < end:
        state = model.make_state()
        for inputs in untimed:
            model.predict(inputs, state=state)
        t0 = clock()
        for inputs in timed:
            model.predict(inputs, state=state)
        samples.append((clock() - t0) * 1e3 / len(timed))
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))
