"""Short scheme names, one spelling for every command line (`fusedformer bench qmatmul
--schemes`, `fusedformer export --weights`):

    int8                Int8()
    affineB             Affine(B, 64)                    e.g. affine4, affine8
    palettizeB / lutB   Palettize(B)                     e.g. palettize4 = lut4
    lutB-grouped        Palettize(B, per_grouped_channel, group_size=16)  (palettizeB-grouped too)
    pruneP              Prune(P / 100)                   e.g. prune50
    pruneP-INNER        Prune(P / 100, then=INNER)       e.g. prune50-affine4, prune50-lut4
"""

from __future__ import annotations

import re

from fusedformer.quant.schemes import Affine, Int8, Palettize, Prune

NAMES_HELP = "int8, affineB (groups of 64), palettizeB or lutB, lutB-grouped, pruneP, pruneP-<one of those>"
_PALETTE = re.compile(r"(?:palettize|lut)(\d+)(-grouped)?")
_PRUNE = re.compile(r"prune(\d+)(?:-(.+))?")


def scheme_from_name(name: str, area: str):
    """The scheme a short name stands for (module docstring); a ValueError naming `area` (the
    command) and the name where there is none or its numbers do not fit the format."""
    try:
        scheme = _parse(name)
    except ValueError as e:  # (a bit width or sparsity the format refuses)
        raise ValueError(f"[{area}] scheme {name!r}: {e}") from None
    if scheme is None:
        raise ValueError(f"[{area}] unknown scheme {name!r}: {NAMES_HELP}")
    return scheme


def _parse(name: str):
    if name == "int8":
        return Int8()
    if m := re.fullmatch(r"affine(\d+)", name):
        return Affine(int(m[1]), 64)
    if m := _PALETTE.fullmatch(name):
        grouped = dict(granularity="per_grouped_channel", group_size=16) if m[2] else {}
        return Palettize(int(m[1]), **grouped)
    if (m := _PRUNE.fullmatch(name)) and 0 < int(m[1]) < 100:
        inner = _parse(m[2]) if m[2] else None
        return None if m[2] and inner is None else Prune(int(m[1]) / 100, then=inner)
    return None
