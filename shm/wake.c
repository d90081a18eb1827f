#include "wake.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <liburing.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* io_uring user_data of the waiter's requests. Polls carry a generation above the low byte so
 * that the completion of a poll on a fd no longer watched is recognised and dropped. */
#define WAKE_TAG_READ 1u
#define WAKE_TAG_POLL 2u
#define WAKE_TAG_CANCEL 3u
#define WAKE_TAG_MASK 0xffu
#define WAKE_URING_ENTRIES 8u
/* Readiness checks between two clock reads while spinning. */
#define WAKE_SPIN_BATCH 16

struct skv_waiter {
	enum skv_wait_backend backend; /* URING or FUTEX */
	struct skv_wake_word *word;    /* shared */
	int efd;
	int watch_fd;                  /* -1: none */
	uint64_t sleeps;
	/* io_uring only */
	int uring_live;                /* ring is initialised */
	int read_armed;                /* the eventfd read is queued or in flight */
	int poll_armed;                /* a poll on watch_fd is queued or in flight */
	int poll_fired;                /* the armed poll completed: watch_fd was readable */
	int uring_error;               /* a request failed: reported by the next wait */
	uint64_t poll_tag;             /* user_data of the armed poll */
	uint64_t poll_generation;
	uint64_t efd_value;            /* the in-flight read's buffer: the eventfd counter */
	struct io_uring ring;
};

/* Wakes that made a system call, for skv_wake_syscalls; and whether this process has logged its
 * fall-back to futex (the header promises one line per process). */
static uint64_t wake_syscall_count;
static int wake_fallback_logged;

uint64_t skv_wake_syscalls(void)
{
	return __atomic_load_n(&wake_syscall_count, __ATOMIC_RELAXED);
}

static int64_t wake_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}


static long wake_futex(uint32_t *uaddr, int op, uint32_t val, const struct timespec *timeout)
{
	/* Not FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes. */
	return syscall(SYS_futex, uaddr, op, val, timeout, NULL, 0);
}

void skv_wake(struct skv_wake_word *word, int efd)
{
	/* F2: orders the caller's publication (R1) before the load of sleeping; pairs with F1 in
	 * the waiter (Dekker): if the consumer's re-check missed the data, we see its announcement. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint32_t how = __atomic_load_n(&word->sleeping, __ATOMIC_RELAXED);
	if (how == SKV_SLEEP_AWAKE)
		return;
	/* Copied once and checked: anything but the two known ways is a corrupt word. */
	if (how != SKV_SLEEP_EVENTFD && how != SKV_SLEEP_FUTEX)
		return;
	if (how == SKV_SLEEP_EVENTFD && efd < 0)
		return;
	/* Claim the wake-up: of all producers that saw this announcement, one makes the call. */
	if (!__atomic_compare_exchange_n(&word->sleeping, &how, SKV_SLEEP_AWAKE, 0, __ATOMIC_RELAXED,
					 __ATOMIC_RELAXED))
		return;
	/* R3: pairs with A3 in wake_sleep_futex; a consumer that reads the new seq also sees the
	 * data published before F2. */
	__atomic_fetch_add(&word->seq, 1, __ATOMIC_RELEASE);
	if (how == SKV_SLEEP_FUTEX) {
		wake_futex(&word->seq, FUTEX_WAKE, INT_MAX, NULL);
	} else {
		uint64_t one = 1;
		/* Fails only if the counter would overflow (a wake-up is pending anyway) or efd is
		 * not an eventfd; a short write cannot happen for 8 bytes. */
		ssize_t n = write(efd, &one, sizeof(one));
		(void)n;
	}
	__atomic_fetch_add(&wake_syscall_count, 1, __ATOMIC_RELAXED);
}

/* 1 if fd is readable (or hung up, or in error: a read will not block), 0 if not, -EBADF. */
static int wake_fd_readable(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int n = poll(&pfd, 1, 0);
	if (n <= 0)
		return 0;
	if (pfd.revents & POLLNVAL)
		return -EBADF;
	return (pfd.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

static struct timespec wake_ts(int64_t ns)
{
	if (ns < 0)
		ns = 0;
	return (struct timespec){ .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
}

/* ---- io_uring ---------------------------------------------------------------------------- */

static struct io_uring_sqe *wake_get_sqe(struct skv_waiter *w)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
	if (!sqe) {
		/* The SQ holds at most a read, a poll and a cancel; make room anyway. */
		io_uring_submit(&w->ring);
		sqe = io_uring_get_sqe(&w->ring);
	}
	return sqe;
}

static int wake_arm_read(struct skv_waiter *w)
{
	struct io_uring_sqe *sqe = wake_get_sqe(w);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, w->efd, &w->efd_value, sizeof(w->efd_value), 0);
	io_uring_sqe_set_data64(sqe, WAKE_TAG_READ);
	w->read_armed = 1;
	return 0;
}

static int wake_arm_poll(struct skv_waiter *w)
{
	struct io_uring_sqe *sqe = wake_get_sqe(w);
	if (!sqe)
		return -EBUSY;
	w->poll_generation++;
	w->poll_tag = (w->poll_generation << 8) | WAKE_TAG_POLL;
	io_uring_prep_poll_add(sqe, w->watch_fd, POLLIN);
	io_uring_sqe_set_data64(sqe, w->poll_tag);
	w->poll_armed = 1;
	return 0;
}

/* Consume every posted completion. A read completion means an eventfd write happened and the
 * read took the whole counter (eventfd without EFD_SEMAPHORE); it is re-armed at the next
 * sleep. Completions of cancelled polls and of cancel requests are dropped. */
static void wake_reap(struct skv_waiter *w)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	io_uring_for_each_cqe(&w->ring, head, cqe) {
		uint64_t tag = io_uring_cqe_get_data64(cqe);
		seen++;
		if (tag == WAKE_TAG_READ) {
			w->read_armed = 0;
			if (cqe->res < 0 && cqe->res != -EINTR && cqe->res != -EAGAIN &&
			    cqe->res != -ECANCELED)
				w->uring_error = cqe->res;
		} else if ((tag & WAKE_TAG_MASK) == WAKE_TAG_POLL && w->poll_armed &&
			   tag == w->poll_tag) {
			w->poll_armed = 0;
			if (cqe->res > 0)
				w->poll_fired = 1;
			else if (cqe->res < 0 && cqe->res != -ECANCELED)
				w->uring_error = cqe->res;
		}
	}
	io_uring_cq_advance(&w->ring, seen);
}

static void wake_cancel_poll(struct skv_waiter *w)
{
	if (!w->poll_armed)
		return;
	struct io_uring_sqe *sqe = wake_get_sqe(w);
	if (sqe) {
		io_uring_prep_poll_remove(sqe, w->poll_tag);
		io_uring_sqe_set_data64(sqe, WAKE_TAG_CANCEL);
		io_uring_submit(&w->ring);
	}
	/* Its completion (or the poll's own, if it fired first) carries a stale tag from now on. */
	w->poll_armed = 0;
	w->poll_fired = 0;
}

/* One sleep: arm what is not in flight, announce, re-check, block until a completion or the
 * deadline. Returns 1 (ready), 2 (watched fd readable), 0 (woken or timed out: the caller
 * re-checks), or -errno. */
static int wake_sleep_uring(struct skv_waiter *w, int (*ready)(void *), void *arg,
			    int64_t deadline_ns)
{
	/* Completions posted while we were awake: late eventfd reads (a producer claimed an
	 * announcement we had already left), or a poll that fired after we returned. The poll's
	 * result is stale (the caller may have drained the fd since): drop it and re-arm, which
	 * reports the fd's current level. */
	wake_reap(w);
	w->poll_fired = 0;
	if (w->uring_error) {
		int err = w->uring_error;
		w->uring_error = 0;
		return err;
	}
	int err = 0;
	if (!w->read_armed)
		err = wake_arm_read(w);
	if (!err && w->watch_fd >= 0 && !w->poll_armed)
		err = wake_arm_poll(w);
	if (err)
		return err;

	__atomic_store_n(&w->word->sleeping, SKV_SLEEP_EVENTFD, __ATOMIC_RELAXED);
	/* F1: orders the announcement before the re-check; pairs with F2 in skv_wake. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (ready(arg)) {
		__atomic_store_n(&w->word->sleeping, SKV_SLEEP_AWAKE, __ATOMIC_RELAXED);
		/* The queued read/poll stay queued; the next sleep submits them. */
		return 1;
	}

	struct io_uring_cqe *cqe = NULL;
	struct __kernel_timespec kts, *kts_ptr = NULL;
	if (deadline_ns >= 0) {
		struct timespec ts = wake_ts(deadline_ns - wake_now_ns());
		kts.tv_sec = ts.tv_sec;
		kts.tv_nsec = ts.tv_nsec;
		kts_ptr = &kts;
	}
	/* liburing 2.3 returns the number submitted (or -ETIME) and may leave cqe NULL: the
	 * completions are read by wake_reap, not through cqe. */
	int ret = io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, kts_ptr, NULL);
	__atomic_store_n(&w->word->sleeping, SKV_SLEEP_AWAKE, __ATOMIC_RELAXED);
	w->sleeps++;
	if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
		return ret;

	wake_reap(w);
	if (w->uring_error) {
		err = w->uring_error;
		w->uring_error = 0;
		return err;
	}
	if (w->poll_fired) {
		w->poll_fired = 0;
		return ready(arg) ? 1 : 2;
	}
	return 0;
}

/* ---- futex ------------------------------------------------------------------------------- */

static int wake_sleep_futex(struct skv_waiter *w, int (*ready)(void *), void *arg,
			    int64_t deadline_ns)
{
	/* A3: pairs with R3 in skv_wake. Read before the announcement: every producer that claims
	 * this announcement bumps seq after this read, so FUTEX_WAIT either sees the change or is
	 * woken by the FUTEX_WAKE that follows the bump. Read after it, seq could already hold
	 * the bump of a late producer that claimed this announcement while answering an earlier
	 * one (it saw the old announcement, then swapped the new one): we would sleep on the
	 * bumped value with the announcement gone, and the next producer, seeing no sleeper,
	 * would never wake us (a lost wake-up; the acquire keeps the store below after it). */
	uint32_t seq = __atomic_load_n(&w->word->seq, __ATOMIC_ACQUIRE);
	__atomic_store_n(&w->word->sleeping, SKV_SLEEP_FUTEX, __ATOMIC_RELAXED);
	/* F1: orders the announcement before the re-check; pairs with F2 in skv_wake. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	int result = 0;
	if (ready(arg)) {
		result = 1;
		goto awake;
	}
	if (w->watch_fd >= 0) {
		result = wake_fd_readable(w->watch_fd);
		if (result) {
			result = result > 0 ? 2 : result;
			goto awake;
		}
	}
	struct timespec ts, *ts_ptr = NULL;
	if (deadline_ns >= 0) {
		ts = wake_ts(deadline_ns - wake_now_ns());
		ts_ptr = &ts;
	}
	long ret = wake_futex(&w->word->seq, FUTEX_WAIT, seq, ts_ptr);
	int saved_errno = errno;
	w->sleeps++;
	if (ret < 0 && saved_errno != EAGAIN && saved_errno != EINTR && saved_errno != ETIMEDOUT) {
		result = -saved_errno;
		goto awake;
	}
	if (w->watch_fd >= 0) {
		result = wake_fd_readable(w->watch_fd);
		if (result > 0)
			result = ready(arg) ? 1 : 2;
	}
awake:
	__atomic_store_n(&w->word->sleeping, SKV_SLEEP_AWAKE, __ATOMIC_RELAXED);
	return result;
}

/* ---- the waiter -------------------------------------------------------------------------- */

static int wake_uring_unavailable(int err)
{
	return err == -EPERM || err == -ENOSYS || err == -EACCES;
}

/* Make the ring and put the eventfd read in flight. */
static int wake_uring_setup(struct skv_waiter *w)
{
	int err = io_uring_queue_init(WAKE_URING_ENTRIES, &w->ring, 0);
	if (err < 0)
		return err;
	w->uring_live = 1;
	err = wake_arm_read(w);
	if (!err) {
		/* A seccomp filter may allow io_uring_setup and refuse io_uring_enter. */
		int n = io_uring_submit(&w->ring);
		err = n < 0 ? n : 0;
	}
	if (err) {
		io_uring_queue_exit(&w->ring);
		w->uring_live = 0;
		w->read_armed = 0;
	}
	return err;
}

int skv_waiter_new(enum skv_wait_backend backend, struct skv_wake_word *word, int efd,
		   void (*log)(const char *line), struct skv_waiter **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!word || (backend != SKV_WAIT_AUTO && backend != SKV_WAIT_URING &&
		      backend != SKV_WAIT_FUTEX))
		return -EINVAL;
	if (backend != SKV_WAIT_FUTEX && efd < 0)
		return -EINVAL;
	struct skv_waiter *w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->word = word;
	w->efd = efd;
	w->watch_fd = -1;
	w->backend = SKV_WAIT_FUTEX;
	if (backend != SKV_WAIT_FUTEX) {
		int err = wake_uring_setup(w);
		if (!err) {
			w->backend = SKV_WAIT_URING;
		} else if (backend == SKV_WAIT_AUTO && wake_uring_unavailable(err)) {
			if (log && !__atomic_exchange_n(&wake_fallback_logged, 1, __ATOMIC_RELAXED)) {
				char line[200];
				snprintf(line, sizeof(line),
					 "io_uring is unavailable here (%s: kernel.io_uring_disabled "
					 "or a seccomp filter?): ring consumers sleep on futexes",
					 strerror(-err));
				log(line);
			}
		} else {
			free(w);
			return err;
		}
	}
	*out = w;
	return 0;
}

void skv_waiter_free(struct skv_waiter *w)
{
	if (!w)
		return;
	if (w->uring_live) {
		/* The kernel must not complete the read into w->efd_value after w is freed: cancel
		 * it and wait (briefly) for its completion before tearing the ring down. */
		if (w->read_armed) {
			struct io_uring_sqe *sqe = wake_get_sqe(w);
			if (sqe) {
				io_uring_prep_cancel64(sqe, WAKE_TAG_READ, 0);
				io_uring_sqe_set_data64(sqe, WAKE_TAG_CANCEL);
			}
			int64_t deadline = wake_now_ns() + 1000000000;
			while (w->read_armed && wake_now_ns() < deadline) {
				struct io_uring_cqe *cqe = NULL;
				struct __kernel_timespec kts = { .tv_sec = 0, .tv_nsec = 10000000 };
				io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, &kts, NULL);
				wake_reap(w);
			}
		}
		io_uring_queue_exit(&w->ring);
	}
	free(w);
}

enum skv_wait_backend skv_waiter_backend(const struct skv_waiter *w)
{
	return w->backend;
}

uint64_t skv_waiter_sleeps(const struct skv_waiter *w)
{
	return w->sleeps;
}

void skv_waiter_watch_fd(struct skv_waiter *w, int extra_fd)
{
	if (extra_fd < 0)
		extra_fd = -1;
	if (extra_fd == w->watch_fd)
		return;
	if (w->backend == SKV_WAIT_URING)
		wake_cancel_poll(w);
	w->watch_fd = extra_fd;
}

int skv_waiter_wait(struct skv_waiter *w, int (*ready)(void *arg), void *arg, int64_t spin_ns,
		    int64_t timeout_ns)
{
	if (ready(arg))
		return 1;
	int64_t now = wake_now_ns();
	int64_t deadline = timeout_ns < 0 ? -1 : now + timeout_ns;
	if (spin_ns > 0) {
		int64_t spin_end = now + spin_ns;
		if (deadline >= 0 && spin_end > deadline)
			spin_end = deadline;
		while (now < spin_end) {
			for (int i = 0; i < WAKE_SPIN_BATCH; i++) {
				if (ready(arg))
					return 1;
				skv_cpu_relax();
			}
			now = wake_now_ns();
		}
	}
	for (;;) {
		int ret = w->backend == SKV_WAIT_URING ? wake_sleep_uring(w, ready, arg, deadline)
						       : wake_sleep_futex(w, ready, arg, deadline);
		if (ret != 0)
			return ret;
		/* Woken with nothing known, or timed out: a late wake-up from an earlier
		 * announcement is absorbed here by sleeping again. */
		if (ready(arg))
			return 1;
		if (deadline >= 0 && wake_now_ns() >= deadline)
			return 0;
	}
}
