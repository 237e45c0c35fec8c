"""benchmarks/build_ab.py: a second build loads as a module of its own and takes the place of
fusedformer._C only inside `using` (two builds loaded under one name would run one of them
twice, and an A/B would compare a build with itself)."""

import sys
from pathlib import Path

import numpy as np
import pytest

import fusedformer as ff
import fusedformer.ops_attention as ops_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
build_ab = pytest.importorskip("build_ab")


def test_second_build_is_its_own_module_and_is_routed_only_inside_using():
    original = ff._C
    other = build_ab.load_build("copy", original.__file__)
    assert other is not original and other.__name__ == "ff_copy._C"
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 33, 64)).astype(np.float32) for _ in range(3))
    expected = ff.sdpa(q, k, v, causal=True)
    with build_ab.using(other):
        assert ops_attention._C is other and ff._C is other
        got = ff.sdpa(q, k, v, causal=True)
    assert ops_attention._C is original and ff._C is original
    np.testing.assert_array_equal(got, expected)


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"\[build_ab\] no such file"):
        build_ab.load_build("none", str(tmp_path / "missing.so"))
