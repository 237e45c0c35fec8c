"""Quantized matmuls per weight format (same as `fusedformer bench qmatmul`)."""
import sys

from fusedformer.cli import main

sys.exit(main(["bench", "qmatmul", *sys.argv[1:]]))
