"""Benchmark harness: timing (warm-up, median of many runs), machine description, reports.

    from fusedformer.bench import measure, Report
    t = measure(lambda: ff.sdpa(q, k, v), budget_s=2.0)
    rep = Report("attention")
    rep.add(case="...", impl="fusedformer", timing=t, flops=..., baseline="torch sdpa")
    rep.finish("benchmarks/results")

Areas (``fusedformer bench <area>``) are modules fusedformer.bench.<area> with ``run(args)``.
"""

from fusedformer.bench.harness import Timing, measure
from fusedformer.bench.report import Report, Row

__all__ = ["Timing", "measure", "Report", "Row"]

# area -> one-line help; the CLI imports fusedformer.bench.<area> only when it runs.
AREAS = {
    "limits": "measured machine limits: fp32 FMA peak and read bandwidth per thread count",
    "attention": "fused SDPA vs torch SDPA, unfused torch and MLX (prefill and decode)",
    "qmatmul": "quantized matmuls per weight format vs torch fp32/bf16/int8 and MLX",
    "model": "end-to-end LLaMA-shaped decoder: prefill ms and decode tokens/s (the main benchmark)",
    "coreml": "Core ML predict timings of exported packages (macOS only)",
}
