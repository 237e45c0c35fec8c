// Per-ISA compilation unit guard. Every kernel source is compiled once per ISA variant with
// FF_ISA_NS set to the variant's name (generic, avx2, avx512), and everything a kernel header defines
// lives in namespace ff::FF_ISA_NS. That keeps the AVX2 build of an inline function from
// replacing the generic one at link time (an ODR clash that would SIGILL on older CPUs).
#pragma once

#ifndef FF_ISA_NS
#error "kernels/cpu sources are compiled per ISA: define FF_ISA_NS (generic, avx2 or avx512)"
#endif

#define FF_STR_(x) #x
#define FF_STR(x) FF_STR_(x)
#define FF_ISA_NAME FF_STR(FF_ISA_NS)
