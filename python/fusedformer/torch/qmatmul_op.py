"""torch custom op ``fusedformer::qmatmul(Tensor x, Tensor[] parts, str meta) -> Tensor``.

``parts`` are a QuantizedWeight's canonical arrays (fusedformer.quant docstring) as tensors and
``meta`` the JSON of its scheme and shape (QuantizedWeight.to_op_args()). The fake kernel gives
torch.compile / export the output shape [..., N]; backward is not implemented yet and raises.
"""

from __future__ import annotations

import json

import torch

from fusedformer._frameworks import refuse_forward_tangents
from fusedformer.ops_quant import qmatmul_tensor
from fusedformer.quant import QuantizedWeight


def parts_as_tensors(qw: QuantizedWeight) -> list[torch.Tensor]:
    """The canonical arrays as CPU tensors sharing memory (uint32 stored as int32). The dtypes are
    read on the tensors: Dynamo cannot trace ndarray.dtype (ff.qmatmul under fullgraph compile)."""
    tensors = [torch.from_numpy(a) for a in qw.arrays.values()]
    return [t.view(torch.int32) if t.dtype == torch.uint32 else t for t in tensors]


@torch.library.custom_op("fusedformer::qmatmul", mutates_args=())
def qmatmul_op(x: torch.Tensor, parts: list[torch.Tensor], meta: str) -> torch.Tensor:
    refuse_forward_tangents(torch, "qmatmul", x=x)
    return qmatmul_tensor(x, QuantizedWeight.from_op_args(parts, meta))


@qmatmul_op.register_fake
def _qmatmul_fake(x, parts, meta):
    n, k = json.loads(meta)["shape"]
    torch._check(x.shape[-1] == k, lambda: f"[qmatmul] x's last dimension must be K={k}")
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise NotImplementedError(
        "[qmatmul] backward is not implemented yet: fusedformer::qmatmul (QuantizedLinear) is "
        "inference-only; run it under torch.no_grad() / torch.inference_mode(), or train the "
        "float nn.Linear and compress afterwards"
    )


qmatmul_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _op_meta(qw: QuantizedWeight) -> str:
    """qw's JSON meta, a constant of the graph under torch.compile (Dynamo cannot trace json)."""
    return qw.to_op_args()[1]


def qmatmul_torch(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    refuse_forward_tangents(torch, "qmatmul", x=x)  # (torch.func.jvp: the op's body sees no transform)
    return torch.ops.fusedformer.qmatmul(x, parts_as_tensors(qw), _op_meta(qw))
