"""QuantizedLinear: nn.Linear with a compressed weight, y = x @ W.T + b through
fusedformer::qmatmul (W decoded inside the kernel)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusedformer._frameworks import forward_ad_active, refuse_forward_tangents
from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES
from fusedformer.ops_quant import kernel_args, qmatmul_tensor
from fusedformer.quant import QuantizedWeight, compress
from fusedformer.torch.qmatmul_op import parts_as_tensors


def _plain_eager(x: torch.Tensor) -> bool:
    """A real CPU tensor (not a subclass: fake and functional tensors are; not on the meta
    device, which the custom op's shape function serves) outside tracing, compilation and
    autograd."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not forward_ad_active(torch)  # (the op refuses tangents)
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class QuantizedLinear(nn.Module):
    """A linear layer over a fusedformer.quant.QuantizedWeight (inference only).

    The compressed arrays are buffers named ``w_<array>`` (plus ``w_meta``: the scheme and
    shape as JSON bytes), so state_dict() holds the compressed form and load_state_dict()
    accepts any scheme/shape (the buffers are replaced, not copied into).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self._set_weight(qw)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme) -> "QuantizedLinear":
        """Compresses linear.weight with scheme (bias kept as is)."""
        return cls(compress(linear.weight.detach(), scheme), linear.bias)

    def __getattr__(self, name: str):
        if name == "weight":  # (an AttributeError still: hasattr and getattr(..., default) stay as they were)
            raise AttributeError("[QuantizedLinear] a compressed layer has no dense .weight: code that reads it "
                                 "needs the layer kept dense (ff.torch.optimize(..., skip=[its name])); "
                                 "dequantized_weight() gives its values")
        return super().__getattr__(name)

    def _set_weight(self, qw: QuantizedWeight) -> None:
        self._names = list(qw.arrays)
        for name in [n for n in self._buffers if n.startswith("w_")]:
            del self._buffers[name]
        for name, t in zip(self._names, parts_as_tensors(qw)):
            self.register_buffer("w_" + name, t.clone())
        self.register_buffer("w_meta", torch.from_numpy(qw.to_dict()["meta"]))
        self._meta = qw.to_op_args()[1]
        self.scheme = qw.scheme
        self._kernel_cache = None

    def _apply(self, fn, recurse=True):
        """.half(), .to(dtype) and the like cast the bias only: the compressed arrays keep their
        storage dtypes (float32 scales, LUTs, values), which the format and the kernel fix."""
        kept = {name: self._buffers[name] for name in self._buffers if name.startswith("w_")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_op_args(self._parts(), self._meta)

    def _parts(self) -> list[torch.Tensor]:
        buffers = self._buffers  # (Module.__getattr__ would cost microseconds a call)
        return [buffers["w_" + n] for n in self._names]

    @property
    def weight_nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._parts()))

    def dequantized_weight(self) -> torch.Tensor:
        return torch.from_numpy(self.quantized_weight().dequantize())

    def __getstate__(self):
        """Pickling and copy.deepcopy leave the kernel cache behind (a _C.QMatmulPlan cannot be
        pickled; the copy builds its own on its first call)."""
        state = self.__dict__.copy()
        state["_kernel_cache"] = None
        return state

    def _cached_kernel(self, parts):
        """(_C.qmatmul's arguments, _C.QMatmulPlan or None) for the buffers now in place."""
        key = tuple(p.data_ptr() for p in parts)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            from fusedformer import _C  # (looked up here: build_ab swaps fusedformer._C for its builds)

            args = kernel_args(QuantizedWeight.from_op_args(parts, self._meta))
            plan_type = getattr(_C, "QMatmulPlan", None)  # (builds from before it have none)
            self._kernel_cache = (key, (args, None if plan_type is None else plan_type(*args)))
        return self._kernel_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        if _plain_eager(x):  # skip the dispatcher and re-parsing the weight on every call
            args, plan = self._cached_kernel(parts)
            # the weight described once in C++ (_C.QMatmulPlan); None for an x it does not take
            # (rows not one stride apart, a large output: the output cache), or builds without it
            y = None if plan is None else plan.torch(x, HUGEPAGE_MIN_BYTES)
            if y is None:
                y = qmatmul_tensor(x, None, args)
        else:  # tracing, compiling, fake tensors or autograd: the custom op
            refuse_forward_tangents(torch, "qmatmul", x=x)  # (torch.func.jvp: the op's body sees no transform)
            y = torch.ops.fusedformer.qmatmul(x, parts, self._meta)
        return y if self.bias is None else y + self.bias.to(device=y.device, dtype=y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta_key = prefix + "w_meta"
        if meta_key in state_dict:
            arrays = {k[len(prefix) + 2:]: state_dict[k].detach().cpu().numpy()
                      for k in state_dict if k.startswith(prefix + "w_")}
            qw = QuantizedWeight.from_dict(arrays)
            if qw.shape != (self.out_features, self.in_features):
                error_msgs.append(f"[qmatmul] {prefix}: compressed weight of shape {list(qw.shape)} does not "
                                  f"fit a layer of [{self.out_features}, {self.in_features}]")
                return
            self._set_weight(qw)  # buffers now have the incoming shapes; super() copies them
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        bpw = 8 * self.weight_nbytes / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, {bpw:.2f} bits/weight")
