"""The native build: both ISA variants compiled in and selectable, clear errors for bad env."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import fusedformer
from fusedformer import _C


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_compiled_variants():
    compiled = _C.compiled_isas()
    assert compiled[0] == "generic"
    if os.uname().machine in ("x86_64", "AMD64"):
        assert "avx2" in compiled
    assert set(_C.supported_isas()) <= set(compiled)


def test_default_is_best_supported():
    proc = run_python("from fusedformer import _C; print(_C.isa())", FUSEDFORMER_ISA="auto")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == _C.supported_isas()[-1]


@pytest.mark.parametrize("isa", _C.supported_isas())
def test_env_forces_variant(isa):
    proc = run_python("from fusedformer import _C; print(_C.isa())", FUSEDFORMER_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


@pytest.mark.parametrize(
    "var, value, expected",
    [
        ("FUSEDFORMER_ISA", "sse9", r"FUSEDFORMER_ISA='sse9' is not one of: auto, generic"),
        ("FUSEDFORMER_NUM_THREADS", "0", r"FUSEDFORMER_NUM_THREADS='0' is not a positive integer"),
        ("FUSEDFORMER_NUM_THREADS", "two", r"FUSEDFORMER_NUM_THREADS='two' is not a positive integer"),
        ("FUSEDFORMER_NUM_THREADS", "-3", r"FUSEDFORMER_NUM_THREADS='-3' is not a positive integer"),
        ("FUSEDFORMER_SPIN_US", "-1", r"FUSEDFORMER_SPIN_US='-1' is not an integer from 0 to 1000000"),
        ("FUSEDFORMER_SPIN_US", "fast", r"FUSEDFORMER_SPIN_US='fast' is not an integer from 0 to 1000000"),
    ],
)
def test_bad_env_is_a_clear_import_error(var, value, expected):
    proc = run_python("import fusedformer", **{var: value})
    assert proc.returncode == 1  # an exception, not a crash (negative return codes are signals)
    assert re.search(expected, proc.stderr), proc.stderr


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"\[fusedformer\] FUSEDFORMER_ISA='neon'"):
        _C._set_isa("neon")
    assert _C.isa() in _C.supported_isas()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif("avx2" not in _C.compiled_isas(), reason="no AVX2 variant in this build")
def test_generic_code_uses_no_avx():
    """Everything outside ff::avx2 must run on a baseline x86-64 CPU: no ymm registers there.

    This catches the classic dual-ISA bug where an inline function compiled with -mavx2 in one
    translation unit replaces the baseline copy at link time (an illegal instruction on CPUs
    without AVX2).
    """
    so = fusedformer._C.__file__
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True).stdout
    offenders, avx2_with_ymm, current, in_avx2 = set(), set(), None, False
    for line in dump.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
            in_avx2 = "ff::avx2::" in current or "N2ff4avx2" in current  # demangled or not
            continue
        if current and "%ymm" in line:
            (avx2_with_ymm if in_avx2 else offenders).add(current)
    assert avx2_with_ymm, "the disassembly shows no AVX code at all: this check would see nothing"
    assert not offenders, f"AVX code outside ff::avx2: {sorted(offenders)[:10]}"


def test_version_is_exposed():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", fusedformer.__version__)
