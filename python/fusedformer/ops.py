"""Framework-neutral front of the fused ops: check arguments, pick a backend, convert back.

numpy, torch and mlx arrays in, the same kind out. The attention front lives in
ops_attention.py, the quantized-matmul front in ops_quant.py.
"""

from fusedformer.ops_attention import sdpa
from fusedformer.ops_quant import qmatmul

__all__ = ["sdpa", "qmatmul"]
