"""Compression schemes: small validated value objects, serialisable to JSON-able dicts."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np


def _fail(msg: str):
    raise ValueError(f"[quant] {msg}")


def _int(scheme, name: str, value) -> int:
    """value as an int: Python and numpy integers, not bools, floats or strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"[quant] {scheme} {name} takes ints, got {value!r}")
    return int(value)


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # (frozen dataclasses: a validated, normalised field)


@dataclass(frozen=True)
class Affine:
    """MLX affine quantization: groups of ``group_size`` along K, w = scale * q + bias."""

    bits: int = 4
    group_size: int = 64

    BITS = (2, 3, 4, 5, 6, 8)
    GROUP_SIZES = (32, 64, 128)

    def __post_init__(self):
        _set(self, "bits", _int("Affine", "bits", self.bits))
        _set(self, "group_size", _int("Affine", "group_size", self.group_size))
        if self.bits not in self.BITS:
            _fail(f"Affine bits={self.bits!r} is not supported; use one of {self.BITS}")
        if self.group_size not in self.GROUP_SIZES:
            _fail(f"Affine group_size={self.group_size!r} is not supported; use one of {self.GROUP_SIZES}")

    def to_json(self) -> dict:
        return {"format": "affine", "bits": self.bits, "group_size": self.group_size}


@dataclass(frozen=True)
class Int8:
    """Per-output-channel int8 (Core ML linear_symmetric): w = (q - zero_point) * scale."""

    zero_point: bool = False

    def __post_init__(self):
        if not isinstance(self.zero_point, (bool, np.bool_)):
            raise TypeError(f"[quant] Int8 zero_point={self.zero_point!r} must be a bool")
        _set(self, "zero_point", bool(self.zero_point))

    def to_json(self) -> dict:
        return {"format": "int8", "zero_point": self.zero_point}


@dataclass(frozen=True)
class Palettize:
    """k-means palettization: w = lut[group of the row][index]; bits-wide indices."""

    bits: int = 4
    granularity: str = "per_tensor"
    group_size: int = 16

    BITS = (1, 2, 3, 4, 6, 8)
    GRANULARITIES = ("per_tensor", "per_grouped_channel")

    def __post_init__(self):
        _set(self, "bits", _int("Palettize", "bits", self.bits))
        _set(self, "group_size", _int("Palettize", "group_size", self.group_size))
        if self.bits not in self.BITS:
            _fail(f"Palettize bits={self.bits!r} is not supported; use one of {self.BITS}")
        if self.granularity not in self.GRANULARITIES:
            _fail(f"Palettize granularity={self.granularity!r}; use one of {self.GRANULARITIES}")
        if self.group_size < 1:
            _fail(f"Palettize group_size={self.group_size!r} must be a positive integer")

    def to_json(self) -> dict:
        return {"format": "palettize", "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size}


@dataclass(frozen=True)
class Prune:
    """Magnitude pruning (unstructured, or n:m along K), optionally quantizing the survivors."""

    sparsity: float | None = None  # (0.5 unless given; with n_m, 1 - n / m)
    then: Affine | Palettize | None = None
    n_m: tuple[int, int] | None = None

    def __post_init__(self):
        if self.n_m is not None:
            if not isinstance(self.n_m, (tuple, list)) or len(self.n_m) != 2:
                raise TypeError(f"[quant] Prune n_m={self.n_m!r} must be a pair of ints (n, m), e.g. (2, 4)")
            n, m = (_int("Prune", "n_m", x) for x in self.n_m)
            if not (0 < n < m <= 16):
                _fail(f"Prune n_m={self.n_m!r} must satisfy 0 < n < m <= 16 (e.g. (2, 4))")
            implied = 1.0 - n / m
            if self.sparsity is not None and not (isinstance(self.sparsity, numbers.Real) and abs(self.sparsity - implied) <= 1e-9):
                _fail(f"Prune sparsity={self.sparsity!r} contradicts n_m={(n, m)}, which keeps {n} of every {m} "
                      f"(sparsity {implied:g}); give one of the two")
            _set(self, "n_m", (n, m))
            _set(self, "sparsity", implied)
        elif self.sparsity is None:
            _set(self, "sparsity", 0.5)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, numbers.Real):
            raise TypeError(f"[quant] Prune sparsity={self.sparsity!r} must be a real number in [0, 1)")
        _set(self, "sparsity", float(self.sparsity))
        if not (0.0 <= self.sparsity < 1.0):  # (false for NaN too)
            _fail(f"Prune sparsity={self.sparsity!r} must lie in [0, 1)")
        if self.then in (Affine, Palettize):  # (DESIGN's spelling, then=Affine: the format's defaults)
            _set(self, "then", self.then())
        if self.then is not None and not isinstance(self.then, (Affine, Palettize)):
            _fail(f"Prune then={self.then!r} must be None, Affine or Palettize (the class: its defaults), or an "
                  f"instance of one")

    def to_json(self) -> dict:
        return {"format": "prune", "sparsity": float(self.sparsity),
                "n_m": list(self.n_m) if self.n_m else None,
                "then": self.then.to_json() if self.then is not None else None}


def scheme_from_json(d: dict):
    fmt = d.get("format")
    if fmt == "affine":
        return Affine(d["bits"], d["group_size"])
    if fmt == "int8":
        return Int8(d.get("zero_point", False))
    if fmt == "palettize":
        return Palettize(d["bits"], d["granularity"], d["group_size"])
    if fmt == "prune":
        then = scheme_from_json(d["then"]) if d.get("then") else None
        n_m = tuple(d["n_m"]) if d.get("n_m") else None
        return Prune(d["sparsity"], then, n_m)
    _fail(f"unknown scheme format {fmt!r}")
