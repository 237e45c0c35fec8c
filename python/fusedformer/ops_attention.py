"""Front of ff.sdpa (issue: fused attention)."""


def sdpa(q, k, v, *, mask=None, causal=False, scale=None, window=None, return_lse=False):
    raise NotImplementedError("[sdpa] the fused attention kernel is not built yet")
