/* Weight types of GGUF files: the ggml block formats, bit for bit.
 *
 * A weight matrix [rows][cols] is stored row by row; each row is cols / block_elems blocks of
 * one type. The types streamkv reads (numbered as ggml numbers them in a GGUF tensor info):
 *
 *   F32    plain float32
 *   F16    IEEE binary16
 *   BF16   bfloat16 (the high half of a float32)
 *   Q8_0   32 weights: fp16 scale d, 32 x int8 q;            w = d * q
 *   Q4_0   32 weights: fp16 scale d, 16 bytes of nibbles;    w = d * (q - 8); byte j holds
 *          weight j in its low nibble and weight j + 16 in its high nibble
 *   Q4_K   256 weights in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
 *          mins (packed as ggml's get_scale_min_k4), 128 bytes of nibbles;
 *          w = d * sc[j] * q - dmin * m[j]
 *   Q5_K   as Q4_K plus 32 bytes holding each weight's fifth bit
 *   Q6_K   256 weights in 16 sub-blocks of 16: 128 bytes of low nibbles, 64 bytes of high
 *          2-bit pairs, 16 int8 scales, fp16 d;  w = d * scale[j] * (q - 32)
 *
 * Every struct below is the exact on-disk block (little-endian, no padding), checked with
 * _Static_assert. fp16 fields are stored as their uint16_t bit pattern.
 *
 * Thread safety: every function is pure. */
#ifndef SKV_QUANT_H
#define SKV_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* ggml type numbers (GGUF tensor infos). */
#define SKV_WTYPE_F32 0u
#define SKV_WTYPE_F16 1u
#define SKV_WTYPE_Q4_0 2u
#define SKV_WTYPE_Q8_0 8u
#define SKV_WTYPE_Q4_K 12u
#define SKV_WTYPE_Q5_K 13u
#define SKV_WTYPE_Q6_K 14u
#define SKV_WTYPE_Q8_K 15u /* activations only: never a weight type in a file we accept */
#define SKV_WTYPE_BF16 30u

#define SKV_QK8_0 32u  /* weights per Q8_0 block */
#define SKV_QK4_0 32u  /* weights per Q4_0 block */
#define SKV_QK_K 256u  /* weights per K-quant super-block */
#define SKV_K_SCALE_BYTES 12u

struct skv_block_q8_0 {
	uint16_t d;            /* fp16 scale */
	int8_t qs[SKV_QK8_0];
};
_Static_assert(sizeof(struct skv_block_q8_0) == 34, "block_q8_0 is 34 bytes");

struct skv_block_q4_0 {
	uint16_t d;                  /* fp16 scale */
	uint8_t qs[SKV_QK4_0 / 2];   /* weight j: low nibble of qs[j]; j + 16: high nibble */
};
_Static_assert(sizeof(struct skv_block_q4_0) == 18, "block_q4_0 is 18 bytes");

struct skv_block_q4_k {
	uint16_t d;                          /* fp16 scale of the sub-block scales */
	uint16_t dmin;                       /* fp16 scale of the sub-block mins */
	uint8_t scales[SKV_K_SCALE_BYTES];   /* 8 scales and 8 mins, 6 bits each */
	uint8_t qs[SKV_QK_K / 2];            /* nibbles */
};
_Static_assert(sizeof(struct skv_block_q4_k) == 144, "block_q4_K is 144 bytes");

struct skv_block_q5_k {
	uint16_t d;
	uint16_t dmin;
	uint8_t scales[SKV_K_SCALE_BYTES];
	uint8_t qh[SKV_QK_K / 8];            /* the fifth bit of each weight */
	uint8_t qs[SKV_QK_K / 2];            /* the low four bits */
};
_Static_assert(sizeof(struct skv_block_q5_k) == 176, "block_q5_K is 176 bytes");

struct skv_block_q6_k {
	uint8_t ql[SKV_QK_K / 2];            /* low four bits */
	uint8_t qh[SKV_QK_K / 4];            /* high two bits */
	int8_t scales[SKV_QK_K / 16];        /* one per 16 weights */
	uint16_t d;                          /* fp16 super-block scale */
};
_Static_assert(sizeof(struct skv_block_q6_k) == 210, "block_q6_K is 210 bytes");

/* Activations quantized for the K-quant dot products, as ggml's block_q8_K. */
struct skv_block_q8_k {
	float d;
	int8_t qs[SKV_QK_K];
	int16_t bsums[SKV_QK_K / 16];        /* sum of each 16 consecutive qs */
};
_Static_assert(sizeof(struct skv_block_q8_k) == 292, "block_q8_K is 292 bytes");

/* One weight matrix [rows][cols] as a file stores it: row by row, each row a whole number of
 * the type's blocks. */
struct skv_qmat {
	uint32_t type;      /* SKV_WTYPE_* */
	uint32_t rows;      /* output features */
	uint32_t cols;      /* input features, a whole number of the type's blocks */
	uint64_t row_bytes; /* skv_wtype_row_bytes(type, cols) */
	const void *data;   /* [rows][row_bytes], read only; in place in the model's mapping */
};

/* The matrix as float32 [rows][cols] when it is stored so, else NULL. */
static inline const float *skv_qmat_f32(const struct skv_qmat *w)
{
	return w->type == SKV_WTYPE_F32 ? (const float *)w->data : NULL;
}

/* Name ("F32", "Q4_K", ...) of a weight type, NULL for one streamkv does not read. */
const char *skv_wtype_name(uint32_t type);
/* Weights per block (1 for F32/F16/BF16) and bytes per block; 0 for an unsupported type. */
uint32_t skv_wtype_block_elems(uint32_t type);
uint32_t skv_wtype_block_bytes(uint32_t type);
/* Bytes of one row of cols weights; 0 if the type is unsupported or cols is not a whole
 * number of blocks. */
uint64_t skv_wtype_row_bytes(uint32_t type, uint64_t cols);
/* Parses a type name as the command line gives it ("q4_k", "Q8_0", "bf16"); 0 and *type on
 * success, -EINVAL for an unknown name. */
int skv_wtype_parse(const char *name, uint32_t *type);

/* IEEE binary16 <-> float32 (round to nearest even, as ggml's conversion), and bfloat16
 * (nearest even; NaN stays a quiet NaN). */
float skv_f16_to_f32(uint16_t h);
uint16_t skv_f32_to_f16(float f);
float skv_bf16_to_f32(uint16_t b);
uint16_t skv_f32_to_bf16(float f);

/* The scalar reference: n weights (a whole number of blocks) of type from src into float32.
 * Follows ggml's dequantize_row_* definitions exactly. Returns 0 or -EINVAL. */
int skv_dequant_row(uint32_t type, const void *src, float *dst, uint64_t n);

/* Quantize n floats (a whole number of blocks) into type by ggml's reference quantizers
 * (quantize_row_*_ref: Q8_0 and Q4_0 by the block's absolute maximum, the K-quants by ggml's
 * make_qkx2_quants / make_qx_quants searches, without an importance matrix). Used by
 * skv-mkmodel; the kernels quantize activations with their own routines (qmatmul.h).
 * Returns 0 or -EINVAL. */
int skv_quant_row(uint32_t type, const float *src, void *dst, uint64_t n);

#endif
