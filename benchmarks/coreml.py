"""Core ML predict timings of exported packages, macOS only (same as `fusedformer bench coreml`)."""
import sys

from fusedformer.cli import main

sys.exit(main(["bench", "coreml", *sys.argv[1:]]))
