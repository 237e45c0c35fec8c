"""The entry ops_quant.qmatmul calls for MLX activations (see fusedformer.mlx.linear)."""

from fusedformer.mlx.linear import qmatmul_mlx as qmatmul

__all__ = ["qmatmul"]
