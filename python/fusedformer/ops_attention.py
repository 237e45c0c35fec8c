"""Front of ff.sdpa: check arguments framework-neutrally, run the fused kernel, same kind out.

numpy arrays and torch tensors run the native kernel (torch through the custom op
``fusedformer::sdpa``, so torch.compile/export see one op and autograd refuses a backward);
mlx arrays go to ``fusedformer.mlx.attention.sdpa_mlx``.
"""

from __future__ import annotations

import collections
import math
import numbers
import os
import sys
import threading
import warnings
import weakref

import numpy as np

from fusedformer import _C
from fusedformer._frameworks import common_framework, forward_ad_active, refuse_forward_tangents

__all__ = ["sdpa", "check_args", "native_sdpa"]

# dtype name (numpy, torch and mlx spell them alike after the last dot) -> kernel code
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
MAX_HEAD_DIM = int(_C.sdpa_max_head_dim)
MAX_SCALE = float(_C.sdpa_max_scale)  # the kernel takes scale * log2(e) in float32


# numpy dtype -> name: str() of a numpy dtype runs Python code (about 8 us a call, four calls
# per sdpa), so each is spelled once. Other frameworks' dtypes are spelled by C code each time
# (a torch dtype in about 0.3 us), which also keeps torch.compile tracing plain: Dynamo cannot
# hash some dtypes (mlx's) that a shared dict would hold. The usual ones are spelled at import:
# str() of a dtype imports numpy code on its first call, which a call from a finalizer at
# interpreter shutdown cannot.
_NUMPY_DTYPE_NAMES: dict = {np.dtype(t): str(np.dtype(t)) for t in ("float32", "float16", "float64", "bool", "uint8")}


def _dtype_name(x) -> str:
    dt = x.dtype
    if isinstance(dt, np.dtype):
        name = _NUMPY_DTYPE_NAMES.get(dt)
        if name is None:
            name = _NUMPY_DTYPE_NAMES[dt] = str(dt)
        return name
    return str(dt).rsplit(".", 1)[-1]


def _check_dense(name, t) -> None:
    """TypeError for torch's sparse and mkldnn tensors, which have no strides to read."""
    layout = getattr(t, "layout", None)
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"[sdpa] {name} must be a dense (strided) tensor, got layout {layout}")


def _shape4(name, t) -> tuple:
    """t's shape as 4 ints; TypeError/ValueError naming the argument otherwise."""
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise TypeError(f"[sdpa] {name} must be an array or tensor, got {type(t).__name__}")
    _check_dense(name, t)
    shape = tuple(t.shape)  # (not int(): symbolic sizes under torch.export would specialize)
    if len(shape) != 4:
        kind = "[B, Hq, Lq, D]" if name == "q" else "[B, Hkv, Lk, D]"
        raise ValueError(f"[sdpa] {name} must be 4-d {kind}, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"[sdpa] {name} has a zero-sized dimension: shape {shape}")
    return shape


def check_args(q, k, v, mask=None, causal=False, scale=None, window=None):
    """Validates ff.sdpa's arguments on shapes and dtype names only (any framework).

    Returns (scale, window) normalised: scale a float (1/sqrt(D) by default), window an int
    (0 for none). Raises ValueError/TypeError starting with ``[sdpa]`` and naming the argument.
    Written for the common call to cost a few microseconds (it runs on every attention call
    of a model): each shape and dtype is read once, plain Python types are checked by type.
    """
    (b, hq, lq, d), k_shape, v_shape = _shape4("q", q), _shape4("k", k), _shape4("v", v)
    dtype = _dtype_name(q)
    if _dtype_name(k) != dtype or _dtype_name(v) != dtype:
        detail = ", ".join(f"{n} is {_dtype_name(t)}" for n, t in (("q", q), ("k", k), ("v", v)))
        raise TypeError(f"[sdpa] q, k and v must share one dtype: {detail}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"[sdpa] q has dtype {dtype}; supported: float32, float16, bfloat16")
    bk, hkv, lk, dk = k_shape
    if v_shape != k_shape:
        raise ValueError(f"[sdpa] v's shape {v_shape} must equal k's {k_shape}")
    if bk != b:
        raise ValueError(f"[sdpa] k has batch {bk}, q has batch {b}")
    if dk != d:
        raise ValueError(f"[sdpa] k's head dim {dk} does not match q's head dim {d}")
    if hq % hkv:
        raise ValueError(f"[sdpa] k has {hkv} heads, which does not divide q's {hq} heads")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"[sdpa] head dim {d} is above the supported {MAX_HEAD_DIM}")
    if causal is not False and causal is not True and not isinstance(causal, np.bool_):
        raise TypeError(f"[sdpa] causal must be a bool, got {type(causal).__name__}")
    if mask is not None:
        _check_mask(mask, (b, hq, lq, lk))
    return _checked_scale(scale, d), _checked_window(window)


def _check_mask(mask, target):
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"[sdpa] mask must be an array or tensor, got {type(mask).__name__}")
    mname = _dtype_name(mask)
    if mname != "bool" and not mname.startswith(("float", "bfloat")):
        order = " in the machine's byte order" if isinstance(mask.dtype, np.dtype) and not mask.dtype.isnative else ""
        raise TypeError(f"[sdpa] mask must be bool (True = keep) or floating (additive){order}, got {mname}")
    _check_dense("mask", mask)
    shape = tuple(mask.shape)
    if len(shape) > 4 or any(m not in (1, t) for m, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"[sdpa] mask of shape {shape} is not broadcastable to [B, Hq, Lq, Lk] = {target}")


def _checked_scale(scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if type(scale) is not float:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"[sdpa] scale must be a real number or None, got {type(scale).__name__}")
        scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"[sdpa] scale must be finite, got {scale}")
    if abs(scale) > MAX_SCALE:  # (else every score is +-inf or nan and the output a silent 0)
        raise ValueError(f"[sdpa] scale {scale} overflows float32, the kernel's precision (|scale| <= {MAX_SCALE:.4g})")
    return scale


def _checked_window(window) -> int:
    if window is None:
        return 0
    if type(window) is not int:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"[sdpa] window must be a positive int or None, got {type(window).__name__}")
        window = int(window)
    if window < 1:
        raise ValueError(f"[sdpa] window must be a positive int or None, got {window}")
    return min(window, 2**63 - 1)  # (wider than any call's keys: the kernel's int64 holds it)


def sdpa(q, k, v, *, mask=None, causal=False, scale=None, window=None, return_lse=False):
    """Fused scaled-dot-product attention (see DESIGN.md): numpy, torch or mlx in, same out.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] with Hq % Hkv == 0 (GQA/MQA without repeating K/V).
    causal is bottom-right aligned (query i sees keys j <= i + Lk - Lq); window=w also needs
    j > i + Lk - Lq - w; mask is bool (True = keep) or additive float, broadcastable to
    [B, Hq, Lq, Lk]. Fully masked rows give 0 (lse -inf), never NaN; a NaN or inf among the
    inputs a row reads makes it NaN, and scores past float32 from finite inputs are exact (the
    native kernel recomputes those rows in float64). Returns out (like q: its
    shape, dtype and, where q's storage is dense, its memory layout, as torch's SDPA does), or
    (out, lse) with lse fp32 [B, Hq, Lq] when return_lse.
    """
    if return_lse is not False and return_lse is not True and not isinstance(return_lse, np.bool_):
        raise TypeError(f"[sdpa] return_lse must be a bool, got {type(return_lse).__name__}")
    out = _eager_call(q, k, v, mask, causal, scale, window, return_lse)
    if out is not None:
        return out
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:  # (numpy would make it a 0-d object array: "q must be 4-d ..., got shape ()")
            raise TypeError(f"[sdpa] {name} must be an array or tensor, got None")
    framework = common_framework("sdpa", q=q, k=k, v=v, mask=mask)
    if framework == "numpy":
        q, k, v = (np.asarray(t) if not isinstance(t, np.ndarray) else t for t in (q, k, v))
    scale_f, window_i = _checked(framework, q, k, v, mask, causal, scale, window)
    if framework == "mlx":
        from fusedformer.mlx.attention import sdpa_mlx

        return sdpa_mlx(q, k, v, mask=mask, causal=causal, scale=scale, window=window_i or None, return_lse=return_lse)
    if framework == "torch" and not _torch_plain_eager(q, k, v, mask):
        import torch

        from fusedformer.torch import attention_op

        # (here, not only in the op: under torch.func.jvp the op's body sees no transform, and
        # its output came back with a zero tangent)
        refuse_forward_tangents(torch, "sdpa", q=q, k=k, v=v, mask=mask)
        op = attention_op.sdpa_lse if return_lse else attention_op.sdpa
        # (the default scale stays None: the op derives it from the shapes it runs on. Passed as
        # 1/sqrt(D), a traced head dim made it a value of the graph, and inductor's caches
        # served a graph compiled for D 16 to a call with D 32: scale 0.25 where 1/sqrt(32))
        return op(q, k, v, mask, bool(causal), None if scale is None else scale_f, window_i or None)
    return native_sdpa(q, k, v, mask=mask, causal=causal, scale=scale_f, window=window_i, return_lse=return_lse)


def _checked(framework, *args):
    """check_args(*args); under torch.jit.trace without its TracerWarnings (a dozen a call: the
    checks read sizes as Python values, which the trace does not record). The trace records the
    op alone; the checks run again, eagerly, inside it on every call of the traced module."""
    torch = sys.modules.get("torch") if framework == "torch" else None
    if torch is None or torch.compiler.is_compiling() or not torch._C._is_tracing():  # (Dynamo: the first)
        return check_args(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return check_args(*args)


def _eager_call(q, k, v, mask, causal, scale, window, return_lse=False):
    """The common eager call (no mask, or a bool or float32 one; with or without the lse) on
    numpy arrays or torch tensors through _C.sdpa_numpy / _C.sdpa_torch, which check and
    describe them in C++: its result, or None where that call does not apply (another
    framework, autograd to record, anything the general path would copy or reject), or
    torch.compile / export / jit.trace is tracing (the op must appear in the graph)."""
    if type(q) is np.ndarray:
        one_step = getattr(_C, "sdpa_numpy", None)
    else:
        torch = sys.modules.get("torch")
        if (torch is None or type(q) is not torch.Tensor or torch.compiler.is_compiling() or torch._C._is_tracing()
                or forward_ad_active(torch)):  # (forward AD: the op's own checks refuse tangents)
            return None
        one_step = getattr(_C, "sdpa_torch", None)
    # (getattr: benchmarks/build_ab.py runs builds from before these calls existed as _C)
    if one_step is None:
        return None
    if return_lse:  # (passed only then: the builds build_ab runs from before it lack it)
        return one_step(q, k, v, mask, causal, scale, window, HUGEPAGE_MIN_BYTES, True)
    return one_step(q, k, v, mask, causal, scale, window, HUGEPAGE_MIN_BYTES)


def _torch_plain_eager(q, k, v, mask) -> bool:
    """True when torch tensors can skip the custom op (about 30 us of dispatch per call): plain
    tensors (no fake/functional/subclass), nothing tracing (torch.compile, export, jit.trace:
    the Core ML export path needs the op in the graph), and no autograd to record. Otherwise
    the op runs, so graphs see it and backward raises."""
    import torch

    if torch.compiler.is_compiling() or torch.jit.is_tracing() or forward_ad_active(torch):
        return False
    plain = torch.Tensor
    if type(q) is not plain or type(k) is not plain or type(v) is not plain:
        return False
    if mask is not None and type(mask) is not plain:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (q.requires_grad or k.requires_grad or v.requires_grad or (mask is not None and mask.requires_grad))


# ---- native path (numpy and torch CPU tensors) ----------------------------------------------


def _descriptor(x, name):
    """(data pointer, shape, element strides) of a numpy array or CPU torch tensor."""
    if isinstance(x, np.ndarray):
        ptr = x.__array_interface__["data"][0]
        return ptr, x.shape, tuple(s // x.itemsize for s in x.strides)
    if not x.is_cpu:
        raise ValueError(f"[sdpa] {name} is on {x.device}; the native kernel takes CPU tensors")
    return x.data_ptr(), tuple(x.shape), x.stride()


def _last_dim_contiguous(x):
    """x itself when its last dimension is contiguous (any other strides), else a copy."""
    if isinstance(x, np.ndarray):
        ok = x.shape[-1] == 1 or x.strides[-1] == x.itemsize
        ok = ok and all(s % x.itemsize == 0 for s in x.strides)
        return x if ok else np.ascontiguousarray(x)
    return x if (x.shape[-1] == 1 or x.stride(-1) == 1) else x.contiguous()


def _additive_f32(m, framework):
    """An additive mask as float32. Finite values of a wider dtype past float32's range become its
    lowest / largest, not -inf (which would drop the key) or +inf; infinities stay."""
    big = float(np.finfo(np.float32).max)
    if framework == "numpy":
        if m.dtype.itemsize > 4:
            m = np.where(np.isinf(m), m, np.clip(m, -big, big))
        return m.astype(np.float32, copy=False)
    import torch

    if m.dtype.itemsize > 4:
        m = torch.where(torch.isinf(m), m, m.clamp(-big, big))
    return m.to(torch.float32)


def _kernel_mask(mask, framework):
    """(mask as uint8 keep / fp32 additive, padded to 4-d, kind code) for the kernel."""
    if mask is None:
        return None, 0
    if framework == "numpy":
        m = np.asarray(mask)
        m = m.view(np.uint8) if m.dtype == np.bool_ else _additive_f32(m, framework)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if any(s % m.itemsize for s in m.strides):
            m = np.ascontiguousarray(m)
    else:
        import torch

        m = mask.view(torch.uint8) if mask.dtype == torch.bool else _additive_f32(mask, framework)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m
    return m, 1 if _dtype_name(m) == "uint8" else 2


# Outputs from this size up are hinted to transparent huge pages (numpy's own threshold for
# its arrays; torch's allocator gives no hint) and come from _OUTPUT_CACHE.
HUGEPAGE_MIN_BYTES = 4 << 20


class _OutputCache:
    """Memory of outputs (torch and numpy; sdpa's, and qmatmul's: ops_quant._cached_output)
    from HUGEPAGE_MIN_BYTES up, kept when the last tensor or array on it dies and handed to the
    next output of the same size (a model's layers, a benchmark's calls), as MLX's allocator
    keeps its buffers. Fresh memory is zeroed page by page by the OS inside the call: on causal
    B1 H32 L2048 D128 fp32 prefill (a 32 MiB output) clear_page_erms held 4.2% of the samples
    (perf), and `fusedformer bench attention` measured 119.9-120.3 ms with the cache against
    134.0-136.4 ms without (README, FUSEDFORMER_OUTPUT_CACHE_MB). Keeps at most ``limit`` bytes
    (FUSEDFORMER_OUTPUT_CACHE_MB, default 256; 0 keeps none). The tensors are ordinary CPU
    tensors whose storage is not resizable (as torch.from_numpy's)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept: dict[int, list] = {}  # bytes -> free 64-byte aligned uint8 arrays
        self._bytes = 0
        # Memory given back waits here until the next take / clear / set_limit / bytes settles it
        # under the lock: give_back runs from finalizers, which a garbage collection may start
        # inside a locked section on the same thread (a deadlock, were it to take the lock).
        self.returned = collections.deque()
        self.lock = threading.Lock()
        self.watches: dict[int, weakref.ref] = {}  # id -> the weak reference of each lent array

    @property
    def bytes(self) -> int:
        """Bytes kept now."""
        with self.lock:
            self._settle()
            return self._bytes

    def _settle(self) -> None:
        """Files the memory given back since (under the lock), up to the limit."""
        while self.returned:
            buf = self.returned.popleft()
            if self._bytes + buf.nbytes <= self.limit:
                self.kept.setdefault(buf.nbytes, []).append(buf)
                self._bytes += buf.nbytes

    def take(self, nbytes: int):
        """A 64-byte aligned uint8 array of nbytes: a kept one, or new and hinted to huge pages."""
        with self.lock:
            self._settle()
            free = self.kept.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        # (the address from __array_interface__: .ctypes imports numpy code on first use, which a
        # call from a finalizer at interpreter shutdown cannot)
        start = -raw.__array_interface__["data"][0] % 64
        buf = raw[start:start + nbytes]
        _C.advise_hugepages(buf.__array_interface__["data"][0], nbytes)
        return buf

    def give_back(self, buf) -> None:
        self.returned.append(buf)  # (no blocking on the lock: see __init__; deque.append is atomic)
        if self.lock.acquire(blocking=False):  # filed now, unless this thread (or another) holds it
            try:
                self._settle()
            finally:
                self.lock.release()

    def clear(self) -> None:
        """Frees the kept memory (memory lent to live outputs stays theirs)."""
        with self.lock:
            self.returned.clear()
            self.kept.clear()
            self._bytes = 0

    def set_limit(self, limit: int) -> int:
        """Keeps at most ``limit`` bytes from now on, freeing kept memory past it (largest
        buffers first); returns the limit before."""
        with self.lock:
            self._settle()
            before, self.limit = self.limit, limit
            for nbytes in sorted(self.kept, reverse=True):
                free = self.kept[nbytes]
                while free and self._bytes > limit:
                    free.pop()
                    self._bytes -= nbytes
            self.kept = {n: free for n, free in self.kept.items() if free}
        return before

    def lend(self, nbytes: int):
        """A uint8 array of nbytes on cached memory, its own: once it and every array or tensor
        made from it are gone, the memory goes back to the cache."""
        buf = self.take(nbytes)
        # through a memoryview: numpy points a view's base past views of arrays to the array that
        # owns the memory, but not past an array on a foreign buffer, so every array made from
        # `lent` keeps it (and torch.from_numpy keeps the array it is given)
        lent = np.frombuffer(memoryview(buf), dtype=np.uint8)
        # a weak reference with a callback, kept here until it runs (weakref.finalize imports
        # atexit on its first use, which a call from a finalizer at interpreter shutdown cannot)
        watches = self.watches

        def returned(ref, buf=buf, give_back=self.give_back):
            watches.pop(id(ref), None)
            give_back(buf)

        ref = weakref.ref(lent, returned)
        watches[id(ref)] = ref
        return lent

    def empty_like(self, torch, q):
        """A tensor like torch.empty_like(q) (shape, dtype, memory layout) on cached memory."""
        layout = torch.empty_like(q, device="meta")
        flat = torch.from_numpy(self.lend(q.numel() * q.element_size())).view(q.dtype)
        return flat.as_strided(layout.shape, layout.stride())

    def empty_like_numpy(self, q):
        """An array like np.empty_like(q) (its axes laid out in q's stride order) on cached memory."""
        order = sorted(range(q.ndim), key=lambda i: (-abs(q.strides[i]), i))  # outermost first
        flat = self.lend(q.nbytes).view(q.dtype)
        return flat.reshape([q.shape[i] for i in order]).transpose(np.argsort(order))


def _cache_limit() -> int:
    text = os.environ.get("FUSEDFORMER_OUTPUT_CACHE_MB") or "256"  # (empty: unset, as the other variables)
    try:
        mb = int(text)
    except ValueError:
        raise ValueError(f"[sdpa] FUSEDFORMER_OUTPUT_CACHE_MB must be a whole number of MiB, got {text!r}") from None
    if mb < 0:
        raise ValueError(f"[sdpa] FUSEDFORMER_OUTPUT_CACHE_MB must be >= 0, got {mb}")
    return mb << 20


_OUTPUT_CACHE = _OutputCache(_cache_limit())


def _unlock_after_fork() -> None:
    """A child forked while another thread held the cache's lock inherits it held, by a thread
    that does not exist there: its first output of HUGEPAGE_MIN_BYTES would wait forever."""
    _OUTPUT_CACHE.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_after_fork)


def get_cache_memory() -> int:
    """Bytes of released ``ff.sdpa`` / ``ff.qmatmul`` output memory kept for the next outputs
    (as ``mx.get_cache_memory``)."""
    return _OUTPUT_CACHE.bytes


def clear_cache() -> None:
    """Frees the kept output memory (as ``mx.clear_cache``); outputs still alive keep theirs."""
    _OUTPUT_CACHE.clear()


def set_cache_limit(limit: int) -> int:
    """Keeps at most ``limit`` bytes of released output memory from now on (0: none; the
    default comes from FUSEDFORMER_OUTPUT_CACHE_MB), freeing what is kept past it; returns the
    limit before (as ``mx.set_cache_limit``)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
        raise TypeError(f"[set_cache_limit] limit must be an int number of bytes, got {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"[set_cache_limit] limit must be >= 0 bytes, got {limit}")
    return _OUTPUT_CACHE.set_limit(int(limit))


def _empty_output_numpy(q):
    """An array laid out as np.empty_like(q) (q's stride order), C-contiguous where q has a
    broadcast axis (np.empty_like would put that axis innermost, after the head dim); from
    HUGEPAGE_MIN_BYTES up on _OUTPUT_CACHE's memory (numpy hints its own large arrays to huge
    pages)."""
    if any(s == 0 and n > 1 for s, n in zip(q.strides, q.shape)):
        return np.empty(q.shape, dtype=q.dtype)
    if q.nbytes >= HUGEPAGE_MIN_BYTES and _OUTPUT_CACHE.limit > 0:
        return _OUTPUT_CACHE.empty_like_numpy(q)
    return np.empty_like(q)


def _empty_output(torch, q):
    """A fresh tensor like q (its memory layout) for the kernel to write: from HUGEPAGE_MIN_BYTES
    up on _OUTPUT_CACHE's memory, hinted to huge pages (_C.advise_hugepages) before anything
    touches it (a 32 MiB output otherwise takes 8192 page faults in the call)."""
    nbytes = q.numel() * q.element_size()
    if nbytes >= HUGEPAGE_MIN_BYTES and _OUTPUT_CACHE.limit > 0:
        return _OUTPUT_CACHE.empty_like(torch, q)
    out = torch.empty_like(q, requires_grad=False)
    if nbytes >= HUGEPAGE_MIN_BYTES:
        _C.advise_hugepages(out.untyped_storage().data_ptr(), nbytes)
    return out


def native_sdpa(q, k, v, *, mask=None, causal=False, scale=None, window=0, return_lse=False,
                out=None, kv_chunk=-1):
    """The native kernel on numpy arrays or CPU torch tensors (arguments already checked).

    ``out`` (test hook): a preallocated output like q to write into. ``kv_chunk``: -1 picks
    split-KV by shape, 0 never splits, n > 0 forces chunks of n keys (tests).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    b, hq, lq, _ = q.shape
    # out takes q's memory layout (as torch's own SDPA does): for the [B, Lq, Hq, D] storage
    # that models' projections produce, the transpose back to [B, Lq, Hq * D] is then free
    if isinstance(q, np.ndarray):
        framework = "numpy"
        if out is None:
            out = _empty_output_numpy(q)
        lse = np.empty((b, hq, lq), dtype=np.float32) if return_lse else None
    else:
        import torch

        framework = "torch"
        if out is None:
            out = _empty_output(torch, q)
        lse = torch.empty((b, hq, lq), dtype=torch.float32) if return_lse else None
    m, mask_kind = _kernel_mask(mask, framework)
    # positional: pybind11 matches keyword arguments by name, about 1 us a call
    _C.sdpa(
        _descriptor(q, "q"), _descriptor(k, "k"), _descriptor(v, "v"), _descriptor(out, "out"),
        DTYPE_CODES[_dtype_name(q)],
        None if lse is None else _descriptor(lse, "lse"),
        None if m is None else _descriptor(m, "mask"), mask_kind,
        bool(causal), scale, int(window or 0), int(kv_chunk),
    )
    return (out, lse) if return_lse else out
