"""Fused attention vs torch SDPA, unfused torch and MLX (same as `fusedformer bench attention`)."""
import sys

from fusedformer.cli import main

sys.exit(main(["bench", "attention", *sys.argv[1:]]))
