#include "kv-layout.h"

#include <errno.h>
#include <string.h>

#include "seqlock.h"
#include "skv-error.h"

_Static_assert(sizeof(struct skv_kv_desc) <= SKV_KV_RING_OFFSET, "descriptor overlaps the ring");
/* A row of 16 q8 slots is 16 bytes and never straddles a cache line; 16 slots of scales are one
 * whole line. */
_Static_assert(SKV_KV_ALIGN % SKV_KV_SLOT_ROUND == 0, "q8 rows straddle lines");
_Static_assert(SKV_KV_SLOT_ROUND * sizeof(float) % SKV_KV_ALIGN == 0, "q8 scales misaligned");

static uint64_t kv_round_up(uint64_t v, uint64_t to)
{
	return (v + to - 1) / to * to;
}

int skv_kv_layout_init(struct skv_kv_desc *desc, uint32_t n_layers, uint32_t n_kv_heads,
		       uint32_t head_size, uint32_t sink_slots, uint32_t window_slots)
{
	return skv_kv_layout_init_dtype(desc, n_layers, n_kv_heads, head_size, sink_slots,
					window_slots, SKV_KV_DTYPE_F32);
}

int skv_kv_layout_init_dtype(struct skv_kv_desc *desc, uint32_t n_layers, uint32_t n_kv_heads,
			     uint32_t head_size, uint32_t sink_slots, uint32_t window_slots,
			     uint32_t dtype)
{
	uint32_t elem = skv_kv_dtype_bytes(dtype);
	if (!n_layers || !n_kv_heads || !head_size || !window_slots || !elem)
		return -EINVAL;
	uint64_t slots = (uint64_t)sink_slots + window_slots;
	if (slots > SKV_KV_MAX_SLOTS || n_layers > 4096 || n_kv_heads > 4096 || head_size > 4096)
		return -EOVERFLOW;
	uint64_t stride = kv_round_up(slots, SKV_KV_SLOT_ROUND);
	uint64_t rows = kv_round_up(stride * n_kv_heads * head_size * elem, SKV_KV_ALIGN);
	/* q8: the scales follow the rows inside each plane, so that a plane stays one block (the
	 * plane accessors and the next-row prefetch need nothing else) and a head's 16 slots of
	 * scales are one aligned line (stride * 4 is a multiple of 64). */
	uint64_t scales_offset = dtype == SKV_KV_DTYPE_Q8 ? rows : 0;
	uint64_t plane = rows + (dtype == SKV_KV_DTYPE_Q8
					 ? kv_round_up(stride * n_kv_heads * sizeof(float), SKV_KV_ALIGN)
					 : 0);
	uint64_t tokens_offset = SKV_KV_RING_OFFSET +
				 kv_round_up(sizeof(struct skv_kv_ring), SKV_KV_ALIGN);
	uint64_t planes_offset = tokens_offset + kv_round_up(stride * sizeof(int32_t), SKV_KV_ALIGN);
	uint64_t region = planes_offset + plane * 2 * n_layers;
	if (region >> 48)
		return -EOVERFLOW;

	memset(desc, 0, sizeof(*desc));
	desc->magic = SKV_KV_MAGIC;
	desc->abi_major = SKV_KV_ABI_MAJOR;
	desc->abi_minor = SKV_KV_ABI_MINOR;
	desc->dtype = dtype;
	desc->n_layers = n_layers;
	desc->n_kv_heads = n_kv_heads;
	desc->head_size = head_size;
	desc->sink_slots = sink_slots;
	desc->window_slots = window_slots;
	desc->slot_stride = (uint32_t)stride;
	desc->plane_bytes = plane;
	desc->scales_offset = scales_offset;
	desc->planes_offset = planes_offset;
	desc->tokens_offset = tokens_offset;
	desc->region_bytes = region;
	return 0;
}

int skv_kv_layout_check(const struct skv_kv_desc *desc, uint64_t mapped_bytes, char *msg,
			size_t msg_len)
{
	if (desc->magic != SKV_KV_MAGIC)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "KV descriptor: bad magic 0x%08x (expected 0x%08x)", desc->magic,
				  SKV_KV_MAGIC);
	if (desc->abi_major != SKV_KV_ABI_MAJOR)
		return skv_errorf(msg, msg_len, -SKV_EVERSION,
				  "KV descriptor: ABI %u.%u, this build speaks %u.%u",
				  desc->abi_major, desc->abi_minor, SKV_KV_ABI_MAJOR,
				  SKV_KV_ABI_MINOR);
	if (!skv_kv_dtype_bytes(desc->dtype))
		return skv_errorf(msg, msg_len, -SKV_EDTYPE, "KV descriptor: dtype %u unsupported",
				  desc->dtype);

	/* Recompute everything from the shape: a descriptor whose derived fields disagree was
	 * written by someone else's arithmetic and is not trusted. */
	struct skv_kv_desc expect;
	int err = skv_kv_layout_init_dtype(&expect, desc->n_layers, desc->n_kv_heads,
					   desc->head_size, desc->sink_slots, desc->window_slots,
					   desc->dtype);
	if (err < 0)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "KV descriptor: impossible shape %u layers x %u heads x %u, "
				  "%u sinks + %u window slots",
				  desc->n_layers, desc->n_kv_heads, desc->head_size, desc->sink_slots,
				  desc->window_slots);
	if (desc->slot_stride != expect.slot_stride || desc->plane_bytes != expect.plane_bytes ||
	    desc->planes_offset != expect.planes_offset ||
	    desc->tokens_offset != expect.tokens_offset ||
	    desc->scales_offset != expect.scales_offset ||
	    desc->region_bytes != expect.region_bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "KV descriptor: sizes disagree with its shape");
	if (desc->region_bytes > mapped_bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "KV descriptor: region of %llu bytes exceeds the %llu mapped",
				  (unsigned long long)desc->region_bytes,
				  (unsigned long long)mapped_bytes);
	return 0;
}

void skv_kv_ring_reset(struct skv_kv_ring *ring, const struct skv_kv_desc *desc)
{
	struct skv_kv_ring fresh = { .window_start = desc->sink_slots };
	skv_kv_ring_publish(ring, &fresh);
}

/* The three counters are the words the seqlock protects (shm/seqlock.h). */
_Static_assert(offsetof(struct skv_kv_ring, seq) == 3 * sizeof(uint64_t), "ring seqlock words");

void skv_kv_ring_publish(struct skv_kv_ring *shared, const struct skv_kv_ring *value)
{
	skv_seqlock_write(&shared->seq, &shared->tokens_seen, &value->tokens_seen, 3);
}

int skv_kv_ring_snapshot(const struct skv_kv_ring *shared, struct skv_kv_ring *out,
			 unsigned max_tries)
{
	out->seq = 0;
	return skv_seqlock_read(&shared->seq, &shared->tokens_seen, &out->tokens_seen, 3, max_tries);
}

uint32_t skv_kv_ring_sink_fill(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc)
{
	return ring->tokens_seen < desc->sink_slots ? (uint32_t)ring->tokens_seen
						    : desc->sink_slots;
}

uint32_t skv_kv_ring_window_fill(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc)
{
	return ring->tokens_seen > ring->window_start
		       ? (uint32_t)(ring->tokens_seen - ring->window_start)
		       : 0;
}

static uint32_t kv_ring_slot(const struct skv_kv_desc *desc, uint64_t abs_pos)
{
	if (abs_pos < desc->sink_slots)
		return (uint32_t)abs_pos;
	return desc->sink_slots + (uint32_t)((abs_pos - desc->sink_slots) % desc->window_slots);
}

int skv_kv_ring_append(struct skv_kv_ring *ring, const struct skv_kv_desc *desc, int allow_evict,
		       struct skv_kv_step *step)
{
	uint64_t pos = ring->tokens_seen;
	uint32_t evicted = 0;

	if (pos >= desc->sink_slots && skv_kv_ring_window_fill(ring, desc) >= desc->window_slots) {
		if (!allow_evict)
			return -SKV_ECACHEFULL;
		ring->window_start++;
		ring->tokens_evicted++;
		evicted = 1;
	}
	ring->tokens_seen = pos + 1;

	step->abs_pos = pos;
	step->slot = kv_ring_slot(desc, pos);
	step->sink_count = skv_kv_ring_sink_fill(ring, desc);
	step->window_fill = skv_kv_ring_window_fill(ring, desc);
	step->window_head = kv_ring_slot(desc, ring->window_start);
	step->cache_pos = step->sink_count + step->window_fill - 1;
	step->evicted = evicted;
	return 0;
}

uint32_t skv_kv_ring_evict(struct skv_kv_ring *ring, const struct skv_kv_desc *desc, uint64_t n)
{
	uint32_t fill = skv_kv_ring_window_fill(ring, desc);
	uint32_t drop = n < fill ? (uint32_t)n : fill;

	ring->window_start += drop;
	ring->tokens_evicted += drop;
	return drop;
}

int64_t skv_kv_ring_slot_of(const struct skv_kv_ring *ring, const struct skv_kv_desc *desc,
			    uint64_t abs_pos)
{
	if (abs_pos >= ring->tokens_seen)
		return -ENOENT;
	if (abs_pos >= desc->sink_slots && abs_pos < ring->window_start)
		return -ENOENT;
	return kv_ring_slot(desc, abs_pos);
}
