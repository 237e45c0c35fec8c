"""Two builds of the native extension against each other, on the same inputs in one process.

    make build && cp python/fusedformer/_C*.so /tmp/base.so      # on the base commit
    git checkout <change> && make build
    python benchmarks/build_ab.py /tmp/base.so [--rounds N] [--case TEXT]

The candidate is the build in python/fusedformer (or a second .so path). Each build is loaded
as its own module (`ff_base._C`, `ff_candidate._C`: Python keeps one module per name, so two
files loaded under the same name would silently run the first one twice) and put in place of
`fusedformer._C` in turn; each case alternates between them, one short measurement each per
round (which goes first alternates from round to round, so that neither always runs on the
other's warm caches or in the same phase of a slowing host), and the table gives medians over
the rounds, their ratio, and the per-round ratios (candidate / base of the same round: a shared
host's slow minutes move both of a round alike) as median and quartiles. A change whose
quartiles straddle 1 is not told from noise by that run. The cases are those of isa_ab.py.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import fusedformer
from fusedformer.bench.harness import measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa_ab import default_cases  # noqa: E402


def load_build(label: str, path: str):
    """The extension at `path` as a module of its own, named ff_<label>._C, loaded from a copy:
    dlopen hands a file it has loaded before (the package's own _C, the default candidate) back
    as the same library, whose module init would then run a second time (registering its
    classes twice is an ImportError)."""
    if not Path(path).is_file():
        raise SystemExit(f"[build_ab] no such file: {path}")
    folder = Path(tempfile.mkdtemp(prefix=f"ff_{label}_"))
    copy = folder / Path(path).name
    shutil.copyfile(path, copy)
    try:
        spec = importlib.util.spec_from_file_location(f"ff_{label}._C", copy)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        shutil.rmtree(folder)  # (the loaded library stays mapped)
    if Path(module.__file__) != copy:
        raise SystemExit(f"[build_ab] {path} did not load as a module of its own")
    return module


@contextmanager
def using(build):
    """Routes every fusedformer module's `_C` to `build` while inside."""
    original = fusedformer._C
    holders = [m for name, m in list(sys.modules.items())
               if name.split(".")[0] == "fusedformer" and getattr(m, "_C", None) is original]
    for m in holders:
        m._C = build
    try:
        yield
    finally:
        for m in holders:
            m._C = original


def alternating_rounds(fns: dict, rounds: int, time_one) -> dict[str, list[float]]:
    """time_one(fn) for each of `fns` (name -> fn) in each of `rounds` rounds, the order
    reversed every other round; returns each name's times in round order."""
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            samples[name].append(time_one(fns[name]))
    return samples


def paired_ratios(base: list[float], cand: list[float]) -> tuple[float, float, float]:
    """The per-round ratios cand / base: (first quartile, median, third quartile)."""
    if len(base) != len(cand) or not base:
        raise ValueError(f"[build_ab] need one base and one candidate time per round, got {len(base)} and {len(cand)}")
    q1, med, q3 = np.quantile(np.asarray(cand) / np.asarray(base), [0.25, 0.5, 0.75])
    return float(q1), float(med), float(q3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the base build's _C .so")
    parser.add_argument("candidate", nargs="?", default=fusedformer._C.__file__,
                        help="the candidate's _C .so (default: the current build)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--case", default="", help="only cases whose name contains this text")
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel pool size of both builds (default: as configured)")
    args = parser.parse_args(argv)
    builds = {"base": load_build("base", args.base), "candidate": load_build("candidate", args.candidate)}
    if args.threads is not None:
        for build in builds.values():
            build.set_num_threads(args.threads)
    cases = [(n, f) for n, f in default_cases(np.random.default_rng(0)) if args.case in n]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"base {args.base} vs candidate {args.candidate}: medians of "
                        f"{args.rounds} alternating rounds ({builds['candidate'].num_threads()} threads)")
    for col in ("case", "base ms", "candidate ms", "candidate / base", "per round (quartiles)"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, fn in cases:
        def time_one(build, fn=fn):
            with using(build):
                return measure(fn, budget_s=0.3).median_ms

        samples = alternating_rounds(builds, args.rounds, time_one)
        base, cand = (statistics.median(samples[label]) for label in builds)
        q1, med, q3 = paired_ratios(samples["base"], samples["candidate"])
        table.add_row(name, f"{base:.3f}", f"{cand:.3f}", f"{cand / base:.3f}", f"{med:.3f} ({q1:.3f}-{q3:.3f})")
    Console(width=max(Console().width, 130)).print(table)


if __name__ == "__main__":
    main()
