/* Weight types (engine/quant.c): sizes and names; fp16 and bf16 conversions against the
 * compiler's IEEE conversion and hand-picked edge cases; every block format dequantized from
 * blocks built here bit by bit, with the expected weights computed from the format's layout;
 * quantize/dequantize round trips within each type's error bound; and the real files of
 * models/quantized ($SKV_QUANT_DIR), written by ggml's llama-quantize: every tensor dequantizes
 * to within the bound of its F32 original, and quantizing the original reproduces the file's
 * bytes exactly. */
#include "gguf.h"
#include "quant-ref.h"
#include "quant.h"
#include "sha256-hex.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MSG_LEN 512

static const uint32_t all_types[] = {
	SKV_WTYPE_F32, SKV_WTYPE_F16, SKV_WTYPE_BF16, SKV_WTYPE_Q8_0,
	SKV_WTYPE_Q4_0, SKV_WTYPE_Q4_K, SKV_WTYPE_Q5_K, SKV_WTYPE_Q6_K,
};
#define N_TYPES (sizeof(all_types) / sizeof(all_types[0]))

static uint32_t f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static float bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

/* xorshift64*: reproducible test data. */
static uint64_t rng_next(uint64_t *state)
{
	*state ^= *state >> 12;
	*state ^= *state << 25;
	*state ^= *state >> 27;
	return *state * 0x2545f4914f6cdd1dull;
}

static float rng_uniform(uint64_t *state) /* [-0.5, 0.5) */
{
	return (float)(rng_next(state) >> 40) / 16777216.0f - 0.5f;
}

/* ---- sizes and names ---- */

Test(quant, type_table)
{
	static const struct {
		uint32_t type;
		const char *name;
		uint32_t elems, bytes;
	} expect[] = {
		{ SKV_WTYPE_F32, "F32", 1, 4 },      { SKV_WTYPE_F16, "F16", 1, 2 },
		{ SKV_WTYPE_BF16, "BF16", 1, 2 },    { SKV_WTYPE_Q8_0, "Q8_0", 32, 34 },
		{ SKV_WTYPE_Q4_0, "Q4_0", 32, 18 },  { SKV_WTYPE_Q4_K, "Q4_K", 256, 144 },
		{ SKV_WTYPE_Q5_K, "Q5_K", 256, 176 }, { SKV_WTYPE_Q6_K, "Q6_K", 256, 210 },
	};
	for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
		cr_assert_str_eq(skv_wtype_name(expect[i].type), expect[i].name);
		cr_assert_eq(skv_wtype_block_elems(expect[i].type), expect[i].elems);
		cr_assert_eq(skv_wtype_block_bytes(expect[i].type), expect[i].bytes);
		/* the GGUF reader sizes tensors of these types the same way */
		cr_assert_str_eq(skv_gguf_ggml_type_name(expect[i].type), expect[i].name);
		cr_assert_eq(skv_wtype_row_bytes(expect[i].type, 4096),
			     4096ull / expect[i].elems * expect[i].bytes);
		cr_assert_eq(skv_wtype_row_bytes(expect[i].type, 0), 0);
	}
	/* ggml's numbering of the types streamkv does not read, and Q8_K (activations only) */
	const uint32_t unsupported[] = { 3, 6, 7, 9, 10, 11, SKV_WTYPE_Q8_K, 16, 24, 28, 29, 31, 99 };
	for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
		cr_assert_null(skv_wtype_name(unsupported[i]), "type %u", unsupported[i]);
		cr_assert_eq(skv_wtype_block_elems(unsupported[i]), 0);
		cr_assert_eq(skv_wtype_block_bytes(unsupported[i]), 0);
		cr_assert_eq(skv_wtype_row_bytes(unsupported[i], 256), 0);
	}
	/* a row must be a whole number of blocks */
	cr_assert_eq(skv_wtype_row_bytes(SKV_WTYPE_Q8_0, 48), 0);
	cr_assert_eq(skv_wtype_row_bytes(SKV_WTYPE_Q4_K, 128), 0);
	cr_assert_eq(skv_wtype_row_bytes(SKV_WTYPE_Q6_K, 768), 3 * 210);
	cr_assert_eq(skv_wtype_row_bytes(SKV_WTYPE_F16, 172), 344);
	cr_assert_eq(skv_wtype_row_bytes(SKV_WTYPE_F32, UINT64_MAX), 0, "overflow refused");
}

Test(quant, parse_names)
{
	static const struct {
		const char *name;
		uint32_t type;
	} names[] = {
		{ "f32", SKV_WTYPE_F32 },   { "F16", SKV_WTYPE_F16 },   { "bf16", SKV_WTYPE_BF16 },
		{ "BF16", SKV_WTYPE_BF16 }, { "q8_0", SKV_WTYPE_Q8_0 }, { "Q4_0", SKV_WTYPE_Q4_0 },
		{ "q4_k", SKV_WTYPE_Q4_K }, { "Q4_K", SKV_WTYPE_Q4_K }, { "q5_K", SKV_WTYPE_Q5_K },
		{ "Q6_k", SKV_WTYPE_Q6_K },
	};
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		uint32_t type = 12345;
		cr_assert_eq(skv_wtype_parse(names[i].name, &type), 0, "%s", names[i].name);
		cr_assert_eq(type, names[i].type, "%s", names[i].name);
	}
	const char *bad[] = { "", "q8", "q8_k", "Q8_K", "q4_k_m", "f64", "q4_1", "Q4_K ", "float" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		uint32_t type = 777;
		cr_assert_eq(skv_wtype_parse(bad[i], &type), -EINVAL, "'%s' accepted", bad[i]);
		cr_assert_eq(type, 777, "'%s' wrote *type", bad[i]);
	}
	cr_assert_eq(skv_wtype_parse(NULL, NULL), -EINVAL);
}

Test(quant, bad_arguments)
{
	float x[512] = { 0 };
	uint8_t buf[4096];

	for (size_t t = 0; t < N_TYPES; t++) {
		const uint32_t elems = skv_wtype_block_elems(all_types[t]);
		cr_assert_eq(skv_quant_row(all_types[t], x, buf, 0), 0);
		cr_assert_eq(skv_dequant_row(all_types[t], buf, x, 0), 0);
		if (elems > 1) {
			cr_assert_eq(skv_quant_row(all_types[t], x, buf, elems + 1), -EINVAL);
			cr_assert_eq(skv_dequant_row(all_types[t], buf, x, elems / 2), -EINVAL);
		}
		cr_assert_eq(skv_quant_row(all_types[t], NULL, buf, elems), -EINVAL);
		cr_assert_eq(skv_dequant_row(all_types[t], buf, NULL, elems), -EINVAL);
	}
	cr_assert_eq(skv_quant_row(SKV_WTYPE_Q8_K, x, buf, 256), -EINVAL);
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q8_K, buf, x, 256), -EINVAL);
	cr_assert_eq(skv_quant_row(99, x, buf, 32), -EINVAL);
	cr_assert_eq(skv_dequant_row(99, buf, x, 32), -EINVAL);
}

/* ---- fp16 and bf16 ---- */

/* binary16 by its definition: (-1)^s 2^(e-15) (1 + m/1024), subnormals 2^-14 (m/1024). */
static float f16_by_definition(uint16_t h)
{
	const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
	float v;

	if (e == 31)
		v = m ? NAN : INFINITY;
	else if (e == 0)
		v = ldexpf((float)m, -24);
	else
		v = ldexpf((float)(1024 + m), e - 25);
	return s ? -v : v;
}

Test(quant, f16_to_f32_every_value)
{
	for (uint32_t h = 0; h < 65536; h++) {
		const float got = skv_f16_to_f32((uint16_t)h);
		const float want = f16_by_definition((uint16_t)h);
		if (isnan(want)) {
			cr_assert(isnan(got), "0x%04x", h);
			cr_assert_eq(f32_bits(got) >> 31, h >> 15, "0x%04x keeps its sign", h);
			cr_assert_eq((f32_bits(got) >> 13) & 0x3ff, h & 0x3ff, "0x%04x payload", h);
			continue;
		}
		cr_assert_eq(f32_bits(got), f32_bits(want), "0x%04x: %a, want %a", h, got, want);
		/* every half converts back to itself */
		cr_assert_eq(skv_f32_to_f16(got), h, "round trip of 0x%04x", h);
	}
}

Test(quant, f32_to_f16_edge_cases)
{
	static const struct {
		float f;
		uint16_t h;
	} cases[] = {
		{ 0.0f, 0x0000 },
		{ -0.0f, 0x8000 },
		{ 1.0f, 0x3c00 },
		{ -2.0f, 0xc000 },
		{ 65504.0f, 0x7bff },            /* largest finite half */
		{ 65519.996f, 0x7bff },          /* just below the halfway point to infinity */
		{ 65520.0f, 0x7c00 },            /* the tie rounds to even: infinity */
		{ -65520.0f, 0xfc00 },
		{ 1e10f, 0x7c00 },
		{ INFINITY, 0x7c00 },
		{ -INFINITY, 0xfc00 },
		{ 0x1p-14f, 0x0400 },            /* smallest normal */
		{ 0x1.ff8p-15f, 0x03ff },        /* largest subnormal, 1023 * 2^-24 */
		{ 0x1.ffcp-15f, 0x0400 },        /* 1023.5 units: tie, up to even 1024 (normal) */
		{ 0x1.ff4p-15f, 0x03fe },        /* 1022.5 units: tie, down to even 1022 */
		{ 0x1p-24f, 0x0001 },            /* smallest subnormal */
		{ -0x1p-24f, 0x8001 },
		{ 0x1p-25f, 0x0000 },            /* half of it: tie to even, zero */
		{ 0x1.000002p-25f, 0x0001 },     /* just above the tie */
		{ 0x1.8p-24f, 0x0002 },          /* 1.5 units: tie to even 2 */
		{ 0x1.4p-23f, 0x0002 },          /* 2.5 units: tie to even 2 */
		{ 0x1.cp-23f, 0x0004 },          /* 3.5 units: tie to even 4 */
		{ 0x1p-30f, 0x0000 },
		{ 1e-45f, 0x0000 },              /* a float subnormal */
		{ 1.00048828125f, 0x3c00 },      /* 1 + 2^-11: tie, stays even */
		{ 1.00146484375f, 0x3c02 },      /* 1 + 3 * 2^-11: tie, up to even */
		{ 1.000489f, 0x3c01 },           /* just above the tie */
		{ 2047.0f, 0x67ff },             /* ulp 1 below 2048 */
		{ 2047.5f, 0x6800 },             /* tie between 2047 and 2048: the even one, 2048 */
		{ 2048.5f, 0x6800 },             /* ulp 2 above 2048: nearer 2048 */
		{ 2049.0f, 0x6800 },             /* tie between 2048 and 2050: even mantissa, 2048 */
		{ 2051.0f, 0x6802 },             /* tie between 2050 and 2052: 2052 */
		{ 0.1f, 0x2e66 },
		{ 3.14159265f, 0x4248 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		cr_assert_eq(skv_f32_to_f16(cases[i].f), cases[i].h, "%a: 0x%04x, want 0x%04x",
			     cases[i].f, skv_f32_to_f16(cases[i].f), cases[i].h);
	/* NaN: ggml's quiet NaN 0x7e00 with the sign kept, whatever the payload */
	cr_assert_eq(skv_f32_to_f16(NAN), 0x7e00);
	cr_assert_eq(skv_f32_to_f16(bits_f32(0x7f800001u)), 0x7e00);
	cr_assert_eq(skv_f32_to_f16(bits_f32(0xffffffffu)), 0xfe00);
	cr_assert_eq(skv_f32_to_f16(bits_f32(0x7fc12345u)), 0x7e00);
}

/* The compiler's _Float16 conversion is an independent IEEE round-to-nearest-even. */
Test(quant, f32_to_f16_matches_ieee)
{
#ifdef __FLT16_MAX__
	uint64_t state = 0x1234567887654321ull;
	uint64_t checked = 0;

	/* random bit patterns over all exponents */
	for (unsigned i = 0; i < 2000000; i++) {
		const uint32_t bits = (uint32_t)(rng_next(&state) >> 32);
		const float f = bits_f32(bits);
		if (isnan(f))
			continue;
		_Float16 h16 = (_Float16)f;
		uint16_t want;
		memcpy(&want, &h16, sizeof(want));
		cr_assert_eq(skv_f32_to_f16(f), want, "%a (0x%08x): 0x%04x, want 0x%04x", f, bits,
			     skv_f32_to_f16(f), want);
		checked++;
	}
	/* every exponent near the half range, with the 13 dropped bits at and around a tie */
	static const uint32_t low_bits[] = { 0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff };
	for (uint32_t e = 90; e <= 145; e++) {
		for (uint32_t k = 0; k < 4096; k++) {
			for (size_t l = 0; l < sizeof(low_bits) / sizeof(low_bits[0]); l++) {
				const uint32_t mant = ((k * 2654435761u) & 0x3ff) << 13 | low_bits[l];
				for (uint32_t sign = 0; sign < 2; sign++) {
					const float f = bits_f32(sign << 31 | e << 23 | (mant & 0x7fffff));
					_Float16 h16 = (_Float16)f;
					uint16_t want;
					memcpy(&want, &h16, sizeof(want));
					cr_assert_eq(skv_f32_to_f16(f), want, "%a: 0x%04x, want 0x%04x", f,
						     skv_f32_to_f16(f), want);
					checked++;
				}
			}
		}
	}
	cr_assert_gt(checked, 3000000);
#else
	cr_skip_test("this compiler has no _Float16 to compare with");
#endif
}

Test(quant, bf16)
{
	static const struct {
		uint32_t f;
		uint16_t b;
	} cases[] = {
		{ 0x3f800000u, 0x3f80 },   /* 1.0 */
		{ 0x3f807fffu, 0x3f80 },   /* below half an ulp */
		{ 0x3f808000u, 0x3f80 },   /* tie, even stays */
		{ 0x3f808001u, 0x3f81 },
		{ 0x3f818000u, 0x3f82 },   /* tie, odd goes up to even */
		{ 0xbf818000u, 0xbf82 },
		{ 0x7f7fffffu, 0x7f80 },   /* FLT_MAX rounds to infinity */
		{ 0x7f800000u, 0x7f80 },   /* infinity */
		{ 0xff800000u, 0xff80 },
		{ 0x00000000u, 0x0000 },
		{ 0x80000000u, 0x8000 },
		{ 0x00008000u, 0x0000 },   /* float subnormals are rounded, not flushed */
		{ 0x00018000u, 0x0002 },
		{ 0x00010001u, 0x0001 },
		{ 0x007fffffu, 0x0080 },   /* largest subnormal rounds up to the smallest normal */
		/* NaN: top bits kept, made quiet */
		{ 0x7f800001u, 0x7fc0 },
		{ 0x7fa00000u, 0x7fe0 },
		{ 0xff800001u, 0xffc0 },
		{ 0x7fc00000u, 0x7fc0 },
		{ 0x7fffffffu, 0x7fff },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		cr_assert_eq(skv_f32_to_bf16(bits_f32(cases[i].f)), cases[i].b,
			     "0x%08x: 0x%04x, want 0x%04x", cases[i].f,
			     skv_f32_to_bf16(bits_f32(cases[i].f)), cases[i].b);
	for (uint32_t b = 0; b < 65536; b++) {
		const float f = skv_bf16_to_f32((uint16_t)b);
		cr_assert_eq(f32_bits(f), b << 16);
		if (!isnan(f))
			cr_assert_eq(skv_f32_to_bf16(f), b);
	}
}

/* ---- hand-built blocks ---- */

Test(quant, q8_0_block)
{
	struct skv_block_q8_0 blk[2];
	float out[64];

	blk[0].d = 0x3800; /* 0.5 */
	for (int j = 0; j < 32; j++)
		blk[0].qs[j] = (int8_t)(j - 16);
	blk[1].d = 0xbc00; /* -1.0 */
	for (int j = 0; j < 32; j++)
		blk[1].qs[j] = (int8_t)(j < 16 ? -128 + j : 127 - (j - 16));
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q8_0, blk, out, 64), 0);
	for (int j = 0; j < 32; j++) {
		cr_assert_float_eq(out[j], 0.5f * (float)(j - 16), 0, "weight %d", j);
		cr_assert_float_eq(out[32 + j], -(float)(j < 16 ? -128 + j : 127 - (j - 16)), 0);
	}
	cr_assert_eq(out[0], -8.0f);
	cr_assert_eq(out[31], 7.5f);
	cr_assert_eq(out[32], 128.0f);
}

Test(quant, q4_0_block)
{
	struct skv_block_q4_0 blk;
	float out[32];

	blk.d = 0x3400; /* 0.25 */
	for (int j = 0; j < 16; j++)
		blk.qs[j] = (uint8_t)(j | (15 - j) << 4);
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q4_0, &blk, out, 32), 0);
	/* weight j: low nibble of byte j; weight j + 16: its high nibble; w = d (q - 8) */
	for (int j = 0; j < 16; j++) {
		cr_assert_eq(out[j], 0.25f * (float)(j - 8), "weight %d", j);
		cr_assert_eq(out[16 + j], 0.25f * (float)(15 - j - 8), "weight %d", 16 + j);
	}
	cr_assert_eq(out[0], -2.0f);
	cr_assert_eq(out[15], 1.75f);
	cr_assert_eq(out[16], 1.75f);
	cr_assert_eq(out[31], -2.0f);
}

/* Sub-block scales and mins of the K-quant blocks below, and their 12 packed bytes, worked out
 * by hand: bytes 0-3 = sc[j] | (sc[j+4] >> 4) << 6, bytes 4-7 = m[j] | (m[j+4] >> 4) << 6,
 * bytes 8-11 = (sc[j+4] & 15) | (m[j+4] & 15) << 4 (j = 0..3).
 *   sc = 1 2 3 63 | 32 (10 0000) 17 (01 0001) 40 (10 1000) 5 (00 0101)
 *   m  = 0 1 63 2 | 33 (10 0001) 48 (11 0000)  7 (00 0111) 16 (01 0000) */
static const uint8_t k_sc[8] = { 1, 2, 3, 63, 32, 17, 40, 5 };
static const uint8_t k_m[8] = { 0, 1, 63, 2, 33, 48, 7, 16 };
static const uint8_t k_scale_bytes[12] = {
	0x81, 0x42, 0x83, 0x3f, /* 1 | 2<<6, 2 | 1<<6, 3 | 2<<6, 63 | 0<<6 */
	0x80, 0xc1, 0x3f, 0x42, /* 0 | 2<<6, 1 | 3<<6, 63 | 0<<6, 2 | 1<<6 */
	0x10, 0x01, 0x78, 0x05, /* 0 | 1<<4, 1 | 0<<4, 8 | 7<<4, 5 | 0<<4 */
};

/* The 4-bit level of weight i (0..255) in the blocks below, and its fifth bit for Q5_K. */
static unsigned k_level4(unsigned i)
{
	return (i * 7u + i / 32u) & 15u;
}

static unsigned k_bit5(unsigned i)
{
	return ((i * 13u) >> 3 ^ i) & 1u;
}

Test(quant, q4_k_block)
{
	struct skv_block_q4_k blk;
	float out[256];

	blk.d = 0x3c00;    /* 1.0 */
	blk.dmin = 0x3800; /* 0.5 */
	memcpy(blk.scales, k_scale_bytes, sizeof(blk.scales));
	/* weight 64 g + l (l < 32): low nibble of qs[32 g + l]; 64 g + 32 + l: its high nibble */
	for (unsigned g = 0; g < 4; g++)
		for (unsigned l = 0; l < 32; l++)
			blk.qs[32 * g + l] = (uint8_t)(k_level4(64 * g + l) | k_level4(64 * g + 32 + l) << 4);
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q4_K, &blk, out, 256), 0);
	for (unsigned i = 0; i < 256; i++) {
		const unsigned sub = i / 32;
		const float want = 1.0f * (float)k_sc[sub] * (float)k_level4(i) - 0.5f * (float)k_m[sub];
		cr_assert_eq(out[i], want, "weight %u: %g, want %g", i, out[i], want);
	}
	/* a few by hand: weight 0 = 1*1*0 - 0.5*0; weight 96 (sub 3, level 96*7+3 & 15 = 3) =
	 * 63*3 - 0.5*2; weight 255 (sub 7, level 255*7+7 & 15 = 0) = 0 - 0.5*16 */
	cr_assert_eq(out[0], 0.0f);
	cr_assert_eq(out[96], 188.0f);
	cr_assert_eq(out[255], -8.0f);
	/* sub-block 4: scale 32, min 33 (their top bits in bytes 0 and 4) */
	cr_assert_eq(out[128], 32.0f * (float)k_level4(128) - 16.5f);
}

Test(quant, q5_k_block)
{
	struct skv_block_q5_k blk;
	float out[256];

	blk.d = 0x3400;    /* 0.25 */
	blk.dmin = 0x4000; /* 2.0 */
	memcpy(blk.scales, k_scale_bytes, sizeof(blk.scales));
	memset(blk.qh, 0, sizeof(blk.qh));
	/* as Q4_K, and weight i of sub-block s = i / 32 has its fifth bit at bit s of qh[i % 32] */
	for (unsigned g = 0; g < 4; g++)
		for (unsigned l = 0; l < 32; l++)
			blk.qs[32 * g + l] = (uint8_t)(k_level4(64 * g + l) | k_level4(64 * g + 32 + l) << 4);
	for (unsigned i = 0; i < 256; i++)
		blk.qh[i % 32] |= (uint8_t)(k_bit5(i) << (i / 32));
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q5_K, &blk, out, 256), 0);
	unsigned high = 0;
	for (unsigned i = 0; i < 256; i++) {
		const unsigned sub = i / 32, level = k_level4(i) + 16 * k_bit5(i);
		const float want = 0.25f * (float)k_sc[sub] * (float)level - 2.0f * (float)k_m[sub];
		cr_assert_eq(out[i], want, "weight %u: %g, want %g", i, out[i], want);
		high += k_bit5(i);
	}
	cr_assert(high > 64 && high < 192, "the fifth bits are mixed (%u set)", high);
}

Test(quant, q6_k_block)
{
	struct skv_block_q6_k blk;
	float out[256];
	unsigned level[256];
	static const int8_t scales[16] = { -128, 127, 1, -1, 64, -64, 2, 3,
					   100, -100, 0, 17, -17, 5, -5, 42 };

	blk.d = 0x3400; /* 0.25 */
	memcpy(blk.scales, scales, sizeof(scales));
	memset(blk.ql, 0, sizeof(blk.ql));
	memset(blk.qh, 0, sizeof(blk.qh));
	/* weight i: half h = i / 128, r = i % 128, k = r / 32, l = r % 32; low 4 bits in ql[64 h + l
	 * + 32 (k & 1)] (low nibble for k < 2, high for k >= 2), high 2 bits at bits 2k of
	 * qh[32 h + l] */
	for (unsigned i = 0; i < 256; i++) {
		const unsigned h = i / 128, r = i % 128, k = r / 32, l = r % 32;
		level[i] = (i * 37u + 11u) & 63u;
		blk.ql[64 * h + l + 32 * (k & 1)] |= (uint8_t)((level[i] & 15u) << (k >= 2 ? 4 : 0));
		blk.qh[32 * h + l] |= (uint8_t)((level[i] >> 4) << (2 * k));
	}
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_Q6_K, &blk, out, 256), 0);
	for (unsigned i = 0; i < 256; i++) {
		const float want = 0.25f * (float)scales[i / 16] * (float)((int)level[i] - 32);
		cr_assert_eq(out[i], want, "weight %u: %g, want %g", i, out[i], want);
	}
	/* weight 0: level 11, scale -128: 0.25 * -128 * -21 */
	cr_assert_eq(out[0], 672.0f);
}

Test(quant, f16_bf16_rows)
{
	const uint16_t halves[4] = { 0x3c00, 0xc000, 0x0001, 0x7c00 };
	const uint16_t brains[4] = { 0x3f80, 0xc000, 0x0001, 0xff80 };
	float out[4];

	cr_assert_eq(skv_dequant_row(SKV_WTYPE_F16, halves, out, 4), 0);
	cr_assert_eq(out[0], 1.0f);
	cr_assert_eq(out[1], -2.0f);
	cr_assert_eq(out[2], 0x1p-24f);
	cr_assert(isinf(out[3]) && out[3] > 0);
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_BF16, brains, out, 4), 0);
	cr_assert_eq(out[0], 1.0f);
	cr_assert_eq(out[1], -2.0f);
	cr_assert_eq(f32_bits(out[2]), 0x00010000u);
	cr_assert(isinf(out[3]) && out[3] < 0);

	/* unaligned rows: the 2-byte types may start at any byte of a mapping */
	uint8_t bytes[9];
	float src[4] = { 1.0f, -2.0f, 0.5f, 65504.0f };
	cr_assert_eq(skv_quant_row(SKV_WTYPE_F16, src, bytes + 1, 4), 0);
	cr_assert_eq(skv_dequant_row(SKV_WTYPE_F16, bytes + 1, out, 4), 0);
	cr_assert_arr_eq(out, src, sizeof(src));
}

/* ---- round trips ---- */

/* Largest error of one weight relative to its block's absolute maximum, by type. Q8_0: half a
 * step of amax/127; Q4_0: a whole step amax/8 (the largest magnitude sits at -8, so +8 clips to
 * +7); the K-quants: about one level step of the block's range (2 amax / nmax) -- their scales
 * are searched and then rounded to 6 or 8 bits, which can clip the extremes by up to a step.
 * Each gets the fp16 rounding of its scales (2^-10 of amax) on top. */
static double type_error_bound(uint32_t type)
{
	switch (type) {
	case SKV_WTYPE_Q8_0:
		return 0.5 / 127 + 1.0 / 1024;
	case SKV_WTYPE_Q4_0:
		return 1.0 / 8 + 1.0 / 1024;
	case SKV_WTYPE_Q4_K:
		return 1.125 * 2.0 / 15;
	case SKV_WTYPE_Q5_K:
		return 1.125 * 2.0 / 31;
	case SKV_WTYPE_Q6_K:
		return 1.125 * 1.0 / 32;
	case SKV_WTYPE_F16:
		return 0x1p-11; /* relative to each weight, in the normal range */
	case SKV_WTYPE_BF16:
		return 0x1p-8;
	default:
		return 0;
	}
}

/* Root-mean-square error relative to the data's RMS that each type stays under on the
 * distributions below (they measure 0.004-0.005, 0.065-0.085, 0.042-0.069, 0.022-0.035 and
 * 0.013-0.017). */
static double type_rms_bound(uint32_t type)
{
	switch (type) {
	case SKV_WTYPE_Q8_0:
		return 0.007;
	case SKV_WTYPE_Q4_0:
		return 0.10;
	case SKV_WTYPE_Q4_K:
		return 0.085;
	case SKV_WTYPE_Q5_K:
		return 0.045;
	case SKV_WTYPE_Q6_K:
		return 0.022;
	default:
		return 0;
	}
}

/* Checks dequantized weights against the originals, per block; returns the RMS error relative
 * to the RMS of x. */
static double check_block_errors(uint32_t type, const float *x, const float *y, uint64_t n,
				 const char *what)
{
	const uint32_t elems = skv_wtype_block_elems(type);
	const double bound = type_error_bound(type);
	double sum_e2 = 0, sum_x2 = 0;

	for (uint64_t b = 0; b < n / elems; b++) {
		float amax = 0;
		for (uint32_t j = 0; j < elems; j++)
			amax = fmaxf(amax, fabsf(x[b * elems + j]));
		for (uint32_t j = 0; j < elems; j++) {
			const uint64_t i = b * elems + j;
			const double err = fabs((double)x[i] - (double)y[i]);
			const double scale = elems == 1 ? fabs((double)x[i]) : (double)amax;
			cr_assert(err <= bound * scale + 1e-30 || (elems == 1 && fabs(x[i]) < 0x1p-14),
				  "%s %s weight %llu: %g dequantized to %g (error %g, block amax %g, "
				  "bound %g)", what, skv_wtype_name(type), (unsigned long long)i,
				  x[i], y[i], err, amax, bound * scale);
			sum_e2 += err * err;
			sum_x2 += (double)x[i] * x[i];
		}
	}
	return sum_x2 > 0 ? sqrt(sum_e2 / sum_x2) : 0;
}

#define RT_N (64u * 256u)

/* Three distributions: uniform; a sum of four uniforms (bell-shaped); uniform with outliers
 * and some blocks shifted all positive (the mins of the K-quants then matter). */
static void fill_distribution(float *x, unsigned n, int dist, uint64_t seed)
{
	uint64_t state = seed;
	for (unsigned i = 0; i < n; i++) {
		float v = 0;
		for (int k = 0; k < (dist == 1 ? 4 : 1); k++)
			v += rng_uniform(&state);
		if (dist == 2 && i % 97 == 0)
			v *= 20;
		if (dist == 2 && (i / 256) % 5 == 0)
			v = fabsf(v) + 3;
		x[i] = v * 0.1f;
	}
}

Test(quant, round_trip_within_bounds)
{
	float *x = malloc(RT_N * sizeof(float)), *y = malloc(RT_N * sizeof(float));
	uint8_t *q = malloc(RT_N * sizeof(float));
	cr_assert(x && y && q);

	for (int dist = 0; dist < 3; dist++) {
		fill_distribution(x, RT_N, dist, 0x9e3779b97f4a7c15ull + (uint64_t)dist);
		for (size_t t = 0; t < N_TYPES; t++) {
			const uint32_t type = all_types[t];
			char what[32];
			snprintf(what, sizeof(what), "distribution %d", dist);
			cr_assert_eq(skv_quant_row(type, x, q, RT_N), 0);
			cr_assert_eq(skv_dequant_row(type, q, y, RT_N), 0);
			if (type == SKV_WTYPE_F32) {
				cr_assert_arr_eq(x, y, RT_N * sizeof(float));
				continue;
			}
			const double rms = check_block_errors(type, x, y, RT_N, what);
			if (type_rms_bound(type) > 0)
				cr_assert_lt(rms, type_rms_bound(type), "%s %s: relative RMS error %g",
					     what, skv_wtype_name(type), rms);
			/* quantization is deterministic and depends only on each block */
			uint8_t *again = malloc(skv_wtype_row_bytes(type, 256));
			const uint64_t rb = skv_wtype_row_bytes(type, 256);
			cr_assert_eq(skv_quant_row(type, x + 5 * 256, again, 256), 0);
			cr_assert_arr_eq(again, q + 5 * rb, rb);
			free(again);
		}
	}
	free(x);
	free(y);
	free(q);
}

/* Degenerate blocks: all zero, constant, a single non-zero weight, all negative. */
Test(quant, degenerate_blocks)
{
	float x[256], y[256];
	uint8_t q[256 * 4];

	for (size_t t = 0; t < N_TYPES; t++) {
		const uint32_t type = all_types[t];

		memset(x, 0, sizeof(x));
		cr_assert_eq(skv_quant_row(type, x, q, 256), 0);
		cr_assert_eq(skv_dequant_row(type, q, y, 256), 0);
		for (int i = 0; i < 256; i++)
			cr_assert_eq(y[i], 0.0f, "%s: zero block gives %g at %d", skv_wtype_name(type),
				     y[i], i);

		for (int i = 0; i < 256; i++)
			x[i] = 0.75f;
		cr_assert_eq(skv_quant_row(type, x, q, 256), 0);
		cr_assert_eq(skv_dequant_row(type, q, y, 256), 0);
		check_block_errors(type, x, y, 256, "constant");

		memset(x, 0, sizeof(x));
		x[77] = -3.0f;
		cr_assert_eq(skv_quant_row(type, x, q, 256), 0);
		cr_assert_eq(skv_dequant_row(type, q, y, 256), 0);
		check_block_errors(type, x, y, 256, "one weight");
		if (type != SKV_WTYPE_F32)
			cr_assert_float_eq(y[77], -3.0f, 3.0 * type_error_bound(type) + 1e-6,
					   "%s", skv_wtype_name(type));

		for (int i = 0; i < 256; i++)
			x[i] = -1.0f - (float)(i % 17) / 16.0f;
		cr_assert_eq(skv_quant_row(type, x, q, 256), 0);
		cr_assert_eq(skv_dequant_row(type, q, y, 256), 0);
		check_block_errors(type, x, y, 256, "negative");
	}
}

/* Blocks of every kind for the comparison with the scalar reference: each run of 16 weights
 * takes one of these shapes, so sub-blocks and whole blocks see all of them and their mixes. */
static void fill_adversarial(float *x, unsigned n, uint64_t *state)
{
	for (unsigned r = 0; r < n; r += 16) {
		const unsigned shape = (unsigned)(rng_next(state) % 12);
		const float scale = ldexpf(1.0f, (int)(rng_next(state) % 40) - 30);
		for (unsigned i = r; i < r + 16; i++) {
			const float u = rng_uniform(state);
			switch (shape) {
			case 0: x[i] = u * scale; break;                         /* symmetric */
			case 1: x[i] = (u + 0.75f) * scale; break;               /* all positive */
			case 2: x[i] = (u - 0.75f) * scale; break;               /* all negative */
			case 3: x[i] = 0.0f; break;
			case 4: x[i] = 0.5f * scale; break;                      /* constant */
			case 5: x[i] = i == r + 7 ? -scale : 0.0f; break;        /* one weight */
			case 6: x[i] = u * 1e-20f; break;                        /* below ggml's eps */
			case 7: x[i] = (float)((int)(u * 16.0f)) / 8.0f; break;  /* ties on a grid */
			case 8: x[i] = u * (i % 5 == 0 ? 100.0f : 0.01f); break; /* outliers */
			case 9: x[i] = (u + 0.5f) * (u + 0.5f) * scale; break;   /* skewed, >= 0 */
			case 10: x[i] = rng_next(state) % 3 ? 0.0f : u; break;   /* sparse */
			default: x[i] = u * u * u * 8.0f; break;                 /* heavy tails */
			}
		}
	}
}

/* engine/quant.c searches four sub-blocks at a time in vector lanes; it must give exactly the
 * bytes of the plain scalar statement of ggml's code (tests/unit/quant-ref.c). */
Test(quant, k_quants_equal_scalar_reference)
{
	const unsigned n_blocks = 6000;
	float *x = malloc((size_t)n_blocks * 256 * sizeof(float));
	uint8_t *mine = malloc((size_t)n_blocks * 210), *ref = malloc((size_t)n_blocks * 210);
	uint64_t state = 0x5eed5eed5eedull;
	cr_assert(x && mine && ref);

	fill_adversarial(x, n_blocks * 256, &state);
	static const uint32_t types[] = { SKV_WTYPE_Q4_K, SKV_WTYPE_Q5_K, SKV_WTYPE_Q6_K };
	for (size_t t = 0; t < 3; t++) {
		const uint32_t bb = skv_wtype_block_bytes(types[t]);
		cr_assert_eq(skv_quant_row(types[t], x, mine, (uint64_t)n_blocks * 256), 0);
		if (types[t] == SKV_WTYPE_Q4_K)
			qref_quant_q4_k(x, (struct skv_block_q4_k *)ref, n_blocks);
		else if (types[t] == SKV_WTYPE_Q5_K)
			qref_quant_q5_k(x, (struct skv_block_q5_k *)ref, n_blocks);
		else
			qref_quant_q6_k(x, (struct skv_block_q6_k *)ref, n_blocks);
		for (unsigned b = 0; b < n_blocks; b++)
			cr_assert_arr_eq(mine + (size_t)b * bb, ref + (size_t)b * bb, bb,
					 "%s block %u differs from the scalar reference",
					 skv_wtype_name(types[t]), b);
	}
	free(x);
	free(mine);
	free(ref);
}

/* The exact bytes ggml writes for an all-zero block: Q4_0's scale is max / -8 = -0.0 (fp16
 * 0x8000) with every nibble 8; Q8_0, the K-quants, F16 and BF16 are zero bytes throughout. */
Test(quant, zero_block_bytes)
{
	float x[256] = { 0 };
	uint8_t q[256 * 4], want[256 * 4];

	cr_assert_eq(skv_quant_row(SKV_WTYPE_Q4_0, x, q, 32), 0);
	want[0] = 0x00;
	want[1] = 0x80;
	memset(want + 2, 0x88, 16);
	cr_assert_arr_eq(q, want, 18);

	const uint32_t zero_types[] = { SKV_WTYPE_Q8_0, SKV_WTYPE_Q4_K, SKV_WTYPE_Q5_K,
					SKV_WTYPE_Q6_K, SKV_WTYPE_F16, SKV_WTYPE_BF16 };
	memset(want, 0, sizeof(want));
	for (size_t t = 0; t < sizeof(zero_types) / sizeof(zero_types[0]); t++) {
		const uint64_t rb = skv_wtype_row_bytes(zero_types[t], 256);
		memset(q, 0xa5, sizeof(q));
		cr_assert_eq(skv_quant_row(zero_types[t], x, q, 256), 0);
		cr_assert_arr_eq(q, want, rb, "%s", skv_wtype_name(zero_types[t]));
	}
}

/* Infinities and NaNs in the input: the quantizers return without a crash (the values they
 * write for such a block are ggml's garbage, unspecified), and the next block is unaffected. */
Test(quant, non_finite_inputs)
{
	float x[512], alone[256];
	uint8_t q[512 * 4], q_alone[256 * 4];
	uint64_t state = 77;
	const float bad[] = { INFINITY, -INFINITY, NAN, 3e38f };

	for (size_t t = 0; t < N_TYPES; t++) {
		const uint32_t type = all_types[t];
		const uint64_t rb = skv_wtype_row_bytes(type, 256);
		for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
			for (int i = 0; i < 512; i++)
				x[i] = rng_uniform(&state);
			x[3] = bad[k];
			x[200] = -bad[k];
			memcpy(alone, x + 256, sizeof(alone));
			cr_assert_eq(skv_quant_row(type, x, q, 512), 0);
			cr_assert_eq(skv_quant_row(type, alone, q_alone, 256), 0);
			cr_assert_arr_eq(q + rb, q_alone, rb, "%s: block after %g",
					 skv_wtype_name(type), bad[k]);
			cr_assert_eq(skv_dequant_row(type, q, x, 512), 0);
		}
	}
}

/* ---- the files made by ggml's llama-quantize ---- */

static const char *quant_path(const char *name)
{
	static char paths[4][1024];
	static unsigned next;
	const char *dir = getenv("SKV_QUANT_DIR");
	cr_assert(dir != NULL, "SKV_QUANT_DIR is not set: run the tests through `meson test`");
	char *out = paths[next++ % 4];
	int n = snprintf(out, sizeof(paths[0]), "%s/%s", dir, name);
	cr_assert(n > 0 && n < (int)sizeof(paths[0]));
	return out;
}

static struct skv_gguf *open_gguf(const char *path)
{
	char msg[MSG_LEN] = "";
	struct skv_gguf *g = NULL;
	int rc = skv_gguf_open(path, &g, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "%s: %s", path, msg);
	return g;
}

/* Weights of each type checked against the file bytes, over all the files. */
struct file_stats {
	uint64_t tensors[32];
	uint64_t weights[32];
};

/* Every tensor of quantized file `name` against the tensor of the same name in `ref` (F32):
 * same shape; the file's bytes are the reference quantizer's output for the F32 weights
 * (byte for byte); its dequantization is within the type's bound. */
static void check_file(const char *path, struct skv_gguf *ref, struct file_stats *stats)
{
	struct skv_gguf *g = open_gguf(path);
	const uint64_t n_tensors = skv_gguf_tensor_count(g);

	cr_assert_eq(n_tensors, skv_gguf_tensor_count(ref), "%s", path);
	for (uint64_t ti = 0; ti < n_tensors; ti++) {
		const struct skv_gguf_tensor *t = skv_gguf_tensor_at(g, ti);
		char name[128];
		snprintf(name, sizeof(name), "%.*s", (int)t->name.len, t->name.ptr);
		const struct skv_gguf_tensor *r = skv_gguf_find_tensor(ref, name);

		cr_assert_not_null(r, "%s: %s has no F32 original", path, name);
		cr_assert_eq(r->type, SKV_WTYPE_F32);
		cr_assert_eq(t->n_dims, r->n_dims, "%s: %s", path, name);
		uint64_t rows = 1;
		for (uint32_t d = 0; d < t->n_dims; d++) {
			cr_assert_eq(t->dims[d], r->dims[d], "%s: %s dim %u", path, name, d);
			if (d)
				rows *= t->dims[d];
		}
		const uint64_t cols = t->dims[0];
		cr_assert_not_null(skv_wtype_name(t->type), "%s: %s has type %u", path, name, t->type);
		const uint64_t row_bytes = skv_wtype_row_bytes(t->type, cols);
		cr_assert_gt(row_bytes, 0);
		cr_assert_eq(t->n_bytes, row_bytes * rows, "%s: %s", path, name);
		cr_assert_not_null(t->data);

		uint8_t *mine = malloc(row_bytes);
		float *deq = malloc(cols * sizeof(float));
		float *orig = malloc(cols * sizeof(float));
		cr_assert(mine && deq && orig);
		for (uint64_t row = 0; row < rows; row++) {
			const uint8_t *theirs = (const uint8_t *)t->data + row * row_bytes;
			memcpy(orig, (const uint8_t *)r->data + row * cols * sizeof(float),
			       cols * sizeof(float));

			cr_assert_eq(skv_quant_row(t->type, orig, mine, cols), 0);
			if (memcmp(mine, theirs, row_bytes)) {
				uint64_t at = 0;
				while (mine[at] == theirs[at])
					at++;
				const uint32_t bb = skv_wtype_block_bytes(t->type);
				cr_assert_fail("%s: %s (%s) row %llu: byte %llu (block %llu, byte %llu "
					       "of it) is 0x%02x, the file has 0x%02x", path, name,
					       skv_wtype_name(t->type), (unsigned long long)row,
					       (unsigned long long)at, (unsigned long long)(at / bb),
					       (unsigned long long)(at % bb), mine[at], theirs[at]);
			}
			cr_assert_eq(skv_dequant_row(t->type, theirs, deq, cols), 0);
			if (t->type == SKV_WTYPE_F32)
				cr_assert_arr_eq(deq, orig, cols * sizeof(float));
			else
				check_block_errors(t->type, orig, deq, cols, name);
		}
		stats->tensors[t->type]++;
		stats->weights[t->type] += rows * cols;
		free(mine);
		free(deq);
		free(orig);
	}
	skv_gguf_close(g);
}

Test(quant, llama_quantize_files_byte_identical)
{
	static const char *random_files[] = {
		"random-d256-Q8_0.gguf", "random-d256-Q4_0.gguf", "random-d256-Q4_K_M.gguf",
		"random-d256-Q5_K_M.gguf", "random-d256-Q6_K.gguf",
	};
	static const char *stories_files[] = { "stories260K-F16.gguf", "stories260K-BF16.gguf" };
	struct file_stats stats;
	memset(&stats, 0, sizeof(stats));

	struct skv_gguf *ref = open_gguf(quant_path("random-d256-f32.gguf"));
	for (size_t i = 0; i < sizeof(random_files) / sizeof(random_files[0]); i++)
		check_file(quant_path(random_files[i]), ref, &stats);
	skv_gguf_close(ref);

	ref = open_gguf(tu_model_path("stories260K.gguf"));
	for (size_t i = 0; i < sizeof(stories_files) / sizeof(stories_files[0]); i++)
		check_file(quant_path(stories_files[i]), ref, &stats);
	skv_gguf_close(ref);

	/* every weight type was among them, each with many weights (F32: the norms only) */
	for (size_t t = 0; t < N_TYPES; t++) {
		const uint32_t type = all_types[t];
		cr_assert_gt(stats.tensors[type], 0, "no %s tensor checked", skv_wtype_name(type));
		cr_assert_geq(stats.weights[type], type == SKV_WTYPE_F32 ? 1024 : 32768, "%s",
			      skv_wtype_name(type));
	}
	/* Q6_K: output.weight of the Q4_0 file, 3 tensors of each _M mix, 16 of the Q6_K file */
	cr_assert_eq(stats.tensors[SKV_WTYPE_Q6_K], 1 + 3 + 3 + 16);
}

Test(quant, file_types_as_named)
{
	static const struct {
		const char *file;
		const char *tensor;
		uint32_t type;
	} expect[] = {
		{ "random-d256-Q8_0.gguf", "blk.0.attn_q.weight", SKV_WTYPE_Q8_0 },
		{ "random-d256-Q4_0.gguf", "blk.0.ffn_up.weight", SKV_WTYPE_Q4_0 },
		{ "random-d256-Q4_K_M.gguf", "blk.0.ffn_gate.weight", SKV_WTYPE_Q4_K },
		{ "random-d256-Q4_K_M.gguf", "output.weight", SKV_WTYPE_Q6_K },
		{ "random-d256-Q5_K_M.gguf", "blk.1.attn_q.weight", SKV_WTYPE_Q5_K },
		{ "random-d256-Q5_K_M.gguf", "blk.1.ffn_down.weight", SKV_WTYPE_Q6_K },
		{ "random-d256-Q6_K.gguf", "token_embd.weight", SKV_WTYPE_Q6_K },
		{ "random-d256-Q6_K.gguf", "output_norm.weight", SKV_WTYPE_F32 },
		{ "stories260K-F16.gguf", "blk.4.ffn_down.weight", SKV_WTYPE_F16 },
		{ "stories260K-BF16.gguf", "token_embd.weight", SKV_WTYPE_BF16 },
	};
	for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
		struct skv_gguf *g = open_gguf(quant_path(expect[i].file));
		const struct skv_gguf_tensor *t = skv_gguf_find_tensor(g, expect[i].tensor);
		cr_assert_not_null(t, "%s: no %s", expect[i].file, expect[i].tensor);
		cr_assert_eq(t->type, expect[i].type, "%s: %s is %s", expect[i].file,
			     expect[i].tensor, skv_gguf_ggml_type_name(t->type));
		skv_gguf_close(g);
	}
}

/* The shipped copies are the producer's files: SHA256SUMS ("<hex>  <name>" lines). */
Test(quant, files_match_sha256sums)
{
	char *sums = tu_read_file(quant_path("SHA256SUMS"), NULL);
	unsigned checked = 0;

	for (char *line = strtok(sums, "\n"); line; line = strtok(NULL, "\n")) {
		char want[SHA256_HEX_LEN + 1], name[256], hex[SHA256_HEX_LEN + 1];
		size_t len;

		cr_assert_eq(sscanf(line, "%64s %255s", want, name), 2, "bad line '%s'", line);
		char *data = tu_read_file(quant_path(name), &len);
		sha256_hex(data, len, hex);
		cr_assert_str_eq(hex, want, "%s: sha256 %s, SHA256SUMS says %s", name, hex, want);
		free(data);
		checked++;
	}
	cr_assert_eq(checked, 8);
	free(sums);
}
