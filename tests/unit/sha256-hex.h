/* The sha256 of a buffer as lowercase hex, through nettle (for the suites that check shipped
 * files against the checksums their READMEs state). */
#ifndef SKV_TEST_SHA256_HEX_H
#define SKV_TEST_SHA256_HEX_H

#include <nettle/sha2.h>
#include <stdio.h>

#define SHA256_HEX_LEN (2 * SHA256_DIGEST_SIZE)

static inline void sha256_hex(const void *data, size_t len, char out[SHA256_HEX_LEN + 1])
{
	struct sha256_ctx ctx;
	uint8_t digest[SHA256_DIGEST_SIZE];
	sha256_init(&ctx);
	sha256_update(&ctx, len, data);
	sha256_digest(&ctx, sizeof(digest), digest);
	for (size_t i = 0; i < sizeof(digest); i++)
		snprintf(out + 2 * i, 3, "%02x", digest[i]);
}

#endif
