/* The sink-pinned circular KV layout and its ring state. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kv-layout.h"
#include "wake.h"
#include "skv-error.h"

Test(kv_layout, sizes_and_offsets)
{
	struct skv_kv_desc d;
	cr_assert_eq(skv_kv_layout_init(&d, 5, 4, 8, 4, 508), 0);
	cr_assert_eq(d.magic, SKV_KV_MAGIC);
	cr_assert_eq(d.slot_stride, 512);
	cr_assert_eq(d.plane_bytes, 4ull * 8 * 512 * sizeof(float));
	cr_assert_eq(d.planes_offset % SKV_KV_ALIGN, 0);
	cr_assert_eq(d.region_bytes, d.planes_offset + 2 * 5 * d.plane_bytes);
	/* Planes are laid out K0 V0 K1 V1 ... without overlap. */
	char *base = NULL;
	for (uint32_t l = 0; l < 5; l++) {
		char *k = (char *)skv_kv_k_plane(base, &d, l), *v = (char *)skv_kv_v_plane(base, &d, l);
		cr_assert_eq((uint64_t)(v - k), d.plane_bytes);
		cr_assert_leq((uint64_t)(v - base) + d.plane_bytes, d.region_bytes);
	}
	/* Odd slot counts round up to whole vectors. */
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, 1, 16), 0);
	cr_assert_eq(d.slot_stride, 32);
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, 0, 0), -EINVAL);
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, 0, SKV_KV_MAX_SLOTS + 1), -EOVERFLOW);
}

Test(kv_layout, half_precision_halves_the_planes)
{
	struct skv_kv_desc f32, f16;
	char msg[256] = "";
	cr_assert_eq(skv_kv_layout_init(&f32, 5, 4, 8, 4, 508), 0);
	cr_assert_eq(skv_kv_layout_init_dtype(&f16, 5, 4, 8, 4, 508, SKV_KV_DTYPE_F16), 0);
	cr_assert_eq(f16.dtype, SKV_KV_DTYPE_F16);
	cr_assert_eq(f16.slot_stride, f32.slot_stride);
	cr_assert_eq(f16.plane_bytes * 2, f32.plane_bytes);
	cr_assert_eq(f16.planes_offset, f32.planes_offset);
	cr_assert_eq(f16.region_bytes, f16.planes_offset + 2 * 5 * f16.plane_bytes);
	cr_assert_eq(skv_kv_layout_check(&f16, f16.region_bytes, msg, sizeof(msg)), 0, "%s", msg);
	/* A descriptor claiming the other dtype with these sizes is refused. */
	struct skv_kv_desc bad = f16;
	bad.dtype = SKV_KV_DTYPE_F32;
	cr_assert_eq(skv_kv_layout_check(&bad, f16.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad.dtype = 9;
	cr_assert_eq(skv_kv_layout_check(&bad, f16.region_bytes, msg, sizeof(msg)), -SKV_EDTYPE);
	cr_assert_eq(skv_kv_layout_init_dtype(&bad, 5, 4, 8, 4, 508, 0), -EINVAL);
	cr_assert_eq(skv_kv_layout_init_dtype(&bad, 5, 4, 8, 4, 508, 7), -EINVAL);
	cr_assert_eq(skv_kv_dtype_bytes(SKV_KV_DTYPE_F32), 4);
	cr_assert_eq(skv_kv_dtype_bytes(SKV_KV_DTYPE_F16), 2);
}

/* q8: int8 rows, then each plane's float32 scales [n_kv_heads][slot_stride] on their own lines;
 * for the shipped model's shape (head_size 8) a plane is 12 bytes per (slot, head), 37.5% of
 * float32, and for head_size 64 it is 68 bytes, 26.6%. */
Test(kv_layout, q8_planes_hold_codes_then_scales)
{
	struct skv_kv_desc f32, q8, bad;
	char msg[256] = "";
	cr_assert_eq(skv_kv_layout_init(&f32, 5, 4, 8, 4, 508), 0);
	cr_assert_eq(skv_kv_layout_init_dtype(&q8, 5, 4, 8, 4, 508, SKV_KV_DTYPE_Q8), 0);
	cr_assert_eq(q8.dtype, SKV_KV_DTYPE_Q8);
	cr_assert_eq(q8.abi_minor, 3);
	cr_assert_eq(skv_kv_dtype_bytes(SKV_KV_DTYPE_Q8), 1);
	cr_assert_str_eq(skv_kv_dtype_name(SKV_KV_DTYPE_Q8), "q8");
	cr_assert_eq(q8.slot_stride, 512);
	cr_assert_eq(q8.scales_offset, 4ull * 8 * 512, "scales right after the codes");
	cr_assert_eq(q8.plane_bytes, 4ull * 8 * 512 + 4ull * 512 * sizeof(float));
	cr_assert_eq(q8.plane_bytes * 8, f32.plane_bytes * 3);
	cr_assert_eq(q8.planes_offset, f32.planes_offset);
	cr_assert_eq(q8.region_bytes, q8.planes_offset + 2 * 5 * q8.plane_bytes);
	cr_assert_eq(f32.scales_offset, 0, "float32 has no scales");
	cr_assert_eq(skv_kv_layout_check(&q8, q8.region_bytes, msg, sizeof(msg)), 0, "%s", msg);
	/* Scales of every plane lie inside it, 64-byte aligned, after its codes. */
	char *base = NULL;
	for (uint32_t l = 0; l < 5; l++) {
		char *k = skv_kv_k_plane(base, &q8, l), *v = skv_kv_v_plane(base, &q8, l);
		char *ks = (char *)skv_kv_plane_scales(k, &q8), *vs = (char *)skv_kv_plane_scales(v, &q8);
		cr_assert_eq((uintptr_t)ks % SKV_KV_ALIGN, 0);
		cr_assert_eq(ks + 4 * 512 * sizeof(float), v);
		cr_assert_eq((uint64_t)(vs + 4 * 512 * sizeof(float) - base), q8.planes_offset +
			     (2 * l + 2) * q8.plane_bytes);
	}
	/* Odd shapes: codes rounded to a line before the scales, scales to a line. */
	cr_assert_eq(skv_kv_layout_init_dtype(&q8, 1, 3, 5, 1, 16, SKV_KV_DTYPE_Q8), 0);
	cr_assert_eq(q8.slot_stride, 32);
	cr_assert_eq(q8.scales_offset, 512, "3 x 5 x 32 = 480 bytes of codes, rounded to a line");
	cr_assert_eq(q8.plane_bytes, q8.scales_offset + 3 * 32 * sizeof(float));
	cr_assert_eq(skv_kv_layout_check(&q8, q8.region_bytes, msg, sizeof(msg)), 0, "%s", msg);

	/* Refusals: a q8 descriptor must carry exactly the recomputed scale offset, and a float
	 * one none; the other dtypes' sizes are refused. */
	cr_assert_eq(skv_kv_layout_init_dtype(&q8, 5, 4, 8, 4, 508, SKV_KV_DTYPE_Q8), 0);
	bad = q8;
	bad.scales_offset += 64;
	cr_assert_eq(skv_kv_layout_check(&bad, q8.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	cr_assert(strstr(msg, "sizes disagree"), "%s", msg);
	bad = q8;
	bad.scales_offset = 0;
	cr_assert_eq(skv_kv_layout_check(&bad, q8.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad = f32;
	bad.scales_offset = 64;
	cr_assert_eq(skv_kv_layout_check(&bad, f32.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad = q8;
	bad.dtype = SKV_KV_DTYPE_F16;
	cr_assert_eq(skv_kv_layout_check(&bad, q8.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad = f32;
	bad.dtype = SKV_KV_DTYPE_Q8;
	cr_assert_eq(skv_kv_layout_check(&bad, f32.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad = q8;
	bad.plane_bytes -= 64; /* the last head's scales would overlap the V plane */
	cr_assert_eq(skv_kv_layout_check(&bad, q8.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	cr_assert_eq(skv_kv_layout_check(&q8, q8.region_bytes - 1, msg, sizeof(msg)), -SKV_ESHAPE);
	cr_assert(strstr(msg, "exceeds"), "%s", msg);
	/* Huge q8 shapes overflow like the others rather than wrapping. */
	cr_assert_eq(skv_kv_layout_init_dtype(&bad, 4096, 4096, 4096, 0, SKV_KV_MAX_SLOTS,
					      SKV_KV_DTYPE_Q8),
		     -EOVERFLOW);
}

Test(kv_layout, check_refuses_foreign_descriptors)
{
	struct skv_kv_desc d, bad;
	char msg[256] = "";
	cr_assert_eq(skv_kv_layout_init(&d, 5, 4, 8, 4, 508), 0);
	cr_assert_eq(skv_kv_layout_check(&d, d.region_bytes, msg, sizeof(msg)), 0);

	bad = d;
	bad.magic ^= 1;
	cr_assert_eq(skv_kv_layout_check(&bad, d.region_bytes, msg, sizeof(msg)), -SKV_EFORMAT);
	cr_assert(strstr(msg, "magic"), "%s", msg);
	bad = d;
	bad.abi_major = SKV_KV_ABI_MAJOR + 1;
	cr_assert_eq(skv_kv_layout_check(&bad, d.region_bytes, msg, sizeof(msg)), -SKV_EVERSION);
	cr_assert(strstr(msg, "ABI"), "%s", msg);
	bad = d;
	bad.dtype = 7;
	cr_assert_eq(skv_kv_layout_check(&bad, d.region_bytes, msg, sizeof(msg)), -SKV_EDTYPE);
	bad = d;
	bad.plane_bytes -= 64; /* would make planes overlap */
	cr_assert_eq(skv_kv_layout_check(&bad, d.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	bad = d;
	bad.window_slots = 0xffffffffu;
	cr_assert_eq(skv_kv_layout_check(&bad, d.region_bytes, msg, sizeof(msg)), -SKV_ESHAPE);
	/* A region larger than what the reader mapped. */
	cr_assert_eq(skv_kv_layout_check(&d, d.region_bytes - 1, msg, sizeof(msg)), -SKV_ESHAPE);
}

/* A model of the cache contents, kept independently: which absolute token sits in each slot.
 * The ring must agree with it after every append, over many wrap-arounds. */
static void check_ring(uint32_t sinks, uint32_t window, uint64_t n_tokens)
{
	struct skv_kv_desc d;
	struct skv_kv_ring ring;
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, sinks, window), 0);
	skv_kv_ring_reset(&ring, &d);
	uint64_t *slot_token = calloc(sinks + window, sizeof(uint64_t));

	for (uint64_t t = 0; t < n_tokens; t++) {
		struct skv_kv_step st;
		cr_assert_eq(skv_kv_ring_append(&ring, &d, 1, &st), 0);
		cr_assert_eq(st.abs_pos, t);
		cr_assert_lt(st.slot, sinks + window);
		/* Sinks are the first tokens and are never overwritten. */
		if (t < sinks)
			cr_assert_eq(st.slot, t);
		else
			cr_assert_geq(st.slot, sinks, "token %llu overwrote a sink",
				      (unsigned long long)t);
		slot_token[st.slot] = t;

		uint32_t sink_fill = skv_kv_ring_sink_fill(&ring, &d);
		uint32_t fill = skv_kv_ring_window_fill(&ring, &d);
		uint64_t expect_fill = t + 1 <= sinks ? 0 : t + 1 - sinks;
		if (expect_fill > window)
			expect_fill = window;
		cr_assert_eq(fill, expect_fill);
		cr_assert_eq(sink_fill, t + 1 < sinks ? t + 1 : sinks);
		cr_assert_eq(st.window_fill, fill);
		cr_assert_eq(st.sink_count, sink_fill);
		/* Slot count is constant once full; the step attends to sinks + window keys. */
		cr_assert_leq(sink_fill + fill, sinks + window);
		cr_assert_eq(st.cache_pos, sink_fill + fill - 1);
		cr_assert_eq(ring.tokens_evicted, t + 1 - sink_fill - fill);
		cr_assert_eq(st.evicted, t >= sinks + window ? 1u : 0u);

		/* Window order: walking from the head visits consecutive tokens, oldest first,
		 * ending with the one just appended. */
		for (uint32_t i = 0; i < fill; i++) {
			uint32_t slot = sinks + (st.window_head - sinks + i) % window;
			cr_assert_eq(slot_token[slot], ring.window_start + i);
			cr_assert_eq(skv_kv_ring_slot_of(&ring, &d, ring.window_start + i), slot);
		}
		cr_assert_eq(slot_token[sinks + (st.window_head - sinks + (fill ? fill - 1 : 0)) %
							window],
			     fill ? t : slot_token[sinks + (st.window_head - sinks) % window]);
		for (uint32_t i = 0; i < sink_fill; i++)
			cr_assert_eq(slot_token[i], i);
		if (ring.window_start > sinks)
			cr_assert_eq(skv_kv_ring_slot_of(&ring, &d, ring.window_start - 1), -ENOENT);
	}
	free(slot_token);
}

Test(kv_ring, invariants_over_many_wraparounds)
{
	check_ring(4, 16, 16 * 200 + 7);
	check_ring(4, 508, 508 * 20 + 3);
	check_ring(0, 7, 7 * 300 + 1);
	check_ring(1, 1, 100);
	check_ring(8, 3, 1000);
}

Test(kv_ring, no_eviction_when_not_allowed)
{
	struct skv_kv_desc d;
	struct skv_kv_ring ring;
	struct skv_kv_step st;
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, 0, 3), 0);
	skv_kv_ring_reset(&ring, &d);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(skv_kv_ring_append(&ring, &d, 0, &st), 0);
	struct skv_kv_ring before = ring;
	cr_assert_eq(skv_kv_ring_append(&ring, &d, 0, &st), -SKV_ECACHEFULL);
	cr_assert(memcmp(&before, &ring, sizeof(ring)) == 0, "a refused append changes nothing");
}

Test(kv_ring, bulk_eviction_keeps_sinks_and_order)
{
	struct skv_kv_desc d;
	struct skv_kv_ring ring;
	struct skv_kv_step st;
	cr_assert_eq(skv_kv_layout_init(&d, 1, 1, 2, 4, 10), 0);
	skv_kv_ring_reset(&ring, &d);
	for (int i = 0; i < 12; i++)
		cr_assert_eq(skv_kv_ring_append(&ring, &d, 1, &st), 0);
	cr_assert_eq(skv_kv_ring_window_fill(&ring, &d), 8);
	cr_assert_eq(skv_kv_ring_evict(&ring, &d, 5), 5);
	cr_assert_eq(skv_kv_ring_window_fill(&ring, &d), 3);
	cr_assert_eq(ring.window_start, 9);
	cr_assert_eq(skv_kv_ring_sink_fill(&ring, &d), 4);
	/* The next appends wrap around the ring without evicting until it is full again. */
	for (int i = 0; i < 7; i++) {
		cr_assert_eq(skv_kv_ring_append(&ring, &d, 1, &st), 0);
		cr_assert_eq(st.evicted, 0);
	}
	cr_assert_eq(skv_kv_ring_append(&ring, &d, 1, &st), 0);
	cr_assert_eq(st.evicted, 1);
	cr_assert_eq(skv_kv_ring_evict(&ring, &d, 100), 10);
	cr_assert_eq(skv_kv_ring_window_fill(&ring, &d), 0);
	cr_assert_eq(skv_kv_ring_slot_of(&ring, &d, 2), 2, "sinks survive a full eviction");
}

/* The seqlock over a ring state: a reader racing a writer never sees a torn value. The
 * writer publishes states whose three fields are tied (v, 2v, 3v); every snapshot must keep
 * the tie, and values must never go backwards. */
struct seqlock_race {
	struct skv_kv_ring shared;
	volatile int stop;
	uint64_t published;
};

static void *seqlock_writer(void *arg)
{
	struct seqlock_race *race = arg;
	for (uint64_t v = 1; !race->stop; v++) {
		struct skv_kv_ring value = { .tokens_seen = v, .window_start = 2 * v,
					     .tokens_evicted = 3 * v };
		skv_kv_ring_publish(&race->shared, &value);
		__atomic_store_n(&race->published, v, __ATOMIC_RELAXED);
		/* A gap between writes, as an engine's steps have: without it a reader on the
		 * other core that tries once may find a write in progress every time. */
		for (int k = 0; k < 4; k++)
			skv_cpu_relax();
	}
	return NULL;
}

Test(kv_ring, snapshot_is_never_torn)
{
	static struct seqlock_race race;
	pthread_t writer;
	cr_assert_eq(pthread_create(&writer, NULL, seqlock_writer, &race), 0);
	uint64_t last = 0, ok = 0, retries = 0;
	for (int i = 0; i < 2000000; i++) {
		struct skv_kv_ring snap;
		if (skv_kv_ring_snapshot(&race.shared, &snap, 1) != 0) {
			retries++;
			continue;
		}
		cr_assert_eq(snap.window_start, 2 * snap.tokens_seen, "torn read at %llu",
			     (unsigned long long)snap.tokens_seen);
		cr_assert_eq(snap.tokens_evicted, 3 * snap.tokens_seen);
		cr_assert_geq(snap.tokens_seen, last, "went backwards");
		last = snap.tokens_seen;
		ok++;
	}
	race.stop = 1;
	pthread_join(writer, NULL);
	cr_assert_gt(ok, 0);
	cr_assert_gt(__atomic_load_n(&race.published, __ATOMIC_RELAXED), 1000,
		     "the writer made progress");
	cr_log_info("%llu consistent snapshots, %llu retries", (unsigned long long)ok,
		    (unsigned long long)retries);
}
