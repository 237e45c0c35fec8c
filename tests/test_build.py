"""The native build: the ISA variants compiled in and selectable, clear errors for bad env."""

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
        assert compiled == ["generic", "avx2", "avx512", "avx512_bf16", "avx512_amx"]
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
        ("FUSEDFORMER_POOL", "tbb", r"FUSEDFORMER_POOL='tbb' is not one of: auto, own, openmp"),
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


# What each variant's code may use, by register names in the disassembly: ymm for AVX;
# zmm, ymm16-31/xmm16-31 and mask registers k0-7 for AVX-512 (EVEX encodings).
AVX = re.compile(r"%ymm")
AVX512 = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[0-7]\b")


def variant_of(symbol: str) -> str:
    for isa in ("avx512", "avx2"):
        if f"ff::{isa}::" in symbol or f"N2ff{len(isa)}{isa}" in symbol:  # demangled or not
            return isa
    return "generic"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif("avx512" not in _C.compiled_isas(), reason="no AVX2/AVX-512 variants in this build")
def test_each_variant_uses_only_its_isa():
    """Code outside ff::avx2 and ff::avx512 must run on a baseline x86-64 CPU (no ymm), and
    code outside ff::avx512 on an AVX2 CPU (no EVEX registers).

    This catches the classic multi-ISA bug where an inline function compiled with -mavx2 in one
    translation unit replaces the baseline copy at link time (an illegal instruction on CPUs
    without AVX2).
    """
    so = fusedformer._C.__file__
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True).stdout
    seen = {"avx2": set(), "avx512": set()}  # functions using each extension, per variant
    offenders, current, variant = set(), None, "generic"
    for line in dump.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current, variant = header.group(1), variant_of(header.group(1))
            continue
        if current is None:
            continue
        if AVX512.search(line):
            (seen["avx512"].add if variant == "avx512" else offenders.add)(current)
        elif AVX.search(line):
            (offenders.add if variant == "generic" else seen[variant].add)(current)
    assert seen["avx2"] and seen["avx512"], "the disassembly shows no AVX code: this check would see nothing"
    assert not offenders, f"code using an ISA its variant may not: {sorted(offenders)[:10]}"


def test_version_is_exposed():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", fusedformer.__version__)
