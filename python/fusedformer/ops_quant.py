"""Front of ff.qmatmul (issue: compressed weights)."""


def qmatmul(x, qw):
    raise NotImplementedError("[qmatmul] the quantized matmul kernels are not built yet")
