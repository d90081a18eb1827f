#include "arena.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "skv-error.h"
#include "topology.h"

/* Debian 12's headers predate these (Linux 6.3 and 5.14). */
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* ==== The allocator ======================================================================
 *
 * Design: two-level segregated fit (as in TLSF, Masmano et al. 2004) over the size classes of
 * arena.h, with immediate coalescing. Every extent of the heap, free or live, is a descriptor
 * in a private array, linked to its address neighbours. Free extents also sit in one list per
 * class: the largest class that fits in the extent. A bitmap of non-empty lists finds the
 * first list at or above the request's class, whose extents are all large enough: good fit
 * (within one class of best fit) in O(1), never a search through unsuitable extents.
 *
 * Why this holds up in a daemon that runs for months:
 *   - A request is rounded up to its class (waste < 20%). A freed region is then exactly the
 *     size the next request of its class needs, so the common steady state (streams of a few
 *     configurations coming and going) reuses extents whole, with no split and no splinter.
 *   - A free coalesces at once with both neighbours, so no two free extents are ever adjacent:
 *     free space is only ever divided by live regions, never by bookkeeping. When everything
 *     is freed the heap is one extent again.
 *   - Splits carve the low end of the extent and return the high end to its list. Smallest-
 *     class-first placement leaves large extents whole as long as smaller ones can serve.
 *   - In each list, extents are kept in address order and the lowest is taken: the classic
 *     "address-ordered good fit" that packs live regions towards the start of the heap and
 *     keeps the large free extents at its end, where they merge (Johnstone & Wilson, "The
 *     memory fragmentation problem: solved?", ISMM 1998, measured address-ordered best/good
 *     fit as the least fragmenting policies). The lists are short: the insert walk is bounded
 *     by the number of free extents of one class.
 *   - A buddy allocator was rejected: power-of-two blocks waste up to 50% at these sizes (a
 *     130 MiB region would take 256 MiB) and a block merges only with its buddy.
 *   - Near exhaustion, a request that fits no extent after rounding to its class but fits one
 *     as requested (a region of nearly the whole arena) is served unrounded from the one list
 *     that can hold such an extent.
 * Metadata is daemon-private (indices, not pointers, so the descriptor array may move on
 * growth); free(offset) finds its extent through an open-addressing hash table. Nothing of it
 * is in shared memory, so an engine cannot corrupt it. */

#define HEAP_NIL UINT32_MAX
#define HEAP_GRANULE SKV_ARENA_ALIGN
#define HEAP_MAX_GRANULES (SKV_ARENA_HEAP_MAX_BYTES / HEAP_GRANULE)
#define HEAP_BITMAP_WORDS ((SKV_ARENA_HEAP_CLASSES + 63) / 64)

struct heap_extent {
	uint64_t start;     /* granules from the heap's start */
	uint64_t size;      /* granules */
	uint64_t requested; /* bytes asked for (live extents) */
	uint32_t phys_prev; /* address neighbours, HEAP_NIL at the heap's ends */
	uint32_t phys_next;
	uint32_t list_prev; /* free list of its class (free extents); spare chain (unused) */
	uint32_t list_next;
	uint16_t cls;       /* live: the request's class; free: its list */
	uint8_t is_free;
	uint8_t in_use;     /* 0: a spare descriptor */
};

struct skv_arena_heap {
	uint64_t offset;   /* bytes: where the heap starts in the arena */
	uint64_t granules; /* heap size */
	struct heap_extent *ext;
	uint32_t ext_cap;
	uint32_t spare;    /* chain of unused descriptors through list_next */
	uint32_t first;    /* the extent at granule 0: it is never merged away */
	uint32_t list_head[SKV_ARENA_HEAP_CLASSES];
	uint64_t list_len[SKV_ARENA_HEAP_CLASSES];
	uint64_t nonempty[HEAP_BITMAP_WORDS];
	uint32_t *table;   /* live extents by start: descriptor index + 1, 0 = empty slot */
	uint64_t table_mask;
	unsigned table_bits;
	uint64_t live;
	uint64_t used_granules;
	uint64_t requested_bytes;
	uint64_t failed;
	uint64_t free_extents;
	uint64_t class_live[SKV_ARENA_HEAP_CLASSES];
};

static unsigned heap_class_of_granules(uint64_t g)
{
	if (g <= 4)
		return (unsigned)g - 1;
	unsigned k = 63u - (unsigned)__builtin_clzll(g - 1); /* g in (2^k, 2^(k+1)], k >= 2 */
	uint64_t quarters = (g + (1ull << (k - 2)) - 1) >> (k - 2); /* 5..8 */
	return 4 + (k - 2) * 4 + (unsigned)(quarters - 5);
}

static uint64_t heap_class_granules(unsigned cls)
{
	if (cls < 4)
		return cls + 1;
	unsigned j = cls - 4;
	return (uint64_t)(5 + j % 4) << (j / 4);
}

/* The list of a free extent: the largest class not above its size. */
static unsigned heap_list_of(uint64_t g)
{
	unsigned c = heap_class_of_granules(g);
	return heap_class_granules(c) > g ? c - 1 : c;
}

unsigned skv_arena_class_of(uint64_t bytes)
{
	if (!bytes || bytes > SKV_ARENA_HEAP_MAX_BYTES)
		return SKV_ARENA_HEAP_CLASSES;
	return heap_class_of_granules((bytes + HEAP_GRANULE - 1) / HEAP_GRANULE);
}

uint64_t skv_arena_class_bytes(unsigned cls)
{
	return cls < SKV_ARENA_HEAP_CLASSES ? heap_class_granules(cls) * HEAP_GRANULE : 0;
}

static uint64_t heap_hash(const struct skv_arena_heap *heap, uint64_t start)
{
	return (start * 0x9e3779b97f4a7c15ull) >> (64 - heap->table_bits);
}

static int heap_table_resize(struct skv_arena_heap *heap, unsigned bits)
{
	uint32_t *old = heap->table;
	uint64_t old_size = old ? heap->table_mask + 1 : 0;
	uint32_t *table = calloc((size_t)1 << bits, sizeof(*table));
	if (!table)
		return -ENOMEM;
	heap->table = table;
	heap->table_bits = bits;
	heap->table_mask = (1ull << bits) - 1;
	for (uint64_t i = 0; i < old_size; i++) {
		if (!old[i])
			continue;
		uint64_t h = heap_hash(heap, heap->ext[old[i] - 1].start);
		while (table[h])
			h = (h + 1) & heap->table_mask;
		table[h] = old[i];
	}
	free(old);
	return 0;
}

static uint64_t heap_table_find(const struct skv_arena_heap *heap, uint64_t start)
{
	uint64_t h = heap_hash(heap, start);
	while (heap->table[h]) {
		if (heap->ext[heap->table[h] - 1].start == start)
			return h;
		h = (h + 1) & heap->table_mask;
	}
	return UINT64_MAX;
}

static void heap_table_insert(struct skv_arena_heap *heap, uint32_t idx)
{
	uint64_t h = heap_hash(heap, heap->ext[idx].start);
	while (heap->table[h])
		h = (h + 1) & heap->table_mask;
	heap->table[h] = idx + 1;
}

/* Linear probing deletion by backward shift: no tombstones, so lookups stay short. */
static void heap_table_remove(struct skv_arena_heap *heap, uint64_t slot)
{
	uint64_t hole = slot, j = slot;
	for (;;) {
		j = (j + 1) & heap->table_mask;
		if (!heap->table[j])
			break;
		uint64_t home = heap_hash(heap, heap->ext[heap->table[j] - 1].start);
		/* Move j into the hole unless its home lies cyclically in (hole, j]. */
		int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
		if (!stays) {
			heap->table[hole] = heap->table[j];
			hole = j;
		}
	}
	heap->table[hole] = 0;
}

/* Make sure one more extent descriptor and one more live entry fit, before any change. */
static int heap_reserve(struct skv_arena_heap *heap)
{
	if (heap->spare == HEAP_NIL) {
		if (heap->ext_cap >= HEAP_NIL / 2)
			return -ENOMEM;
		uint32_t cap = heap->ext_cap ? heap->ext_cap * 2 : 64;
		struct heap_extent *ext = realloc(heap->ext, (size_t)cap * sizeof(*ext));
		if (!ext)
			return -ENOMEM;
		for (uint32_t i = heap->ext_cap; i < cap; i++) {
			memset(&ext[i], 0, sizeof(ext[i]));
			ext[i].list_next = i + 1 < cap ? i + 1 : HEAP_NIL;
		}
		heap->spare = heap->ext_cap;
		heap->ext = ext;
		heap->ext_cap = cap;
	}
	if ((heap->live + 1) * 2 > heap->table_mask + 1)
		return heap_table_resize(heap, heap->table_bits + 1);
	return 0;
}

static uint32_t heap_ext_get(struct skv_arena_heap *heap)
{
	uint32_t idx = heap->spare;
	heap->spare = heap->ext[idx].list_next;
	memset(&heap->ext[idx], 0, sizeof(heap->ext[idx]));
	heap->ext[idx].in_use = 1;
	return idx;
}

static void heap_ext_put(struct skv_arena_heap *heap, uint32_t idx)
{
	heap->ext[idx].in_use = 0;
	heap->ext[idx].list_next = heap->spare;
	heap->spare = idx;
}

static void heap_list_insert(struct skv_arena_heap *heap, uint32_t idx)
{
	struct heap_extent *e = &heap->ext[idx];
	unsigned list = heap_list_of(e->size);
	e->cls = (uint16_t)list;
	e->is_free = 1;
	/* Address order: walk to the first extent above this one. */
	uint32_t prev = HEAP_NIL, next = heap->list_head[list];
	while (next != HEAP_NIL && heap->ext[next].start < e->start) {
		prev = next;
		next = heap->ext[next].list_next;
	}
	e->list_prev = prev;
	e->list_next = next;
	if (prev == HEAP_NIL)
		heap->list_head[list] = idx;
	else
		heap->ext[prev].list_next = idx;
	if (next != HEAP_NIL)
		heap->ext[next].list_prev = idx;
	heap->list_len[list]++;
	heap->nonempty[list / 64] |= 1ull << (list % 64);
	heap->free_extents++;
}

static void heap_list_remove(struct skv_arena_heap *heap, uint32_t idx)
{
	struct heap_extent *e = &heap->ext[idx];
	unsigned list = e->cls;
	if (e->list_prev == HEAP_NIL)
		heap->list_head[list] = e->list_next;
	else
		heap->ext[e->list_prev].list_next = e->list_next;
	if (e->list_next != HEAP_NIL)
		heap->ext[e->list_next].list_prev = e->list_prev;
	if (--heap->list_len[list] == 0)
		heap->nonempty[list / 64] &= ~(1ull << (list % 64));
	heap->free_extents--;
	e->is_free = 0;
}

/* First non-empty list at or above cls, or SKV_ARENA_HEAP_CLASSES. */
static unsigned heap_find_list(const struct skv_arena_heap *heap, unsigned cls)
{
	for (unsigned w = cls / 64; w < HEAP_BITMAP_WORDS; w++) {
		uint64_t bits = heap->nonempty[w];
		if (w == cls / 64)
			bits &= ~0ull << (cls % 64);
		if (bits)
			return w * 64 + (unsigned)__builtin_ctzll(bits);
	}
	return SKV_ARENA_HEAP_CLASSES;
}

int skv_arena_heap_new(uint64_t offset, uint64_t bytes, struct skv_arena_heap **out)
{
	*out = NULL;
	if (offset % HEAP_GRANULE || bytes % HEAP_GRANULE || !bytes ||
	    bytes > SKV_ARENA_HEAP_MAX_BYTES || offset > INT64_MAX - bytes)
		return -EINVAL;
	struct skv_arena_heap *heap = calloc(1, sizeof(*heap));
	if (!heap)
		return -ENOMEM;
	heap->offset = offset;
	heap->granules = bytes / HEAP_GRANULE;
	heap->spare = HEAP_NIL;
	for (unsigned i = 0; i < SKV_ARENA_HEAP_CLASSES; i++)
		heap->list_head[i] = HEAP_NIL;
	if (heap_table_resize(heap, 6) < 0 || heap_reserve(heap) < 0) {
		skv_arena_heap_destroy(heap);
		return -ENOMEM;
	}
	uint32_t idx = heap_ext_get(heap);
	heap->ext[idx].start = 0;
	heap->ext[idx].size = heap->granules;
	heap->ext[idx].phys_prev = heap->ext[idx].phys_next = HEAP_NIL;
	heap_list_insert(heap, idx);
	heap->first = idx;
	*out = heap;
	return 0;
}

void skv_arena_heap_destroy(struct skv_arena_heap *heap)
{
	if (!heap)
		return;
	free(heap->table);
	free(heap->ext);
	free(heap);
}

/* Near exhaustion: an extent of at least g granules that is smaller than g's class can only
 * be in the list just below that class. */
static uint32_t heap_find_unrounded(const struct skv_arena_heap *heap, uint64_t g)
{
	unsigned list = heap_list_of(g);
	for (uint32_t i = heap->list_head[list]; i != HEAP_NIL; i = heap->ext[i].list_next)
		if (heap->ext[i].size >= g)
			return i;
	return HEAP_NIL;
}

int64_t skv_arena_heap_alloc(struct skv_arena_heap *heap, uint64_t bytes)
{
	if (!bytes)
		return -EINVAL;
	if (bytes > heap->granules * HEAP_GRANULE) {
		heap->failed++;
		return -ENOMEM;
	}
	uint64_t g = (bytes + HEAP_GRANULE - 1) / HEAP_GRANULE;
	unsigned cls = heap_class_of_granules(g);
	uint64_t take = heap_class_granules(cls);
	uint32_t idx = HEAP_NIL;
	unsigned list = heap_find_list(heap, cls);
	if (list < SKV_ARENA_HEAP_CLASSES) {
		idx = heap->list_head[list];
	} else {
		idx = heap_find_unrounded(heap, g);
		take = g;
	}
	if (idx == HEAP_NIL || heap_reserve(heap) < 0) {
		heap->failed++;
		return -ENOMEM;
	}

	heap_list_remove(heap, idx);
	struct heap_extent *e = &heap->ext[idx];
	if (e->size > take) {
		uint32_t rest = heap_ext_get(heap); /* reserved above: the array did not move */
		struct heap_extent *r = &heap->ext[rest];
		r->start = e->start + take;
		r->size = e->size - take;
		r->phys_prev = idx;
		r->phys_next = e->phys_next;
		if (e->phys_next != HEAP_NIL)
			heap->ext[e->phys_next].phys_prev = rest;
		e->phys_next = rest;
		e->size = take;
		heap_list_insert(heap, rest);
	}
	e->cls = (uint16_t)cls;
	e->requested = bytes;
	heap_table_insert(heap, idx);
	heap->live++;
	heap->used_granules += e->size;
	heap->requested_bytes += bytes;
	heap->class_live[cls]++;
	return (int64_t)(heap->offset + e->start * HEAP_GRANULE);
}

static uint64_t heap_lookup(const struct skv_arena_heap *heap, uint64_t offset)
{
	if (offset < heap->offset || (offset - heap->offset) % HEAP_GRANULE ||
	    (offset - heap->offset) / HEAP_GRANULE >= heap->granules)
		return UINT64_MAX;
	return heap_table_find(heap, (offset - heap->offset) / HEAP_GRANULE);
}

uint64_t skv_arena_heap_size_of(const struct skv_arena_heap *heap, uint64_t offset)
{
	uint64_t slot = heap_lookup(heap, offset);
	return slot == UINT64_MAX ? 0 : heap->ext[heap->table[slot] - 1].size * HEAP_GRANULE;
}

/* Absorb extent `gone` (free, not in a list) into its lower neighbour `keep`. */
static void heap_merge(struct skv_arena_heap *heap, uint32_t keep, uint32_t gone)
{
	struct heap_extent *k = &heap->ext[keep], *g = &heap->ext[gone];
	k->size += g->size;
	k->phys_next = g->phys_next;
	if (g->phys_next != HEAP_NIL)
		heap->ext[g->phys_next].phys_prev = keep;
	heap_ext_put(heap, gone);
}

int skv_arena_heap_free(struct skv_arena_heap *heap, uint64_t offset)
{
	uint64_t slot = heap_lookup(heap, offset);
	if (slot == UINT64_MAX)
		return -EINVAL;
	uint32_t idx = heap->table[slot] - 1;
	heap_table_remove(heap, slot);
	struct heap_extent *e = &heap->ext[idx];
	heap->live--;
	heap->used_granules -= e->size;
	heap->requested_bytes -= e->requested;
	heap->class_live[e->cls]--;
	e->requested = 0;

	uint32_t next = e->phys_next, prev = e->phys_prev;
	if (next != HEAP_NIL && heap->ext[next].is_free) {
		heap_list_remove(heap, next);
		heap_merge(heap, idx, next);
	}
	if (prev != HEAP_NIL && heap->ext[prev].is_free) {
		heap_list_remove(heap, prev);
		heap_merge(heap, prev, idx);
		idx = prev;
	}
	heap_list_insert(heap, idx);
	return 0;
}

void skv_arena_heap_stats(const struct skv_arena_heap *heap, struct skv_arena_heap_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->heap_bytes = heap->granules * HEAP_GRANULE;
	out->used_bytes = heap->used_granules * HEAP_GRANULE;
	out->requested_bytes = heap->requested_bytes;
	out->free_bytes = out->heap_bytes - out->used_bytes;
	out->free_extents = heap->free_extents;
	out->live_allocs = heap->live;
	out->failed_allocs = heap->failed;
	for (unsigned c = 0; c < SKV_ARENA_HEAP_CLASSES; c++) {
		out->class_live[c] = heap->class_live[c];
		out->class_free[c] = heap->list_len[c];
	}
	/* The largest extent is in the highest non-empty list. */
	for (unsigned c = SKV_ARENA_HEAP_CLASSES; c-- > 0;) {
		if (!heap->list_len[c])
			continue;
		for (uint32_t i = heap->list_head[c]; i != HEAP_NIL; i = heap->ext[i].list_next)
			if (heap->ext[i].size * HEAP_GRANULE > out->largest_free)
				out->largest_free = heap->ext[i].size * HEAP_GRANULE;
		break;
	}
}

int skv_arena_heap_check(const struct skv_arena_heap *heap, char *msg, size_t msg_len)
{
	uint64_t pos = 0, n_free = 0, n_live = 0, used = 0, requested = 0;
	uint64_t class_live[SKV_ARENA_HEAP_CLASSES] = { 0 };
	uint32_t prev = HEAP_NIL, steps = 0;
	int prev_free = 0;
	for (uint32_t i = heap->first; i != HEAP_NIL; prev = i, i = heap->ext[i].phys_next) {
		const struct heap_extent *e = &heap->ext[i];
		if (++steps > heap->ext_cap || !e->in_use)
			return skv_errorf(msg, msg_len, -EFAULT, "heap: extent chain broken at %u", i);
		if (e->phys_prev != prev || e->start != pos || !e->size)
			return skv_errorf(msg, msg_len, -EFAULT,
					  "heap: extent %u at %" PRIu64 " size %" PRIu64
					  " does not follow %" PRIu64,
					  i, e->start, e->size, pos);
		if (e->is_free && prev_free)
			return skv_errorf(msg, msg_len, -EFAULT,
					  "heap: adjacent free extents at %" PRIu64, e->start);
		if (e->is_free) {
			n_free++;
			if (e->cls != heap_list_of(e->size))
				return skv_errorf(msg, msg_len, -EFAULT,
						  "heap: free extent %u in the wrong list", i);
		} else {
			n_live++;
			used += e->size;
			requested += e->requested;
			class_live[e->cls]++;
			uint64_t slot = heap_table_find(heap, e->start);
			if (slot == UINT64_MAX || heap->table[slot] != i + 1)
				return skv_errorf(msg, msg_len, -EFAULT,
						  "heap: live extent %u missing from the table", i);
			if (e->size < (e->requested + HEAP_GRANULE - 1) / HEAP_GRANULE)
				return skv_errorf(msg, msg_len, -EFAULT,
						  "heap: live extent %u smaller than its request", i);
		}
		prev_free = e->is_free;
		pos += e->size;
	}
	if (pos != heap->granules)
		return skv_errorf(msg, msg_len, -EFAULT,
				  "heap: extents cover %" PRIu64 " of %" PRIu64 " granules", pos,
				  heap->granules);
	if (n_free != heap->free_extents || n_live != heap->live || used != heap->used_granules ||
	    requested != heap->requested_bytes)
		return skv_errorf(msg, msg_len, -EFAULT, "heap: counters disagree with the extents");
	uint64_t listed = 0;
	for (unsigned c = 0; c < SKV_ARENA_HEAP_CLASSES; c++) {
		uint64_t len = 0;
		uint32_t lprev = HEAP_NIL;
		for (uint32_t i = heap->list_head[c]; i != HEAP_NIL; lprev = i,
			      i = heap->ext[i].list_next) {
			const struct heap_extent *e = &heap->ext[i];
			if (!e->is_free || e->cls != c || e->list_prev != lprev || ++len > n_free)
				return skv_errorf(msg, msg_len, -EFAULT, "heap: list %u corrupt", c);
			if (lprev != HEAP_NIL && heap->ext[lprev].start >= e->start)
				return skv_errorf(msg, msg_len, -EFAULT,
						  "heap: list %u not in address order", c);
		}
		int bit = (heap->nonempty[c / 64] >> (c % 64)) & 1;
		if (len != heap->list_len[c] || bit != (len > 0) ||
		    class_live[c] != heap->class_live[c])
			return skv_errorf(msg, msg_len, -EFAULT, "heap: list %u counters", c);
		listed += len;
	}
	if (listed != n_free)
		return skv_errorf(msg, msg_len, -EFAULT, "heap: free extents missing from lists");
	return 0;
}

/* ==== Huge page pool =================================================================== */

static int arena_read_u64(const char *path, uint64_t *out)
{
	FILE *f = fopen(path, "re");
	if (!f)
		return -errno;
	unsigned long long v;
	int n = fscanf(f, "%llu", &v);
	fclose(f);
	if (n != 1)
		return -EINVAL;
	*out = v;
	return 0;
}

static uint64_t arena_default_hugepage(void)
{
	FILE *f = fopen("/proc/meminfo", "re");
	if (!f)
		return 0;
	char line[128];
	unsigned long long kib = 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Hugepagesize: %llu kB", &kib) == 1)
			break;
	fclose(f);
	return (uint64_t)kib * 1024;
}

int skv_hugepages_query(int node_os, struct skv_hugepages *out)
{
	memset(out, 0, sizeof(*out));
	uint64_t page = arena_default_hugepage();
	if (!page)
		return 0;
	char dir[128], path[192];
	snprintf(dir, sizeof(dir), "/sys/kernel/mm/hugepages/hugepages-%llukB",
		 (unsigned long long)(page / 1024));
	uint64_t overcommit = 0, surplus = 0;
	static const char *const names[] = { "nr_hugepages", "free_hugepages", "resv_hugepages",
					     "nr_overcommit_hugepages", "surplus_hugepages" };
	uint64_t *fields[] = { &out->total_pages, &out->free_pages, &out->resv_pages, &overcommit,
			       &surplus };
	for (unsigned i = 0; i < 5; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		int err = arena_read_u64(path, fields[i]);
		if (err < 0)
			return err;
	}
	out->page_bytes = page;
	out->overcommit_pages = overcommit > surplus ? overcommit - surplus : 0;
	out->node_os = -1;
	uint64_t avail = out->free_pages > out->resv_pages ? out->free_pages - out->resv_pages : 0;
	if (node_os >= 0) {
		/* Reservations are global but the pages of a bound arena must come from its node. */
		char node_dir[160];
		snprintf(node_dir, sizeof(node_dir),
			 "/sys/devices/system/node/node%d/hugepages/hugepages-%llukB", node_os,
			 (unsigned long long)(page / 1024));
		snprintf(path, sizeof(path), "%s/nr_hugepages", node_dir);
		int have_total = arena_read_u64(path, &out->node_total_pages) == 0;
		snprintf(path, sizeof(path), "%s/free_hugepages", node_dir);
		if (have_total && arena_read_u64(path, &out->node_free_pages) == 0) {
			out->node_os = node_os;
			if (out->node_free_pages < avail)
				avail = out->node_free_pages;
		}
	}
	out->available_pages = avail + out->overcommit_pages;
	return 0;
}

/* ==== Arena creation =================================================================== */

struct skv_arena {
	int fd;
	void *base;
	uint64_t bytes;
	struct skv_arena_info info;
	struct skv_arena_heap *heap;
};

int skv_huge_mode_parse(const char *text, enum skv_huge_mode *out)
{
	static const char *const names[] = { "auto", "on", "off" };
	for (unsigned i = 0; i < 3; i++) {
		if (!strcmp(text, names[i])) {
			*out = (enum skv_huge_mode)i;
			return 0;
		}
	}
	return -EINVAL;
}

const char *skv_huge_mode_name(enum skv_huge_mode mode)
{
	switch (mode) {
	case SKV_HUGE_AUTO:
		return "auto";
	case SKV_HUGE_ON:
		return "on";
	case SKV_HUGE_OFF:
		return "off";
	}
	return "?";
}

uint64_t skv_arena_instance_id_new(void)
{
	uint64_t id = 0;
	if (getrandom(&id, sizeof(id), 0) != (ssize_t)sizeof(id)) {
		/* No entropy source: still different per start, which is all it must be. */
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		id = ((uint64_t)ts.tv_sec * 1000000007ull) ^ (uint64_t)ts.tv_nsec ^
		     ((uint64_t)getpid() << 40);
		id *= 0x9e3779b97f4a7c15ull;
	}
	return id ? id : 1;
}

static void arena_size_text(uint64_t bytes, char *buf, size_t len)
{
	if (bytes >= (1ull << 30) && !(bytes % (1ull << 30)))
		snprintf(buf, len, "%llu GiB", (unsigned long long)(bytes >> 30));
	else if (bytes >= (1ull << 20) && !(bytes % (1ull << 20)))
		snprintf(buf, len, "%llu MiB", (unsigned long long)(bytes >> 20));
	else
		snprintf(buf, len, "%llu KiB", (unsigned long long)(bytes >> 10));
}

/* The bracketed word of /sys/kernel/mm/transparent_hugepage/shmem_enabled. */
static void arena_shmem_thp(char *buf, size_t len)
{
	snprintf(buf, len, "unknown");
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "re");
	if (!f)
		return;
	char line[256];
	if (fgets(line, sizeof(line), f)) {
		char *open = strchr(line, '['), *close = open ? strchr(open, ']') : NULL;
		if (open && close)
			snprintf(buf, len, "%.*s", (int)(close - open - 1), open + 1);
	}
	fclose(f);
}

/* Fault [addr, addr + len) in for writing. MADV_POPULATE_WRITE (5.14) fails with an error where
 * touching the pages would raise SIGBUS (a hugetlb page that the node cannot supply). */
static int arena_populate(void *addr, size_t len, uint64_t page_bytes)
{
	if (madvise(addr, len, MADV_POPULATE_WRITE) == 0)
		return 0;
	if (errno != EINVAL)
		return -errno;
	/* Older kernel: touch every page. The memory is freshly created and zero. */
	for (size_t off = 0; off < len; off += page_bytes)
		((volatile char *)addr)[off] = 0;
	return 0;
}

static int arena_memfd(const char *name, unsigned huge_flag)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL | huge_flag);
	if (fd < 0 && errno == EINVAL) /* kernel before 6.3: no MFD_NOEXEC_SEAL */
		fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | huge_flag);
	return fd < 0 ? -errno : fd;
}

/* Build the memfd, mapping and binding of one backing. On failure everything made here is
 * undone and arena->fd/base are reset. */
static int arena_make(struct skv_arena *arena, const struct skv_arena_config *cfg,
		      uint32_t backing, uint64_t page_bytes, char *msg, size_t msg_len)
{
	const char *name = cfg->name ? cfg->name : "skv-arena";
	int huge = backing == SKV_ARENA_BACKING_HUGETLB;
	uint64_t bytes = (cfg->bytes + page_bytes - 1) / page_bytes * page_bytes;
	uint32_t flags = 0;
	int err;

	arena->fd = arena_memfd(name, huge ? MFD_HUGETLB : 0);
	if (arena->fd < 0) {
		err = arena->fd;
		arena->fd = -1;
		return skv_errorf(msg, msg_len, err, "arena: memfd_create%s: %s",
				  huge ? " (MFD_HUGETLB)" : "", skv_strerror(err));
	}
	if (ftruncate(arena->fd, (off_t)bytes) < 0) {
		err = -errno;
		skv_errorf(msg, msg_len, err, "arena: cannot size the memfd to %llu bytes: %s",
			   (unsigned long long)bytes, skv_strerror(err));
		goto fail;
	}
	if (fcntl(arena->fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0) {
		err = -errno;
		skv_errorf(msg, msg_len, err, "arena: cannot seal the memfd: %s",
			   skv_strerror(err));
		goto fail;
	}
	arena->base = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_SHARED, arena->fd, 0);
	if (arena->base == MAP_FAILED) {
		err = -errno;
		arena->base = NULL;
		skv_errorf(msg, msg_len, err, "arena: mmap of %llu bytes%s: %s",
			   (unsigned long long)bytes, huge ? " of huge pages" : "",
			   skv_strerror(err));
		goto fail;
	}
	arena->bytes = bytes;
	if (!huge && madvise(arena->base, (size_t)bytes, MADV_HUGEPAGE) == 0)
		flags |= SKV_ARENA_F_THP_ADVISED;

	uint32_t node = SKV_ARENA_NODE_NONE;
	if (cfg->node_os >= 0) {
		node = (uint32_t)cfg->node_os;
		err = skv_topology_bind_memory(cfg->topo, arena->base, (size_t)bytes,
					       (unsigned)cfg->node_os);
		if (err == 0) {
			flags |= SKV_ARENA_F_NODE_BOUND;
		} else if (!(err == -ENOSYS && skv_topology_node_count(cfg->topo) == 1)) {
			/* A kernel without NUMA on a one-node machine needs no binding. */
			skv_errorf(msg, msg_len, err, "arena: cannot bind memory to NUMA node %d: %s",
				   cfg->node_os, skv_strerror(err));
			goto fail;
		}
	}

	int prefault = cfg->prefault || (huge && (flags & SKV_ARENA_F_NODE_BOUND));
	err = arena_populate(arena->base, prefault ? (size_t)bytes : (size_t)page_bytes,
			     page_bytes);
	if (err < 0) {
		skv_errorf(msg, msg_len, err, "arena: cannot fault in %s%s: %s",
			   prefault ? "the arena" : "the header page",
			   huge ? " (huge pages on this node)" : "", skv_strerror(err));
		goto fail;
	}
	if (prefault)
		flags |= SKV_ARENA_F_PREFAULTED;

	struct skv_arena_hdr hdr;
	err = skv_arena_hdr_init(&hdr, bytes, page_bytes, backing, flags, node, cfg->instance_id);
	if (err < 0) {
		skv_errorf(msg, msg_len, err, "arena: %llu bytes cannot hold a header and a heap",
			   (unsigned long long)bytes);
		goto fail;
	}
	memcpy(arena->base, &hdr, sizeof(hdr));

	arena->info.backing = backing;
	arena->info.flags = flags;
	arena->info.bytes = bytes;
	arena->info.page_bytes = page_bytes;
	arena->info.node_os = node == SKV_ARENA_NODE_NONE ? -1 : (int)node;
	arena->info.instance_id = cfg->instance_id;
	return 0;
fail:
	if (arena->base)
		munmap(arena->base, (size_t)bytes);
	arena->base = NULL;
	arena->bytes = 0;
	close(arena->fd);
	arena->fd = -1;
	return err;
}

static void arena_describe(struct skv_arena *arena, const char *fallback_reason)
{
	struct skv_arena_info *info = &arena->info;
	char page[32], size[32], thp[32] = "";
	arena_size_text(info->page_bytes, page, sizeof(page));
	arena_size_text(info->bytes, size, sizeof(size));
	size_t used = 0, len = sizeof(info->backing_desc);
	char *buf = info->backing_desc;
	if (info->backing == SKV_ARENA_BACKING_HUGETLB) {
		used += (size_t)snprintf(buf, len, "hugetlb: %llu pages of %s (%s)",
					 (unsigned long long)(info->bytes / info->page_bytes), page,
					 size);
	} else {
		arena_shmem_thp(thp, sizeof(thp));
		int thp_used = !strcmp(thp, "always") || !strcmp(thp, "within_size") ||
			       !strcmp(thp, "advise") || !strcmp(thp, "force");
		used += (size_t)snprintf(buf, len, "pages: %s pages (%s), THP %s (shmem_enabled=%s)",
					 page, size,
					 !(info->flags & SKV_ARENA_F_THP_ADVISED) ? "not advised"
					 : thp_used ? "advised"
						    : "advised but off for shmem",
					 thp);
	}
	if (used < len && info->node_os >= 0)
		used += (size_t)snprintf(buf + used, len - used, ", node %d%s", info->node_os,
					 info->flags & SKV_ARENA_F_NODE_BOUND ? "" : " (unbound)");
	if (used < len && (info->flags & SKV_ARENA_F_PREFAULTED))
		used += (size_t)snprintf(buf + used, len - used, ", prefaulted");
	if (used < len && fallback_reason && fallback_reason[0])
		snprintf(buf + used, len - used, "; %s", fallback_reason);
}

int skv_arena_new(const struct skv_arena_config *cfg, struct skv_arena **out, char *msg,
		  size_t msg_len)
{
	*out = NULL;
	if (!cfg->bytes || cfg->bytes > SKV_ARENA_HEAP_MAX_BYTES)
		return skv_errorf(msg, msg_len, -EINVAL,
				  "arena: size %llu bytes is out of range (1 byte to 256 TiB)",
				  (unsigned long long)cfg->bytes);
	if (cfg->huge != SKV_HUGE_AUTO && cfg->huge != SKV_HUGE_ON && cfg->huge != SKV_HUGE_OFF)
		return skv_errorf(msg, msg_len, -EINVAL, "arena: unknown huge page mode %d",
				  (int)cfg->huge);
	if (cfg->node_os >= 0) {
		if (!cfg->topo || !skv_topology_is_this_system(cfg->topo))
			return skv_errorf(msg, msg_len, -EINVAL,
					  "arena: binding to node %d needs this machine's topology",
					  cfg->node_os);
		if (!skv_topology_node_by_os(cfg->topo, (unsigned)cfg->node_os))
			return skv_errorf(msg, msg_len, -EINVAL,
					  "arena: NUMA node %d does not exist", cfg->node_os);
	}

	struct skv_arena *arena = calloc(1, sizeof(*arena));
	if (!arena)
		return skv_errorf(msg, msg_len, -ENOMEM, "arena: out of memory");
	arena->fd = -1;
	struct skv_arena_config local = *cfg;
	if (!local.instance_id)
		local.instance_id = skv_arena_instance_id_new();

	struct skv_hugepages hp = { 0 };
	char reason[400] = "";
	int err = cfg->huge == SKV_HUGE_OFF ? 0 : skv_hugepages_query(cfg->node_os, &hp);
	if (err < 0) {
		skv_errorf(reason, sizeof(reason), err, "huge pages: cannot read the pool: %s",
			   skv_strerror(err));
		hp.page_bytes = 0;
	}
	int try_huge = 0;
	if (cfg->huge == SKV_HUGE_OFF) {
		snprintf(reason, sizeof(reason), "huge pages off");
	} else if (!hp.page_bytes) {
		if (!reason[0])
			snprintf(reason, sizeof(reason), "this kernel has no huge page support");
	} else {
		uint64_t need = (cfg->bytes + hp.page_bytes - 1) / hp.page_bytes;
		char page[32];
		arena_size_text(hp.page_bytes, page, sizeof(page));
		try_huge = hp.available_pages >= need;
		if (!try_huge) {
			/* Name the pool to grow and its new size: its size plus the shortfall. On
			 * a node, the node's own pool (the global one spreads over all nodes). */
			uint64_t short_by = need - hp.available_pages;
			char where[128], on_node[24] = "";
			if (hp.node_os >= 0)
				snprintf(on_node, sizeof(on_node), " on node %d", hp.node_os);
			if (hp.node_os >= 0)
				snprintf(where, sizeof(where),
					 "/sys/devices/system/node/node%d/hugepages/"
					 "hugepages-%llukB/nr_hugepages",
					 hp.node_os, (unsigned long long)(hp.page_bytes / 1024));
			else
				snprintf(where, sizeof(where), "/proc/sys/vm/nr_hugepages");
			snprintf(reason, sizeof(reason),
				 "%s huge pages reserved: %llu free of size %s%s, need %llu; reserve "
				 "them with `echo %llu > %s`",
				 hp.available_pages ? "not enough" : "no",
				 (unsigned long long)hp.available_pages, page,
				 on_node, (unsigned long long)need,
				 (unsigned long long)((hp.node_os >= 0 ? hp.node_total_pages
									: hp.total_pages) +
						      short_by),
				 where);
		}
	}
	if (cfg->huge == SKV_HUGE_ON && !try_huge) {
		err = skv_errorf(msg, msg_len, -ENOMEM, "arena (--huge on): %s", reason);
		goto fail;
	}

	if (try_huge) {
		char huge_msg[256] = "";
		err = arena_make(arena, &local, SKV_ARENA_BACKING_HUGETLB, hp.page_bytes, huge_msg,
				 sizeof(huge_msg));
		if (err < 0 && cfg->huge == SKV_HUGE_ON) {
			skv_errorf(msg, msg_len, err, "%s", huge_msg);
			goto fail;
		}
		if (err < 0) /* auto: the pool changed under us, or the node had too few */
			snprintf(reason, sizeof(reason), "huge pages failed: %.130s", huge_msg);
		else
			reason[0] = '\0';
	}
	if (!try_huge || err < 0) {
		err = arena_make(arena, &local, SKV_ARENA_BACKING_PAGES,
				 (uint64_t)sysconf(_SC_PAGESIZE), msg, msg_len);
		if (err < 0)
			goto fail;
	}

	const struct skv_arena_hdr *hdr = arena->base;
	err = skv_arena_heap_new(hdr->table[SKV_ARENA_TABLE_HEAP].offset,
				 hdr->table[SKV_ARENA_TABLE_HEAP].bytes, &arena->heap);
	if (err < 0) {
		skv_errorf(msg, msg_len, err, "arena: cannot create its allocator: %s",
			   skv_strerror(err));
		goto fail;
	}
	arena_describe(arena, reason);
	*out = arena;
	return 0;
fail:
	skv_arena_destroy(arena);
	return err;
}

void skv_arena_destroy(struct skv_arena *arena)
{
	if (!arena)
		return;
	skv_arena_heap_destroy(arena->heap);
	if (arena->base)
		munmap(arena->base, (size_t)arena->bytes);
	if (arena->fd >= 0)
		close(arena->fd);
	free(arena);
}

int skv_arena_fd(const struct skv_arena *arena)
{
	return arena->fd;
}

void *skv_arena_base(const struct skv_arena *arena)
{
	return arena->base;
}

const struct skv_arena_info *skv_arena_info(const struct skv_arena *arena)
{
	return &arena->info;
}

struct skv_arena_heap *skv_arena_heap(struct skv_arena *arena)
{
	return arena->heap;
}

int64_t skv_arena_alloc(struct skv_arena *arena, uint64_t bytes)
{
	return skv_arena_heap_alloc(arena->heap, bytes);
}

int skv_arena_free(struct skv_arena *arena, uint64_t offset)
{
	return skv_arena_heap_free(arena->heap, offset);
}
