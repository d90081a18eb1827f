/* Sleeping and waking across processes: the Dekker handshake and its claim, both backends
 * (io_uring and futex), the watched fd, timeouts, late wake-ups, ping-pong where every message
 * needs a wake-up, and the fall-back to futex when a seccomp filter refuses io_uring. */
#include <criterion/criterion.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"
#include "skv-error.h"
#include "testutil.h"
#include "wake.h"

static int new_eventfd(void)
{
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	cr_assert(efd >= 0, "eventfd: %s", strerror(errno));
	return efd;
}

/* Skip (with the reason) the io_uring variant of a test where io_uring is unavailable. */
static void require_backend(enum skv_wait_backend backend)
{
	if (backend != SKV_WAIT_URING)
		return;
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w;
	int efd = new_eventfd();
	int err = skv_waiter_new(SKV_WAIT_URING, &word, efd, NULL, &w);
	close(efd);
	if (err)
		cr_skip_test("io_uring unavailable here (%s): the futex variant covers this",
			     skv_strerror(err));
	skv_waiter_free(w);
}

static int never_ready(void *arg)
{
	(void)arg;
	return 0;
}

static int always_ready(void *arg)
{
	(void)arg;
	return 1;
}

static int flag_ready(void *arg)
{
	return __atomic_load_n((uint32_t *)arg, __ATOMIC_ACQUIRE) != 0;
}

static int fd_readable_now(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

/* ---- a forked waker ------------------------------------------------------------------------ */

/* Shared between the test and its forked waker. */
struct waker_page {
	struct skv_wake_word word;
	uint32_t data;            /* the "published" flag the waiter's ready() reads */
	uint64_t child_syscalls;  /* the waker's skv_wake_syscalls() at its end */
};

enum waker_action {
	WAKER_PUBLISH,      /* data = 1, then skv_wake(word, efd) */
	WAKER_SOCKET,       /* write a byte to sock, no wake call (io_uring polls the socket) */
	WAKER_SOCKET_WAKE,  /* write a byte to sock, then skv_wake(word, -1) (futex waiters) */
};

static char proc_state(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return '?';
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	char *close_paren = strrchr(buf, ')');
	return close_paren && close_paren[1] == ' ' ? close_paren[2] : '?';
}

/* In the waker: return once the waiter has announced sleep and its process is blocked in the
 * kernel, so that the wake-up under test really has to go through the kernel. */
static void waker_until_asleep(pid_t waiter, struct skv_wake_word *word)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (__atomic_load_n(&word->sleeping, __ATOMIC_ACQUIRE) != SKV_SLEEP_AWAKE &&
		    proc_state(waiter) == 'S')
			return;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 30)
			_exit(7);
		usleep(200);
	}
}

static pid_t fork_waker(struct waker_page *page, enum waker_action action, int efd, int sock)
{
	pid_t waiter = getpid();
	pid_t child = fork();
	cr_assert(child >= 0);
	if (child)
		return child;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != waiter)
		_exit(9);
	/* The counter is per process and fork copies it: count from here. */
	uint64_t syscalls0 = skv_wake_syscalls();
	waker_until_asleep(waiter, &page->word);
	if (action == WAKER_PUBLISH) {
		__atomic_store_n(&page->data, 1, __ATOMIC_RELEASE);
		skv_wake(&page->word, efd);
	} else {
		char byte = 'x';
		if (write(sock, &byte, 1) != 1)
			_exit(8);
		if (action == WAKER_SOCKET_WAKE)
			skv_wake(&page->word, -1);
	}
	page->child_syscalls = skv_wake_syscalls() - syscalls0;
	_exit(0);
}

static void reap_waker(pid_t child)
{
	int status = 0;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "waker failed: status 0x%x",
		  status);
}

/* ---- tests --------------------------------------------------------------------------------- */

Test(wake, waiter_new_validates_arguments)
{
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w = (struct skv_waiter *)&word;
	cr_assert_eq(skv_waiter_new(SKV_WAIT_FUTEX, NULL, -1, NULL, &w), -EINVAL);
	cr_assert_null(w);
	cr_assert_eq(skv_waiter_new((enum skv_wait_backend)7, &word, -1, NULL, &w), -EINVAL);
	cr_assert_eq(skv_waiter_new(SKV_WAIT_URING, &word, -1, NULL, &w), -EINVAL);
	cr_assert_eq(skv_waiter_new(SKV_WAIT_AUTO, &word, -1, NULL, &w), -EINVAL);
	cr_assert_eq(skv_waiter_new(SKV_WAIT_FUTEX, &word, -1, NULL, NULL), -EINVAL);
	cr_assert_eq(skv_waiter_new(SKV_WAIT_FUTEX, &word, -1, NULL, &w), 0);
	cr_assert_eq(skv_waiter_backend(w), SKV_WAIT_FUTEX);
	cr_assert_eq(skv_waiter_sleeps(w), 0);
	skv_waiter_free(w);
	skv_waiter_free(NULL);
}

Test(wake, auto_picks_uring_where_it_works)
{
	require_backend(SKV_WAIT_URING);
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w;
	int efd = new_eventfd();
	cr_assert_eq(skv_waiter_new(SKV_WAIT_AUTO, &word, efd, NULL, &w), 0);
	cr_assert_eq(skv_waiter_backend(w), SKV_WAIT_URING);
	skv_waiter_free(w);
	close(efd);
}

Test(wake, producer_makes_no_syscall_while_consumer_is_awake)
{
	struct skv_wake_word word = { SKV_SLEEP_AWAKE, 0 };
	int efd = new_eventfd();
	uint64_t before = skv_wake_syscalls();
	for (int i = 0; i < 1000; i++) {
		skv_wake(&word, efd);
		skv_wake(&word, -1);
	}
	cr_assert_eq(skv_wake_syscalls(), before);
	cr_assert_eq(word.seq, 0);
	cr_assert_not(fd_readable_now(efd));
	close(efd);
}

Test(wake, one_announcement_costs_one_syscall)
{
	int efd = new_eventfd();
	struct skv_wake_word word = { SKV_SLEEP_FUTEX, 0 };
	uint64_t before = skv_wake_syscalls();
	for (int i = 0; i < 3; i++)
		skv_wake(&word, efd);
	cr_assert_eq(skv_wake_syscalls(), before + 1);
	cr_assert_eq(word.sleeping, SKV_SLEEP_AWAKE);
	cr_assert_eq(word.seq, 1);
	cr_assert_not(fd_readable_now(efd)); /* a futex sleeper is not woken by eventfd */

	word.sleeping = SKV_SLEEP_EVENTFD;
	for (int i = 0; i < 3; i++)
		skv_wake(&word, efd);
	cr_assert_eq(skv_wake_syscalls(), before + 2);
	cr_assert_eq(word.sleeping, SKV_SLEEP_AWAKE);
	uint64_t counter = 0;
	cr_assert_eq(read(efd, &counter, sizeof(counter)), (ssize_t)sizeof(counter));
	cr_assert_eq(counter, 1);

	/* Without the eventfd a producer cannot wake an io_uring sleeper: it leaves the
	 * announcement to one that can. A corrupt word wakes nobody. */
	word.sleeping = SKV_SLEEP_EVENTFD;
	skv_wake(&word, -1);
	cr_assert_eq(word.sleeping, SKV_SLEEP_EVENTFD);
	word.sleeping = 7;
	skv_wake(&word, efd);
	cr_assert_eq(word.sleeping, 7);
	cr_assert_eq(skv_wake_syscalls(), before + 2);
	close(efd);
}

static void timeouts_return_zero(enum skv_wait_backend backend)
{
	require_backend(backend);
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w;
	int efd = new_eventfd();
	cr_assert_eq(skv_waiter_new(backend, &word, efd, NULL, &w), 0);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 20 * 1000000), 0);
	cr_assert_geq(skv_waiter_sleeps(w), 1);
	cr_assert_eq(word.sleeping, SKV_SLEEP_AWAKE);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 0), 0);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 1000000, 5000000), 0);
	cr_assert_eq(word.sleeping, SKV_SLEEP_AWAKE);
	/* Ready at once: no sleep at all. */
	uint64_t sleeps = skv_waiter_sleeps(w);
	cr_assert_eq(skv_waiter_wait(w, always_ready, NULL, 0, -1), 1);
	cr_assert_eq(skv_waiter_sleeps(w), sleeps);
	skv_waiter_free(w);
	close(efd);
}

Test(wake, timeouts_return_zero_uring)
{
	timeouts_return_zero(SKV_WAIT_URING);
}

Test(wake, timeouts_return_zero_futex)
{
	timeouts_return_zero(SKV_WAIT_FUTEX);
}

static void cross_process_wakeup(const char *test_name, enum skv_wait_backend backend)
{
	require_backend(backend);
	struct waker_page *page = tu_map_shared(test_name, 4096);
	int efd = new_eventfd();
	struct skv_waiter *w;
	cr_assert_eq(skv_waiter_new(backend, &page->word, efd, NULL, &w), 0);
	/* Twice, so the second sleep runs on a waiter that was woken once. */
	for (int round = 0; round < 2; round++) {
		page->data = 0;
		page->child_syscalls = 0;
		uint64_t sleeps = skv_waiter_sleeps(w);
		pid_t child = fork_waker(page, WAKER_PUBLISH, efd, -1);
		cr_assert_eq(skv_waiter_wait(w, flag_ready, &page->data, 0, -1), 1);
		reap_waker(child);
		cr_assert_eq(page->child_syscalls, 1);
		cr_assert_gt(skv_waiter_sleeps(w), sleeps);
		cr_assert_eq(page->word.sleeping, SKV_SLEEP_AWAKE);
	}
	cr_assert_eq(page->word.seq, 2);
	skv_waiter_free(w);
	close(efd);
	munmap(page, 4096);
}

Test(wake, cross_process_wakeup_uring)
{
	cross_process_wakeup("cross_process_wakeup_uring", SKV_WAIT_URING);
}

Test(wake, cross_process_wakeup_futex)
{
	cross_process_wakeup("cross_process_wakeup_futex", SKV_WAIT_FUTEX);
}

static void watched_fd_wakes(const char *test_name, enum skv_wait_backend backend)
{
	require_backend(backend);
	struct waker_page *page = tu_map_shared(test_name, 4096);
	int efd = new_eventfd();
	int sv[2];
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	struct skv_waiter *w;
	cr_assert_eq(skv_waiter_new(backend, &page->word, efd, NULL, &w), 0);
	skv_waiter_watch_fd(w, sv[0]);

	/* Not readable: a timeout. */
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0);
	/* Becomes readable while the waiter sleeps. */
	pid_t child = fork_waker(page, backend == SKV_WAIT_URING ? WAKER_SOCKET : WAKER_SOCKET_WAKE,
				 efd, sv[1]);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, -1), 2);
	reap_waker(child);
	/* Still readable: reported again at once (level, not edge). */
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, -1), 2);
	/* Ready work comes first. */
	cr_assert_eq(skv_waiter_wait(w, always_ready, NULL, 0, -1), 1);
	char byte;
	cr_assert_eq(read(sv[0], &byte, 1), 1);
	/* Drained: a timeout again. */
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0);
	/* Hang-up counts as readable. */
	close(sv[1]);
	if (backend == SKV_WAIT_FUTEX)
		skv_wake(&page->word, -1);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, -1), 2);
	skv_waiter_watch_fd(w, -1);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0);
	skv_waiter_free(w);
	close(sv[0]);
	close(efd);
	munmap(page, 4096);
}

Test(wake, watched_fd_wakes_uring)
{
	watched_fd_wakes("watched_fd_wakes_uring", SKV_WAIT_URING);
}

Test(wake, watched_fd_wakes_futex)
{
	watched_fd_wakes("watched_fd_wakes_futex", SKV_WAIT_FUTEX);
}

Test(wake, changing_the_watched_fd_cancels_the_old_poll)
{
	require_backend(SKV_WAIT_URING);
	struct skv_wake_word word = { 0, 0 };
	int efd = new_eventfd();
	int a[2], b[2];
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a), 0);
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b), 0);
	struct skv_waiter *w;
	cr_assert_eq(skv_waiter_new(SKV_WAIT_URING, &word, efd, NULL, &w), 0);

	skv_waiter_watch_fd(w, a[0]);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0); /* poll on a */
	skv_waiter_watch_fd(w, b[0]);
	char byte = 'a';
	cr_assert_eq(write(a[1], &byte, 1), 1);
	/* The old poll's completion (fired or cancelled) is not taken for b's. */
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0);
	cr_assert_eq(write(b[1], &byte, 1), 1);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, -1), 2);
	skv_waiter_watch_fd(w, -1);
	cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 10 * 1000000), 0);
	skv_waiter_free(w);
	close(a[0]);
	close(a[1]);
	close(b[0]);
	close(b[1]);
	close(efd);
}

/* A producer that claimed an announcement after the waiter left on its timeout wakes nobody in
 * particular: the late completion must neither end the next wait early as "ready", nor make it
 * fail, nor leave the eventfd counter set; and the next real wake-up must still arrive. */
static void late_wakeup_is_absorbed(const char *test_name, enum skv_wait_backend backend)
{
	require_backend(backend);
	struct waker_page *page = tu_map_shared(test_name, 4096);
	int efd = new_eventfd();
	struct skv_waiter *w;
	cr_assert_eq(skv_waiter_new(backend, &page->word, efd, NULL, &w), 0);
	for (int round = 0; round < 3; round++) {
		cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 5 * 1000000), 0);
		/* What a late claiming producer does, after the waiter returned. */
		__atomic_fetch_add(&page->word.seq, 1, __ATOMIC_RELEASE);
		if (backend == SKV_WAIT_URING) {
			uint64_t one = 1;
			cr_assert_eq(write(efd, &one, sizeof(one)), (ssize_t)sizeof(one));
		} else {
			syscall(SYS_futex, &page->word.seq, FUTEX_WAKE, 1, NULL, NULL, 0);
		}
		cr_assert_eq(skv_waiter_wait(w, never_ready, NULL, 0, 20 * 1000000), 0);
		/* The armed read took the whole counter. */
		cr_assert_not(fd_readable_now(efd));
	}
	page->data = 0;
	pid_t child = fork_waker(page, WAKER_PUBLISH, efd, -1);
	cr_assert_eq(skv_waiter_wait(w, flag_ready, &page->data, 0, -1), 1);
	reap_waker(child);
	cr_assert_eq(page->child_syscalls, 1);
	skv_waiter_free(w);
	close(efd);
	munmap(page, 4096);
}

Test(wake, late_wakeup_is_absorbed_uring)
{
	late_wakeup_is_absorbed("late_wakeup_is_absorbed_uring", SKV_WAIT_URING);
}

Test(wake, late_wakeup_is_absorbed_futex)
{
	late_wakeup_is_absorbed("late_wakeup_is_absorbed_futex", SKV_WAIT_FUTEX);
}

/* ---- ping-pong: every message needs a wake-up ---------------------------------------------- */

#define PP_ROUND_TRIPS 20000u
#define PP_RACE_ROUND_TRIPS 200000u
#define PP_CAPACITY 16u

struct pp_msg {
	uint64_t seq;
};

struct pp_page {
	uint32_t round_trips;
	uint64_t child_syscalls;
	uint64_t child_sleeps;
	int child_error;
	uint32_t child_backend;
};

struct pp_layout {
	char *mem;
	size_t ring_bytes, total;
	void *ping, *pong;
	struct pp_page *page;
};

static int pp_ready(void *arg)
{
	return skv_ring_count(arg) != 0;
}

/* The echo side: pop from ping, push the same message to pong, wake, round_trips times. */
static void pp_echo(struct pp_layout *l, enum skv_wait_backend backend, int ping_efd,
		    int pong_efd, int64_t echo_spin_ns)
{
	struct skv_ring in, out;
	struct skv_waiter *w = NULL;
	/* The counter is per process and fork copies it: count from here. */
	uint64_t syscalls0 = skv_wake_syscalls();
	int err = skv_ring_attach(&in, l->ping, l->ring_bytes, SKV_RING_CONSUMER);
	if (!err)
		err = skv_ring_attach(&out, l->pong, l->ring_bytes, SKV_RING_PRODUCER);
	if (!err)
		err = skv_waiter_new(backend, skv_ring_wake_word(&in), ping_efd, NULL, &w);
	for (uint32_t i = 0; !err && i < l->page->round_trips; i++) {
		struct pp_msg m;
		while ((err = skv_ring_pop(&in, &m)) == -EAGAIN) {
			err = skv_waiter_wait(w, pp_ready, &in, echo_spin_ns, -1);
			if (err < 0)
				break;
		}
		if (!err)
			err = skv_ring_push(&out, &m);
		skv_ring_wake(&out, pong_efd);
	}
	l->page->child_error = err;
	l->page->child_syscalls = skv_wake_syscalls() - syscalls0;
	l->page->child_sleeps = w ? skv_waiter_sleeps(w) : 0;
	l->page->child_backend = w ? (uint32_t)skv_waiter_backend(w) : 0;
	skv_waiter_free(w);
	_exit(err ? 1 : 0);
}

/* echo_spin_ns 0: both sides sleep for every message. Large: the echo side spins, so its reply
 * lands within a few hundred nanoseconds of the request, right while the requester announces
 * its sleep: the Dekker handshake is raced on nearly every round trip. */
static void ping_pong(const char *test_name, enum skv_wait_backend backend, int64_t echo_spin_ns)
{
	require_backend(backend);
	struct pp_layout l;
	l.ring_bytes = skv_ring_bytes(sizeof(struct pp_msg), PP_CAPACITY);
	l.total = 2 * l.ring_bytes + 4096;
	l.mem = tu_map_shared(test_name, l.total);
	l.ping = l.mem;
	l.pong = l.mem + l.ring_bytes;
	l.page = (struct pp_page *)(l.mem + 2 * l.ring_bytes);
	cr_assert_eq(skv_ring_init(l.ping, l.ring_bytes, sizeof(struct pp_msg), PP_CAPACITY), 0);
	cr_assert_eq(skv_ring_init(l.pong, l.ring_bytes, sizeof(struct pp_msg), PP_CAPACITY), 0);
	const uint32_t round_trips = echo_spin_ns ? PP_RACE_ROUND_TRIPS : PP_ROUND_TRIPS;
	l.page->round_trips = round_trips;
	int ping_efd = new_eventfd(), pong_efd = new_eventfd();

	pid_t parent = getpid();
	pid_t child = fork();
	cr_assert(child >= 0);
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(9);
		pp_echo(&l, backend, ping_efd, pong_efd, echo_spin_ns);
	}

	struct skv_ring out, in;
	struct skv_waiter *w;
	cr_assert_eq(skv_ring_attach(&out, l.ping, l.ring_bytes, SKV_RING_PRODUCER), 0);
	cr_assert_eq(skv_ring_attach(&in, l.pong, l.ring_bytes, SKV_RING_CONSUMER), 0);
	cr_assert_eq(skv_waiter_new(backend, skv_ring_wake_word(&in), pong_efd, NULL, &w), 0);
	uint64_t syscalls0 = skv_wake_syscalls();
	uint32_t echoed = 0, wrong = 0;
	int err = 0;
	for (uint32_t i = 0; !err && i < round_trips; i++) {
		struct pp_msg m = { .seq = i };
		err = skv_ring_push(&out, &m);
		skv_ring_wake(&out, ping_efd);
		while (!err && (err = skv_ring_pop(&in, &m)) == -EAGAIN) {
			/* Spin 0 and no timeout: every reply needs a wake-up, and a lost one hangs
			 * the test until the suite's timeout fails it. */
			err = skv_waiter_wait(w, pp_ready, &in, 0, -1);
			err = err < 0 ? err : 0;
		}
		if (!err) {
			wrong += m.seq != i;
			echoed++;
		}
	}
	int status = 0;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert_eq(err, 0, "%s", skv_strerror(err));
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "echo side: status 0x%x, %s",
		  status, skv_strerror(l.page->child_error));
	cr_assert_eq(echoed, round_trips);
	cr_assert_eq(wrong, 0);
	cr_assert_eq(l.page->child_backend, (uint32_t)backend);
	if (echo_spin_ns == 0) {
		cr_assert_gt(skv_wake_syscalls(), syscalls0);
		cr_assert_gt(l.page->child_syscalls, 0);
		cr_assert_gt(skv_waiter_sleeps(w), 0);
		cr_assert_gt(l.page->child_sleeps, 0);
	}
	cr_log_info("%s: parent %lu sleeps %lu wakes, echo %lu sleeps %lu wakes", test_name,
		    (unsigned long)skv_waiter_sleeps(w),
		    (unsigned long)(skv_wake_syscalls() - syscalls0),
		    (unsigned long)l.page->child_sleeps, (unsigned long)l.page->child_syscalls);
	skv_waiter_free(w);
	close(ping_efd);
	close(pong_efd);
	munmap(l.mem, l.total);
}

Test(wake, ping_pong_every_message_wakes_uring, .timeout = 300)
{
	ping_pong("ping_pong_every_message_wakes_uring", SKV_WAIT_URING, 0);
}

Test(wake, ping_pong_every_message_wakes_futex, .timeout = 300)
{
	ping_pong("ping_pong_every_message_wakes_futex", SKV_WAIT_FUTEX, 0);
}

Test(wake, ping_pong_reply_races_the_announcement_uring, .timeout = 300)
{
	ping_pong("ping_pong_reply_races_the_announcement_uring", SKV_WAIT_URING,
		  1000000000);
}

Test(wake, ping_pong_reply_races_the_announcement_futex, .timeout = 300)
{
	ping_pong("ping_pong_reply_races_the_announcement_futex", SKV_WAIT_FUTEX,
		  1000000000);
}

/* ---- io_uring refused by seccomp: AUTO falls back to futex --------------------------------- */

#define FB_MESSAGES 200000u
#define FB_CAPACITY 256u

struct fb_page {
	int step;                 /* the child's progress, for the failure message */
	int auto_err, auto_backend;
	int second_err, second_backend;
	int forced_err;
	int log_lines;
	char log_line[256];
	uint64_t moved, bad, sleeps, producer_syscalls;
	int producer_status;
	int consumer_error;
};

static struct fb_page *fb_page;

static void fb_log(const char *line)
{
	fb_page->log_lines++;
	snprintf(fb_page->log_line, sizeof(fb_page->log_line), "%s", line);
}

/* Refuse io_uring_setup, io_uring_enter and io_uring_register with EPERM, the way a container
 * runtime's seccomp profile does (kernel.io_uring_disabled=2 fails io_uring_setup alike); or,
 * with only_enter, just io_uring_enter, so that the ring is made but cannot be used. */
static int fb_forbid_io_uring(int only_enter)
{
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 3, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
			 only_enter ? __NR_io_uring_enter : __NR_io_uring_setup, 2, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
			 only_enter ? __NR_io_uring_enter : __NR_io_uring_register, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
	};
	struct sock_fprog prog = {
		.len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
		.filter = filter,
	};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return -errno;
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
		return -errno;
	return 0;
}

static int fb_ready(void *arg)
{
	return skv_ring_count(arg) != 0;
}

static void fb_producer(void *ring_mem, size_t ring_bytes, int efd)
{
	struct skv_ring r;
	if (skv_ring_attach(&r, ring_mem, ring_bytes, SKV_RING_PRODUCER))
		_exit(2);
	uint64_t syscalls0 = skv_wake_syscalls(); /* fork copied the consumer's counter */
	for (uint64_t seq = 0; seq < FB_MESSAGES; seq++) {
		struct pp_msg m = { .seq = seq };
		while (skv_ring_push(&r, &m) == -EAGAIN) {
			skv_ring_wake(&r, efd);
			sched_yield();
		}
		skv_ring_wake(&r, efd);
		if (seq % 1000 == 999)
			usleep(100);
	}
	fb_page->producer_syscalls = skv_wake_syscalls() - syscalls0;
	_exit(0);
}

/* The whole scenario, in a child process that installs the filter. */
static void fb_child(void *ring_mem, size_t ring_bytes)
{
	fb_page->step = 1;
	if (fb_forbid_io_uring(0))
		_exit(10);
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd < 0)
		_exit(11);
	struct skv_ring r;
	if (skv_ring_attach(&r, ring_mem, ring_bytes, SKV_RING_CONSUMER))
		_exit(12);

	fb_page->step = 2;
	struct skv_waiter *w = NULL, *second = NULL, *forced = NULL;
	fb_page->auto_err = skv_waiter_new(SKV_WAIT_AUTO, skv_ring_wake_word(&r), efd, fb_log, &w);
	if (w)
		fb_page->auto_backend = (int)skv_waiter_backend(w);
	struct skv_wake_word scratch = { 0, 0 };
	fb_page->second_err = skv_waiter_new(SKV_WAIT_AUTO, &scratch, efd, fb_log, &second);
	if (second)
		fb_page->second_backend = (int)skv_waiter_backend(second);
	skv_waiter_free(second);
	fb_page->forced_err = skv_waiter_new(SKV_WAIT_URING, &scratch, efd, fb_log, &forced);
	skv_waiter_free(forced);
	if (!w)
		_exit(13);

	fb_page->step = 3;
	pid_t consumer = getpid();
	pid_t producer = fork();
	if (producer < 0)
		_exit(14);
	if (producer == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != consumer)
			_exit(9);
		fb_producer(ring_mem, ring_bytes, efd);
	}
	int err = 0;
	while (fb_page->moved < FB_MESSAGES) {
		struct pp_msg m;
		err = skv_ring_pop(&r, &m);
		if (!err) {
			fb_page->bad += m.seq != fb_page->moved;
			fb_page->moved++;
			continue;
		}
		if (err != -EAGAIN)
			break;
		err = skv_waiter_wait(w, fb_ready, &r, 2000, -1);
		if (err < 0)
			break;
		err = 0;
	}
	fb_page->consumer_error = err;
	fb_page->sleeps = skv_waiter_sleeps(w);
	waitpid(producer, &fb_page->producer_status, 0);
	skv_waiter_free(w);
	fb_page->step = 4;
	_exit(0);
}

Test(wake, io_uring_refused_falls_back_to_futex, .timeout = 300)
{
	const char *name = "io_uring_refused_falls_back_to_futex";
	size_t ring_bytes = skv_ring_bytes(sizeof(struct pp_msg), FB_CAPACITY);
	size_t total = ring_bytes + 4096;
	char *mem = tu_map_shared(name, total);
	cr_assert_eq(skv_ring_init(mem, ring_bytes, sizeof(struct pp_msg), FB_CAPACITY), 0);
	fb_page = (struct fb_page *)(mem + ring_bytes);

	pid_t parent = getpid();
	pid_t child = fork();
	cr_assert(child >= 0);
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(9);
		fb_child(mem, ring_bytes);
	}
	int status = 0;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "child failed at step %d: status 0x%x", fb_page->step, status);
	cr_assert_eq(fb_page->auto_err, 0, "%s", skv_strerror(fb_page->auto_err));
	cr_assert_eq(fb_page->auto_backend, SKV_WAIT_FUTEX);
	cr_assert_eq(fb_page->log_lines, 1, "logged %d lines", fb_page->log_lines);
	cr_assert(strstr(fb_page->log_line, "io_uring"), "%s", fb_page->log_line);
	cr_assert(strstr(fb_page->log_line, "futex"), "%s", fb_page->log_line);
	cr_assert_null(strchr(fb_page->log_line, '\n'));
	cr_assert_eq(fb_page->second_err, 0);
	cr_assert_eq(fb_page->second_backend, SKV_WAIT_FUTEX);
	cr_assert_eq(fb_page->forced_err, -EPERM, "%s", skv_strerror(fb_page->forced_err));
	cr_assert_eq(fb_page->consumer_error, 0, "%s", skv_strerror(fb_page->consumer_error));
	cr_assert(WIFEXITED(fb_page->producer_status) && WEXITSTATUS(fb_page->producer_status) == 0,
		  "producer: status 0x%x", fb_page->producer_status);
	cr_assert_eq(fb_page->moved, FB_MESSAGES);
	cr_assert_eq(fb_page->bad, 0);
	cr_assert_gt(fb_page->sleeps, 0);
	cr_assert_gt(fb_page->producer_syscalls, 0);
	munmap(mem, total);
}

/* io_uring_setup works but io_uring_enter is refused: the waiter finds out when it submits its
 * first read, and AUTO falls back all the same. */
Test(wake, io_uring_enter_refused_falls_back_to_futex)
{
	struct fb_page *page = tu_map_shared("io_uring_enter_refused_falls_back_to_futex", 4096);
	fb_page = page;
	pid_t parent = getpid();
	pid_t child = fork();
	cr_assert(child >= 0);
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent || fb_forbid_io_uring(1))
			_exit(9);
		int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		struct skv_wake_word word = { 0, 0 };
		struct skv_waiter *w = NULL;
		page->forced_err = skv_waiter_new(SKV_WAIT_URING, &word, efd, fb_log, &w);
		skv_waiter_free(w);
		w = NULL;
		page->auto_err = skv_waiter_new(SKV_WAIT_AUTO, &word, efd, fb_log, &w);
		if (w) {
			page->auto_backend = (int)skv_waiter_backend(w);
			/* And it still sleeps and times out. */
			page->consumer_error = skv_waiter_wait(w, never_ready, NULL, 0, 1000000);
			page->sleeps = skv_waiter_sleeps(w);
		}
		skv_waiter_free(w);
		_exit(0);
	}
	int status = 0;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: status 0x%x", status);
	cr_assert_eq(page->forced_err, -EPERM, "%s", skv_strerror(page->forced_err));
	cr_assert_eq(page->auto_err, 0, "%s", skv_strerror(page->auto_err));
	cr_assert_eq(page->auto_backend, SKV_WAIT_FUTEX);
	cr_assert_eq(page->log_lines, 1);
	cr_assert(strstr(page->log_line, "io_uring"), "%s", page->log_line);
	cr_assert_eq(page->consumer_error, 0);
	cr_assert_geq(page->sleeps, 1);
	munmap(page, 4096);
}
