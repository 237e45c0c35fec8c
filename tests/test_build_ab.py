"""benchmarks/build_ab.py: a second build loads as a module of its own and takes the place of
fusedformer._C only inside `using` (two builds loaded under one name would run one of them
twice, and an A/B would compare a build with itself)."""

import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

import fusedformer as ff
import fusedformer.ops_attention as ops_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import build_ab  # noqa: E402


def test_second_build_is_its_own_module_and_is_routed_only_inside_using(tmp_path):
    original = ff._C
    copy = tmp_path / Path(original.__file__).name  # another file: dlopen gives its own library
    shutil.copyfile(original.__file__, copy)
    other = build_ab.load_build("copy", str(copy))
    assert other is not original and other.__name__ == "ff_copy._C"
    # its own native state: a thread count set on the copy leaves the original's alone
    threads = original.num_threads()
    other.set_num_threads(1)
    try:
        assert original.num_threads() == threads
    finally:
        other.set_num_threads(threads)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 33, 64)).astype(np.float32) for _ in range(3))
    expected = ff.sdpa(q, k, v, causal=True)
    with build_ab.using(other):
        assert ops_attention._C is other and ff._C is other
        got = ff.sdpa(q, k, v, causal=True)
    assert ops_attention._C is original and ff._C is original
    np.testing.assert_array_equal(got, expected)


def test_the_package_build_loads_again_as_its_own_module():
    """The default candidate is the package's own _C file, already loaded: it loads from a copy
    (the same file again would be the same library, its module init run twice: its classes'
    second registration raised ImportError)."""
    other = build_ab.load_build("again", ff._C.__file__)
    assert other is not ff._C and other.__name__ == "ff_again._C"
    assert other.QMatmulPlan is not ff._C.QMatmulPlan


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"\[build_ab\] no such file"):
        build_ab.load_build("none", str(tmp_path / "missing.so"))


def test_rounds_alternate_which_build_goes_first():
    calls = []
    samples = build_ab.alternating_rounds({"base": "b", "candidate": "c"}, 4,
                                          lambda fn: calls.append(fn) or float(len(calls)))
    assert calls == ["b", "c", "c", "b", "b", "c", "c", "b"]
    assert samples == {"base": [1.0, 4.0, 5.0, 8.0], "candidate": [2.0, 3.0, 6.0, 7.0]}


def test_paired_ratios_are_per_round():
    # a candidate 0.9x the base's time on a host that slows down 3x during round 3 and stays
    # slow: the ratio of the medians says 2.7, the per-round ratios 0.9 (but round 3's)
    base = [1.0, 1.0, 1.0, 3.0, 3.0]
    cand = [0.9, 0.9, 2.7, 2.7, 2.7]
    assert statistics.median(cand) / statistics.median(base) == pytest.approx(2.7)
    assert build_ab.paired_ratios(base, cand) == pytest.approx((0.9, 0.9, 0.9))
    q1, med, q3 = build_ab.paired_ratios([1.0, 1.0, 1.0, 1.0], [0.8, 1.0, 1.1, 1.3])
    assert q1 < med < q3 and med == pytest.approx(1.05)
    with pytest.raises(ValueError, match=r"\[build_ab\] need one base and one candidate"):
        build_ab.paired_ratios([1.0], [1.0, 2.0])
