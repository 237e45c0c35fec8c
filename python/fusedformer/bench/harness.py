"""Timing: warm up, then run until a time budget is spent; report the median with min and max."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    # process CPU seconds per wall second over the timed calls: how many threads the impl kept
    # busy (MLX's CPU path ran on ~1.0 of 2 where ours and torch's used the pool's 2); None where
    # not measured. Process-wide: a previous impl's threads still spinning count (our pool's for
    # FUSEDFORMER_SPIN_US, 100 us after a kernel), a small share of a batch of calls.
    cpu_per_wall: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 2.0,
    sync: Callable[[object], object] | None = None,
) -> Timing:
    """Times ``fn()``: ``warmup`` untimed calls, then at least ``min_runs`` and at most
    ``max_runs`` timed calls, stopping once ``budget_s`` seconds of timed calls have passed.

    ``sync(result)`` forces fn's result before the clock stops (``mx.eval`` for lazy MLX
    arrays).
    """
    return _timing(*_samples_ms(fn, warmup, min_runs, max_runs, budget_s, sync))


def measure_in_rounds(
    fns: dict[str, tuple[Callable[[], object], dict]],
    *,
    rounds: int = 4,
    budget_s: float = 2.0,
) -> dict[str, Timing]:
    """Times several implementations of one case in alternating rounds: each round gives every
    one ``budget_s / rounds`` seconds (at least one call, and its ``min_runs`` spread over the
    rounds), so all of them are sampled across the same minutes and a machine that slows down
    for a while (a shared host) moves them alike; the ratio of two medians then compares like
    with like. ``fns`` maps a name to (fn, options of ``measure``: min_runs, sync)."""
    if rounds < 1:
        raise ValueError(f"[bench] need rounds >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu_wall = {name: [0.0, 0.0] for name in fns}  # (CPU seconds, wall seconds) of the timed batches
    for r in range(rounds):
        for name, (fn, opts) in fns.items():
            min_runs = max(1, -(-opts.get("min_runs", 5) // rounds))
            ms, cpu_s, wall_s = _samples_ms(fn, 2 if r == 0 else 0, min_runs, 200, budget_s / rounds,
                                            opts.get("sync"))
            samples[name] += ms
            cpu_wall[name][0] += cpu_s
            cpu_wall[name][1] += wall_s
    return {name: _timing(ms, *cpu_wall[name]) for name, ms in samples.items()}


def _samples_ms(fn, warmup, min_runs, max_runs, budget_s, sync) -> tuple[list[float], float, float]:
    """ms of each timed call, and the process CPU and wall seconds of the batch of them (read
    once before and once after it, outside every call's timed span)."""
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"[bench] need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")

    def call():
        out = fn()
        if sync is not None:
            sync(out)
        return out

    for _ in range(warmup):
        call()
    samples = []
    spent = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or spent < budget_s):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return [s * 1e3 for s in samples], cpu, wall


def _timing(ms: list[float], cpu_s: float = 0.0, wall_s: float = 0.0) -> Timing:
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms), cpu_s / wall_s if wall_s > 0 else None)


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache level (Linux sysfs); 32 MiB where it cannot be read."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else 32 << 20


def cold_copies(nbytes: float, *, cap: int = 256) -> int:
    """How many copies of an operand of ``nbytes`` to use in turn so that one round streams at
    least twice the last-level cache: every call then reads its operand from memory, as each
    layer's weights and KV cache are read in a model's decode step. (Timing one copy that fits
    in the cache measures the cache, not the kernel's use of memory bandwidth.) At most ``cap``
    copies: operands under 2 x LLC / cap (256 KiB with a 32 MiB cache) are read partly from cache."""
    need = 2 * last_level_cache_bytes()
    return int(min(cap, max(1, -(-need // max(int(nbytes), 1)))))


def in_turn(items: list) -> Callable[[], object]:
    """A function returning items[0], items[1], ... cyclically, one per call."""
    state = {"i": -1}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


MLX_INSTALL = "pip install 'fusedformer[mlx]'"


def not_installed(module: str, install: str) -> str | None:
    """None where `module` imports; else the note for the rows of the peer it provides, which are
    not run ("not installed (pip install ...)"): rows that just vanish would not say why."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return f"not installed ({install})"
    return None


def parse_shape(spec: str, names: str, area: str) -> tuple[int, ...]:
    """The sizes of a `--shape` argument: as many integers >= 1 as `names` (e.g. "M,N,K") has."""
    count = len(names.split(","))
    try:
        sizes = tuple(int(x) for x in spec.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != count:
        raise ValueError(f"[bench {area}] --shape takes {names} ({count} integers), got {spec!r}")
    if min(sizes) < 1:
        raise ValueError(f"[bench {area}] --shape {spec!r}: every size must be >= 1")
    return sizes


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error otherwise, not a traceback later)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (-1, 0, nan and inf are usage errors)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def quick_or(args, name: str, quick: int, default: int) -> int:
    """An option whose default depends on --quick: the value given, else `quick` with --quick,
    else `default` (options given explicitly win over --quick)."""
    value = getattr(args, name)
    return value if value is not None else quick if args.quick else default


def add_rounds_argument(parser) -> None:
    """The --rounds option of the areas timed with measure_in_rounds."""
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="alternating rounds per case: each impl gets --budget / rounds seconds in each")


READ_PROBE = "read probe"


class ReadProbe:
    """The streaming-read probe of `bench limits` (all pool threads summing a buffer of `nbytes`),
    as a contender of a case's rounds; its buffer is made (and first touched) on first use,
    by torch as the cases' K and V are: numpy asks the kernel for huge pages for large arrays,
    which read ~10% faster here than torch's (25.1-25.9 against 22.8-23.3 GB/s side by side)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes // 64 * 64
        self._buf = None

    def run(self):
        import torch

        from fusedformer import _C

        if self._buf is None:
            self._buf = torch.ones(self.nbytes // 4, dtype=torch.float32).numpy()
        return _C.stream_sum(self._buf)

    def gbs(self, timing) -> float:
        return self.nbytes / (timing.median_ms / 1e3) / 1e9

    def add_row(self, rep, case: str, timing, note: str = "this case's % BW refers to") -> None:
        """The probe's row of `case` in `rep`: the GB/s of `timing` (its runs in the case's rounds)."""
        rep.add(case=case, impl=READ_PROBE, timing=timing, bytes=self.nbytes, bandwidth_gbs=self.gbs(timing),
                note=f"streaming read timed in the same rounds: the GB/s {note}")

    @classmethod
    def for_run(cls, quick: bool) -> "ReadProbe":
        """The probe of a benchmark run: 512 MiB, or 128 MiB with --quick, and at least four
        times the last-level cache, so that it reads from memory (a 64 MiB probe, twice this
        machine's 32 MiB L3, read 47 GB/s: partly from the cache)."""
        return cls(max(128 << 20 if quick else 512 << 20, 4 * last_level_cache_bytes()))


PEAK_PROBE = "peak probe"


class PeakProbe:
    """The compute-peak probe of the limit Report.peak_key picks for `dtype` (fp32 FMAs; bf16:
    the AMX tiles when the avx512_amx variant runs, else the bf16 dot product where the CPU has
    it), as a contender of a case's rounds: each call runs it for `seconds` and keeps the
    GFLOP/s it measured; gflops() is their median."""

    # limit key -> (name, the _C probe that measures it)
    PROBES = {
        "peak_gflops": ("fp32 FMA probe", "peak_gflops"),
        "peak_gflops_bf16_dot": ("bf16 dot probe", "peak_gflops_bf16_dot"),
        "peak_gflops_amx_bf16": ("AMX bf16 probe", "peak_gflops_amx_bf16"),
    }

    def __init__(self, rep, dtype: str, seconds: float = 0.02):
        from fusedformer import _C

        self.name, fn = self.PROBES[rep.peak_key(dtype)]
        self._fn = getattr(_C, fn)
        self.seconds = seconds
        self.samples: list[float] = []

    def run(self):
        self.samples.append(self._fn(seconds=self.seconds))

    def gflops(self) -> float:
        import statistics

        return statistics.median(self.samples)

    def add_row(self, rep, case: str, timing, note: str = "this case's % peak refers to") -> None:
        """The probe's row of `case` in `rep`: gflops() over the `timing` of its runs."""
        gflops = self.gflops()
        rep.add(case=case, impl=PEAK_PROBE, timing=timing, flops=gflops * 1e9 * timing.median_ms / 1e3,
                peak_gflops=gflops, note=f"{self.name} run in the same rounds: the GFLOP/s {note}")
