"""Compressed weights: one format shared by the native kernels, MLX and Core ML.

A compressed ``W [N, K]`` (``y = x @ W.T``: N output channels, K input features) is a
:class:`QuantizedWeight` built by ``compress(w, scheme)``. Its canonical arrays, in the order
of ``to_op_args()`` (the ``parts`` of ``fusedformer::qmatmul``) and of the native kernels:

Every packed stream is an LSB-first bitstream (fusedformer.quant.packing): element i of a
b-bit stream occupies bits [i*b, (i+1)*b), bit j of byte B being bit 8*B + j.

``Affine(bits, group_size)``   bits 2,3,4,5,6,8; groups of 32/64/128 along K  (MLX affine)
    w_q     uint32 [N, K*bits/32]  row-major bitstream of q in [0, 2**bits); exactly MLX's
                                   packing (also for 3/5/6 bits) -> mx.quantized_matmul
    scales  float32 [N, K/group_size]
    biases  float32 [N, K/group_size]
    W[n, k] = fp32(fp32(scales[n, g] * q[n, k]) + biases[n, g]), g = k // group_size (two
    roundings, = mx.dequantize). Scale/bias rule = mx.quantize's (bit-identical arrays).
    Core ML: exact as constexpr_lut_to_dense with a per-(row, group) LUT of 2**bits values
    (lut[n, g, q] = the formula above), or constexpr_blockwise_shift_scale approximately.

``Int8(zero_point=False)``     per output channel (Core ML linear_symmetric / linear)
    w_q          int8 [N, K]
    scales       float32 [N]
    zero_points  int8 [N]          (only with zero_point=True)
    W[n, k] = fp32((q - zero_point) * scales[n]) (the difference is exact: one rounding) =
    constexpr_blockwise_shift_scale(data=w_q, scale=scales[:, None], offset=zero_points[:, None]).

``Palettize(bits, granularity, group_size)``   bits 1,2,3,4,6,8; K % 8 == 0
    indices  uint8 [N, K*bits/8]   row-major bitstream of LUT indices
    lut      float32 [G, 2**bits]  G = 1 (per_tensor) or N / group_size (per_grouped_channel:
                                   rows [g*group_size, (g+1)*group_size) share lut[g]); ascending
    W[n, k] = lut[n // group_size or 0, index[n, k]]
    = constexpr_lut_to_dense(indices as uint{bits} [N, K], lut reshaped [G, 1, 2**bits, 1]).

``Prune(sparsity, then=None, n_m=None)``   magnitude pruning; K % 8 == 0
    mask     uint8 [N, K/8]        1-bit stream of the dense [N, K] (1 = kept), row-major
    then=None:       values   float32 [nnz]   the kept values in row-major order
    then=Affine:     w_q uint8 [ceil(nnz*bits/8)] (bitstream of the kept entries' q),
                     scales, biases float32 [N, K/group_size] (range of the kept entries only)
    then=Palettize:  indices uint8 [ceil(nnz*bits/8)], lut float32 [G, 2**bits]
    W[n, k] = 0 where the mask is 0, else the inner format's value for the next survivor.
    = constexpr_sparse_to_dense(nonzero_data, mask as uint1 [N, K]) (iOS18: the inner formats
    via constexpr_lut_to_sparse / constexpr_sparse_blockwise_shift_scale).

``QuantizedWeight``: .scheme, .shape, .arrays (name -> array), .dequantize() (float32, the
values every backend reproduces exactly), .nbytes, .bits_per_weight (all arrays counted),
.snr_db(w), .codes(), .mask(), .to_mlx(), .to_dict()/from_dict() (arrays plus ``meta``: the
JSON of scheme and shape as uint8 bytes; safetensors-compatible), .to_op_args()/from_op_args().
"""

from .packing import pack_bits, unpack_bits
from .schemes import Affine, Int8, Palettize, Prune, scheme_from_json
from .weight import QuantizedWeight, check_compressible, check_values, compress, is_scheme

__all__ = ["Affine", "Int8", "Palettize", "Prune", "QuantizedWeight", "compress",
           "pack_bits", "unpack_bits", "scheme_from_json", "is_scheme", "check_compressible", "check_values"]
