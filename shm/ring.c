#include "ring.h"

#include <errno.h>
#include <string.h>

#include "skv-error.h"

/* One writer per cache line: the offsets are ABI, and the per-side lines must not share. */
_Static_assert(offsetof(struct skv_ring_hdr, magic) == 0, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, abi) == 4, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, elem_size) == 8, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, capacity) == 12, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, head) == 1 * SKV_CACHE_LINE, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, tail) == 2 * SKV_CACHE_LINE, "ring ABI");
_Static_assert(offsetof(struct skv_ring_hdr, wake) == 3 * SKV_CACHE_LINE, "ring ABI");

#define RING_MIN_CAPACITY 2u
#define RING_MAX_CAPACITY (1u << 24)
#define RING_MIN_ELEM 8u
#define RING_MAX_ELEM 65536u

size_t skv_ring_bytes(uint32_t elem_size, uint32_t capacity)
{
	if (capacity < RING_MIN_CAPACITY || capacity > RING_MAX_CAPACITY ||
	    (capacity & (capacity - 1)))
		return 0;
	if (elem_size < RING_MIN_ELEM || elem_size > RING_MAX_ELEM || elem_size % 8)
		return 0;
	/* At most 2^24 x 2^16 = 2^40 bytes: no overflow in 64-bit arithmetic. */
	uint64_t bytes = sizeof(struct skv_ring_hdr) + (uint64_t)elem_size * capacity;
	if (bytes > SIZE_MAX)
		return 0;
	return (size_t)bytes;
}

int skv_ring_init_at(void *mem, size_t bytes, uint32_t elem_size, uint32_t capacity,
		     uint32_t start_index)
{
	size_t need = skv_ring_bytes(elem_size, capacity);
	if (!mem || (uintptr_t)mem % SKV_CACHE_LINE || !need || bytes < need)
		return -EINVAL;

	struct skv_ring_hdr *hdr = mem;
	/* A stale magic from an earlier ring in the same memory must not validate a half-written
	 * header: clear it first, publish it last. */
	__atomic_store_n(&hdr->magic, 0, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	memset((char *)hdr + sizeof(hdr->magic), 0, sizeof(*hdr) - sizeof(hdr->magic));
	hdr->abi = SKV_RING_ABI;
	hdr->elem_size = elem_size;
	hdr->capacity = capacity;
	hdr->head = start_index;
	hdr->tail = start_index;
	/* R0: publishes the whole header; pairs with A0 in skv_ring_attach. */
	__atomic_store_n(&hdr->magic, SKV_RING_MAGIC, __ATOMIC_RELEASE);
	return 0;
}

int skv_ring_init(void *mem, size_t bytes, uint32_t elem_size, uint32_t capacity)
{
	return skv_ring_init_at(mem, bytes, elem_size, capacity, 0);
}

int skv_ring_attach(struct skv_ring *r, void *mem, size_t mapped_bytes, enum skv_ring_role role)
{
	if (!r || !mem || (uintptr_t)mem % SKV_CACHE_LINE ||
	    (role != SKV_RING_PRODUCER && role != SKV_RING_CONSUMER))
		return -EINVAL;
	memset(r, 0, sizeof(*r));
	if (mapped_bytes < sizeof(struct skv_ring_hdr))
		return -SKV_EFORMAT;

	/* Every field is read exactly once into a local and only the locals are used: the peer
	 * may rewrite the shared copy between two reads. */
	struct skv_ring_hdr *hdr = mem;
	/* A0: pairs with R0 in skv_ring_init_at (the immutable line is complete). */
	uint32_t magic = __atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE);
	uint32_t abi = __atomic_load_n(&hdr->abi, __ATOMIC_RELAXED);
	uint32_t elem_size = __atomic_load_n(&hdr->elem_size, __ATOMIC_RELAXED);
	uint32_t capacity = __atomic_load_n(&hdr->capacity, __ATOMIC_RELAXED);
	if (magic != SKV_RING_MAGIC)
		return -SKV_EFORMAT;
	if (abi != SKV_RING_ABI)
		return -SKV_EVERSION;
	size_t need = skv_ring_bytes(elem_size, capacity);
	if (!need || need > mapped_bytes)
		return -SKV_EFORMAT;

	/* A1/A2 at attach: pair with the peer's R1 (push) / R2 (pop) that published them. */
	uint32_t head = __atomic_load_n(&hdr->head, __ATOMIC_ACQUIRE);
	uint32_t tail = __atomic_load_n(&hdr->tail, __ATOMIC_ACQUIRE);
	if (head - tail > capacity)
		return -SKV_EFORMAT;

	r->hdr = hdr;
	r->slots = (uint8_t *)mem + sizeof(struct skv_ring_hdr);
	r->elem_size = elem_size;
	r->mask = capacity - 1;
	r->role = role;
	if (role == SKV_RING_PRODUCER) {
		r->local = head;
		r->other_cached = tail;
	} else {
		r->local = tail;
		r->other_cached = head;
	}
	return 0;
}

/* Producer: reload tail from shared memory. 0, or -SKV_EFORMAT if the consumer's tail is not
 * within capacity behind our head (it ran ahead of head, or fell impossibly far behind). */
static int ring_reload_tail(struct skv_ring *r)
{
	/* A2: pairs with R2 in skv_ring_pop: the consumer finished reading every slot below tail,
	 * so the producer may overwrite them. */
	uint32_t tail = __atomic_load_n(&r->hdr->tail, __ATOMIC_ACQUIRE);
	if (r->local - tail > r->mask + 1)
		return -SKV_EFORMAT;
	r->other_cached = tail;
	return 0;
}

/* Consumer: reload head from shared memory; -SKV_EFORMAT if it is behind our tail or more than
 * capacity ahead of it. */
static int ring_reload_head(struct skv_ring *r)
{
	/* A1: pairs with R1 in skv_ring_push: every slot below head is written. */
	uint32_t head = __atomic_load_n(&r->hdr->head, __ATOMIC_ACQUIRE);
	if (head - r->local > r->mask + 1)
		return -SKV_EFORMAT;
	r->other_cached = head;
	return 0;
}

int skv_ring_push(struct skv_ring *r, const void *elem)
{
	if (r->role != SKV_RING_PRODUCER)
		return -EINVAL;
	uint32_t head = r->local;
	uint32_t capacity = r->mask + 1;
	if (head - r->other_cached == capacity) {
		int err = ring_reload_tail(r);
		if (err)
			return err;
		if (head - r->other_cached == capacity)
			return -EAGAIN;
	}
	memcpy(r->slots + (size_t)(head & r->mask) * r->elem_size, elem, r->elem_size);
	/* R1: publishes the slot; pairs with A1 in ring_reload_head (and in skv_ring_attach). */
	__atomic_store_n(&r->hdr->head, head + 1, __ATOMIC_RELEASE);
	r->local = head + 1;
	return 0;
}

int skv_ring_pop(struct skv_ring *r, void *elem)
{
	if (r->role != SKV_RING_CONSUMER)
		return -EINVAL;
	uint32_t tail = r->local;
	if (r->other_cached == tail) {
		int err = ring_reload_head(r);
		if (err)
			return err;
		if (r->other_cached == tail)
			return -EAGAIN;
	}
	memcpy(elem, r->slots + (size_t)(tail & r->mask) * r->elem_size, r->elem_size);
	/* R2: hands the slot back; pairs with A2 in ring_reload_tail (and in skv_ring_attach). */
	__atomic_store_n(&r->hdr->tail, tail + 1, __ATOMIC_RELEASE);
	r->local = tail + 1;
	return 0;
}

uint32_t skv_ring_count(struct skv_ring *r)
{
	uint32_t capacity = r->mask + 1;
	if (r->role == SKV_RING_PRODUCER) {
		if (ring_reload_tail(r))
			return SKV_RING_CORRUPT;
		return capacity - (r->local - r->other_cached);
	}
	if (ring_reload_head(r))
		return SKV_RING_CORRUPT;
	return r->other_cached - r->local;
}

struct skv_wake_word *skv_ring_wake_word(struct skv_ring *r)
{
	return &r->hdr->wake;
}

void skv_ring_wake(struct skv_ring *r, int efd)
{
	skv_wake(&r->hdr->wake, efd);
}
