/* Soak (issue 14, item 5): resumable greedy streams keep generating while engines, clients and
 * the daemon are killed at random, round after round. Every token every stream delivers must be
 * the uninterrupted stream's token at that position (a killed client's stream continues where
 * it was; a daemon killed with -9 comes back at each stream's last snapshot, and so does a
 * stream whose engine was killed: -SKV_ERESTORED says at which token, and the client attaches
 * again), or the stream ends with a clear error (its engine died before its first snapshot:
 * -EPIPE; the daemon did: -ENOENT on attach) and a fresh one takes its place. No read may hang; at the end the arena is
 * empty, the daemon holds the fds it held at its start, this process holds the fds it held
 * before, the state directory is empty and /dev/shm holds what it held.
 *
 * SKV_SOAK_ROUNDS sets the rounds (default 8; tools/bench/soak runs the long form). */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "channel.h"
#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"

#define SOAK_STREAMS 3
#define SOAK_REF_TOKENS 30000
#define SOAK_READ_TIMEOUT_MS 20000

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

/* The long form (tools/bench/soak) runs for up to an hour; meson bounds the short one. */
TestSuite(soak, .init = suite_init, .fini = suite_fini, .timeout = 3600);

struct soak_stream {
	skv_client *c;
	skv_client_stream *s;
	char name[64];
	char token[33];
	uint64_t pos;        /* tokens delivered and checked against the reference */
	unsigned generation; /* names: soak-<i>-<generation> */
};

static int32_t *ref_ids;

/* This process's fds that are not pidfds or sockets (mputil keeps a pidfd per process it
 * watches and an admin socket per daemon start): what a libskv client could leak (eventfds,
 * epoll and io_uring fds, memfds). Their kinds go into buf. */
static unsigned count_sockets(void)
{
	unsigned n = 0;
	char path[64], link[256];
	for (int fd = 0; fd < 4096; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t k = readlink(path, link, sizeof(link) - 1);
		if (k > 0 && !strncmp(link, "socket:", 7))
			n++;
	}
	return n;
}

static unsigned client_fds(char *buf, size_t len)
{
	unsigned n = 0;
	buf[0] = '\0';
	char path[64], link[256];
	for (int fd = 0; fd < 4096; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t k = readlink(path, link, sizeof(link) - 1);
		if (k <= 0)
			continue;
		link[k] = '\0';
		if (strstr(link, "pidfd") || !strncmp(link, "socket:", 7) || strstr(link, "bxf_"))
			continue;
		n++;
		size_t used = strlen(buf);
		snprintf(buf + used, len - used, "%d:%s ", fd, link);
	}
	return n;
}

static unsigned count_dir(const char *path)
{
	DIR *d = opendir(path);
	cr_assert(d, "%s: %s", path, strerror(errno));
	unsigned n = 0;
	for (struct dirent *e; (e = readdir(d));)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* The names in path, hidden ones too (a snapshot being written), but . and .. */
static void list_dir(const char *path, char *buf, size_t len)
{
	buf[0] = '\0';
	DIR *d = opendir(path);
	if (!d)
		return;
	for (struct dirent *e; (e = readdir(d));) {
		size_t used = strlen(buf);
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			snprintf(buf + used, len - used, "%s ", e->d_name);
	}
	closedir(d);
}

static void reference(const struct mp_daemon *d)
{
	ref_ids = malloc(SOAK_REF_TOKENS * sizeof(*ref_ids));
	cr_assert(ref_ids);
	skv_client *c = mp_connect(d);
	skv_client_stream *s = NULL;
	cr_assert_eq(skv_client_stream_open(c, NULL, &s), 0);
	cr_assert_eq(skv_client_stream_generate(s, "", 0, SOAK_REF_TOKENS, SKV_CLIENT_ENDLESS), 0);
	size_t n = 0;
	struct skv_client_event ev;
	for (;;) {
		cr_assert_eq(skv_client_stream_read(s, &ev, SOAK_READ_TIMEOUT_MS), 1, "%s",
			     skv_client_last_error(c));
		if (ev.type == SKV_CLIENT_EV_TOKEN && n < SOAK_REF_TOKENS)
			ref_ids[n++] = ev.token;
		if (ev.type == SKV_CLIENT_EV_DONE)
			break;
	}
	cr_assert_eq(n, SOAK_REF_TOKENS);
	skv_client_stream_close(s);
	skv_client_disconnect(c);
}

static void soak_open(const struct mp_daemon *d, struct soak_stream *st, unsigned i)
{
	st->generation++;
	snprintf(st->name, sizeof(st->name), "soak-%u-%u", i, st->generation);
	st->c = mp_connect(d);
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_resumable(o, st->name), 0);
	cr_assert_eq(skv_client_stream_open(st->c, o, &st->s), 0, "%s",
		     skv_client_last_error(st->c));
	skv_client_opts_free(o);
	struct skv_client_resume r;
	cr_assert_eq(skv_client_stream_resume_info(st->s, &r), 0);
	memcpy(st->token, r.token, 33);
	st->pos = 0;
	cr_assert_eq(skv_client_stream_generate(st->s, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS),
		     0);
}

static void soak_close(struct soak_stream *st)
{
	skv_client_stream_close(st->s);
	skv_client_disconnect(st->c);
	st->s = NULL;
	st->c = NULL;
}

/* End a stream for good: close the handle, then, if the daemon restored the stream from its
 * snapshot meanwhile (its engine died after this client stopped reading it, so the
 * -SKV_ERESTORED was never read, and a close after it is how a client re-attaches), attach to
 * the restored stream and close that too. A close while the restore is still pending cancels
 * it; -ENOENT: there is nothing left. Without this a restored stream would wait, detached,
 * for its detach time-out. */
static void soak_end(const struct mp_daemon *d, struct soak_stream *st)
{
	soak_close(st);
	skv_client *c = mp_connect(d);
	skv_client_stream *s = NULL;
	int err = -EBUSY;
	for (int k = 0; k < 300 && err == -EBUSY; k++)
		if ((err = skv_client_stream_attach(c, st->name, st->token, &s)) == -EBUSY)
			mp_sleep_ms(20);
	cr_assert(err == 0 || err == -ENOENT, "%s: %d (%s)", st->name, err,
		  skv_client_last_error(c));
	if (!err)
		skv_client_stream_close(s);
	skv_client_disconnect(c);
}

/* Read what is there for up to ms; every token is checked. Returns 0, or the stream's error
 * (the caller decides whether it is an allowed one). */
static int soak_read(struct soak_stream *st, int ms)
{
	double until = mp_now() + ms / 1000.0;
	while (mp_now() < until) {
		if (st->pos >= SOAK_REF_TOKENS - 2 * SKV_CHAN_RING_CAPACITY)
			return 0; /* far enough: the engine pauses on the full ring */
		struct skv_client_event ev;
		int rc = skv_client_stream_read(st->s, &ev, 100);
		if (rc < 0)
			return rc;
		if (rc == 0)
			continue;
		if (ev.type == SKV_CLIENT_EV_TOKEN) {
			cr_assert_eq(ev.token, ref_ids[st->pos], "%s: token %llu is %d, uninterrupted %d",
				     st->name, (unsigned long long)st->pos, ev.token,
				     ref_ids[st->pos]);
			st->pos++;
		}
		cr_assert(ev.type != SKV_CLIENT_EV_ERROR, "%s: %.*s", st->name, (int)ev.len, ev.text);
	}
	return 0;
}

/* The stream must now have failed: read the rest (checked), then the error, within bounds. */
static void soak_expect_failure(struct soak_stream *st, int want, const char *what)
{
	double until = mp_now() + SOAK_READ_TIMEOUT_MS / 1000.0;
	int rc = 0;
	while (!rc) {
		cr_assert(mp_now() < until, "%s: %s never failed (no hang allowed)", st->name, what);
		rc = soak_read(st, 200);
		if (!rc && st->pos >= SOAK_REF_TOKENS - 2 * SKV_CHAN_RING_CAPACITY) {
			struct skv_client_event ev;
			rc = skv_client_stream_read(st->s, &ev, 100);
			rc = rc == 1 ? 0 : rc;
		}
	}
	cr_assert_eq(rc, want, "%s after %s: %d (%s)", st->name, what, rc,
		     skv_client_last_error(st->c));
	cr_assert(strlen(skv_client_last_error(st->c)) > 10, "%s: no reason given", st->name);
}

enum soak_attach_after {
	SOAK_AFTER_CLIENT_KILL,   /* the stream went on detached: its request is still ours */
	SOAK_AFTER_DAEMON_KILL,   /* back at its last snapshot, if it had one (else -ENOENT) */
	SOAK_AFTER_RESTORE,       /* its engine died, the daemon restored it: it is there */
};

static void soak_attach(const struct mp_daemon *d, struct soak_stream *st, unsigned i,
			enum soak_attach_after after);

/* A stream whose engine was killed comes back from its snapshot (-SKV_ERESTORED, at the token
 * the message names: attach again) or, before its first snapshot, ends with -EPIPE and says so
 * (a fresh one takes its place). Any other error fails the test. */
static void soak_check(const struct mp_daemon *d, struct soak_stream *st, unsigned i, int rc)
{
	if (rc == 0)
		return;
	if (rc == -SKV_ERESTORED) {
		const char *why = skv_client_last_error(st->c);
		const char *at = strstr(why, "at token ");
		cr_assert(at && strstr(why, "attach again"), "%s: %s", st->name, why);
		uint64_t restored = strtoull(at + strlen("at token "), NULL, 10);
		soak_close(st);
		soak_attach(d, st, i, SOAK_AFTER_RESTORE);
		cr_assert_eq(st->pos, restored, "%s: attached at %llu, restored at %llu", st->name,
			     (unsigned long long)st->pos, (unsigned long long)restored);
		return;
	}
	cr_assert_eq(rc, -EPIPE, "%s: %d (%s)", st->name, rc, skv_client_last_error(st->c));
	cr_assert(strstr(skv_client_last_error(st->c), "engine died"), "%s",
		  skv_client_last_error(st->c));
	soak_close(st);
	soak_open(d, st, i);
}

static void soak_attach(const struct mp_daemon *d, struct soak_stream *st, unsigned i,
			enum soak_attach_after after)
{
	int after_daemon_restart = after == SOAK_AFTER_DAEMON_KILL;
	st->c = mp_connect(d);
	int err = -EBUSY;
	for (int k = 0; k < 300 && (err == -EBUSY || (after_daemon_restart && err == -ENOENT));
	     k++)
		if ((err = skv_client_stream_attach(st->c, st->name, st->token, &st->s)) < 0)
			mp_sleep_ms(20);
	if (after_daemon_restart && err == -ENOENT) {
		/* Killed before its first snapshot: it ended, and says so. */
		cr_assert(strstr(skv_client_last_error(st->c), "no resumable stream"), "%s",
			  skv_client_last_error(st->c));
		skv_client_disconnect(st->c);
		soak_open(d, st, i);
		return;
	}
	cr_assert_eq(err, 0, "attach %s: %s", st->name, skv_client_last_error(st->c));
	if (after == SOAK_AFTER_CLIENT_KILL) {
		cr_assert_eq(skv_client_stream_pending(st->s), 1);
		return;
	}
	/* Back at its last snapshot, idle: BOS plus the tokens it fed, then the one it had
	 * sampled; the request in progress ended with the daemon (or the engine). A snapshot
	 * taken before its engine took the first request holds nothing (0): the stream then
	 * starts again from BOS, as the uninterrupted one did. */
	struct skv_client_resume r;
	cr_assert_eq(skv_client_stream_resume_info(st->s, &r), 0);
	cr_assert(r.tokens_seen <= st->pos + SKV_CHAN_RING_CAPACITY + 1,
		  "%s: restored at %llu, had read %llu", st->name,
		  (unsigned long long)r.tokens_seen, (unsigned long long)st->pos);
	cr_assert_eq(skv_client_stream_pending(st->s), 0);
	st->pos = r.tokens_seen;
	cr_assert_eq(skv_client_stream_generate(st->s, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS),
		     0);
}

Test(soak, random_kills_of_engines_clients_and_the_daemon)
{
	unsigned rounds = 8;
	const char *env = getenv("SKV_SOAK_ROUNDS");
	if (env && *env)
		rounds = (unsigned)strtoul(env, NULL, 10);
	struct mp_daemon d;
	const char *dir = tu_scratch_dir("soak");
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/state", dir);
	cr_assert_eq(mkdir(state, 0700), 0);
	const char *const flags[] = { "--state-dir", state, "--snapshot-interval", "1", NULL };
	unsigned shm_before = count_dir("/dev/shm");
	mp_daemon_start(&d, "soak", 2, NULL, flags);
	unsigned daemon_fds = mp_fd_count(d.pid);
	reference(&d);
	char fds_before[2048], fds_after[2048];
	unsigned self_fds = client_fds(fds_before, sizeof(fds_before));
	unsigned sockets = count_sockets(), restarts = 0;
	struct soak_stream st[SOAK_STREAMS];
	memset(st, 0, sizeof(st));
	for (unsigned i = 0; i < SOAK_STREAMS; i++)
		soak_open(&d, &st[i], i);
	unsigned kills[4] = { 0 };
	for (unsigned round = 0; round < rounds; round++) {
		for (unsigned i = 0; i < SOAK_STREAMS; i++)
			soak_check(&d, &st[i], i, soak_read(&st[i], 150 + (int)(mp_fuzz_u32() % 300)));
		/* Past the reference: start that one over. */
		for (unsigned i = 0; i < SOAK_STREAMS; i++)
			if (st[i].pos >= SOAK_REF_TOKENS - 2 * SKV_CHAN_RING_CAPACITY) {
				soak_end(&d, &st[i]);
				soak_open(&d, &st[i], i);
			}
		unsigned what = mp_fuzz_u32() % 4;
		kills[what]++;
		if (what == 1) {
			/* An engine: its streams come back from their snapshots (or, before the
			 * first, end with -EPIPE); the others go on. */
			mp_daemon_wait_ready(&d, 2, 30.0);
			struct skv_msg_stats s;
			mp_stats(&d, &s);
			pid_t victim = s.engine_pid[mp_fuzz_u32() % 2];
			cr_assert(victim > 0);
			kill(victim, SIGKILL);
			/* Not mp_wait_gone: it keeps a pidfd per process, and the long form kills
			 * more engines than mputil tracks. */
			double gone_by = mp_now() + 10.0;
			while (!mp_proc_gone(victim)) {
				cr_assert(mp_now() < gone_by, "engine %d survived SIGKILL", victim);
				mp_sleep_ms(10);
			}
			for (unsigned i = 0; i < SOAK_STREAMS; i++)
				soak_check(&d, &st[i], i, soak_read(&st[i], 300));
		} else if (what == 2) {
			/* A client: its stream waits, detached, and continues exactly. */
			unsigned i = mp_fuzz_u32() % SOAK_STREAMS;
			skv_client_disconnect(st[i].c);
			st[i].c = NULL;
			st[i].s = NULL;
			soak_attach(&d, &st[i], i, SOAK_AFTER_CLIENT_KILL);
		} else if (what == 3) {
			/* The daemon, with -9: every client gets -EPIPE at once; after the restart
			 * every stream is back at its last snapshot. */
			kill(d.pid, SIGKILL);
			cr_assert(mp_daemon_reap(&d, 10.0));
			for (unsigned i = 0; i < SOAK_STREAMS; i++) {
				soak_expect_failure(&st[i], -EPIPE, "kill -9 of the daemon");
				skv_client_stream_close(st[i].s);
				skv_client_disconnect(st[i].c);
			}
			mp_daemon_start(&d, "soak", 2, NULL, flags);
			daemon_fds = mp_fd_count(d.pid);
			restarts++;
			for (unsigned i = 0; i < SOAK_STREAMS; i++)
				soak_attach(&d, &st[i], i, SOAK_AFTER_DAEMON_KILL);
		}
	}
	for (unsigned i = 0; i < SOAK_STREAMS; i++)
		soak_end(&d, &st[i]);
	mp_wait_streams_freed(&d, 20.0);
	/* Snapshots of streams that ended are gone with them. */
	double until = mp_now() + 5.0;
	char left[1024];
	list_dir(state, left, sizeof(left));
	while (left[0] && mp_now() < until) {
		mp_sleep_ms(50);
		list_dir(state, left, sizeof(left));
	}
	cr_assert_eq(left[0], '\0', "snapshot files left in the state directory: %s", left);
	/* At most what it held when it started (it may hold fewer: start-up has extra). */
	until = mp_now() + 10.0;
	while (mp_fd_count(d.pid) > daemon_fds && mp_now() < until)
		mp_sleep_ms(50);
	cr_assert_leq(mp_fd_count(d.pid), daemon_fds, "the daemon leaks fds");
	cr_assert_eq(client_fds(fds_after, sizeof(fds_after)), self_fds,
		     "this process leaks fds: before %s, after %s", fds_before, fds_after);
	/* Sockets: one admin connection more per daemon start (mputil's, closed at the end). */
	cr_assert_eq(count_sockets(), sockets + restarts, "this process leaks sockets");
	cr_assert_eq(count_dir("/dev/shm"), shm_before, "shared memory objects leaked");
	cr_assert(kills[1] + kills[2] + kills[3] > 0, "nothing was killed in %u rounds", rounds);
	free(ref_ids);
}
