"""Measured machine limits (same as `fusedformer bench limits`)."""
import sys

from fusedformer.cli import main

sys.exit(main(["bench", "limits", *sys.argv[1:]]))
