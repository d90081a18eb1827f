/* The one ring of streamkv: single producer, single consumer, fixed-size elements, in memory
 * shared between two processes (or threads).
 *
 * Layout in shared memory (struct skv_ring_hdr, then the slots):
 *   line 0  immutable after skv_ring_init: magic, ABI, element size, capacity (a power of two)
 *   line 1  written only by the producer: head, the free-running count of elements pushed
 *   line 2  written only by the consumer: tail, the free-running count of elements popped
 *   line 3  the consumer's wake word (struct skv_wake_word, wake.h): `sleeping` is set by the
 *           consumer and cleared by it or by the one producer that claims the wake-up; `seq`
 *           is bumped by waking producers. A consumer of several rings may sleep on one word
 *           for all of them; its producers then wake that word (skv_wake), not their ring's.
 *   slots   capacity x elem_size bytes, elem_size a multiple of 8
 * Indices are free-running uint32 (masked on use), so full is head - tail == capacity and no
 * slot is wasted.
 *
 * Memory order (the pairs are named again at each atomic in ring.c):
 *   R1  push writes the slot, then store-release of head   --pairs with-->  A1 in pop
 *   A1  pop load-acquires head, then reads the slot
 *   R2  pop reads the slot, then store-release of tail     --pairs with-->  A2 in push
 *   A2  push load-acquires tail, then overwrites the slot
 *   R0  init stores the immutable line, then store-release of magic  -->  A0 in attach
 * Each side keeps a private cached copy of the other's index and reloads it only when the ring
 * looks full (producer) or empty (consumer), so a side with a backlog reads the other's cache
 * line once per batch, not once per element. Neither side ever reads its own index back from
 * shared memory after attaching. Pop copies the element out: validate the copy, never the slot.
 *
 * Never trust shared memory: skv_ring_attach copies the immutable fields once into the private
 * struct skv_ring and validates them against the mapped size; every index read from the other
 * side is copied once and checked (0 <= head - tail <= capacity, in uint32 arithmetic) and a
 * violation returns -SKV_EFORMAT (a peer corrupted the ring: the caller drops that peer).
 *
 * Thread safety: one producer and one consumer, each with its own struct skv_ring attached to
 * the same memory; a struct skv_ring is used by one thread at a time. */
#ifndef SKV_RING_H
#define SKV_RING_H

#include <stddef.h>
#include <stdint.h>

#include "wake.h"

#define SKV_RING_MAGIC 0x474e5253u /* "SRNG" */
#define SKV_RING_ABI 1u
#define SKV_CACHE_LINE 64
/* skv_ring_count's answer when the other side's index is corrupt (larger than any capacity):
 * the next push or pop returns -SKV_EFORMAT. */
#define SKV_RING_CORRUPT UINT32_MAX

struct skv_ring_hdr {
	/* line 0: immutable */
	uint32_t magic;
	uint32_t abi;
	uint32_t elem_size;
	uint32_t capacity;
	uint8_t pad0[SKV_CACHE_LINE - 16];
	/* line 1: producer */
	uint32_t head;
	uint8_t pad1[SKV_CACHE_LINE - 4];
	/* line 2: consumer */
	uint32_t tail;
	uint8_t pad2[SKV_CACHE_LINE - 4];
	/* line 3: consumer's wake word */
	struct skv_wake_word wake;
	uint8_t pad3[SKV_CACHE_LINE - sizeof(struct skv_wake_word)];
};
_Static_assert(sizeof(struct skv_ring_hdr) == 4 * SKV_CACHE_LINE, "skv_ring_hdr is ABI");

/* Private view of one side. */
struct skv_ring {
	struct skv_ring_hdr *hdr;
	uint8_t *slots;
	uint32_t elem_size;
	uint32_t mask;          /* capacity - 1 */
	uint32_t local;         /* producer: next head; consumer: next tail */
	uint32_t other_cached;  /* producer: last tail seen; consumer: last head seen */
	uint32_t role;          /* enum skv_ring_role this side attached as */
};

/* Bytes for a ring of capacity elements of elem_size bytes; 0 if invalid (capacity not a
 * power of two in [2, 2^24], elem_size not a multiple of 8 in [8, 65536]). */
size_t skv_ring_bytes(uint32_t elem_size, uint32_t capacity);

/* Creator side (the daemon): format mem (bytes >= skv_ring_bytes(), 64-byte aligned) as an
 * empty ring with head = tail = 0, wake word zeroed. Call before handing the memory to the
 * peers. Returns 0 or -EINVAL (bad sizes, misaligned or too small memory). */
int skv_ring_init(void *mem, size_t bytes, uint32_t elem_size, uint32_t capacity);

/* skv_ring_init, but head = tail = start_index. For tests, which start near UINT32_MAX to cross
 * the wrap of the free-running indices without pushing 2^32 elements; a ring behaves the same
 * from any start. */
int skv_ring_init_at(void *mem, size_t bytes, uint32_t elem_size, uint32_t capacity,
		     uint32_t start_index);

enum skv_ring_role {
	SKV_RING_PRODUCER = 1,
	SKV_RING_CONSUMER = 2,
};

/* Attach to a formatted ring of mapped_bytes. Validates magic, ABI, sizes against the mapping,
 * and the indices. Returns 0, -SKV_EFORMAT (bad magic, sizes, indices, or a ring larger than
 * the mapping), -SKV_EVERSION (other ABI), -EINVAL (NULL or misaligned mem, bad role). */
int skv_ring_attach(struct skv_ring *r, void *mem, size_t mapped_bytes, enum skv_ring_role role);

/* Producer: copy one element in. 0, -EAGAIN when full, -SKV_EFORMAT on a corrupt tail, -EINVAL
 * if r is attached as the consumer. Does not wake the consumer: call skv_ring_wake() after a
 * push or a batch of pushes. */
int skv_ring_push(struct skv_ring *r, const void *elem);

/* Consumer: copy one element out. 0, -EAGAIN when empty, -SKV_EFORMAT on a corrupt head,
 * -EINVAL if r is attached as the producer. */
int skv_ring_pop(struct skv_ring *r, void *elem);

/* Elements the consumer could pop now (consumer side), or free slots (producer side). Reloads
 * the other side's index (one shared cache-line read), so it suits a consumer's readiness check
 * before sleeping. SKV_RING_CORRUPT if that index is corrupt: a consumer's readiness check then
 * wakes it, and its pop reports -SKV_EFORMAT. */
uint32_t skv_ring_count(struct skv_ring *r);

/* Producer: wake the consumer if it announced it is going to sleep (no system call otherwise).
 * efd is the consumer's eventfd (io_uring path) or -1 (futex path). Same as
 * skv_wake(skv_ring_wake_word(r), efd). */
void skv_ring_wake(struct skv_ring *r, int efd);

/* The ring's wake word in shared memory, for the consumer's skv_waiter_new. */
struct skv_wake_word *skv_ring_wake_word(struct skv_ring *r);

#endif
