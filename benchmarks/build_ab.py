"""Two builds of the native extension against each other, on the same inputs in one process.

    make build && cp python/fusedformer/_C*.so /tmp/base.so      # on the base commit
    git checkout <change> && make build
    python benchmarks/build_ab.py /tmp/base.so [--rounds N] [--case TEXT]

The candidate is the build in python/fusedformer (or a second .so path). Each build is loaded
as its own module (`ff_base._C`, `ff_candidate._C`: Python keeps one module per name, so two
files loaded under the same name would silently run the first one twice) and put in place of
`fusedformer._C` in turn; each case alternates between them, one short measurement each per
round, and the table gives medians over the rounds and their ratio. The cases are those of
isa_ab.py. Prints a table; writes nothing.
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
    for col in ("case", "base ms", "candidate ms", "candidate / base"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, fn in cases:
        samples = {label: [] for label in builds}
        for _ in range(args.rounds):
            for label, build in builds.items():
                with using(build):
                    samples[label].append(measure(fn, budget_s=0.3).median_ms)
        base, cand = (statistics.median(samples[label]) for label in builds)
        table.add_row(name, f"{base:.3f}", f"{cand:.3f}", f"{cand / base:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
