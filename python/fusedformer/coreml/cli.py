"""`fusedformer export` and `fusedformer verify` (wired into fusedformer.cli by the lead).

    fusedformer export ./my-hf-model --out lm.mlpackage --attention fused --weights affine4
    fusedformer export tiny-llama --out tiny.mlpackage --kv-cache
    fusedformer verify lm.mlpackage --inputs inputs.npz
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from fusedformer.bench.harness import positive_int

# --weights takes fusedformer.quant.names' short names; these are the ones the help lists
WEIGHT_EXAMPLES = ("affine4", "affine8", "int8", "lut4", "lut4-grouped", "prune50", "prune50-lut4")


def weight_scheme(name: str):
    """argparse type of --weights: the scheme of a short name (an unknown one is a usage error)."""
    import argparse

    from fusedformer.quant.names import scheme_from_name

    try:
        return scheme_from_name(name, "export")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


BUILTIN_MODELS = ("tiny-llama",)


def _say(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# export


def add_export_arguments(parser) -> None:
    parser.add_argument("model", help="a Hugging Face model directory or hub id, or 'tiny-llama' (a built-in test decoder)")
    parser.add_argument("--out", required=True, help="path of the .mlpackage to write")
    parser.add_argument("--attention", choices=("fused", "unfused"), default="fused")
    parser.add_argument("--target", default="iOS18",
                        help="minimum deployment target: iOS18 or macOS15 (or later) for fused attention, --weights, "
                             "--kv-cache and --adapter; an older one (iOS17, macOS14, ... down to iOS15) only for "
                             "plain exports, whose attention is then unfused")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--weights", type=weight_scheme, metavar="SCHEME",
                        help=f"compress every linear (lm_head kept): a short scheme name, e.g. {', '.join(WEIGHT_EXAMPLES)} "
                        "(affineB: groups of 64; palettizeB = lutB; pruneP-<inner>)")
    parser.add_argument("--seq-len", type=positive_int, default=64, help="tokens of the example input (and default length)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--kv-cache", action="store_true", help="stateful decoder with the K/V caches as Core ML states")
    parser.add_argument("--max-len", type=positive_int, default=512, help="cache length of --kv-cache exports")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                        help="add a function NAME whose tensors come from FILE (.safetensors/.pt state dict)")


def _load_model(name: str):
    """(model, kind) with kind 'causal-lm' or 'encoder'."""
    if name == "tiny-llama":
        from fusedformer.coreml.models import tiny_llama

        return tiny_llama(), "causal-lm"
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:  # (no such directory, no config.json, a hub id not reachable)
        raise OSError(f"[export] cannot load model {name!r}: {e}") from None
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
                                                   for a in (config.architectures or [])):
        return AutoModelForCausalLM.from_pretrained(name).eval(), "causal-lm"
    return AutoModel.from_pretrained(name).eval(), "encoder"


def _load_state_dict(path: str) -> dict:
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"[export] --adapter file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _parse_adapters(items) -> dict:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"[export] --adapter takes NAME=FILE, got {item!r}")
        adapters[name] = _load_state_dict(path)
    return adapters


def run_export(args) -> int:
    import torch

    import fusedformer as ff

    from fusedformer.coreml.export import check_options, check_target_supports

    check_options(args.attention, args.target, args.precision)  # (before minutes of loading)
    check_target_supports(args.target, kv_cache=args.kv_cache, adapters=bool(args.adapter),
                          compressed=bool(args.weights))
    adapters = _parse_adapters(args.adapter) or None
    started = time.perf_counter()
    _say(f"loading {args.model}")
    model, kind = _load_model(args.model)
    if args.weights or args.attention == "fused":
        scheme = args.weights
        _say(f"optimizing: attention={args.attention}, weights={scheme}")
        if not hasattr(model, "kv_cache_config"):  # our own decoders call the fused op already
            ff.torch.optimize(model, attention="fused", weights=scheme)
        elif scheme is not None:
            ff.torch.optimize(model, attention=None, weights=scheme)
    ids = torch.randint(0, 10, (args.batch, args.seq_len))
    inputs = {"input_ids": ids}
    static = {}
    if kind == "encoder":
        inputs["attention_mask"] = torch.ones_like(ids)
    elif not hasattr(model, "kv_cache_config"):
        static = {"use_cache": False}
    _say(f"tracing and converting ({args.attention} attention, {args.target}, {args.precision})")
    mlmodel = ff.coreml.export(
        model, inputs, args.out, attention=args.attention, target=args.target, precision=args.precision,
        kv_cache=args.kv_cache, adapters=adapters,
        **({"max_len": args.max_len} if args.kv_cache else {"static_kwargs": static}),
    )
    from fusedformer.coreml.interpreter import Program
    from fusedformer.coreml.multifunction import package_size

    program = Program.load(mlmodel)
    counts = program.op_types()
    top = ", ".join(f"{op} {n}" for op, n in counts.most_common() if op != "const")
    _say(f"saved {mlmodel.package_path}: {package_size(mlmodel.package_path) / 2**20:.2f} MiB, "
         f"functions {program.functions}")
    _say(f"inputs {program.input_names}, outputs {program.output_names}, states {program.state_names}")
    _say(f"ops: {top}")
    for note in mlmodel.fusedformer.notes:
        _say(f"note: {note}")
    _say(f"done in {time.perf_counter() - started:.1f} s; check it with: fusedformer verify {mlmodel.package_path}")
    return 0


# ----------------------------------------------------------------------------------------------
# verify


def add_verify_arguments(parser) -> None:
    parser.add_argument("package", help="a .mlpackage written by fusedformer export (or any ML program)")
    parser.add_argument("--inputs", help=".npz of inputs keyed by input name (default: random tokens / ones)")
    parser.add_argument("--function", default="main", help="function of a multifunction package")
    parser.add_argument("--seq-len", type=positive_int, default=8, help="length of flexible dims for random inputs")
    parser.add_argument("--fp32", action="store_true", help="keep fp16 values in fp32 (no fp16 rounding emulation)")
    parser.add_argument("--save", help="write the outputs to this .npz")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def random_inputs(program, seq_len: int, seed: int = 0) -> dict:
    """Inputs for a smoke run: ones for masks, small token ids for ints, normal floats."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    from fusedformer.coreml.interpreter import _np_dtype

    rng = np.random.default_rng(seed)
    out = {}
    for name in program.input_names:
        var = program.function.inputs[name]
        shape = [seq_len if is_symbolic(d) else int(d) for d in var.shape]
        dtype = _np_dtype(var.dtype)
        if np.issubdtype(dtype, np.integer):
            out[name] = np.ones(shape, dtype) if "mask" in name else rng.integers(0, 10, shape).astype(dtype)
        else:
            out[name] = rng.standard_normal(shape).astype(dtype)
    return out


def run_verify(args) -> int:
    from fusedformer.coreml.interpreter import Program, UnsupportedOpError

    if not os.path.exists(args.package):
        print(f"fusedformer verify: no such package {args.package}", file=sys.stderr)
        return 2
    import coremltools as ct
    from google.protobuf.message import DecodeError

    try:
        model = ct.models.MLModel(args.package, skip_model_load=True)
    except (RuntimeError, DecodeError, OSError) as e:  # (no Manifest.json, not a Core ML spec)
        reason = " ".join(str(e).split())
        print(f"fusedformer verify: [verify] cannot read {args.package!r} as a Core ML model: {reason}",
              file=sys.stderr)
        return 2
    try:
        program = Program.load(model, args.function, emulate_fp16=not args.fp32)
    except UnsupportedOpError as e:  # (a valid program the interpreter cannot run)
        print(f"fusedformer verify: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # (not an ML program, no such --function)
        print(f"fusedformer verify: {e}", file=sys.stderr)
        return 2
    if args.inputs:
        if not os.path.isfile(args.inputs):
            print(f"fusedformer verify: no such --inputs file {args.inputs}", file=sys.stderr)
            return 2
        try:
            with np.load(args.inputs) as data:
                inputs = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:  # (not an .npz)
            print(f"fusedformer verify: cannot read --inputs {args.inputs} as .npz: {e}", file=sys.stderr)
            return 2
    else:
        inputs = random_inputs(program, args.seq_len)
    state = program.make_state() if program.state_names else None
    started = time.perf_counter()
    try:
        outputs = program.predict(inputs, state=state)
    except ValueError as e:  # inputs the program does not take: names, shapes, a stateful export's rules
        if not str(e).startswith("[verify]"):  # (anything else is a bug: its traceback)
            raise
        print(f"fusedformer verify: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    summary = {
        "package": args.package,
        "function": args.function,
        "ops": dict(program.op_types()),
        "inputs": {k: list(np.shape(v)) for k, v in inputs.items()},
        "outputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "nan": int(np.isnan(v).sum()) if v.dtype.kind == "f" else 0,
                "min": float(np.min(v)), "max": float(np.max(v))}
            for k, v in outputs.items()
        },
        "interpreter_seconds": round(seconds, 3),
    }
    if args.save:
        np.savez(args.save, **outputs)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.package} [{args.function}]: ran {sum(summary['ops'].values())} ops in {seconds:.2f} s")
        for k, v in summary["outputs"].items():
            print(f"  {k}: {v['shape']} {v['dtype']} min {v['min']:.4g} max {v['max']:.4g} NaN {v['nan']}")
    return 1 if any(v["nan"] for v in summary["outputs"].values()) else 0
