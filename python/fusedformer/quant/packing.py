"""Bit packing shared by every format: an LSB-first bitstream.

Element i of a stream of b-bit unsigned integers occupies bits [i*b, (i+1)*b) of the byte
array, bit j of byte B being bit 8*B + j. For b in (2, 4, 8) viewed as little-endian uint32
words this is exactly MLX's packing (element 0 in the low bits); for 3, 5, 6 bits it is MLX's
byte packing (8 values in 3 or 5 bytes, 4 six-bit values in 3 bytes) too. Masks are 1-bit
streams of the same kind.
"""

from __future__ import annotations

import numpy as np


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """uint values < 2**bits, shape [..., n] -> uint8 [..., ceil(n*bits/8)]."""
    q = np.asarray(q)
    if bits == 8:
        return q.astype(np.uint8)
    planes = (q[..., None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1
    flat = planes.reshape(*q.shape[:-1], q.shape[-1] * bits)
    return np.packbits(flat, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 [..., nbytes] -> uint8 [..., count]."""
    packed = np.asarray(packed).view(np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    flat = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = flat.reshape(*packed.shape[:-1], count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)
