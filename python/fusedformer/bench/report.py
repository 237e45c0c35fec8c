"""Benchmark reports: rows with derived figures, a rich table, JSON and a PNG plot.

Every row of a case is compared with that case's baseline row (same run, same inputs), and with
the machine's measured limits: GFLOP/s against the FMA peak, GB/s against the read bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusedformer.bench.harness import Timing
from fusedformer.bench.machine import describe_machine

SCHEMA = "fusedformer.bench/1"
ROW_KEYS = {
    "case": str,
    "impl": str,
    "median_ms": (float, type(None)),  # (None: a row not timed, runs 0: its note says why)
    "min_ms": (float, type(None)),
    "max_ms": (float, type(None)),
    "runs": int,
    "gflops": (float, type(None)),
    "pct_peak": (float, type(None)),
    "gbs": (float, type(None)),
    "pct_bandwidth": (float, type(None)),
    "baseline": (str, type(None)),
    "ratio": (float, type(None)),
    "note": str,
    "extra": dict,
}


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float | None  # (None in a row not timed: Report.add_note)
    min_ms: float | None
    max_ms: float | None
    runs: int
    gflops: float | None = None
    pct_peak: float | None = None
    gbs: float | None = None
    pct_bandwidth: float | None = None
    baseline: str | None = None
    ratio: float | None = None  # time / baseline's time (< 1 is faster)
    note: str = ""
    extra: dict = field(default_factory=dict)


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else float(round(x, digits))


class Report:
    """Rows of one benchmark area, with the machine they ran on."""

    def __init__(self, area: str, description: str = "", machine: dict | None = None):
        self.area = area
        self.description = description
        self.machine = machine if machine is not None else describe_machine()
        self.rows: list[Row] = []
        # impls that are measuring sticks of a case, not contenders (attention's read and peak
        # probes): in the table and JSON, not in the plot
        self.references: set[str] = set()

    @property
    def peak_gflops(self) -> float:
        return self.machine["limits"]["peak_gflops"]

    def peak_key(self, dtype: str) -> str:
        """Which measured limit is the compute ceiling of a case in ``dtype``: bf16 cases are
        measured against the AMX-BF16 tile peak when the kernels run the avx512_amx variant, else
        the bf16 dot-product peak where the CPU has one (vdpbf16ps, two products per lane; each peak
        as its probe measured it);
        everything else against the fp32 FMA peak."""
        limits = self.machine["limits"]
        if dtype in ("bf16", "bfloat16"):
            if self.machine.get("isa") == "avx512_amx" and limits.get("peak_gflops_amx_bf16"):
                return "peak_gflops_amx_bf16"
            if limits.get("peak_gflops_bf16_dot"):
                return "peak_gflops_bf16_dot"
        return "peak_gflops"

    def peak_for(self, dtype: str, fp32: float | None = None) -> float:
        """The compute ceiling of a case in ``dtype`` (peak_key), GFLOP/s; where that is the fp32
        FMA peak, ``fp32`` if given (the FMA probe run in the case's rounds)."""
        key = self.peak_key(dtype)
        return fp32 if key == "peak_gflops" and fp32 else self.machine["limits"][key]

    @property
    def bandwidth_gbs(self) -> float:
        return self.machine["limits"]["bandwidth_gbs"]

    def add(
        self,
        *,
        case: str,
        impl: str,
        timing: Timing,
        flops: float | None = None,
        bytes: float | None = None,
        baseline: str | None = None,
        note: str = "",
        peak_gflops: float | None = None,
        bandwidth_gbs: float | None = None,
        ratio: float | None = None,
        share_of_bandwidth: bool = True,
        **extra,
    ) -> Row:
        """Adds a timed row. ``flops``/``bytes`` are the work of one call (GFLOP/s and GB/s are
        derived); ``baseline`` names the impl of the same case this row is compared with;
        ``peak_gflops`` is the ceiling % peak refers to (default: the fp32 FMA peak), and
        ``bandwidth_gbs`` the one % BW refers to (default: the read bandwidth measured at the
        start of the run); ``ratio``, where given, is this row's ratio to the baseline as the
        area measured it (bench model: against the baseline's samples of the same rounds) instead
        of the medians' quotient; ``share_of_bandwidth=False`` leaves % BW out (a row timed
        cache-warm); ``extra`` holds further figures (tokens_per_s=..., model_mb=...), and the
        timing's cpu_per_wall where the harness measured it (the threads the impl kept busy)."""
        peak = peak_gflops or self.peak_gflops
        bandwidth = bandwidth_gbs or self.bandwidth_gbs
        sec = timing.median_ms / 1e3
        gflops = flops / sec / 1e9 if flops else None
        gbs = bytes / sec / 1e9 if bytes else None
        row = Row(
            case=case,
            impl=impl,
            median_ms=_round(timing.median_ms, 4),
            min_ms=_round(timing.min_ms, 4),
            max_ms=_round(timing.max_ms, 4),
            runs=timing.runs,
            gflops=_round(gflops, 2),
            pct_peak=_round(100 * gflops / peak if gflops else None, 1),
            gbs=_round(gbs, 2),
            pct_bandwidth=_round(100 * gbs / bandwidth if gbs and share_of_bandwidth else None, 1),
            baseline=baseline if baseline != impl else None,
            note=note,
            extra={k: (_round(v, 4) if isinstance(v, float) else v) for k, v in extra.items()},
        )
        if ratio is not None:
            row.extra["ratio_of"] = "the baseline's samples of the same rounds"
            row.ratio = _round(ratio, 4)
        if timing.cpu_per_wall is not None:
            row.extra["cpu_per_wall"] = _round(timing.cpu_per_wall, 2)
        self.rows.append(row)
        self._update_ratios()
        return row

    def add_note(self, *, case: str, impl: str, note: str) -> Row:
        """Adds a row that was not timed (runs 0, no figures), its note saying why: a peer that is
        not installed is named in the table and JSON rather than missing from them."""
        row = Row(case=case, impl=impl, median_ms=None, min_ms=None, max_ms=None, runs=0, note=note)
        self.rows.append(row)
        return row

    def note_threads(self, row: Row) -> None:
        """Appends to ``row``'s note how many of the pool's threads its impl kept busy (its
        cpu_per_wall): for a peer that picks its own (MLX's CPU path runs on one)."""
        used = row.extra.get("cpu_per_wall")
        if used is not None:
            row.note = "; ".join(filter(None, [row.note, f"used ~{used:.1f} of {self.machine['threads']} threads"]))

    def _update_ratios(self) -> None:
        by_key = {(r.case, r.impl): r for r in self.rows}
        for r in self.rows:
            if "ratio_of" in r.extra or not r.runs:  # (given by the area; not timed)
                continue
            base = by_key.get((r.case, r.baseline)) if r.baseline else None
            r.ratio = _round(r.median_ms / base.median_ms, 4) if base and base.runs and base.median_ms > 0 else None

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "area": self.area,
            "description": self.description,
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
        }

    # -- output ---------------------------------------------------------------------------

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        limits = self.machine["limits"]
        title = (
            f"fusedformer bench {self.area} — {self.machine['cpu']}, {self.machine['threads']} threads"
            + (f" (torch {tt})" if (tt := self.machine.get("torch_threads")) and tt != self.machine["threads"] else "")
            + ", "
            f"ISA {self.machine['isa']}; measured peak {limits['peak_gflops']:.0f} GFLOP/s"
            + (f" (bf16 dot {limits['peak_gflops_bf16_dot']:.0f})" if limits.get("peak_gflops_bf16_dot") else "")
            + (f" (AMX bf16 {limits['peak_gflops_amx_bf16']:.0f})" if limits.get("peak_gflops_amx_bf16") else "")
            + f", bandwidth {limits['bandwidth_gbs']:.1f} GB/s"
        )
        table = Table(title=title, title_justify="left")
        extra_keys = sorted({k for r in self.rows for k in r.extra})
        for name in ["case", "impl", "ms (median)", "min–max", "GFLOP/s", "% peak", "GB/s", "% BW", "× baseline"]:
            table.add_column(name, justify="left" if name in ("case", "impl") else "right")
        for k in extra_keys:
            table.add_column(k, justify="right")
        table.add_column("note")

        def fmt(x, spec=".2f"):
            return "—" if x is None else format(x, spec)

        prev_case = None
        for r in self.rows:
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}× {r.baseline}"
            table.add_row(
                escape(r.case) if r.case != prev_case else "",  # (text, not markup: "pip install 'x[mlx]'")
                escape(r.impl),
                fmt(r.median_ms, ".3f"),
                f"{r.min_ms:.3f}–{r.max_ms:.3f}" if r.runs else "—",
                fmt(r.gflops, ".1f"),
                fmt(r.pct_peak, ".0f"),
                fmt(r.gbs, ".1f"),
                fmt(r.pct_bandwidth, ".0f"),
                ratio,
                *[escape(r.extra[k]) if isinstance(r.extra.get(k), str) else fmt(r.extra.get(k), ".4g")
                  for k in extra_keys],
                escape(r.note),
            )
            prev_case = r.case
        return table

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console(width=200)).print(self.table())

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def write_plot(self, path: str | Path) -> Path:
        """One panel per case: median time per impl (bars, min–max whiskers)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        timed = [r for r in self.rows if r.runs and r.impl not in self.references]
        cases = list(dict.fromkeys(r.case for r in timed))
        ncols = min(3, len(cases)) or 1
        nrows = math.ceil(len(cases) / ncols) or 1
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 0.5 + 2.6 * nrows), squeeze=False)
        for ax, case in zip(axes.flat, cases):
            rows = [r for r in timed if r.case == case]
            y = range(len(rows))
            ax.barh(
                list(y),
                [r.median_ms for r in rows],
                xerr=[[r.median_ms - r.min_ms for r in rows], [r.max_ms - r.median_ms for r in rows]],
                color=["tab:orange" if r.impl.startswith("fusedformer") else "tab:blue" for r in rows],
            )
            ax.set_yticks(list(y), [r.impl for r in rows], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(case, fontsize=9)
            ax.set_xlabel("ms (median, lower is better)", fontsize=8)
            for i, r in enumerate(rows):
                if r.ratio is not None:
                    ax.annotate(f" {r.ratio:.2f}×", (r.median_ms, i), va="center", fontsize=7)
        for ax in list(axes.flat)[len(cases):]:
            ax.axis("off")
        m = self.machine
        fig.suptitle(f"fusedformer bench {self.area} — {m['cpu']}, {m['threads']} threads, {m['isa']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def finish(self, out_dir: str | Path | None = "benchmarks/results", *, plot: bool = True, console=None) -> dict:
        """Prints the table; writes <out_dir>/<area>.json (and .png). Returns the written paths."""
        self.print(console)
        written = {}
        if out_dir is not None:
            out_dir = Path(out_dir)
            written["json"] = self.write_json(out_dir / f"{self.area}.json")
            if plot and self.rows:
                try:
                    written["png"] = self.write_plot(out_dir / f"{self.area}.png")
                except ImportError:
                    print("no plot: matplotlib is missing (pip install 'fusedformer[bench]')")
            for p in written.values():
                print(f"wrote {p}")
        return written


def validate(result: dict) -> None:
    """Raises ValueError if ``result`` (a loaded JSON report) does not follow SCHEMA."""
    if result.get("schema") != SCHEMA:
        raise ValueError(f"[bench] schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("area", "description", "machine", "rows"):
        if key not in result:
            raise ValueError(f"[bench] report lacks {key!r}")
    for key in ("cpu", "threads", "isa", "limits", "versions", "date"):
        if key not in result["machine"]:
            raise ValueError(f"[bench] machine description lacks {key!r}")
    for i, row in enumerate(result["rows"]):
        for key, kind in ROW_KEYS.items():
            if key not in row:
                raise ValueError(f"[bench] row {i} lacks {key!r}")
            if not isinstance(row[key], kind) and not (kind is float and isinstance(row[key], int)):
                raise ValueError(f"[bench] row {i}: {key}={row[key]!r} is not {kind}")


def track(iterable, description: str = "benchmarking", total: int | None = None):
    """A rich progress bar over ``iterable`` (plain iteration when output is not a terminal)."""
    from rich.progress import track as rich_track

    return rich_track(iterable, description=description, total=total, transient=True)
