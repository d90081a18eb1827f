/* skv-bench-ring: round-trip latency between two processes over the shm/ rings, next to a Unix
 * socket ping-pong measured in the same run.
 *
 * A requester pushes a 64-byte message on one ring and waits for the echo process to push it
 * back on another ring. Paths:
 *   ring, sleeping (io_uring)  both sides wait with spin 0 through io_uring: every message needs
 *                              a wake-up (eventfd write -> io_uring read completion)
 *   ring, sleeping (futex)     the same through FUTEX_WAIT / FUTEX_WAKE
 *   ring, spinning             both sides spin (no system call per message at all)
 *   unix socket                socketpair(AF_UNIX, SOCK_SEQPACKET): blocking write + read
 * Each repeat runs every path once, in turn (interleaved, so that noise from other processes hits
 * them all alike), each in a fresh pair of processes, with --warmup round trips discarded. The
 * table shows the median and the 99th percentile over all repeats' round trips, the range of
 * the per-repeat medians, and wake-up system calls per round trip. With 2+ usable CPUs the two
 * processes are pinned to different ones (sched_setaffinity). Timings are CLOCK_MONOTONIC. */
#include <errno.h>
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench-util.h"
#include "ring.h"
#include "skv-error.h"
#include "wake.h"

#define BENCH_MSG_BYTES 64
#define BENCH_RING_CAPACITY 64u
#define BENCH_SPIN_NS 1000000000ll /* "spinning": longer than any round trip */

enum bench_path {
	PATH_SLEEP_URING,
	PATH_SLEEP_FUTEX,
	PATH_SPIN,
	PATH_SOCKET,
	PATH_COUNT
};

static const char *const path_label[PATH_COUNT] = {
	"ring, sleeping (io_uring)",
	"ring, sleeping (futex)",
	"ring, spinning",
	"unix socket (SEQPACKET)",
};

static const char *const path_key[PATH_COUNT] = {
	"ring_sleep_uring",
	"ring_sleep_futex",
	"ring_spin",
	"unix_socket",
};

struct bench_msg {
	uint64_t seq;
	uint8_t payload[BENCH_MSG_BYTES - 8];
};
_Static_assert(sizeof(struct bench_msg) == BENCH_MSG_BYTES, "message size");

struct bench_opts {
	int round_trips;
	int warmup;
	int repeats;
	int json;
};

/* Written by the echo process, read by the requester after waitpid. */
struct bench_echo_report {
	uint64_t wake_syscalls;
	uint64_t sleeps;
	int error;
};

struct bench_result {
	int available;
	char why[160];
	int64_t *samples;         /* ns, repeats x round_trips */
	size_t n_samples;
	int64_t *repeat_medians;  /* ns, one per repeat */
	uint64_t wake_syscalls;   /* both sides, all repeats */
	uint64_t sleeps;          /* both sides, all repeats */
};

struct bench_cpus {
	int pinned;
	int requester_cpu, echo_cpu;
	int usable;
};

static int64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void bench_usage(FILE *out)
{
	fputs("usage: skv-bench-ring [--round-trips N] [--warmup N] [--repeats N] [--json]\n", out);
}

static void bench_parse(int argc, char **argv, struct bench_opts *o)
{
	static const struct option longs[] = {
		{ "round-trips", required_argument, NULL, 'n' },
		{ "warmup", required_argument, NULL, 'w' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	*o = (struct bench_opts){ .round_trips = 20000, .warmup = 1000, .repeats = 5 };
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
		switch (c) {
		case 'n': o->round_trips = (int)bench_parse_int("--round-trips", optarg, 1, 10000000); break;
		case 'w': o->warmup = (int)bench_parse_int("--warmup", optarg, 0, 10000000); break;
		case 'r': o->repeats = (int)bench_parse_int("--repeats", optarg, 1, 1000); break;
		case 'j': o->json = 1; break;
		case 'h': bench_usage(stdout); exit(0);
		default:
			bench_usage(stderr);
			bench_die("unknown or incomplete flag '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s'", argv[optind]);
}

static void bench_pick_cpus(struct bench_cpus *cpus)
{
	cpu_set_t set;
	*cpus = (struct bench_cpus){ .requester_cpu = -1, .echo_cpu = -1 };
	if (sched_getaffinity(0, sizeof(set), &set))
		return;
	cpus->usable = CPU_COUNT(&set);
	if (cpus->usable < 2)
		return;
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, &set))
			continue;
		if (cpus->requester_cpu < 0)
			cpus->requester_cpu = cpu;
		else if (cpus->echo_cpu < 0)
			cpus->echo_cpu = cpu;
	}
	cpus->pinned = 1;
}

static void bench_pin(int cpu)
{
	if (cpu < 0)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		bench_die("sched_setaffinity(cpu %d): %s", cpu, strerror(errno));
}

static void *bench_map(size_t bytes, const char *what)
{
	char name[64];
	snprintf(name, sizeof(name), "skv-bench-ring-%d-%s", (int)getpid(), what);
	int fd = memfd_create(name, MFD_CLOEXEC);
	if (fd < 0)
		bench_die("memfd_create: %s", strerror(errno));
	if (ftruncate(fd, (off_t)bytes))
		bench_die("ftruncate: %s", strerror(errno));
	void *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		bench_die("mmap: %s", strerror(errno));
	close(fd);
	return mem;
}

static int bench_ring_ready(void *arg)
{
	return skv_ring_count(arg) != 0;
}

/* Both sides of the ring paths. The memory holds the request ring, the reply ring, then the
 * echo's report. */
struct bench_rings {
	char *mem;
	size_t ring_bytes, total;
	int request_efd, reply_efd;
	struct bench_echo_report *report;
};

static enum skv_wait_backend bench_backend(enum bench_path path)
{
	return path == PATH_SLEEP_URING ? SKV_WAIT_URING
	       : path == PATH_SLEEP_FUTEX ? SKV_WAIT_FUTEX
					  : SKV_WAIT_AUTO;
}

static void bench_echo_ring(struct bench_rings *br, enum bench_path path, int total)
{
	struct skv_ring in, out;
	struct skv_waiter *w = NULL;
	int64_t spin = path == PATH_SPIN ? BENCH_SPIN_NS : 0;
	/* The counter is per process and fork copies it: count from here. */
	uint64_t syscalls0 = skv_wake_syscalls();
	int err = skv_ring_attach(&in, br->mem, br->ring_bytes, SKV_RING_CONSUMER);
	if (!err)
		err = skv_ring_attach(&out, br->mem + br->ring_bytes, br->ring_bytes,
				      SKV_RING_PRODUCER);
	if (!err)
		err = skv_waiter_new(bench_backend(path), skv_ring_wake_word(&in), br->request_efd,
				     NULL, &w);
	for (int i = 0; !err && i < total; i++) {
		struct bench_msg m;
		while ((err = skv_ring_pop(&in, &m)) == -EAGAIN) {
			err = skv_waiter_wait(w, bench_ring_ready, &in, spin, -1);
			if (err < 0)
				break;
		}
		if (!err)
			err = skv_ring_push(&out, &m);
		skv_ring_wake(&out, br->reply_efd);
	}
	br->report->wake_syscalls = skv_wake_syscalls() - syscalls0;
	br->report->sleeps = w ? skv_waiter_sleeps(w) : 0;
	br->report->error = err;
	skv_waiter_free(w);
	_exit(err ? 1 : 0);
}

static pid_t bench_fork_echo(int cpu)
{
	pid_t parent = getpid();
	pid_t child = fork();
	if (child < 0)
		bench_die("fork: %s", strerror(errno));
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(9);
		bench_pin(cpu);
	}
	return child;
}

static void bench_reap_echo(pid_t child, const char *path, int err)
{
	int status = 0;
	if (waitpid(child, &status, 0) != child)
		bench_die("waitpid: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		bench_die("%s: the echo process failed (status 0x%x, %s)", path, status,
			  skv_strerror(err));
}

/* Runs warmup + round_trips round trips; stores round_trips samples. */
static void bench_run_ring(enum bench_path path, const struct bench_opts *o,
			   const struct bench_cpus *cpus, int64_t *samples,
			   uint64_t *wake_syscalls, uint64_t *sleeps)
{
	struct bench_rings br;
	br.ring_bytes = skv_ring_bytes(sizeof(struct bench_msg), BENCH_RING_CAPACITY);
	br.total = 2 * br.ring_bytes + 4096;
	br.mem = bench_map(br.total, path_key[path]);
	br.report = (struct bench_echo_report *)(br.mem + 2 * br.ring_bytes);
	char *request_mem = br.mem, *reply_mem = br.mem + br.ring_bytes;
	if (skv_ring_init(request_mem, br.ring_bytes, sizeof(struct bench_msg),
			  BENCH_RING_CAPACITY) ||
	    skv_ring_init(reply_mem, br.ring_bytes, sizeof(struct bench_msg), BENCH_RING_CAPACITY))
		bench_die("skv_ring_init failed");
	br.request_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	br.reply_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (br.request_efd < 0 || br.reply_efd < 0)
		bench_die("eventfd: %s", strerror(errno));
	int total = o->warmup + o->round_trips;

	pid_t child = bench_fork_echo(cpus->echo_cpu);
	if (child == 0)
		bench_echo_ring(&br, path, total);

	struct skv_ring out, in;
	struct skv_waiter *w;
	int err = skv_ring_attach(&out, request_mem, br.ring_bytes, SKV_RING_PRODUCER);
	if (!err)
		err = skv_ring_attach(&in, reply_mem, br.ring_bytes, SKV_RING_CONSUMER);
	if (!err)
		err = skv_waiter_new(bench_backend(path), skv_ring_wake_word(&in), br.reply_efd,
				     NULL, &w);
	if (err)
		bench_die("%s: %s", path_label[path], skv_strerror(err));
	int64_t spin = path == PATH_SPIN ? BENCH_SPIN_NS : 0;
	uint64_t syscalls0 = skv_wake_syscalls();
	struct bench_msg m;
	memset(&m, 0, sizeof(m));
	for (int i = 0; i < total; i++) {
		int64_t t0 = bench_now_ns();
		m.seq = (uint64_t)i;
		err = skv_ring_push(&out, &m);
		skv_ring_wake(&out, br.request_efd);
		while (!err && (err = skv_ring_pop(&in, &m)) == -EAGAIN) {
			err = skv_waiter_wait(w, bench_ring_ready, &in, spin, -1);
			err = err < 0 ? err : 0;
		}
		int64_t t1 = bench_now_ns();
		if (err)
			bench_die("%s: %s", path_label[path], skv_strerror(err));
		if (m.seq != (uint64_t)i)
			bench_die("%s: echo of %d came back as %lu", path_label[path], i,
				  (unsigned long)m.seq);
		if (i >= o->warmup)
			samples[i - o->warmup] = t1 - t0;
	}
	bench_reap_echo(child, path_label[path], br.report->error);
	*wake_syscalls += skv_wake_syscalls() - syscalls0 + br.report->wake_syscalls;
	*sleeps += skv_waiter_sleeps(w) + br.report->sleeps;
	skv_waiter_free(w);
	close(br.request_efd);
	close(br.reply_efd);
	munmap(br.mem, br.total);
}

static int bench_read_full(int fd, void *buf, size_t len)
{
	ssize_t n;
	do
		n = read(fd, buf, len);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)len ? 0 : -1;
}

static int bench_write_full(int fd, const void *buf, size_t len)
{
	ssize_t n;
	do
		n = write(fd, buf, len);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)len ? 0 : -1;
}

static void bench_run_socket(const struct bench_opts *o, const struct bench_cpus *cpus,
			     int64_t *samples)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv))
		bench_die("socketpair: %s", strerror(errno));
	int total = o->warmup + o->round_trips;
	pid_t child = bench_fork_echo(cpus->echo_cpu);
	if (child == 0) {
		close(sv[0]);
		struct bench_msg m;
		for (int i = 0; i < total; i++)
			if (bench_read_full(sv[1], &m, sizeof(m)) ||
			    bench_write_full(sv[1], &m, sizeof(m)))
				_exit(1);
		_exit(0);
	}
	close(sv[1]);
	struct bench_msg m;
	memset(&m, 0, sizeof(m));
	for (int i = 0; i < total; i++) {
		int64_t t0 = bench_now_ns();
		m.seq = (uint64_t)i;
		if (bench_write_full(sv[0], &m, sizeof(m)) || bench_read_full(sv[0], &m, sizeof(m)))
			bench_die("unix socket: %s", strerror(errno));
		int64_t t1 = bench_now_ns();
		if (m.seq != (uint64_t)i)
			bench_die("unix socket: echo of %d came back as %lu", i,
				  (unsigned long)m.seq);
		if (i >= o->warmup)
			samples[i - o->warmup] = t1 - t0;
	}
	close(sv[0]);
	bench_reap_echo(child, path_label[PATH_SOCKET], 0);
}

static int bench_cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted values. */
static int64_t bench_percentile(const int64_t *sorted, size_t n, double p)
{
	size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return sorted[rank - 1];
}

static int64_t bench_median_of(int64_t *v, size_t n)
{
	qsort(v, n, sizeof(*v), bench_cmp_i64);
	return bench_percentile(v, n, 50.0);
}

/* Is io_uring usable here? (It is not under kernel.io_uring_disabled or a seccomp filter.) */
static int bench_uring_available(char *why, size_t why_len)
{
	struct skv_wake_word word = { 0, 0 };
	struct skv_waiter *w;
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd < 0)
		bench_die("eventfd: %s", strerror(errno));
	int err = skv_waiter_new(SKV_WAIT_URING, &word, efd, NULL, &w);
	close(efd);
	if (err) {
		snprintf(why, why_len, "io_uring unavailable here: %s", skv_strerror(err));
		return 0;
	}
	skv_waiter_free(w);
	return 1;
}

static void bench_print_table(const struct bench_opts *o, const struct bench_cpus *cpus,
			      struct bench_result *res)
{
	printf("skv-bench-ring: %d round trips x %d repeats (interleaved, %d warm-up each), "
	       "%d-byte messages\n",
	       o->round_trips, o->repeats, o->warmup, BENCH_MSG_BYTES);
	if (cpus->pinned)
		printf("requester pinned to cpu %d, echo to cpu %d (sched_setaffinity)\n",
		       cpus->requester_cpu, cpus->echo_cpu);
	else
		printf("not pinned: %d usable cpu(s)\n", cpus->usable);
	printf("\n%-28s %10s %10s %23s %12s %12s\n", "path", "median us", "p99 us",
	       "repeat medians us", "wakes/rt", "sleeps/rt");
	for (int p = 0; p < PATH_COUNT; p++) {
		struct bench_result *r = &res[p];
		if (!r->available) {
			printf("%-28s %s\n", path_label[p], r->why);
			continue;
		}
		int64_t med = bench_percentile(r->samples, r->n_samples, 50.0);
		int64_t p99 = bench_percentile(r->samples, r->n_samples, 99.0);
		char range[64];
		snprintf(range, sizeof(range), "%.2f..%.2f", r->repeat_medians[0] / 1e3,
			 r->repeat_medians[o->repeats - 1] / 1e3);
		double rts = (double)o->repeats * (o->round_trips + o->warmup);
		if (p == PATH_SOCKET)
			printf("%-28s %10.2f %10.2f %23s %12s %12s\n", path_label[p], med / 1e3,
			       p99 / 1e3, range, "-", "-");
		else
			printf("%-28s %10.2f %10.2f %23s %12.2f %12.2f\n", path_label[p], med / 1e3,
			       p99 / 1e3, range, r->wake_syscalls / rts, r->sleeps / rts);
	}
}

static void bench_print_json(const struct bench_opts *o, const struct bench_cpus *cpus,
			     struct bench_result *res)
{
	printf("{\"round_trips\": %d, \"warmup\": %d, \"repeats\": %d, \"message_bytes\": %d, ",
	       o->round_trips, o->warmup, o->repeats, BENCH_MSG_BYTES);
	printf("\"pinned\": %s, \"requester_cpu\": %d, \"echo_cpu\": %d, \"paths\": [",
	       cpus->pinned ? "true" : "false", cpus->requester_cpu, cpus->echo_cpu);
	for (int p = 0; p < PATH_COUNT; p++) {
		struct bench_result *r = &res[p];
		printf("%s{\"path\": \"%s\", \"available\": %s", p ? ", " : "", path_key[p],
		       r->available ? "true" : "false");
		if (r->available) {
			double rts = (double)o->repeats * (o->round_trips + o->warmup);
			printf(", \"median_ns\": %lld, \"p99_ns\": %lld, \"repeat_medians_ns\": [",
			       (long long)bench_percentile(r->samples, r->n_samples, 50.0),
			       (long long)bench_percentile(r->samples, r->n_samples, 99.0));
			for (int i = 0; i < o->repeats; i++)
				printf("%s%lld", i ? ", " : "", (long long)r->repeat_medians[i]);
			printf("]");
			if (p != PATH_SOCKET)
				printf(", \"wake_syscalls_per_round_trip\": %.3f, "
				       "\"sleeps_per_round_trip\": %.3f",
				       r->wake_syscalls / rts, r->sleeps / rts);
		} else {
			printf(", \"reason\": \"%s\"", r->why);
		}
		printf("}");
	}
	printf("]}\n");
}

int main(int argc, char **argv)
{
	struct bench_opts o;
	bench_parse(argc, argv, &o);
	struct bench_cpus cpus;
	bench_pick_cpus(&cpus);

	struct bench_result res[PATH_COUNT];
	memset(res, 0, sizeof(res));
	for (int p = 0; p < PATH_COUNT; p++) {
		res[p].available = 1;
		res[p].samples = calloc((size_t)o.repeats * o.round_trips, sizeof(int64_t));
		res[p].repeat_medians = calloc((size_t)o.repeats, sizeof(int64_t));
		if (!res[p].samples || !res[p].repeat_medians)
			bench_die("out of memory for %d x %d samples", o.repeats, o.round_trips);
	}
	res[PATH_SLEEP_URING].available =
		bench_uring_available(res[PATH_SLEEP_URING].why, sizeof(res[PATH_SLEEP_URING].why));
	if (cpus.usable < 2)
		snprintf(res[PATH_SPIN].why, sizeof(res[PATH_SPIN].why),
			 "skipped: spinning needs 2 cpus");
	res[PATH_SPIN].available = cpus.usable >= 2;

	bench_pin(cpus.requester_cpu);
	int64_t *scratch = calloc((size_t)o.round_trips, sizeof(int64_t));
	if (!scratch)
		bench_die("out of memory");
	for (int rep = 0; rep < o.repeats; rep++) {
		for (int p = 0; p < PATH_COUNT; p++) {
			struct bench_result *r = &res[p];
			if (!r->available)
				continue;
			int64_t *samples = r->samples + (size_t)rep * o.round_trips;
			if (p == PATH_SOCKET)
				bench_run_socket(&o, &cpus, samples);
			else
				bench_run_ring((enum bench_path)p, &o, &cpus, samples,
					       &r->wake_syscalls, &r->sleeps);
			memcpy(scratch, samples, (size_t)o.round_trips * sizeof(int64_t));
			r->repeat_medians[rep] = bench_median_of(scratch, (size_t)o.round_trips);
			r->n_samples += (size_t)o.round_trips;
		}
	}
	for (int p = 0; p < PATH_COUNT; p++) {
		if (!res[p].available)
			continue;
		qsort(res[p].samples, res[p].n_samples, sizeof(int64_t), bench_cmp_i64);
		qsort(res[p].repeat_medians, (size_t)o.repeats, sizeof(int64_t), bench_cmp_i64);
	}
	if (o.json)
		bench_print_json(&o, &cpus, res);
	else
		bench_print_table(&o, &cpus, res);
	for (int p = 0; p < PATH_COUNT; p++) {
		free(res[p].samples);
		free(res[p].repeat_medians);
	}
	free(scratch);
	return 0;
}
