/* Scalar reference of ggml's K-quant reference quantizers (tests only): n_blocks blocks of
 * 256 weights each, as quantize_row_q4_K_ref / q5_K_ref / q6_K_ref write them. */
#ifndef SKV_TEST_QUANT_REF_H
#define SKV_TEST_QUANT_REF_H

#include "quant.h"

#include <stdint.h>

void qref_quant_q4_k(const float *src, struct skv_block_q4_k *blocks, uint64_t n_blocks);
void qref_quant_q5_k(const float *src, struct skv_block_q5_k *blocks, uint64_t n_blocks);
void qref_quant_q6_k(const float *src, struct skv_block_q6_k *blocks, uint64_t n_blocks);

#endif
