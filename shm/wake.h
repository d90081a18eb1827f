/* Sleeping and waking across processes, for ring consumers.
 *
 * A consumer with nothing to do spins briefly, then sleeps. It sleeps through io_uring: an
 * eventfd read submitted on its own ring (plus, optionally, a poll on one more fd such as its
 * control socket, so that one sleep waits for both). Where io_uring is unavailable (the
 * kernel.io_uring_disabled sysctl, a seccomp filter, an old kernel) the same protocol falls back
 * to futex waits on the shared wake word, and the first waiter that falls back logs one line
 * saying so through the caller's log callback.
 *
 * The protocol (a Dekker handshake; every acquire names its paired release):
 *   consumer:  (futex: s = load-acquire seq, A3);
 *              sleeping = SKV_SLEEP_EVENTFD or SKV_SLEEP_FUTEX (store);  full fence F1;
 *              re-check its rings (A1 of ring.h);
 *              if still idle: sleep (eventfd read in io_uring, or FUTEX_WAIT(seq, s));
 *              on wake-up: sleeping = SKV_SLEEP_AWAKE.
 *   producer:  publish (R1 of ring.h);  full fence F2;  load sleeping: if set, claim the wake-up
 *              by compare-and-swap sleeping -> SKV_SLEEP_AWAKE; the one producer whose swap
 *              succeeds bumps seq (R3, pairs with A3) and writes the eventfd (EVENTFD) or
 *              FUTEX_WAKEs seq (FUTEX). The consumer says which way it sleeps, so producers need
 *              no configuration.
 * F1 and F2 make "the consumer saw the data" or "the producer saw the announcement" true (or
 * both), so no wake-up is lost; the claim makes one announcement cost at most one system call,
 * however many producers or pushes follow it. A producer therefore makes no system call while
 * its consumer is awake: a busy system makes none per message. One wake word may serve many
 * rings with one consumer (an engine sleeps on one word for all its input rings).
 *
 * io_uring: each waiter owns a small io_uring made once, with one 8-byte eventfd read always in
 * flight (re-armed only after its completion was reaped), so an eventfd write is never missed
 * and the read itself drains the eventfd's counter; a wake-up that arrives late (after the
 * waiter returned on a timeout or on its watched fd) leaves a completion that the next wait
 * reaps and treats as spurious: it re-checks and sleeps again. Waiters do not survive fork():
 * make them in the process and thread that waits.
 *
 * Thread safety: one waiter per consumer thread; skv_wake may be called from any producer. */
#ifndef SKV_WAKE_H
#define SKV_WAKE_H

#include <stdint.h>

/* In shared memory: sleeping is set by the consumer and cleared by it or by the one producer
 * that claims the wake-up; seq is bumped by claiming producers. */
#define SKV_SLEEP_AWAKE 0u
#define SKV_SLEEP_EVENTFD 1u /* asleep in io_uring on its eventfd: producers write the eventfd */
#define SKV_SLEEP_FUTEX 2u   /* asleep in FUTEX_WAIT on seq: producers FUTEX_WAKE */

struct skv_wake_word {
	uint32_t sleeping; /* SKV_SLEEP_*: set by the consumer, cleared by it or by the claiming
			    * producer */
	uint32_t seq;      /* bumped by every waking producer; the futex word */
};
_Static_assert(sizeof(struct skv_wake_word) == 8, "skv_wake_word is ABI");

enum skv_wait_backend {
	SKV_WAIT_AUTO = 0,  /* io_uring if it works here, else futex */
	SKV_WAIT_URING = 1,
	SKV_WAIT_FUTEX = 2,
};

struct skv_waiter;

/* Consumer side, in the process and thread that will wait. word: its shared wake word (in
 * MAP_SHARED memory for futex waits across processes); efd: an eventfd, best made with
 * EFD_NONBLOCK (io_uring then polls it instead of parking a kernel worker in a blocking read;
 * needed by URING and AUTO, ignored by FUTEX); log: called with one line, once per process, when
 * AUTO falls back to futex because io_uring is unavailable (may be NULL). Errors: -EINVAL (no
 * word, no eventfd for URING/AUTO, bad backend), -ENOMEM, -ENOSYS/-EPERM/-EACCES when URING is
 * forced and unavailable, or io_uring_queue_init's error. */
int skv_waiter_new(enum skv_wait_backend backend, struct skv_wake_word *word, int efd,
		   void (*log)(const char *line), struct skv_waiter **out);
/* Cancels the waiter's requests and closes its io_uring. NULL is fine. */
void skv_waiter_free(struct skv_waiter *w);
/* The backend chosen: SKV_WAIT_URING or SKV_WAIT_FUTEX, never AUTO. */
enum skv_wait_backend skv_waiter_backend(const struct skv_waiter *w);

/* Times this waiter entered the kernel to sleep (for metrics and tests). */
uint64_t skv_waiter_sleeps(const struct skv_waiter *w);

/* Also wake up when extra_fd becomes readable (POLLIN/POLLHUP/POLLERR), e.g. a control socket.
 * io_uring: one poll request in the same wait (re-armed at each sleep, so it reports the fd's
 * level, not edges); futex: the waiter checks the fd with poll() before and after sleeping, and
 * the producer of extra_fd's data must also call skv_wake on this word. -1 to remove. Changing
 * the fd cancels the poll on the old one (call this before closing a watched fd). */
void skv_waiter_watch_fd(struct skv_waiter *w, int extra_fd);

/* Spin up to spin_ns checking ready(arg), then announce sleep, re-check, and sleep until woken
 * or timeout_ns passes (< 0: no timeout; 0: check once, do not block). Returns 1 if ready(arg)
 * is true (checked first), 2 if extra_fd is readable, 0 on timeout, or -errno. A wake-up with
 * nothing ready (a late or stale one) is absorbed: the waiter announces and sleeps again until
 * the timeout. ready() must be cheap and must not sleep; it runs in the spin loop and between
 * the announcement and the sleep. */
int skv_waiter_wait(struct skv_waiter *w, int (*ready)(void *arg), void *arg, int64_t spin_ns,
		    int64_t timeout_ns);

/* Producer side: after publishing, wake the consumer of word if it sleeps, the way it sleeps
 * (efd: the consumer's eventfd, or -1 if it sleeps on the futex). A producer without the
 * eventfd (efd -1) cannot wake a consumer that sleeps in io_uring: it leaves the announcement
 * unclaimed for a producer that has it (hand every producer the eventfd). Async-signal-safe. */
void skv_wake(struct skv_wake_word *word, int efd);

/* A spinning waiter's pause between checks. */
static inline void skv_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Wakes since start that needed a system call (per process, for metrics; a forked child starts
 * from its parent's count). */
uint64_t skv_wake_syscalls(void);

#endif
