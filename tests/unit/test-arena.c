/* KV arenas: the shared header and its validation (shm/arena.c), the daemon's arena over a
 * sealed memfd and its allocator (cached/arena.c). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* cached/arena.h and shm/arena.h share a name: take the daemon's by path (it includes the
 * shared one the same way). */
#include "../../cached/arena.h"
#include "skv-error.h"
#include "topology.h"

#define KIB (1ull << 10)
#define MIB (1ull << 20)
#define GIB (1ull << 30)

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *state)
{
	/* splitmix64: a fixed seed gives the same run everywhere */
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* KV-region-like sizes, log-uniform within octaves: 60% 4 KiB-256 KiB, 30% 256 KiB-16 MiB,
 * 10% 16 MiB-256 MiB; not multiples of anything. */
static uint64_t rand_region_bytes(uint64_t *rng)
{
	uint64_t r = rng_next(rng) % 100;
	unsigned lo = r < 60 ? 12 : r < 90 ? 18 : 24, hi = r < 60 ? 18 : r < 90 ? 24 : 28;
	unsigned k = lo + (unsigned)(rng_next(rng) % (hi - lo));
	return (1ull << k) + rng_next(rng) % (1ull << k);
}

/* Shadow of the live allocations: a tree whose comparator calls overlapping spans equal, so
 * inserting a span that overlaps a live one finds that one instead. */
struct span {
	uint64_t offset;
	uint64_t end;
};

static int span_cmp(const void *a, const void *b)
{
	const struct span *x = a, *y = b;
	if (x->end <= y->offset)
		return -1;
	if (y->end <= x->offset)
		return 1;
	return 0;
}

struct shadow {
	void *tree;
	struct span **live; /* for picking a random live allocation */
	size_t n_live, cap;
	uint64_t requested;
};

static void shadow_add(struct shadow *sh, uint64_t offset, uint64_t bytes)
{
	struct span *s = malloc(sizeof(*s));
	cr_assert_not_null(s);
	*s = (struct span){ offset, offset + bytes };
	struct span **found = tsearch(s, &sh->tree, span_cmp);
	cr_assert_not_null(found);
	cr_assert_eq(*found, s, "allocation [%llu, %llu) overlaps live [%llu, %llu)",
		     (unsigned long long)s->offset, (unsigned long long)s->end,
		     (unsigned long long)(*found)->offset, (unsigned long long)(*found)->end);
	if (sh->n_live == sh->cap) {
		sh->cap = sh->cap ? sh->cap * 2 : 1024;
		sh->live = realloc(sh->live, sh->cap * sizeof(*sh->live));
		cr_assert_not_null(sh->live);
	}
	sh->live[sh->n_live++] = s;
	sh->requested += bytes;
}

/* Remove live allocation i (swap with the last); returns its offset. */
static uint64_t shadow_take(struct shadow *sh, size_t i)
{
	struct span *s = sh->live[i];
	sh->live[i] = sh->live[--sh->n_live];
	cr_assert_not_null(tdelete(s, &sh->tree, span_cmp));
	uint64_t offset = s->offset;
	sh->requested -= s->end - s->offset;
	free(s);
	return offset;
}

static void shadow_free_all(struct shadow *sh)
{
	tdestroy(sh->tree, free);
	free(sh->live);
	memset(sh, 0, sizeof(*sh));
}

static struct skv_arena_heap *heap_new(uint64_t offset, uint64_t bytes)
{
	struct skv_arena_heap *heap = NULL;
	cr_assert_eq(skv_arena_heap_new(offset, bytes, &heap), 0);
	cr_assert_not_null(heap);
	return heap;
}

static void heap_assert_ok(const struct skv_arena_heap *heap)
{
	char msg[256] = "";
	cr_assert_eq(skv_arena_heap_check(heap, msg, sizeof(msg)), 0, "%s", msg);
}

static void heap_assert_empty(const struct skv_arena_heap *heap)
{
	struct skv_arena_heap_stats st;
	heap_assert_ok(heap);
	skv_arena_heap_stats(heap, &st);
	cr_assert_eq(st.live_allocs, 0);
	cr_assert_eq(st.used_bytes, 0);
	cr_assert_eq(st.requested_bytes, 0);
	cr_assert_eq(st.free_extents, 1, "%llu free extents left: fragmentation leaked",
		     (unsigned long long)st.free_extents);
	cr_assert_eq(st.largest_free, st.heap_bytes);
}

/* Allocate, check alignment, bounds and overlap, and record in the shadow. */
static int heap_alloc_checked(struct skv_arena_heap *heap, struct shadow *sh, uint64_t base,
			      uint64_t heap_bytes, uint64_t bytes)
{
	int64_t off = skv_arena_heap_alloc(heap, bytes);
	if (off == -ENOMEM)
		return -ENOMEM;
	cr_assert_geq(off, 0, "alloc(%llu): %lld", (unsigned long long)bytes, (long long)off);
	cr_assert_eq((uint64_t)off % SKV_ARENA_ALIGN, 0);
	cr_assert_geq((uint64_t)off, base);
	cr_assert_leq((uint64_t)off + bytes, base + heap_bytes);
	uint64_t got = skv_arena_heap_size_of(heap, (uint64_t)off);
	cr_assert_geq(got, bytes);
	shadow_add(sh, (uint64_t)off, got);
	return 0;
}

/* ---- header ----------------------------------------------------------------------------- */

Test(arena_hdr, init_and_check)
{
	struct skv_arena_hdr hdr;
	cr_assert_eq(skv_arena_hdr_init(&hdr, 64 * MIB, 4096, SKV_ARENA_BACKING_PAGES,
					SKV_ARENA_F_THP_ADVISED, SKV_ARENA_NODE_NONE, 42),
		     0);
	cr_assert_eq(hdr.magic, SKV_ARENA_MAGIC);
	cr_assert_eq(hdr.header_bytes, sizeof(hdr));
	cr_assert_eq(hdr.instance_id, 42);
	cr_assert_eq(hdr.table[SKV_ARENA_TABLE_HEAP].offset, SKV_ARENA_HEADER_BLOCK);
	cr_assert_eq(hdr.table[SKV_ARENA_TABLE_HEAP].bytes, 64 * MIB - SKV_ARENA_HEADER_BLOCK);
	cr_assert_eq(hdr.table[SKV_ARENA_TABLE_STREAMS].bytes, 0);
	struct skv_arena_file file = { .bytes = 64 * MIB, .page_bytes = 4096, .sealed = 1 };
	char msg[256] = "";
	cr_assert_eq(skv_arena_hdr_check(&hdr, &file, msg, sizeof(msg)), 0, "%s", msg);

	/* Impossible arenas are refused at creation. */
	cr_assert_eq(skv_arena_hdr_init(&hdr, 4096, 4096, SKV_ARENA_BACKING_PAGES, 0, 0, 1),
		     -EINVAL);
	cr_assert_eq(skv_arena_hdr_init(&hdr, 3 * MIB, 2 * MIB, SKV_ARENA_BACKING_HUGETLB, 0, 0, 1),
		     -EINVAL);
	cr_assert_eq(skv_arena_hdr_init(&hdr, 8192, 3000, SKV_ARENA_BACKING_PAGES, 0, 0, 1),
		     -EINVAL);
	cr_assert_eq(skv_arena_hdr_init(&hdr, 8192, 4096, 9, 0, 0, 1), -EINVAL);
	cr_assert_eq(skv_arena_hdr_init(&hdr, 8192, 4096, SKV_ARENA_BACKING_PAGES, 0x100, 0, 1),
		     -EINVAL);
}

/* ---- size classes ------------------------------------------------------------------------ */

Test(arena_heap, size_classes)
{
	uint64_t prev = 0;
	for (unsigned c = 0; c < SKV_ARENA_HEAP_CLASSES; c++) {
		uint64_t bytes = skv_arena_class_bytes(c);
		cr_assert_gt(bytes, prev, "class %u not above class %u", c, c - 1);
		cr_assert_eq(bytes % SKV_ARENA_ALIGN, 0);
		cr_assert_eq(skv_arena_class_of(bytes), c);
		if (bytes < SKV_ARENA_HEAP_MAX_BYTES)
			cr_assert_eq(skv_arena_class_of(bytes + 1), c + 1);
		/* 4 classes per power of two above 256 bytes */
		if (bytes > 256 && c >= 4)
			cr_assert_eq(skv_arena_class_bytes(c + 4 < SKV_ARENA_HEAP_CLASSES ? c + 4 : c) ==
					     (c + 4 < SKV_ARENA_HEAP_CLASSES ? bytes * 2 : bytes),
				     1, "class %u", c);
		prev = bytes;
	}
	cr_assert_eq(skv_arena_class_bytes(SKV_ARENA_HEAP_CLASSES - 1), SKV_ARENA_HEAP_MAX_BYTES);
	cr_assert_eq(skv_arena_class_bytes(SKV_ARENA_HEAP_CLASSES), 0);
	cr_assert_eq(skv_arena_class_of(0), SKV_ARENA_HEAP_CLASSES);
	cr_assert_eq(skv_arena_class_of(SKV_ARENA_HEAP_MAX_BYTES + 1), SKV_ARENA_HEAP_CLASSES);

	/* Internal waste stays under 20% of what is handed out (one granule for tiny sizes). */
	uint64_t rng = 7;
	for (int i = 0; i < 1000000; i++) {
		uint64_t bytes = 1 + rng_next(&rng) % (1ull << (1 + rng_next(&rng) % 40));
		uint64_t got = skv_arena_class_bytes(skv_arena_class_of(bytes));
		cr_assert_geq(got, bytes);
		if (got > 256)
			cr_assert_lt((double)(got - bytes), 0.2 * (double)got,
				     "%llu bytes -> class of %llu", (unsigned long long)bytes,
				     (unsigned long long)got);
		else
			cr_assert_lt(got - bytes, SKV_ARENA_ALIGN);
	}
}

/* ---- allocator ------------------------------------------------------------------------- */

Test(arena_heap, basics)
{
	const uint64_t base = SKV_ARENA_HEADER_BLOCK;
	struct skv_arena_heap *heap = NULL;
	cr_assert_eq(skv_arena_heap_new(base + 1, 64 * MIB, &heap), -EINVAL);
	cr_assert_eq(skv_arena_heap_new(base, 64 * MIB + 1, &heap), -EINVAL);
	cr_assert_eq(skv_arena_heap_new(base, 0, &heap), -EINVAL);
	cr_assert_null(heap);
	heap = heap_new(base, 64 * MIB);
	heap_assert_empty(heap);

	cr_assert_eq(skv_arena_heap_alloc(heap, 0), -EINVAL);
	int64_t a = skv_arena_heap_alloc(heap, 1);
	cr_assert_eq(a, (int64_t)base, "the first region starts the heap");
	int64_t b = skv_arena_heap_alloc(heap, 5000);
	cr_assert_eq(b, a + 64);
	cr_assert_eq(skv_arena_heap_size_of(heap, (uint64_t)b), skv_arena_class_bytes(
									 skv_arena_class_of(5000)));
	struct skv_arena_heap_stats st;
	skv_arena_heap_stats(heap, &st);
	cr_assert_eq(st.live_allocs, 2);
	cr_assert_eq(st.requested_bytes, 5001);
	cr_assert_eq(st.class_live[skv_arena_class_of(5000)], 1);
	cr_assert_eq(st.class_live[0], 1);

	/* Not an allocation: misaligned, inside one, outside the heap, twice. */
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)b + 1), -EINVAL);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)b + 64), -EINVAL);
	cr_assert_eq(skv_arena_heap_free(heap, 0), -EINVAL);
	cr_assert_eq(skv_arena_heap_free(heap, base + 128 * MIB), -EINVAL);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)a), 0);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)a), -EINVAL);
	cr_assert_eq(skv_arena_heap_size_of(heap, (uint64_t)a), 0);
	heap_assert_ok(heap);

	/* A freed region is reused whole by the next request of its class. */
	cr_assert_eq(skv_arena_heap_alloc(heap, 64), a, "the lowest fitting extent is taken");
	int64_t c = skv_arena_heap_alloc(heap, 4097);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)b), 0);
	int64_t d = skv_arena_heap_alloc(heap, 4500);
	cr_assert_eq(d, b);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)c), 0);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)d), 0);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)a), 0);
	heap_assert_empty(heap);
	skv_arena_heap_destroy(heap);
	skv_arena_heap_destroy(NULL);
}

Test(arena_heap, exhaustion)
{
	const uint64_t base = SKV_ARENA_HEADER_BLOCK;
	struct skv_arena_heap *heap = heap_new(base, 64 * MIB);
	struct skv_arena_heap_stats before, after;
	int64_t offs[64];
	for (int i = 0; i < 64; i++) {
		offs[i] = skv_arena_heap_alloc(heap, MIB);
		cr_assert_eq(offs[i], (int64_t)(base + (uint64_t)i * MIB));
	}
	skv_arena_heap_stats(heap, &before);
	cr_assert_eq(before.free_bytes, 0);
	cr_assert_eq(before.largest_free, 0);
	cr_assert_eq(skv_arena_heap_alloc(heap, 1), -ENOMEM);
	cr_assert_eq(skv_arena_heap_alloc(heap, 65 * MIB), -ENOMEM);
	skv_arena_heap_stats(heap, &after);
	cr_assert_eq(after.failed_allocs, 2);
	after.failed_allocs = before.failed_allocs;
	cr_assert_eq(memcmp(&before, &after, sizeof(before)), 0, "a failed alloc changed the heap");
	heap_assert_ok(heap);

	/* Every other MiB free: 32 MiB free but no 2 MiB extent. */
	for (int i = 0; i < 64; i += 2)
		cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)offs[i]), 0);
	skv_arena_heap_stats(heap, &after);
	cr_assert_eq(after.free_bytes, 32 * MIB);
	cr_assert_eq(after.largest_free, MIB);
	cr_assert_eq(after.free_extents, 32);
	cr_assert_eq(skv_arena_heap_alloc(heap, MIB + 1), -ENOMEM);
	for (int i = 1; i < 64; i += 2)
		cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)offs[i]), 0);
	heap_assert_empty(heap);
	skv_arena_heap_destroy(heap);

	/* Nearly the whole heap in one region: its class (64 MiB) does not fit a 63 MiB heap,
	 * the request itself does. */
	heap = heap_new(base, 63 * MIB);
	int64_t big = skv_arena_heap_alloc(heap, 60 * MIB);
	cr_assert_eq(big, (int64_t)base);
	cr_assert_eq(skv_arena_heap_size_of(heap, (uint64_t)big), 60 * MIB);
	cr_assert_eq(skv_arena_heap_alloc(heap, 3 * MIB + 1), -ENOMEM);
	int64_t rest = skv_arena_heap_alloc(heap, 3 * MIB);
	cr_assert_eq(rest, (int64_t)(base + 60 * MIB));
	skv_arena_heap_stats(heap, &after);
	cr_assert_eq(after.free_bytes, 0);
	heap_assert_ok(heap);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)big), 0);
	cr_assert_eq(skv_arena_heap_free(heap, (uint64_t)rest), 0);
	heap_assert_empty(heap);
	skv_arena_heap_destroy(heap);
}

/* Millions of random allocations and frees with occupancy swinging between nearly empty and
 * nearly full; then everything freed must leave one extent. */
Test(arena_heap, churn_then_empty, .timeout = 300)
{
	const uint64_t base = SKV_ARENA_HEADER_BLOCK, heap_bytes = 8 * GIB;
	struct skv_arena_heap *heap = heap_new(base, heap_bytes);
	struct shadow sh = { 0 };
	uint64_t rng = 0x5eed;
	uint64_t ops = 0, nomem = 0;
	double target = 0.9;
	while (ops < 3000000) {
		struct skv_arena_heap_stats st;
		if (ops % 200000 == 0) {
			heap_assert_ok(heap);
			target = 0.1 + 0.85 * (double)(rng_next(&rng) % 1000) / 1000.0;
		}
		uint64_t occupancy_pm = sh.requested * 1000 / heap_bytes;
		int want_alloc = sh.n_live == 0 ||
				 (rng_next(&rng) % 1000) < (occupancy_pm < target * 1000 ? 700 : 300);
		if (want_alloc) {
			if (heap_alloc_checked(heap, &sh, base, heap_bytes,
					       rand_region_bytes(&rng)) < 0)
				nomem++;
		} else {
			uint64_t off = shadow_take(&sh, rng_next(&rng) % sh.n_live);
			cr_assert_eq(skv_arena_heap_free(heap, off), 0);
		}
		ops++;
		if (ops % 500000 == 0) {
			skv_arena_heap_stats(heap, &st);
			cr_assert_eq(st.live_allocs, sh.n_live);
			cr_assert_eq(st.used_bytes, sh.requested);
		}
	}
	heap_assert_ok(heap);
	while (sh.n_live) {
		uint64_t off = shadow_take(&sh, rng_next(&rng) % sh.n_live);
		cr_assert_eq(skv_arena_heap_free(heap, off), 0);
	}
	heap_assert_empty(heap);
	cr_assert_lt(nomem, ops / 10, "%llu of %llu operations found no room",
		     (unsigned long long)nomem, (unsigned long long)ops);
	shadow_free_all(&sh);
	skv_arena_heap_destroy(heap);
}

/* A long steady state at ~75% occupancy: the largest free extent must not shrink over time. */
Test(arena_heap, steady_state_fragmentation, .timeout = 300)
{
	const uint64_t base = SKV_ARENA_HEADER_BLOCK, heap_bytes = 16 * GIB;
	const uint64_t target = heap_bytes / 4 * 3;
	enum { WARMUP = 200000, OPS = 3000000, CHECK_EVERY = 25000 };
	enum { N_CHECKS = (OPS - WARMUP) / CHECK_EVERY };
	static uint64_t largest[N_CHECKS], free_bytes[N_CHECKS];
	struct skv_arena_heap *heap = heap_new(base, heap_bytes);
	struct shadow sh = { 0 };
	uint64_t rng = 0xfeed;
	unsigned n_checks = 0;
	uint64_t nomem = 0, allocs = 0;
	for (uint64_t op = 1; op <= OPS; op++) {
		if (sh.n_live == 0 || sh.requested < target) {
			allocs++;
			if (heap_alloc_checked(heap, &sh, base, heap_bytes,
					       rand_region_bytes(&rng)) < 0)
				nomem++;
		} else {
			uint64_t off = shadow_take(&sh, rng_next(&rng) % sh.n_live);
			cr_assert_eq(skv_arena_heap_free(heap, off), 0);
		}
		if (op > WARMUP && (op - WARMUP) % CHECK_EVERY == 0 && n_checks < N_CHECKS) {
			struct skv_arena_heap_stats st;
			skv_arena_heap_stats(heap, &st);
			largest[n_checks] = st.largest_free;
			free_bytes[n_checks] = st.free_bytes;
			n_checks++;
		}
	}
	heap_assert_ok(heap);
	cr_assert_eq(n_checks, N_CHECKS);

	/* Bounds: at every checkpoint the largest free extent can serve the largest request
	 * (256 MiB); on average it holds a quarter of the free space (it swings between about
	 * 10% and 50% as regions come and go); and the last quarter of the run is no worse than
	 * the first (no slow decay). With LIFO free lists instead of address order, this
	 * workload's mean largest extent drops by about 40% and allocations start failing. */
	double first = 0, last = 0, sum_largest = 0, sum_free = 0;
	for (unsigned i = 0; i < N_CHECKS; i++) {
		cr_assert_geq(largest[i], 256 * MIB,
			      "checkpoint %u: largest free extent %llu MiB of %llu MiB free", i,
			      (unsigned long long)(largest[i] / MIB),
			      (unsigned long long)(free_bytes[i] / MIB));
		sum_largest += (double)largest[i];
		sum_free += (double)free_bytes[i];
		if (i < N_CHECKS / 4)
			first += (double)largest[i];
		if (i >= N_CHECKS - N_CHECKS / 4)
			last += (double)largest[i];
	}
	cr_assert_geq(sum_largest * 4, sum_free,
		      "the largest free extent averages %.0f MiB of %.0f MiB free",
		      sum_largest / N_CHECKS / MIB, sum_free / N_CHECKS / MIB);
	cr_assert_geq(last, first * 0.8, "largest free extent decays: %.0f MiB -> %.0f MiB",
		      first / (N_CHECKS / 4) / MIB, last / (N_CHECKS / 4) / MIB);
	cr_assert_lt(nomem, allocs / 100, "%llu of %llu allocations found no room",
		     (unsigned long long)nomem, (unsigned long long)allocs);

	while (sh.n_live)
		cr_assert_eq(skv_arena_heap_free(heap, shadow_take(&sh, sh.n_live - 1)), 0);
	heap_assert_empty(heap);
	shadow_free_all(&sh);
	skv_arena_heap_destroy(heap);
}

/* ---- real arenas ------------------------------------------------------------------------ */

/* A forked child reports a failed check through shared memory and its exit status; the parent
 * asserts (Criterion's asserts belong to the test process). */
struct child_report {
	char msg[1024];
};

static struct child_report *child_report_new(void)
{
	struct child_report *r = mmap(NULL, sizeof(*r), PROT_READ | PROT_WRITE,
				      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cr_assert_neq(r, MAP_FAILED);
	memset(r, 0, sizeof(*r));
	return r;
}

#define CHILD_CHECK(report, cond, ...)                                                      \
	do {                                                                                \
		if (!(cond)) {                                                              \
			int n_ = snprintf((report)->msg, sizeof((report)->msg), "line %d: ",   \
					  __LINE__);                                        \
			snprintf((report)->msg + n_, sizeof((report)->msg) - (size_t)n_,       \
				 __VA_ARGS__);                                              \
			_exit(1);                                                           \
		}                                                                           \
	} while (0)

/* Run body(ctx, report) in a child; returns its wait status. */
static int run_child(void (*body)(void *, struct child_report *), void *ctx,
		     struct child_report *report)
{
	fflush(NULL);
	pid_t pid = fork();
	if (pid == 0) {
		body(ctx, report);
		_exit(0);
	}
	if (pid < 0)
		return -1;
	int status = 0;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return status;
}

static void assert_child_ok(int status, const struct child_report *report)
{
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child failed (status 0x%x): %s",
		  status, report->msg[0] ? report->msg : "no message (crashed?)");
}

static struct skv_arena *arena_new_checked(const struct skv_arena_config *cfg)
{
	struct skv_arena *arena = NULL;
	char msg[512] = "";
	int err = skv_arena_new(cfg, &arena, msg, sizeof(msg));
	cr_assert_eq(err, 0, "skv_arena_new: %s (%s)", msg, skv_strerror(err));
	cr_assert_not_null(arena);
	return arena;
}

struct shared_ctx {
	int fd;
	uint64_t instance_id;
	uint64_t arena_bytes;
	uint32_t backing;
	int64_t parent_region; /* holds a pattern the parent wrote */
	int64_t child_region;  /* the child writes a pattern here */
};

/* What an engine does with an arena fd it was handed. */
static void child_maps_arena(void *arg, struct child_report *report)
{
	const struct shared_ctx *ctx = arg;
	struct skv_arena_view view;
	char msg[256] = "";
	int err = skv_arena_map_fd(ctx->fd, &view, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "map_fd: %s", msg);
	CHILD_CHECK(report, view.hdr.instance_id == ctx->instance_id, "instance id differs");
	CHILD_CHECK(report, view.hdr.arena_bytes == ctx->arena_bytes && view.bytes == ctx->arena_bytes,
		    "size differs");
	CHILD_CHECK(report, view.hdr.backing == ctx->backing, "backing differs");
	const uint32_t *in = skv_arena_at(&view, (uint64_t)ctx->parent_region, 4096);
	CHILD_CHECK(report, in != NULL, "parent region outside the view");
	for (unsigned i = 0; i < 1024; i++)
		CHILD_CHECK(report, in[i] == 0xabc00000u + i, "parent's word %u is 0x%x", i, in[i]);
	uint32_t *out = skv_arena_at(&view, (uint64_t)ctx->child_region, 4096);
	CHILD_CHECK(report, out != NULL, "child region outside the view");
	for (unsigned i = 0; i < 1024; i++)
		out[i] = 0xc41d0000u + i;
	CHILD_CHECK(report, skv_arena_at(&view, view.bytes - 8, 16) == NULL, "bounds not checked");
	CHILD_CHECK(report, skv_arena_at(&view, UINT64_MAX - 4, 8) == NULL, "overflow not checked");
	skv_arena_unmap(&view);
	CHILD_CHECK(report, view.base == NULL, "unmap left a base");
}

static void check_sealed(int fd, uint64_t bytes, uint64_t page_bytes)
{
	int seals = fcntl(fd, F_GET_SEALS);
	cr_assert_geq(seals, 0);
	cr_assert_eq(seals & (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL),
		     F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL, "seals 0x%x", seals);
	cr_assert_eq(seals & F_SEAL_WRITE, 0, "engines must be able to write");
	cr_assert_eq(ftruncate(fd, (off_t)(bytes + page_bytes)), -1);
	cr_assert_eq(errno, EPERM, "grow: %s", strerror(errno));
	cr_assert_eq(ftruncate(fd, (off_t)(bytes - page_bytes)), -1);
	cr_assert_eq(errno, EPERM, "shrink: %s", strerror(errno));
	cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1, "F_SEAL_SEAL stops more seals");
	cr_assert_neq(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0);
	struct stat st;
	cr_assert_eq(fstat(fd, &st), 0);
	cr_assert_eq((uint64_t)st.st_size, bytes);
}

/* Share an arena with a forked child: it validates the header, reads what the parent wrote and
 * writes back what the parent then sees. */
static void share_with_child(struct skv_arena *arena)
{
	const struct skv_arena_info *info = skv_arena_info(arena);
	struct shared_ctx ctx = {
		.fd = skv_arena_fd(arena),
		.instance_id = info->instance_id,
		.arena_bytes = info->bytes,
		.backing = info->backing,
	};
	ctx.parent_region = skv_arena_alloc(arena, 4096);
	ctx.child_region = skv_arena_alloc(arena, 4096);
	cr_assert_geq(ctx.parent_region, 0);
	cr_assert_geq(ctx.child_region, 0);
	char *base = skv_arena_base(arena);
	uint32_t *in = (uint32_t *)(base + ctx.parent_region);
	for (unsigned i = 0; i < 1024; i++)
		in[i] = 0xabc00000u + i;
	struct child_report *report = child_report_new();
	assert_child_ok(run_child(child_maps_arena, &ctx, report), report);
	munmap(report, sizeof(*report));
	const uint32_t *out = (const uint32_t *)(base + ctx.child_region);
	for (unsigned i = 0; i < 1024; i++)
		cr_assert_eq(out[i], 0xc41d0000u + i, "the child's write is not visible (word %u)", i);
	cr_assert_eq(skv_arena_free(arena, (uint64_t)ctx.parent_region), 0);
	cr_assert_eq(skv_arena_free(arena, (uint64_t)ctx.child_region), 0);
}

/* The fallback path always runs: ordinary pages, no MFD_HUGETLB. */
Test(arena, pages_backing_shared_and_sealed)
{
	struct skv_arena_config cfg = { .bytes = 8 * MIB + 1, .huge = SKV_HUGE_OFF, .node_os = -1,
					.name = "skv-test-arena-pages" };
	struct skv_arena *arena = arena_new_checked(&cfg);
	const struct skv_arena_info *info = skv_arena_info(arena);
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	cr_assert_eq(info->backing, SKV_ARENA_BACKING_PAGES);
	cr_assert_eq(info->page_bytes, page);
	cr_assert_eq(info->bytes, 8 * MIB + page, "rounded up to whole pages");
	cr_assert_eq(info->node_os, -1);
	cr_assert_neq(info->instance_id, 0);
	cr_assert(strncmp(info->backing_desc, "pages:", 6) == 0, "%s", info->backing_desc);
	cr_assert(strstr(info->backing_desc, "huge pages off"), "%s", info->backing_desc);
	cr_assert(strstr(info->backing_desc, "shmem_enabled="), "%s", info->backing_desc);

	/* The daemon's own header passes the readers' validation. */
	const struct skv_arena_hdr *hdr = skv_arena_base(arena);
	cr_assert_eq(hdr->magic, SKV_ARENA_MAGIC);
	cr_assert_eq(hdr->arena_bytes, info->bytes);
	cr_assert_eq(hdr->backing, SKV_ARENA_BACKING_PAGES);
	cr_assert_eq(hdr->node, SKV_ARENA_NODE_NONE);
	cr_assert_eq(hdr->instance_id, info->instance_id);
	cr_assert_eq(hdr->flags, info->flags);
	struct skv_arena_view view;
	char msg[256] = "";
	cr_assert_eq(skv_arena_map_fd(skv_arena_fd(arena), &view, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(memcmp(&view.hdr, hdr, sizeof(*hdr)), 0);
	skv_arena_unmap(&view);
	skv_arena_unmap(NULL);

	check_sealed(skv_arena_fd(arena), info->bytes, page);
	share_with_child(arena);

	/* The allocator covers exactly the heap extent of the header. */
	struct skv_arena_heap_stats st;
	skv_arena_heap_stats(skv_arena_heap(arena), &st);
	cr_assert_eq(st.heap_bytes, hdr->table[SKV_ARENA_TABLE_HEAP].bytes);
	int64_t all = skv_arena_alloc(arena, st.heap_bytes);
	cr_assert_eq(all, (int64_t)hdr->table[SKV_ARENA_TABLE_HEAP].offset);
	cr_assert_eq(skv_arena_alloc(arena, 64), -ENOMEM);
	cr_assert_eq(skv_arena_free(arena, (uint64_t)all), 0);

	/* Two daemons' arenas carry different instance ids. */
	struct skv_arena *other = arena_new_checked(&cfg);
	cr_assert_neq(skv_arena_info(other)->instance_id, info->instance_id);
	skv_arena_destroy(other);
	skv_arena_destroy(arena);
	skv_arena_destroy(NULL);
}

Test(arena, bad_config)
{
	struct skv_arena *arena = NULL;
	char msg[256] = "";
	struct skv_arena_config cfg = { .bytes = 0, .huge = SKV_HUGE_OFF, .node_os = -1 };
	cr_assert_eq(skv_arena_new(&cfg, &arena, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "size"), "%s", msg);
	cfg.bytes = 4096; /* one page: no room for a heap after the header */
	cr_assert_eq(skv_arena_new(&cfg, &arena, msg, sizeof(msg)), -EINVAL);
	cfg.bytes = MIB;
	cfg.node_os = 0; /* binding without a topology */
	cr_assert_eq(skv_arena_new(&cfg, &arena, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "node 0"), "%s", msg);
	cr_assert_null(arena);

	enum skv_huge_mode mode;
	cr_assert_eq(skv_huge_mode_parse("on", &mode), 0);
	cr_assert_eq(mode, SKV_HUGE_ON);
	cr_assert_eq(skv_huge_mode_parse("auto", &mode), 0);
	cr_assert_eq(mode, SKV_HUGE_AUTO);
	cr_assert_eq(skv_huge_mode_parse("maybe", &mode), -EINVAL);
	cr_assert_str_eq(skv_huge_mode_name(SKV_HUGE_OFF), "off");
}

/* --huge on when the pool cannot hold the arena: refused with the way out in the message. */
Test(arena, huge_on_without_pages)
{
	struct skv_hugepages hp;
	cr_assert_eq(skv_hugepages_query(-1, &hp), 0);
	struct skv_arena_config cfg = { .huge = SKV_HUGE_ON, .node_os = -1 };
	uint64_t page = hp.page_bytes ? hp.page_bytes : 2 * MIB;
	cfg.bytes = (hp.total_pages + hp.available_pages + 1000) * page;
	struct skv_arena *arena = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_arena_new(&cfg, &arena, msg, sizeof(msg)), -ENOMEM);
	cr_assert_null(arena);
	if (hp.page_bytes) {
		cr_assert(strstr(msg, "huge pages reserved: ") && strstr(msg, "free of size") &&
				  strstr(msg, "/proc/sys/vm/nr_hugepages"),
			  "%s", msg);
	} else {
		cr_assert(strstr(msg, "no huge page support"), "%s", msg);
	}
}

/* auto takes huge pages exactly when the pool has enough, and says why when it does not. */
Test(arena, huge_auto_follows_the_pool)
{
	struct skv_hugepages hp;
	cr_assert_eq(skv_hugepages_query(-1, &hp), 0);
	struct skv_arena_config cfg = { .bytes = 4 * MIB, .huge = SKV_HUGE_AUTO, .node_os = -1 };
	struct skv_arena *arena = arena_new_checked(&cfg);
	const struct skv_arena_info *info = skv_arena_info(arena);
	int enough = hp.page_bytes && hp.available_pages * hp.page_bytes >= cfg.bytes;
	struct skv_hugepages again;
	cr_assert_eq(skv_hugepages_query(-1, &again), 0);
	int taken = info->backing == SKV_ARENA_BACKING_HUGETLB ? (int)(info->bytes / hp.page_bytes)
							      : 0;
	if (again.available_pages + (uint64_t)taken != hp.available_pages) {
		skv_arena_destroy(arena);
		cr_skip_test("the huge page pool changed during the test (another process)");
	}
	if (enough) {
		cr_assert_eq(info->backing, SKV_ARENA_BACKING_HUGETLB, "%s", info->backing_desc);
	} else {
		cr_assert_eq(info->backing, SKV_ARENA_BACKING_PAGES);
		cr_assert(strstr(info->backing_desc, hp.page_bytes ? "huge pages reserved: "
								   : "no huge page support"),
			  "%s", info->backing_desc);
	}
	skv_arena_destroy(arena);
}

/* ---- huge pages, reserved by the test when it may ------------------------------------- */

#define NR_HUGEPAGES "/proc/sys/vm/nr_hugepages"

static int read_nr_hugepages(unsigned long long *out)
{
	FILE *f = fopen(NR_HUGEPAGES, "re");
	if (!f)
		return -errno;
	int n = fscanf(f, "%llu", out);
	fclose(f);
	return n == 1 ? 0 : -EINVAL;
}

static int write_nr_hugepages(unsigned long long value)
{
	FILE *f = fopen(NR_HUGEPAGES, "we");
	if (!f)
		return -errno;
	int n = fprintf(f, "%llu\n", value);
	int closed = fclose(f);
	return n > 0 && closed == 0 ? 0 : -EIO;
}

struct huge_ctx {
	int node_os; /* this machine's first node with cores */
};

static void child_huge_arenas(void *arg, struct child_report *report)
{
	const struct huge_ctx *ctx = arg;
	char msg[512] = "";
	struct skv_hugepages hp;
	CHILD_CHECK(report, skv_hugepages_query(-1, &hp) == 0, "query");

	/* on: explicit huge pages, sealed like any arena, shared with a grandchild. */
	struct skv_arena_config cfg = { .bytes = 6 * MIB + 1, .huge = SKV_HUGE_ON, .node_os = -1,
					.name = "skv-test-arena-huge" };
	struct skv_arena *arena = NULL;
	int err = skv_arena_new(&cfg, &arena, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "huge on: %s", msg);
	const struct skv_arena_info *info = skv_arena_info(arena);
	CHILD_CHECK(report, info->backing == SKV_ARENA_BACKING_HUGETLB, "backing %u",
		    info->backing);
	CHILD_CHECK(report, info->page_bytes == hp.page_bytes, "page size");
	CHILD_CHECK(report, info->bytes == 4 * hp.page_bytes || hp.page_bytes != 2 * MIB,
		    "6 MiB + 1 rounds to 4 huge pages, got %llu", (unsigned long long)info->bytes);
	CHILD_CHECK(report, !strncmp(info->backing_desc, "hugetlb:", 8), "%s", info->backing_desc);
	int fd = skv_arena_fd(arena);
	int seals = fcntl(fd, F_GET_SEALS);
	CHILD_CHECK(report, (seals & (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)) ==
				    (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL),
		    "hugetlb seals 0x%x", seals);
	CHILD_CHECK(report, ftruncate(fd, (off_t)(info->bytes + hp.page_bytes)) == -1 &&
				    errno == EPERM,
		    "hugetlb grow not refused: %s", strerror(errno));
	CHILD_CHECK(report, ftruncate(fd, (off_t)(info->bytes - hp.page_bytes)) == -1 &&
				    errno == EPERM,
		    "hugetlb shrink not refused: %s", strerror(errno));
	struct skv_arena_view view;
	err = skv_arena_map_fd(fd, &view, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "map_fd on hugetlb: %s", msg);
	CHILD_CHECK(report, view.hdr.backing == SKV_ARENA_BACKING_HUGETLB &&
				    view.hdr.page_bytes == hp.page_bytes,
		    "hugetlb header");
	/* Two mappings of one hugetlb file see each other's writes. */
	int64_t region = skv_arena_alloc(arena, 3 * MIB);
	CHILD_CHECK(report, region >= 0, "alloc");
	memset((char *)skv_arena_base(arena) + region, 0x5a, 3 * MIB);
	const unsigned char *seen = skv_arena_at(&view, (uint64_t)region, 3 * MIB);
	CHILD_CHECK(report, seen && seen[0] == 0x5a && seen[3 * MIB - 1] == 0x5a, "not shared");
	skv_arena_unmap(&view);
	skv_arena_destroy(arena);

	/* auto with enough pages takes them. */
	cfg.huge = SKV_HUGE_AUTO;
	err = skv_arena_new(&cfg, &arena, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "huge auto: %s", msg);
	CHILD_CHECK(report, skv_arena_info(arena)->backing == SKV_ARENA_BACKING_HUGETLB, "%s",
		    skv_arena_info(arena)->backing_desc);
	skv_arena_destroy(arena);

	/* Bound to a node: prefaulted by the daemon (hugetlb faults do not follow a shared
	 * policy), and still valid for readers. */
	struct skv_topology *topo = NULL;
	CHILD_CHECK(report, skv_topology_new(&topo, msg, sizeof(msg)) == 0, "topology: %s", msg);
	cfg.huge = SKV_HUGE_ON;
	cfg.node_os = ctx->node_os;
	cfg.topo = topo;
	err = skv_arena_new(&cfg, &arena, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "huge on node %d: %s", ctx->node_os, msg);
	info = skv_arena_info(arena);
	CHILD_CHECK(report, info->backing == SKV_ARENA_BACKING_HUGETLB, "backing");
	CHILD_CHECK(report, info->node_os == ctx->node_os, "node");
	if (info->flags & SKV_ARENA_F_NODE_BOUND)
		CHILD_CHECK(report, info->flags & SKV_ARENA_F_PREFAULTED,
			    "node-bound hugetlb arena not prefaulted: %s", info->backing_desc);
	err = skv_arena_map_fd(skv_arena_fd(arena), &view, msg, sizeof(msg));
	CHILD_CHECK(report, err == 0, "map_fd: %s", msg);
	CHILD_CHECK(report, view.hdr.node == (uint32_t)ctx->node_os, "header node");
	skv_arena_unmap(&view);
	skv_arena_destroy(arena);
	skv_topology_destroy(topo);
}

Test(arena, hugetlb_backing)
{
	struct skv_hugepages hp;
	cr_assert_eq(skv_hugepages_query(-1, &hp), 0);
	if (!hp.page_bytes)
		cr_skip_test("the kernel has no hugetlb support (no Hugepagesize in /proc/meminfo)");
	/* The arenas below take at most 4 pages at a time; reserve a margin. */
	const unsigned long long want = 64;
	unsigned long long old = 0;
	int err = read_nr_hugepages(&old);
	if (err < 0)
		cr_skip_test("cannot read %s: %s", NR_HUGEPAGES, strerror(-err));
	int changed = 0;
	if (hp.available_pages < want) {
		if (geteuid() != 0)
			cr_skip_test("%llu huge pages available, the test needs %llu and is not root "
				     "to reserve them (echo %llu > %s)",
				     (unsigned long long)hp.available_pages, want,
				     old + want - hp.available_pages, NR_HUGEPAGES);
		err = write_nr_hugepages(old + want - hp.available_pages);
		if (err < 0)
			cr_skip_test("cannot write %s: %s", NR_HUGEPAGES, strerror(-err));
		changed = 1;
	}

	/* From here on the pool is restored whatever happens: the checks run in a child and the
	 * parent restores before asserting. */
	struct skv_hugepages now;
	int query = skv_hugepages_query(-1, &now);
	struct skv_topology *topo = NULL;
	char msg[256] = "";
	int status = -1, have_pages = query == 0 && now.available_pages >= 8;
	struct child_report *report = child_report_new();
	if (have_pages && skv_topology_new(&topo, msg, sizeof(msg)) == 0) {
		struct huge_ctx ctx = { .node_os = -1 };
		for (unsigned i = 0; i < skv_topology_node_count(topo) && ctx.node_os < 0; i++)
			if (skv_topology_node(topo, i)->n_cores)
				ctx.node_os = (int)skv_topology_node(topo, i)->os_index;
		status = run_child(child_huge_arenas, &ctx, report);
	}
	skv_topology_destroy(topo);
	int restored = changed ? write_nr_hugepages(old) : 0;
	unsigned long long after = 0;
	cr_assert_eq(read_nr_hugepages(&after), 0);

	cr_assert_eq(restored, 0, "could not restore %s to %llu", NR_HUGEPAGES, old);
	cr_assert_eq(after, old, "%s is %llu, was %llu before the test", NR_HUGEPAGES, after, old);
	if (!have_pages)
		cr_skip_test("asked the kernel for %llu huge pages, it reserved only %llu (memory "
			     "too fragmented?)",
			     want, (unsigned long long)now.available_pages);
	cr_assert_neq(status, -1, "topology: %s", msg);
	assert_child_ok(status, report);
	munmap(report, sizeof(*report));
}

/* ---- readers refuse foreign or damaged arenas ----------------------------------------- */

/* A memfd of file_bytes holding hdr at its start, sealed unless told otherwise. */
static int arena_copy(const struct skv_arena_hdr *hdr, uint64_t file_bytes, int seal)
{
	int fd = memfd_create("skv-test-arena-copy", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	cr_assert_geq(fd, 0);
	cr_assert_eq(ftruncate(fd, (off_t)file_bytes), 0);
	size_t n = file_bytes < sizeof(*hdr) ? (size_t)file_bytes : sizeof(*hdr);
	cr_assert_eq(pwrite(fd, hdr, n, 0), (ssize_t)n);
	if (seal)
		cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK), 0);
	return fd;
}

static void expect_refused(const struct skv_arena_hdr *hdr, uint64_t file_bytes, int seal,
			   int expect, const char *needle)
{
	int fd = arena_copy(hdr, file_bytes, seal);
	struct skv_arena_view view;
	char msg[256] = "";
	int err = skv_arena_map_fd(fd, &view, msg, sizeof(msg));
	close(fd);
	cr_assert_eq(err, expect, "expected %s, got %s: %s", skv_strerror(expect),
		     skv_strerror(err), msg);
	cr_assert_null(view.base);
	cr_assert(strstr(msg, needle), "message \"%s\" lacks \"%s\"", msg, needle);
}

Test(arena, readers_refuse_bad_headers)
{
	struct skv_arena_config cfg = { .bytes = MIB, .huge = SKV_HUGE_OFF, .node_os = -1 };
	struct skv_arena *arena = arena_new_checked(&cfg);
	const struct skv_arena_hdr good = *(const struct skv_arena_hdr *)skv_arena_base(arena);
	const uint64_t size = good.arena_bytes;
	skv_arena_destroy(arena);

	/* The unchanged copy is fine. */
	int fd = arena_copy(&good, size, 1);
	struct skv_arena_view view;
	char msg[256] = "";
	cr_assert_eq(skv_arena_map_fd(fd, &view, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(view.hdr.instance_id, good.instance_id);
	skv_arena_unmap(&view);
	close(fd);

	struct skv_arena_hdr bad = good;
	bad.magic ^= 0x20;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "magic");

	bad = good;
	bad.abi_major++;
	expect_refused(&bad, size, 1, -SKV_EVERSION, "ABI 2.0, this build speaks 1.0");

	bad = good;
	bad.features = 0x1;
	expect_refused(&bad, size, 1, -SKV_EVERSION, "features");

	bad = good;
	bad.arena_bytes = size * 2; /* claims more than the fd holds */
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "claims");
	bad.arena_bytes = size - 4096; /* claims less: a shrunk claim is as wrong */
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "claims");
	expect_refused(&good, size / 2, 1, -SKV_ESHAPE, "claims"); /* the file is short */

	bad = good;
	bad.table[SKV_ARENA_TABLE_HEAP].bytes += SKV_ARENA_ALIGN;
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "outside");
	bad = good;
	bad.table[SKV_ARENA_TABLE_HEAP].offset = UINT64_MAX - 63;
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "outside");
	bad = good;
	bad.table[SKV_ARENA_TABLE_HEAP].offset = 0; /* over the header */
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "outside");
	bad = good;
	bad.table[SKV_ARENA_TABLE_HEAP].offset += 8;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "aligned");
	bad = good;
	bad.table[SKV_ARENA_TABLE_HEAP] = (struct skv_arena_extent){ 0, 0 };
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "no heap");
	bad = good;
	bad.table[SKV_ARENA_TABLE_STATS].offset = 8192;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "without bytes");

	bad = good;
	bad.header_bytes = 300;
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "header bytes");
	bad = good;
	bad.page_bytes = 2 * MIB;
	expect_refused(&bad, size, 1, -SKV_ESHAPE, "page size");
	bad = good;
	bad.backing = SKV_ARENA_BACKING_HUGETLB;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "hugetlbfs");
	bad = good;
	bad.backing = 77;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "backing");
	bad = good;
	bad.reserved[4] = 1;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "reserved");
	bad = good;
	bad.flags |= 0x80;
	expect_refused(&bad, size, 1, -SKV_EFORMAT, "flags");

	/* A newer minor may use reserved space and flags: accepted. */
	struct skv_arena_hdr newer = good;
	newer.abi_minor = SKV_ARENA_ABI_MINOR + 1;
	newer.reserved[4] = 1;
	newer.flags |= 0x80;
	newer.table[5] = (struct skv_arena_extent){ 8192, 4096 };
	fd = arena_copy(&newer, size, 1);
	cr_assert_eq(skv_arena_map_fd(fd, &view, msg, sizeof(msg)), 0, "%s", msg);
	skv_arena_unmap(&view);
	close(fd);

	/* A file anyone could resize under the mapping, and one too small for a header. */
	expect_refused(&good, size, 0, -SKV_ESHAPE, "sealed");
	expect_refused(&good, 100, 1, -SKV_ESHAPE, "cannot hold");
	cr_assert_eq(skv_arena_map_fd(-1, &view, msg, sizeof(msg)), -EBADF);
}

/* On this machine's first node: the header names the node and the kernel's policy says BIND. */
Test(arena, node_binding)
{
	struct skv_topology *topo = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_topology_new(&topo, msg, sizeof(msg)), 0, "%s", msg);
	int node = (int)skv_topology_node(topo, 0)->os_index;
	struct skv_arena_config cfg = { .bytes = 4 * MIB, .huge = SKV_HUGE_OFF, .node_os = node,
					.topo = topo, .prefault = 1 };
	struct skv_arena *arena = arena_new_checked(&cfg);
	const struct skv_arena_info *info = skv_arena_info(arena);
	cr_assert_eq(info->node_os, node);
	cr_assert_eq(((const struct skv_arena_hdr *)skv_arena_base(arena))->node, (uint32_t)node);
	cr_assert_neq(info->flags & SKV_ARENA_F_PREFAULTED, 0);
	if (!(info->flags & SKV_ARENA_F_NODE_BOUND)) {
		skv_arena_destroy(arena);
		skv_topology_destroy(topo);
		cr_skip_test("the kernel has no NUMA policy support: arena left unbound (%s)",
			     info->backing_desc);
	}
	hwloc_topology_t hw;
	cr_assert_eq(hwloc_topology_init(&hw), 0);
	cr_assert_eq(hwloc_topology_load(hw), 0);
	hwloc_bitmap_t nodeset = hwloc_bitmap_alloc();
	hwloc_membind_policy_t policy;
	cr_assert_eq(hwloc_get_area_membind(hw, skv_arena_base(arena), (size_t)info->bytes, nodeset,
					    &policy, HWLOC_MEMBIND_BYNODESET),
		     0);
	cr_assert_eq(policy, HWLOC_MEMBIND_BIND);
	cr_assert(hwloc_bitmap_isset(nodeset, (unsigned)node));
	hwloc_bitmap_free(nodeset);
	hwloc_topology_destroy(hw);
	cr_assert(strstr(info->backing_desc, "node"), "%s", info->backing_desc);

	/* A node that does not exist, and a synthetic topology, are refused. */
	struct skv_arena *none = NULL;
	cfg.node_os = 4000;
	cr_assert_eq(skv_arena_new(&cfg, &none, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "4000"), "%s", msg);
	struct skv_topology *synthetic = NULL;
	cr_assert_eq(skv_topology_new_synthetic("pack:2 numa:1 core:1 pu:1", &synthetic, msg,
						sizeof(msg)),
		     0);
	cfg.node_os = 0;
	cfg.topo = synthetic;
	cr_assert_eq(skv_arena_new(&cfg, &none, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "this machine"), "%s", msg);
	skv_topology_destroy(synthetic);
	skv_arena_destroy(arena);
	skv_topology_destroy(topo);
}
