"""Build of the native extension ``fusedformer._C``.

The pure kernels under ``kernels/cpu`` are compiled once per ISA variant into separate
namespaces (``ff::generic``, ``ff::avx2``, ``ff::avx512``); the bindings under ``csrc`` are compiled once,
portable, and pick a variant by CPUID at import. No host-specific -march flag anywhere: a wheel built
here must run on any x86-64 (or aarch64) CPU.
"""

from __future__ import annotations

import glob
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
COMMON_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]

# (name, compiler flags). The generic variant takes the platform's baseline only.
ISA_VARIANTS = [("generic", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    AVX2 = ["-mavx2", "-mfma", "-mf16c"]
    ISA_VARIANTS.append(("avx2", AVX2))
    # The AVX2 kernels again, with AVX-512 (F/BW/VL/DQ) and VNNI: 32 vector registers, EVEX
    # encodings, and the VNNI micro-kernels that pay off (the 4-bit affine GEMV).
    ISA_VARIANTS.append(("avx512", AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]))


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


KERNEL_SOURCES = rel("kernels/cpu/**/*.cpp")
BINDING_SOURCES = rel("csrc/**/*.cpp")
HEADERS = rel("kernels/cpu/**/*.h") + rel("csrc/**/*.h")


def needs_recompile(obj: str, src: str) -> bool:
    """Recompile when the object is older than its source or than any project header."""
    if not os.path.exists(obj):
        return True
    newest = max([os.path.getmtime(src)] + [os.path.getmtime(h) for h in HEADERS])
    return os.path.getmtime(obj) < newest


ParallelCompile("FUSEDFORMER_BUILD_JOBS", needs_recompile=needs_recompile).install()


class BuildExt(build_ext):
    """Compiles the kernel sources once per ISA variant, then links them with the bindings."""

    def build_extension(self, ext):
        objects = []
        for isa, flags in ISA_VARIANTS:
            objects += self.compiler.compile(
                KERNEL_SOURCES,
                output_dir=os.path.join(self.build_temp, "isa_" + isa),
                macros=[("FF_ISA_NS", isa)],
                include_dirs=[ROOT],
                extra_postargs=COMMON_FLAGS + flags,
                depends=HEADERS,
            )
        ext.extra_objects = objects
        super().build_extension(ext)


ext = Pybind11Extension(
    "fusedformer._C",
    BINDING_SOURCES,
    include_dirs=[ROOT],
    define_macros=[("FF_HAVE_" + isa.upper(), "1") for isa, _ in ISA_VARIANTS],
    extra_compile_args=COMMON_FLAGS,
    cxx_std=17,
)
ext.extra_link_args += ["-pthread"]
ext.depends += KERNEL_SOURCES + HEADERS  # relink _C when only kernel objects changed

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
