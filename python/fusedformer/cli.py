"""`fusedformer info | bench <area> | export | verify`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys


def cmd_info(args) -> int:
    from fusedformer import info

    data = info(measure=not args.no_measure)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"fusedformer {data['version']}", show_header=False, title_justify="left")
    table.add_row("cpu", f"{data['cpu']} ({data['platform']}, {data['cpus_available']} CPUs available)")
    table.add_row("isa", f"{data['isa']} (compiled: {', '.join(data['isas_compiled'])}; "
                  f"this CPU: {', '.join(data['isas_supported'])})")
    table.add_row("threads", str(data["threads"]))
    if data["limits"]:
        table.add_row("measured peak", f"{data['limits']['peak_gflops']:.1f} GFLOP/s fp32 FMA")
        if data["limits"].get("peak_gflops_bf16_dot"):
            table.add_row("", f"{data['limits']['peak_gflops_bf16_dot']:.1f} GFLOP/s bf16 dot (vdpbf16ps)")
        if data["limits"].get("peak_gflops_amx_bf16"):
            table.add_row("", f"{data['limits']['peak_gflops_amx_bf16']:.1f} GFLOP/s bf16 AMX tiles (tdpbf16ps)")
        table.add_row("measured bandwidth", f"{data['limits']['bandwidth_gbs']:.1f} GB/s streaming read")
    for name, st in data["backends"].items():  # (escaped: rich reads "[torch]" in a hint as markup)
        table.add_row(name, st["version"] if st["available"] else escape(f"missing: {st['reason']} — {st['install']}"))
    Console().print(table)
    return 0


def cmd_bench(args) -> int:
    from fusedformer.bench import AREAS

    try:
        module = importlib.import_module(f"fusedformer.bench.{args.area}")
    except ModuleNotFoundError as e:
        if e.name == f"fusedformer.bench.{args.area}":
            print(f"fusedformer bench {args.area}: not available in this build", file=sys.stderr)
            return 2
        raise
    assert args.area in AREAS
    report = module.run(args)
    if report is None:  # the area printed why it could not run
        return 1
    from fusedformer.bench.machine import torch_threads

    report.machine["torch_threads"] = torch_threads()  # (torch is imported by then where the area timed it)
    report.finish(None if args.no_save else args.out, plot=args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fusedformer.bench import AREAS
    from fusedformer.bench.harness import positive_seconds

    parser = argparse.ArgumentParser(prog="fusedformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, ISA, threads, measured limits, optional backends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-measure", action="store_true", help="skip the machine-limit probes")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="run a benchmark area; prints a table, writes JSON and PNG")
    areas = p.add_subparsers(dest="area", required=True, metavar="AREA")
    for area, help_text in AREAS.items():
        a = areas.add_parser(area, help=help_text, description=help_text)
        a.add_argument("--quick", action="store_true", help="smaller shapes, for a fast look")
        a.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG")
        a.add_argument("--budget", type=positive_seconds, default=1.0,
                       help="seconds of timed runs per row" + (" (MiniLM's rows; the decoder's are set by "
                                                               "--rounds and --steps)" if area == "model" else ""))
        a.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
        a.add_argument("--no-save", action="store_true", help="print only, write nothing")
        try:
            module = importlib.import_module(f"fusedformer.bench.{area}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "add_arguments"):
            module.add_arguments(a)
    p.set_defaults(func=cmd_bench)

    try:
        from fusedformer.coreml import cli as coreml_cli
    except ImportError:
        coreml_cli = None
    if coreml_cli is not None:
        p = sub.add_parser("export", help="export a model to a Core ML package")
        coreml_cli.add_export_arguments(p)
        p.set_defaults(func=coreml_cli.run_export)
        p = sub.add_parser("verify", help="run an exported Core ML program with the MIL reference interpreter")
        coreml_cli.add_verify_arguments(p)
        p.set_defaults(func=coreml_cli.run_verify)
    return parser


def install_hint(module: str) -> str:
    """The pip command that installs what imports ``module`` (an extra where one carries it)."""
    from fusedformer._info import BACKENDS

    root = module.split(".")[0]
    extras = {mod.split(".")[0]: extra for mod, extra in BACKENDS.values()}
    extras |= {"matplotlib": "bench", "safetensors": "hf", "sklearn": "coreml"}
    return f"pip install 'fusedformer[{extras[root]}]'" if root in extras else f"pip install {root}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if not e.name or e.name.split(".")[0] == "fusedformer":  # (ours missing: a broken install, its traceback)
            raise
        print(f"fusedformer {args.command}: needs {e.name.split('.')[0]} ({install_hint(e.name)})", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        if not str(e).startswith("["):  # (ours are tagged "[area] ..."; anything else is a bug: its traceback)
            raise
        print(f"fusedformer {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
