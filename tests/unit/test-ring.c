/* The SPSC ring: validation of what a peer put in shared memory, full/empty, the wrap of the
 * free-running uint32 indices, and ten million messages between two real processes on both
 * wake-up paths. */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"
#include "skv-error.h"
#include "testutil.h"
#include "wake.h"

struct elem {
	uint64_t value;
	uint64_t filler;
};

static void *make_ring(const char *test_name, uint32_t capacity, uint32_t start, size_t *bytes)
{
	*bytes = skv_ring_bytes(sizeof(struct elem), capacity);
	cr_assert_neq(*bytes, 0);
	void *mem = tu_map_shared(test_name, *bytes);
	cr_assert_eq(skv_ring_init_at(mem, *bytes, sizeof(struct elem), capacity, start), 0);
	return mem;
}

Test(ring, bytes_validates_shape)
{
	cr_assert_eq(skv_ring_bytes(8, 2), sizeof(struct skv_ring_hdr) + 16);
	cr_assert_eq(skv_ring_bytes(64, 1024), sizeof(struct skv_ring_hdr) + 65536);
	cr_assert_eq(skv_ring_bytes(65536, 1u << 24), sizeof(struct skv_ring_hdr) + (1ull << 40));
	cr_assert_eq(skv_ring_bytes(8, 0), 0);
	cr_assert_eq(skv_ring_bytes(8, 1), 0);
	cr_assert_eq(skv_ring_bytes(8, 3), 0);
	cr_assert_eq(skv_ring_bytes(8, 1u << 25), 0);
	cr_assert_eq(skv_ring_bytes(0, 16), 0);
	cr_assert_eq(skv_ring_bytes(12, 16), 0);
	cr_assert_eq(skv_ring_bytes(65544, 16), 0);
}

Test(ring, init_refuses_bad_memory)
{
	size_t bytes = skv_ring_bytes(16, 8);
	char *mem = tu_map_shared("init_refuses_bad_memory", bytes + 64);
	cr_assert_eq(skv_ring_init(NULL, bytes, 16, 8), -EINVAL);
	cr_assert_eq(skv_ring_init(mem + 8, bytes, 16, 8), -EINVAL); /* not cache-line aligned */
	cr_assert_eq(skv_ring_init(mem, bytes - 1, 16, 8), -EINVAL);
	cr_assert_eq(skv_ring_init(mem, bytes, 16, 6), -EINVAL);
	cr_assert_eq(skv_ring_init(mem, bytes, 16, 8), 0);
	struct skv_ring_hdr *hdr = (struct skv_ring_hdr *)mem;
	cr_assert_eq(hdr->magic, SKV_RING_MAGIC);
	cr_assert_eq(hdr->abi, SKV_RING_ABI);
	cr_assert_eq(hdr->head, 0);
	cr_assert_eq(hdr->tail, 0);
	cr_assert_eq(hdr->wake.sleeping, SKV_SLEEP_AWAKE);
	cr_assert_eq(hdr->wake.seq, 0);
	munmap(mem, bytes + 64);
}

Test(ring, attach_refuses_foreign_or_corrupt_headers)
{
	size_t bytes;
	char *mem = make_ring("attach_refuses_foreign_or_corrupt_headers", 16, 0, &bytes);
	struct skv_ring_hdr *hdr = (struct skv_ring_hdr *)mem;
	struct skv_ring_hdr saved = *hdr;
	struct skv_ring r;

	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_ring_attach(&r, NULL, bytes, SKV_RING_CONSUMER), -EINVAL);
	cr_assert_eq(skv_ring_attach(&r, mem + 8, bytes, SKV_RING_CONSUMER), -EINVAL);
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, (enum skv_ring_role)3), -EINVAL);
	/* A mapping shorter than the header, or than the ring the header describes. */
	cr_assert_eq(skv_ring_attach(&r, mem, sizeof(*hdr) - 1, SKV_RING_CONSUMER), -SKV_EFORMAT);
	cr_assert_eq(skv_ring_attach(&r, mem, bytes - 1, SKV_RING_CONSUMER), -SKV_EFORMAT);

	hdr->magic ^= 1;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	*hdr = saved;
	hdr->abi = SKV_RING_ABI + 1;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_PRODUCER), -SKV_EVERSION);
	*hdr = saved;
	hdr->capacity = 32; /* valid shape, but twice the mapping */
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	*hdr = saved;
	hdr->capacity = 12; /* not a power of two */
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	*hdr = saved;
	hdr->elem_size = 20; /* not a multiple of 8 */
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	*hdr = saved;
	hdr->elem_size = 0xffffffffu;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);

	/* Indices: head more than capacity ahead of tail, or behind it. */
	*hdr = saved;
	hdr->head = 17;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_PRODUCER), -SKV_EFORMAT);
	hdr->head = 16; /* exactly full is fine */
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_ring_count(&r), 16);
	hdr->head = 0;
	hdr->tail = 1;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_PRODUCER), -SKV_EFORMAT);
	/* Across the wrap: head = 5, tail = 2^32 - 3 is 8 elements, fine; tail = 6 is not. */
	hdr->head = 5;
	hdr->tail = 0xfffffffdu;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_ring_count(&r), 8);
	hdr->tail = 6;
	cr_assert_eq(skv_ring_attach(&r, mem, bytes, SKV_RING_CONSUMER), -SKV_EFORMAT);
	munmap(mem, bytes);
}

Test(ring, full_and_empty)
{
	size_t bytes;
	void *mem = make_ring("full_and_empty", 8, 0, &bytes);
	struct skv_ring prod, cons;
	cr_assert_eq(skv_ring_attach(&prod, mem, bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&cons, mem, bytes, SKV_RING_CONSUMER), 0);
	struct elem e = { 0, 0 };

	cr_assert_eq(skv_ring_pop(&cons, &e), -EAGAIN);
	cr_assert_eq(skv_ring_count(&cons), 0);
	cr_assert_eq(skv_ring_count(&prod), 8);
	for (uint64_t i = 0; i < 8; i++) {
		e.value = 100 + i;
		cr_assert_eq(skv_ring_push(&prod, &e), 0);
	}
	e.value = 999;
	cr_assert_eq(skv_ring_push(&prod, &e), -EAGAIN);
	cr_assert_eq(skv_ring_count(&prod), 0);
	cr_assert_eq(skv_ring_count(&cons), 8);
	/* Sides cannot be swapped. */
	cr_assert_eq(skv_ring_push(&cons, &e), -EINVAL);
	cr_assert_eq(skv_ring_pop(&prod, &e), -EINVAL);

	cr_assert_eq(skv_ring_pop(&cons, &e), 0);
	cr_assert_eq(e.value, 100);
	e.value = 108;
	cr_assert_eq(skv_ring_push(&prod, &e), 0);
	for (uint64_t i = 1; i < 9; i++) {
		cr_assert_eq(skv_ring_pop(&cons, &e), 0);
		cr_assert_eq(e.value, 100 + i);
	}
	cr_assert_eq(skv_ring_pop(&cons, &e), -EAGAIN);
	cr_assert_eq(skv_ring_count(&cons), 0);
	cr_assert_eq(skv_ring_count(&prod), 8);
	munmap(mem, bytes);
}

Test(ring, indices_wrap_around_uint32)
{
	const uint32_t start = 0xffffffffu - 20;
	size_t bytes;
	void *mem = make_ring("indices_wrap_around_uint32", 16, start, &bytes);
	struct skv_ring_hdr *hdr = mem;
	struct skv_ring prod, cons;
	cr_assert_eq(skv_ring_attach(&prod, mem, bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&cons, mem, bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_ring_count(&cons), 0);

	/* Batches of 1..16 pushes and pops, full rings included, well across the wrap. */
	uint64_t pushed = 0, popped = 0;
	struct elem e = { 0, 0 };
	for (unsigned round = 0; round < 200; round++) {
		unsigned n = 1 + round % 16;
		for (unsigned i = 0; i < n; i++) {
			e.value = pushed;
			e.filler = ~pushed;
			cr_assert_eq(skv_ring_push(&prod, &e), 0);
			pushed++;
		}
		if (n == 16) {
			cr_assert_eq(skv_ring_push(&prod, &e), -EAGAIN);
			cr_assert_eq(skv_ring_count(&cons), 16);
		}
		for (unsigned i = 0; i < n; i++) {
			cr_assert_eq(skv_ring_pop(&cons, &e), 0);
			cr_assert_eq(e.value, popped);
			cr_assert_eq(e.filler, ~popped);
			popped++;
		}
		cr_assert_eq(skv_ring_pop(&cons, &e), -EAGAIN);
	}
	/* The shared indices really wrapped: they are now small, and still agree. */
	cr_assert_eq(hdr->head, (uint32_t)(start + pushed));
	cr_assert_lt(hdr->head, start);
	cr_assert_eq(hdr->tail, hdr->head);
	/* Attaching after the wrap sees an empty ring. */
	struct skv_ring late;
	cr_assert_eq(skv_ring_attach(&late, mem, bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_ring_count(&late), 0);
	munmap(mem, bytes);
}

Test(ring, corrupt_indices_from_the_peer)
{
	const uint32_t start = 0xfffffff8u; /* the checks must hold across the wrap too */
	size_t bytes;
	void *mem = make_ring("corrupt_indices_from_the_peer", 8, start, &bytes);
	struct skv_ring_hdr *hdr = mem;
	struct skv_ring prod, cons;
	struct elem e = { 7, 7 };
	cr_assert_eq(skv_ring_attach(&prod, mem, bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&cons, mem, bytes, SKV_RING_CONSUMER), 0);

	/* The consumer side of a full ring writes a tail ahead of head, then one more than a
	 * capacity behind it: the producer's reload refuses both. */
	for (int i = 0; i < 8; i++)
		cr_assert_eq(skv_ring_push(&prod, &e), 0);
	uint32_t head = hdr->head;
	hdr->tail = head + 1;
	cr_assert_eq(skv_ring_push(&prod, &e), -SKV_EFORMAT);
	cr_assert_eq(skv_ring_count(&prod), SKV_RING_CORRUPT);
	hdr->tail = head - 9;
	cr_assert_eq(skv_ring_push(&prod, &e), -SKV_EFORMAT);
	hdr->tail = head - 8; /* repaired: full again, not corrupt */
	cr_assert_eq(skv_ring_push(&prod, &e), -EAGAIN);
	cr_assert_eq(skv_ring_count(&prod), 0);

	/* The producer side writes a head more than a capacity ahead of tail, or behind it. */
	for (int i = 0; i < 8; i++)
		cr_assert_eq(skv_ring_pop(&cons, &e), 0);
	uint32_t tail = hdr->tail;
	hdr->head = tail + 9;
	cr_assert_eq(skv_ring_pop(&cons, &e), -SKV_EFORMAT);
	cr_assert_eq(skv_ring_count(&cons), SKV_RING_CORRUPT);
	hdr->head = tail - 1;
	cr_assert_eq(skv_ring_pop(&cons, &e), -SKV_EFORMAT);
	hdr->head = tail;
	cr_assert_eq(skv_ring_pop(&cons, &e), -EAGAIN);
	cr_assert_eq(skv_ring_count(&cons), 0);
	munmap(mem, bytes);
}

Test(ring, other_index_is_reloaded_only_when_needed)
{
	size_t bytes;
	void *mem = make_ring("other_index_is_reloaded_only_when_needed", 8, 0, &bytes);
	struct skv_ring_hdr *hdr = mem;
	struct skv_ring prod, cons;
	struct elem e = { 1, 1 };
	cr_assert_eq(skv_ring_attach(&prod, mem, bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&cons, mem, bytes, SKV_RING_CONSUMER), 0);

	/* The producer's cached tail says there is room: it does not read the shared tail (here
	 * garbage) until the ring looks full, and then refuses it. */
	hdr->tail = 0x12345678u;
	for (int i = 0; i < 8; i++)
		cr_assert_eq(skv_ring_push(&prod, &e), 0);
	cr_assert_eq(skv_ring_push(&prod, &e), -SKV_EFORMAT);
	hdr->tail = 0;

	/* Likewise the consumer reads head once for all 8 elements it saw. */
	cr_assert_eq(skv_ring_pop(&cons, &e), 0);
	hdr->head = 0x12345678u;
	for (int i = 1; i < 8; i++)
		cr_assert_eq(skv_ring_pop(&cons, &e), 0);
	cr_assert_eq(skv_ring_pop(&cons, &e), -SKV_EFORMAT);
	munmap(mem, bytes);
}

/* ---- ten million messages between two processes ------------------------------------------ */

#define BIG_MESSAGES 10000000ull
#define BIG_CAPACITY 1024u

/* Each message carries its sequence number, a payload derived from it, and a checksum of
 * itself, so a torn, stale, duplicated or reordered slot is caught. */
struct big_msg {
	uint64_t seq;
	uint64_t payload[2];
	uint64_t check;
};

struct big_results {
	uint64_t producer_wake_syscalls;
	uint64_t producer_pauses;
	int producer_error;
};

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t big_checksum(const struct big_msg *m)
{
	return splitmix64(m->seq ^ splitmix64(m->payload[0] ^ splitmix64(m->payload[1])));
}

static void spin_ns(int64_t ns)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do
		clock_gettime(CLOCK_MONOTONIC, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000000000ll + (t.tv_nsec - t0.tv_nsec) < ns);
}

/* The producer process: bursts of 1..2048 messages, each followed by a wake call (so the
 * Dekker handshake is raced at every push), then sometimes no pause, sometimes a busy pause of
 * up to 20 us (around the consumer's spin budget), sometimes a 50..250 us sleep (the consumer
 * goes to sleep). */
static void big_producer(void *ring_mem, size_t bytes, int efd, struct big_results *res)
{
	struct skv_ring r;
	int err = skv_ring_attach(&r, ring_mem, bytes, SKV_RING_PRODUCER);
	if (err) {
		res->producer_error = err;
		_exit(2);
	}
	uint64_t syscalls0 = skv_wake_syscalls(); /* fork copied the consumer's counter */
	uint64_t rng = 12345;
	uint64_t seq = 0;
	while (seq < BIG_MESSAGES) {
		rng = splitmix64(rng);
		uint64_t burst = 1 + (rng & 2047);
		for (uint64_t i = 0; i < burst && seq < BIG_MESSAGES; i++, seq++) {
			struct big_msg m = { .seq = seq };
			m.payload[0] = splitmix64(seq);
			m.payload[1] = rng ^ seq;
			m.check = big_checksum(&m);
			while ((err = skv_ring_push(&r, &m)) == -EAGAIN) {
				skv_ring_wake(&r, efd);
				sched_yield();
			}
			if (err) {
				res->producer_error = err;
				_exit(3);
			}
			skv_ring_wake(&r, efd);
		}
		switch ((rng >> 20) & 7) {
		case 0: case 1: case 2: case 3:
			break;
		case 4: case 5:
			spin_ns((int64_t)((rng >> 32) % 20000));
			break;
		default:
			res->producer_pauses++;
			usleep((useconds_t)(50 + (rng >> 32) % 200));
			break;
		}
	}
	res->producer_wake_syscalls = skv_wake_syscalls() - syscalls0;
	_exit(0);
}

/* A peer's death must fail the test, not hang it: a thread of the consumer process watches the
 * producer's pidfd and, when it exits, raises a flag and wakes the consumer through the wake
 * protocol itself (it is one more producer on the wake word). A lost wake-up still hangs the
 * consumer, and the suite's timeout fails the test. */
struct death_watch {
	int pidfd;
	struct skv_wake_word *word;
	int efd;
	uint32_t exited;
	pthread_t thread;
};

static void *death_watch_main(void *arg)
{
	struct death_watch *dw = arg;
	struct pollfd pfd = { .fd = dw->pidfd, .events = POLLIN };
	while (poll(&pfd, 1, -1) < 0 && errno == EINTR)
		;
	__atomic_store_n(&dw->exited, 1, __ATOMIC_RELEASE);
	skv_wake(dw->word, dw->efd);
	return NULL;
}

static void death_watch_start(struct death_watch *dw, pid_t pid, struct skv_wake_word *word,
			      int efd)
{
	dw->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	cr_assert(dw->pidfd >= 0, "pidfd_open: %s", strerror(errno));
	dw->word = word;
	dw->efd = efd;
	dw->exited = 0;
	cr_assert_eq(pthread_create(&dw->thread, NULL, death_watch_main, dw), 0);
}

/* After the producer was reaped. */
static void death_watch_stop(struct death_watch *dw)
{
	cr_assert_eq(pthread_join(dw->thread, NULL), 0);
	close(dw->pidfd);
}

struct big_consumer {
	struct skv_ring ring;
	struct death_watch watch;
};

static int big_ready(void *arg)
{
	struct big_consumer *c = arg;
	return skv_ring_count(&c->ring) != 0 || __atomic_load_n(&c->watch.exited, __ATOMIC_ACQUIRE);
}

/* io_uring works here if a forced URING waiter can be made. */
static int uring_works(char *why, size_t why_len)
{
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w;
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	cr_assert(efd >= 0);
	int err = skv_waiter_new(SKV_WAIT_URING, &word, efd, NULL, &w);
	skv_waiter_free(err ? NULL : w);
	close(efd);
	if (err) {
		snprintf(why, why_len, "io_uring unavailable here: %s", skv_strerror(err));
		return 0;
	}
	return 1;
}

static void big_run(const char *test_name, enum skv_wait_backend backend)
{
	char why[160];
	if (backend == SKV_WAIT_URING && !uring_works(why, sizeof(why)))
		cr_skip_test("%s", why);

	size_t ring_bytes = skv_ring_bytes(sizeof(struct big_msg), BIG_CAPACITY);
	size_t total = ring_bytes + 4096;
	char *mem = tu_map_shared(test_name, total);
	struct big_results *res = (struct big_results *)(mem + ring_bytes);
	cr_assert_eq(skv_ring_init(mem, ring_bytes, sizeof(struct big_msg), BIG_CAPACITY), 0);
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	cr_assert(efd >= 0);

	pid_t parent = getpid();
	pid_t child = fork();
	cr_assert(child >= 0);
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(9);
		big_producer(mem, ring_bytes, efd, res);
	}

	struct big_consumer c;
	struct skv_ring *r = &c.ring;
	cr_assert_eq(skv_ring_attach(r, mem, ring_bytes, SKV_RING_CONSUMER), 0);
	struct skv_waiter *w;
	cr_assert_eq(skv_waiter_new(backend, skv_ring_wake_word(r), efd, NULL, &w), 0);
	cr_assert_eq(skv_waiter_backend(w), backend);
	death_watch_start(&c.watch, child, skv_ring_wake_word(r), efd);

	uint64_t expected = 0, bad = 0, first_bad = UINT64_MAX, waits = 0;
	int err = 0;
	while (expected < BIG_MESSAGES) {
		struct big_msg m;
		err = skv_ring_pop(r, &m);
		if (err == 0) {
			if (m.seq != expected || m.check != big_checksum(&m) ||
			    m.payload[0] != splitmix64(m.seq)) {
				if (!bad++)
					first_bad = expected;
			}
			expected++;
			continue;
		}
		if (err != -EAGAIN)
			break;
		err = 0;
		/* Empty, and the producer is gone (the count is re-read after the flag). */
		if (__atomic_load_n(&c.watch.exited, __ATOMIC_ACQUIRE) && !skv_ring_count(r))
			break;
		waits++;
		/* No timeout: a lost wake-up hangs here and the suite's timeout fails the test. */
		int ret = skv_waiter_wait(w, big_ready, &c, 2000, -1);
		if (ret != 1) {
			err = ret < 0 ? ret : -EPROTO;
			break;
		}
	}
	int status = 0;
	cr_assert_eq(waitpid(child, &status, 0), child);
	death_watch_stop(&c.watch);
	cr_assert_eq(err, 0, "consumer: %s after %lu messages", skv_strerror(err),
		     (unsigned long)expected);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "producer failed: status 0x%x, error %s", status,
		  skv_strerror(res->producer_error));
	cr_assert_eq(expected, BIG_MESSAGES);
	cr_assert_eq(bad, 0, "%lu bad messages, the first at %lu", (unsigned long)bad,
		     (unsigned long)first_bad);
	struct big_msg extra;
	cr_assert_eq(skv_ring_pop(r, &extra), -EAGAIN, "a message beyond the last one");
	/* The sleep path really ran: the consumer slept, and the producer woke it by system
	 * call (only when it had announced sleep: how often depends on scheduling, so the count is
	 * logged, not bounded). */
	cr_assert_gt(res->producer_pauses, 0);
	cr_assert_gt(skv_waiter_sleeps(w), 0);
	cr_assert_gt(res->producer_wake_syscalls, 0);
	cr_assert_eq(skv_ring_wake_word(r)->sleeping, SKV_SLEEP_AWAKE);
	cr_log_info("%s: %lu waits, %lu sleeps, %lu producer wake syscalls, %lu pauses", test_name,
		    (unsigned long)waits, (unsigned long)skv_waiter_sleeps(w),
		    (unsigned long)res->producer_wake_syscalls,
		    (unsigned long)res->producer_pauses);
	skv_waiter_free(w);
	close(efd);
	munmap(mem, total);
}

Test(ring, ten_million_messages_two_processes_uring, .timeout = 300)
{
	big_run("ten_million_messages_two_processes_uring", SKV_WAIT_URING);
}

Test(ring, ten_million_messages_two_processes_futex, .timeout = 300)
{
	big_run("ten_million_messages_two_processes_futex", SKV_WAIT_FUTEX);
}
