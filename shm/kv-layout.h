/* The sink-pinned circular KV layout of one stream, and its ring state.
 *
 * A stream's KV region holds, for every layer, a K plane and a V plane. Each plane is
 * [n_kv_heads][head_size][slot_stride] elements of the region's dtype (float32; IEEE half
 * precision: half the memory and the memory traffic of attention; or int8 with a float32 scale
 * per (slot, kv head), see SKV_KV_DTYPE_Q8): for every (kv head, component) pair one row
 * over the stream's slots, so that attention runs along contiguous slots for a fixed component
 * (the scores of 16 slots are one AVX-512 FMA per component). Slots 0..sink_slots-1 of every
 * row are the attention sinks, pinned for the life of the stream; slots
 * sink_slots..sink_slots+window_slots-1 are the ring of the rolling window. Appending a token
 * writes its K and V into one slot of every row; eviction only advances the ring state; no
 * slot is ever moved or copied.
 *
 *   region:  [struct skv_kv_desc][pad][struct skv_kv_ring, own line][token ids][L0 K][L0 V]...
 *   plane:   row (h, d) = elements [ (h * head_size + d) * slot_stride ... + slot_stride )
 *            q8 only, after the rows at scales_offset: float32 scale [n_kv_heads][slot_stride]
 *   row:     | sink 0 .. sink S-1 | ring slot 0 .. ring slot W-1 | pad to slot_stride |
 *
 * The descriptor holds sizes and offsets only (no pointers), so the same region works in a
 * private mapping (local mode) and inside a shared-memory arena mapped at different addresses
 * in different processes. Keys are stored already rotated (RoPE) at their absolute position in
 * the text; see engine/attention.h for how in-cache positions are recovered exactly.
 *
 * The ring state (struct skv_kv_ring) lives in the region, at SKV_KV_RING_OFFSET, on a cache
 * line of its own: it is written only by the process that runs the stream's forward pass (the
 * engine serving it), and read by others (admin snapshots) as a plain value.
 *
 * Thread safety: all functions are pure or touch only the objects passed in. */
#ifndef SKV_KV_LAYOUT_H
#define SKV_KV_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define SKV_KV_MAGIC 0x31564b53u /* "SKV1" little-endian */
#define SKV_KV_ABI_MAJOR 1
/* 1.1: the token-id row (tokens_offset); 1.2: dtype F16; 1.3: dtype Q8 and scales_offset (the
 * former reserved word, still zero for F32 and F16). */
#define SKV_KV_ABI_MINOR 3
#define SKV_KV_DTYPE_F32 1u
#define SKV_KV_DTYPE_F16 2u /* IEEE binary16 (_Float16), as the paper's GPU caches */
/* Symmetric int8: each plane's rows hold int8 codes, and after them (at scales_offset from the
 * plane's start, 64-byte aligned) a float32 scale per (kv head, slot), [n_kv_heads][slot_stride].
 * Element (h, d, t) is scale[h][t] * code[h][d][t]; the scale of a slot is the largest |x| of
 * its head's head_size components / 127, codes round to nearest in [-127, 127]. A K or V plane
 * of head_size h per slot and head is h + 4 bytes, against 4h for float32. */
#define SKV_KV_DTYPE_Q8 3u
#define SKV_KV_Q8_MAX 127
/* Plane and row alignment: a cache line, and a whole AVX-512 vector of float32 per 16 slots. */
#define SKV_KV_ALIGN 64u
#define SKV_KV_SLOT_ROUND 16u
/* Largest slot count a region may hold (sinks + window); keeps offsets far from overflow. */
#define SKV_KV_MAX_SLOTS (1u << 24)

struct skv_kv_desc {
	uint32_t magic;              /* SKV_KV_MAGIC */
	uint16_t abi_major;          /* SKV_KV_ABI_MAJOR: a different major is refused */
	uint16_t abi_minor;          /* newer minors only add fields in reserved space */
	uint32_t dtype;              /* SKV_KV_DTYPE_F32, _F16 or _Q8 */
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_size;
	uint32_t sink_slots;         /* S: pinned slots at the start of every row */
	uint32_t window_slots;       /* W: ring slots after the sinks */
	uint32_t slot_stride;        /* elements per row: S + W rounded up to SKV_KV_SLOT_ROUND */
	uint32_t reserved0;
	uint64_t plane_bytes;        /* bytes of one K or V plane (its q8 scales included) */
	uint64_t planes_offset;      /* from region start to layer 0's K plane (after the ring) */
	uint64_t region_bytes;       /* whole region, descriptor included */
	uint64_t tokens_offset;      /* int32 token id of each slot: [slot_stride] */
	uint64_t scales_offset;      /* q8: from a plane's start to its float32 scales
				      * [n_kv_heads][slot_stride]; 0 for F32 and F16 (ABI 1.3) */
};
_Static_assert(sizeof(struct skv_kv_desc) == 80, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, dtype) == 8, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, slot_stride) == 32, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, plane_bytes) == 40, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, planes_offset) == 48, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, region_bytes) == 56, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, tokens_offset) == 64, "skv_kv_desc is ABI");
_Static_assert(offsetof(struct skv_kv_desc, scales_offset) == 72, "skv_kv_desc is ABI");

/* Ring state of one stream. Token indices are absolute positions in the stream's text:
 * tokens 0..S-1 are the sinks; the window holds tokens [window_start, tokens_seen). */
struct skv_kv_ring {
	uint64_t tokens_seen;    /* tokens appended so far = absolute index of the next token */
	uint64_t window_start;   /* absolute index of the oldest token still in the window (>= S) */
	uint64_t tokens_evicted; /* tokens dropped from the window so far */
	uint64_t seq;            /* seqlock: odd while the writer updates the fields above */
};
_Static_assert(sizeof(struct skv_kv_ring) == 32, "skv_kv_ring is ABI");

/* The ring state's place in a region: the cache line after the descriptor's. */
#define SKV_KV_RING_OFFSET 128u

static inline struct skv_kv_ring *skv_kv_region_ring(void *base)
{
	return (struct skv_kv_ring *)((char *)base + SKV_KV_RING_OFFSET);
}

/* The token id held by each slot (what the KV of that slot was computed from), so that tools can
 * show a stream's sinks and window as text. Written by the engine with the slot's K/V. */
static inline int32_t *skv_kv_region_tokens(void *base, const struct skv_kv_desc *desc)
{
	return (int32_t *)((char *)base + desc->tokens_offset);
}

/* Seqlock over a ring state in shared memory: the one writer (the engine serving the stream)
 * publishes a new value; readers in other processes take a consistent snapshot, retrying while
 * a write is in progress or if one happened during their read. Readers never block the
 * writer. skv_kv_ring_snapshot returns 0, or -EAGAIN after max_tries torn reads. */
void skv_kv_ring_publish(struct skv_kv_ring *shared, const struct skv_kv_ring *value);
int skv_kv_ring_snapshot(const struct skv_kv_ring *shared, struct skv_kv_ring *out,
			 unsigned max_tries);

/* Where one appended token goes and what its attention step sees. */
struct skv_kv_step {
	uint64_t abs_pos;      /* absolute position of the token (RoPE angle of its key) */
	uint32_t slot;         /* slot its K/V are written to */
	uint32_t cache_pos;    /* its position inside the cache: sinks 0..S-1, then window order */
	uint32_t sink_count;   /* sink slots [0, sink_count) valid for this step */
	uint32_t window_head;  /* slot of the oldest window token */
	uint32_t window_fill;  /* window tokens valid for this step, its own included */
	uint32_t evicted;      /* 1 if appending it evicted the oldest window token */
};

/* Fill desc for a region of the given shape, float32. Returns 0, or -EINVAL for zero sizes or a
 * window of zero slots, -EOVERFLOW when the region would exceed SKV_KV_MAX_SLOTS slots or 2^48
 * bytes. */
int skv_kv_layout_init(struct skv_kv_desc *desc, uint32_t n_layers, uint32_t n_kv_heads,
		       uint32_t head_size, uint32_t sink_slots, uint32_t window_slots);
/* The same with an element type (SKV_KV_DTYPE_*; -EINVAL for another). */
int skv_kv_layout_init_dtype(struct skv_kv_desc *desc, uint32_t n_layers, uint32_t n_kv_heads,
			     uint32_t head_size, uint32_t sink_slots, uint32_t window_slots,
			     uint32_t dtype);
/* Bytes of one element of a plane's rows of dtype (0 for an unknown one); q8's scales come on
 * top (see SKV_KV_DTYPE_Q8). */
static inline uint32_t skv_kv_dtype_bytes(uint32_t dtype)
{
	return dtype == SKV_KV_DTYPE_F32   ? 4
	       : dtype == SKV_KV_DTYPE_F16 ? 2
	       : dtype == SKV_KV_DTYPE_Q8  ? 1
					   : 0;
}

/* Short name of a dtype as the --kv flags spell it ("f32", "f16", "q8"; "?" for another). */
static inline const char *skv_kv_dtype_name(uint32_t dtype)
{
	return dtype == SKV_KV_DTYPE_F32   ? "f32"
	       : dtype == SKV_KV_DTYPE_F16 ? "f16"
	       : dtype == SKV_KV_DTYPE_Q8  ? "q8"
					   : "?";
}

/* Validate a descriptor copied out of shared memory against the region size the reader
 * mapped: magic, ABI major, dtype, and every size and offset recomputed from the shape.
 * Returns 0, -SKV_EFORMAT, -SKV_EVERSION or -SKV_ESHAPE (msg says which field). */
int skv_kv_layout_check(const struct skv_kv_desc *desc, uint64_t mapped_bytes, char *msg,
			size_t msg_len);

/* K or V plane of a layer inside a region that starts at base (desc validated). */
static inline void *skv_kv_k_plane(void *base, const struct skv_kv_desc *desc, uint32_t layer)
{
	return (char *)base + desc->planes_offset + (uint64_t)layer * 2 * desc->plane_bytes;
}

static inline void *skv_kv_v_plane(void *base, const struct skv_kv_desc *desc, uint32_t layer)
{
	return (char *)base + desc->planes_offset + ((uint64_t)layer * 2 + 1) * desc->plane_bytes;
}

/* Q8 only: the float32 scales [n_kv_heads][slot_stride] of a plane returned above. */
static inline float *skv_kv_plane_scales(void *plane, const struct skv_kv_desc *desc)
{
	return (float *)((char *)plane + desc->scales_offset);
}

void skv_kv_ring_reset(struct skv_kv_ring *ring, const struct skv_kv_desc *desc);

/* Plan the append of the next token and advance the ring. When the window is full the oldest
 * window token is evicted if allow_evict, otherwise -SKV_ECACHEFULL is returned and the ring is
 * unchanged. The sinks are never evicted. */
int skv_kv_ring_append(struct skv_kv_ring *ring, const struct skv_kv_desc *desc, int allow_evict,
		       struct skv_kv_step *step);

/* Evict the n oldest window tokens at once (per-prompt eviction). Evicting more than the
 * window holds empties it. Returns the number evicted. */
uint32_t skv_kv_ring_evict(struct skv_kv_ring *ring, const struct skv_kv_desc *desc, uint64_t n);

/* Tokens currently in the window, and in the sinks. */
uint32_t skv_kv_ring_window_fill(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc);
uint32_t skv_kv_ring_sink_fill(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc);

/* Slot of the token at absolute position abs_pos, or -ENOENT if it is not in the cache. */
int64_t skv_kv_ring_slot_of(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc,
			    uint64_t abs_pos);

#endif
