/* The snapshot file of one stream: everything needed to continue it in another daemon process.
 *
 * Layout: struct skv_snap_header, then the stream's KV region exactly as it lies in the arena
 * (region_bytes: its descriptor, ring state, token id per slot, K/V planes in the region's
 * dtype). The header says which model made it (model_id: a sha256 over the model's shape and
 * the first bytes of its file, where GGUF keeps its metadata and tensor infos and llama2.c its
 * header), the stream's parameters, its engine-private state at a request boundary (sampler
 * state, last tokens) and, for a resumable stream, its name, owner and resume token (so the
 * file is a secret: mode 0600). sha256 covers the whole file with the sha256 field zeroed.
 *
 * A recompute stream's region is scratch its engine re-runs at every token; for a snapshot the
 * engine writes its window's token ids (the last L fed) into the region's token row and ring
 * state, as a window region holds its tokens, and its whole count into state.tokens_seen.
 *
 * Versions: major changes refuse (a newer major is "newer than this daemon"); a newer minor of
 * the same major only adds meaning to reserved words, which older readers ignore.
 *
 * Written and read by the daemon (cached/snapshot.c) only; nobody maps it. */
#ifndef SKV_SNAPSHOT_H
#define SKV_SNAPSHOT_H

#include <stdint.h>

#include "proto.h"

#define SKV_SNAP_MAGIC 0x53564b53u /* "SKVS" */
#define SKV_SNAP_MAJOR 1u
#define SKV_SNAP_MINOR 1u /* 1.1: recompute streams (their window's token ids in the region's
			   * token row, state.tokens_seen their count) */
#define SKV_SNAP_ALIGN 4096u       /* the region starts at a page boundary of the file */

struct skv_snap_header {
	uint32_t magic;
	uint16_t major, minor;
	uint32_t header_bytes;       /* sizeof(struct skv_snap_header) */
	uint32_t kv_dtype;           /* SKV_KV_DTYPE_*: the region's, repeated for the refusal */
	uint64_t region_offset;      /* SKV_SNAP_ALIGN */
	uint64_t region_bytes;
	uint64_t file_bytes;         /* region_offset + region_bytes */
	uint64_t tokens_seen;        /* informational: the ring state in the region is the truth */
	uint64_t created_unix;
	uint8_t model_id[32];
	uint8_t sha256[32];          /* of the whole file, these 32 bytes zero */
	struct skv_stream_params params;  /* resolved: the region's shape follows from them */
	struct skv_stream_state state;
	char name[SKV_STREAM_NAME_MAX];   /* "" for a stream that is not resumable */
	char token[SKV_TOKEN_HEX];
	uint32_t owner_uid;
	uint32_t flags;              /* zero */
	uint64_t reserved[22];
};
_Static_assert(sizeof(struct skv_snap_header) == 512, "ABI");

#endif
