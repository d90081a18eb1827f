/* Private to the attention kernels: the vector types, the kernels' entry points per ISA. */
#ifndef SKV_ATTENTION_PVT_H
#define SKV_ATTENTION_PVT_H

#include <stdint.h>

#include "attention.h"

typedef float attn_vf __attribute__((vector_size(64)));
typedef int32_t attn_vi __attribute__((vector_size(64)));
typedef float attn_vf_u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
#define ATTN_LANES 16

/* The kernels' element types (a compile-time constant at each call, so each gets its own loops). */
#define ATTN_KV_F32 0
#define ATTN_KV_F16 1
#define ATTN_KV_Q8 2

struct attn_range {
	uint32_t lo, hi;
	const float *q;
	int64_t alibi_origin; /* ALiBi: slot t of the range lies at distance alibi_origin - t */
};


#define ATTN_CAT(a, b) a##_##b
#define ATTN_CAT2(a, b) ATTN_CAT(a, b)
#define ATTN_FN(name) ATTN_CAT2(name, ATTN_ISA)

#define ATTN_DECLARE(isa)                                                                   \
	void attn_attend_##isa(const struct skv_attn_args *args);                            \
	void attn_swiglu_##isa(float *out, const float *gu, uint32_t rows, uint32_t hidden);
ATTN_DECLARE(v4)
ATTN_DECLARE(v3)
ATTN_DECLARE(base)

#endif
