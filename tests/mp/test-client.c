/* libskv as an application sees it: the installed library and its pkg-config file (the example
 * of the docs compiled against them and run), the three ways to receive (blocking, callback,
 * event loop) giving the same bytes, cancelling, wait-any, and every error path: bad options,
 * no daemon, a socket that is not a daemon, a daemon that dies while we wait, misuse. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "channel.h"
#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"

#define FAIL_NOTICE_S 5.0

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(client, .init = suite_init, .fini = suite_fini, .timeout = 180);

static skv_client_stream *open_greedy(skv_client *c, int64_t window)
{
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_window(o, window), 0);
	skv_client_stream *s = NULL;
	int err = skv_client_stream_open(c, o, &s);
	cr_assert_eq(err, 0, "open: %s", skv_client_last_error(c));
	skv_client_opts_free(o);
	return s;
}

/* ==== the installed library ================================================================ */

Test(client, docs_example_builds_with_pkg_config_and_runs)
{
	const char *dir = tu_scratch_dir("pkgconfig");
	const char *build = mp_env_path("SKV_BUILD_ROOT");
	char destdir[PATH_MAX], cmd[8 * PATH_MAX];
	snprintf(destdir, sizeof(destdir), "%s/root", dir);
	char *out = NULL, *err = NULL;
	int st = mp_run("/usr/bin/env",
			(const char *const[]){ "meson", "install", "-C", build, "--destdir", destdir,
					       "--no-rebuild", "--quiet", NULL },
			&out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "meson install: %s%s", out, err);
	free(out);
	free(err);

	/* Compile the example exactly as the docs say, against the installed copy only. */
	char src[PATH_MAX], exe[PATH_MAX];
	snprintf(src, sizeof(src), "%s/client/examples/hello-stream.c",
		 mp_env_path("SKV_SOURCE_ROOT"));
	snprintf(exe, sizeof(exe), "%s/hello-stream", dir);
	snprintf(cmd, sizeof(cmd),
		 "set -e; pc=$(find '%s' -name libskv.pc); export PKG_CONFIG_PATH=$(dirname \"$pc\") "
		 "PKG_CONFIG_SYSROOT_DIR='%s'; "
		 "cc -Wall -Wextra -Werror '%s' $(pkg-config --cflags --libs libskv) -o '%s'; "
		 "nm -D --defined-only \"$(dirname \"$(dirname \"$pc\")\")/libskv.so\" | "
		 "awk '$2 == \"T\" {print $3}' | sed 's/@.*//' | sort",
		 destdir, destdir, src, exe);
	st = mp_run("/bin/sh", (const char *const[]){ "-c", cmd, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "build: %s%s", out, err);
	/* The library exports its interface and nothing it is built from. */
	for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
		cr_assert(!strncmp(line, "skv_client_", 11) || !strcmp(line, "skv_strerror"),
			  "libskv.so exports %s", line);
	free(out);
	free(err);

	struct mp_daemon d;
	mp_daemon_start(&d, "pkgconfig", 1, NULL, NULL);
	snprintf(cmd, sizeof(cmd),
		 "pc=$(find '%s' -name libskv.so.1); LD_LIBRARY_PATH=$(dirname \"$pc\") exec '%s' '%s'",
		 destdir, exe, d.sock);
	st = mp_run("/bin/sh", (const char *const[]){ "-c", cmd, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the example failed: %s", err);
	cr_assert(strncmp(out, "Once upon a time, there was a little girl named Lily.", 53) == 0,
		  "the example printed: %s", out);
	free(out);
	free(err);

	/* Without a daemon it says so and fails. */
	snprintf(cmd, sizeof(cmd),
		 "pc=$(find '%s' -name libskv.so.1); LD_LIBRARY_PATH=$(dirname \"$pc\") exec '%s' "
		 "'%s/none.sock'", destdir, exe, dir);
	st = mp_run("/bin/sh", (const char *const[]){ "-c", cmd, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1 && strstr(err, "is the daemon running"),
		  "status 0x%x, stderr: %s", st, err);
	free(out);
	free(err);
}

Test(client, readme_shows_the_example_as_it_is)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/README.md", mp_env_path("SKV_SOURCE_ROOT"));
	char *readme = tu_read_file(path, NULL);
	snprintf(path, sizeof(path), "%s/client/examples/hello-stream.c",
		 mp_env_path("SKV_SOURCE_ROOT"));
	char *file = tu_read_file(path, NULL);
	const char *code = strstr(file, "#include <stdio.h>");
	const char *block = strstr(readme, "```c\n#include <stdio.h>");
	cr_assert(code && block, "README.md has no C block of the example");
	block += 5;
	const char *end = strstr(block, "```");
	cr_assert(end);
	cr_assert_eq((size_t)(end - block), strlen(code), "README.md's copy differs in length");
	cr_assert(!strncmp(block, code, strlen(code)), "README.md's copy of the example differs");
	free(readme);
	free(file);
}

/* ==== error paths =========================================================================== */

Test(client, bad_options_are_refused_with_einval)
{
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_policy(o, (enum skv_client_policy)4), -EINVAL);
	cr_assert_eq(skv_client_opts_policy_name(o, "sinks"), -EINVAL);
	cr_assert_eq(skv_client_opts_policy_name(o, NULL), -EINVAL);
	cr_assert_eq(skv_client_opts_policy_name(o, "recompute"), 0);
	cr_assert_eq(skv_client_opts_sinks(o, -2), -EINVAL);
	cr_assert_eq(skv_client_opts_window(o, 0), -EINVAL);
	cr_assert_eq(skv_client_opts_window(o, -7), -EINVAL);
	cr_assert_eq(skv_client_opts_evict(o, (enum skv_client_evict)2), -EINVAL);
	cr_assert_eq(skv_client_opts_sampling(o, -0.5f, 0.9f, 1), -EINVAL);
	cr_assert_eq(skv_client_opts_sampling(o, NAN, 0.9f, 1), -EINVAL);
	cr_assert_eq(skv_client_opts_sampling(o, 1.0f, 0.0f, 1), -EINVAL);
	cr_assert_eq(skv_client_opts_sampling(o, 1.0f, 1.5f, 1), -EINVAL);
	cr_assert_eq(skv_client_opts_sampling(o, 0.8f, 0.95f, 7), 0);
	skv_client_opts_free(o);
	skv_client_opts_free(NULL);
	skv_client_disconnect(NULL);
	skv_client_stream_close(NULL);
	cr_assert_str_eq(skv_client_last_error(NULL), "");
	cr_assert_str_eq(skv_strerror(-ENOSPC), "No space left on device");
}

Test(client, no_daemon_and_not_a_daemon_give_clear_errors)
{
	const char *dir = tu_scratch_dir("no_daemon");
	char path[PATH_MAX], msg[256] = "";
	skv_client *c = NULL;
	snprintf(path, sizeof(path), "%s/none.sock", dir);
	int err = skv_client_connect(path, &c, msg, sizeof(msg));
	cr_assert_eq(err, -ENOENT, "%d: %s", err, msg);
	cr_assert(strstr(msg, path) && strstr(msg, "is the daemon running"), "%s", msg);
	cr_assert_null(c);

	/* A path too long for a Unix socket. */
	char longpath[300];
	memset(longpath, 'x', sizeof(longpath) - 1);
	longpath[sizeof(longpath) - 1] = '\0';
	err = skv_client_connect(longpath, &c, msg, sizeof(msg));
	cr_assert_eq(err, -ENAMETOOLONG, "%d: %s", err, msg);

	/* Something listens but hangs up without a word: an error, never a hang. */
	snprintf(path, sizeof(path), "%s/mute.sock", dir);
	int lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	cr_assert(strlen(path) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, path, strlen(path) + 1);
	cr_assert(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) == 0 && listen(lfd, 4) == 0);
	pid_t child = mp_fork();
	if (child == 0) {
		int a = accept(lfd, NULL, NULL);
		char buf[256];
		if (a >= 0 && read(a, buf, sizeof(buf)) > 0)
			close(a);
		_exit(0);
	}
	close(lfd);
	double t0 = mp_now();
	err = skv_client_connect(path, &c, msg, sizeof(msg));
	cr_assert(err == -EPROTO || err == -ECONNRESET || err == -EPIPE, "%d: %s", err, msg);
	cr_assert(strstr(msg, "no valid answer from skv-cached") != NULL, "%s", msg);
	cr_assert(mp_now() - t0 < 5.0);
	mp_wait_gone(child, 5.0, "the mute listener");
}

Test(client, daemon_death_fails_waits_and_calls_with_epipe)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "death", 1, NULL, NULL);
	skv_client *c = mp_connect(&d);
	skv_client_stream *s = open_greedy(c, -1);
	cr_assert_eq(skv_client_stream_generate(s, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS), 0);
	struct skv_client_event ev;
	cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
	kill(d.pid, SIGKILL);
	mp_daemon_reap(&d, 10.0);
	/* Engines exit once their daemon is gone; reading drains, then -EPIPE. */
	double deadline = mp_now() + 2 * FAIL_NOTICE_S;
	int rc;
	while ((rc = skv_client_stream_read(s, &ev, 200)) >= 0)
		cr_assert(mp_now() < deadline, "no failure after the daemon died");
	cr_assert_eq(rc, -EPIPE, "read returned %d: %s", rc, skv_client_last_error(c));
	cr_assert(strstr(skv_client_last_error(c), "skv-cached went away") != NULL, "%s",
		  skv_client_last_error(c));
	cr_assert_eq(skv_client_stream_generate(s, "x", 1, 5, 0), -EPIPE);
	skv_client_stream *t = NULL;
	cr_assert_eq(skv_client_stream_open(c, NULL, &t), -EPIPE);
	struct skv_client_stats st;
	cr_assert_eq(skv_client_stats(c, &st), -EPIPE);
	skv_client_stream *ready;
	cr_assert_eq(skv_client_wait(c, &ready, 100), -EPIPE);
	skv_client_stream_close(s);
	skv_client_disconnect(c);
}

Test(client, misuse_is_refused)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "misuse", 1, NULL, NULL);
	skv_client *c = mp_connect(&d);
	skv_client_stream *s = open_greedy(c, -1);
	cr_assert_eq(skv_client_stream_generate(s, "hi", 2, 5, 0x80), -EINVAL);
	cr_assert(strstr(skv_client_last_error(c), "flags") != NULL);
	cr_assert_eq(skv_client_stream_generate(s, NULL, 3, 5, 0), -EINVAL);
	cr_assert_eq(skv_client_stream_score(s, "", 0, 0), -EINVAL);
	cr_assert_eq(skv_client_stream_run(s, NULL, NULL), -EINVAL, "run with nothing pending");
	cr_assert_eq(skv_client_stream_generate(s, "", 0, 3, 0), 0);
	struct skv_client_event ev;
	int tokens = 0;
	do {
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
		tokens += ev.type == SKV_CLIENT_EV_TOKEN;
	} while (ev.type != SKV_CLIENT_EV_DONE);
	cr_assert_eq(tokens, 3);
	cr_assert_eq(ev.count, 3);
	/* One more token has nothing to predict: the request fails, the stream goes on. */
	cr_assert_eq(skv_client_stream_score(s, "a", 1, 0), 0);
	cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
	cr_assert_eq(ev.type, SKV_CLIENT_EV_ERROR);
	cr_assert_eq(ev.error, -EINVAL);
	cr_assert(ev.len > 0 && strstr(ev.text, "no text to score"), "%.*s", (int)ev.len, ev.text);
	cr_assert_eq(skv_client_stream_pending(s), 0);
	/* Nothing pending: a read times out, it does not hang. */
	double t0 = mp_now();
	cr_assert_eq(skv_client_stream_read(s, &ev, 50), 0);
	cr_assert(mp_now() - t0 < 2.0);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== receiving: blocking, callback, event loop ============================================ */

struct collect {
	char text[8192];
	size_t len;
	int events, stop_after;
};

static int collect_fn(skv_client_stream *s, const struct skv_client_event *ev, void *arg)
{
	(void)s;
	struct collect *k = arg;
	if ((ev->type == SKV_CLIENT_EV_TOKEN || ev->type == SKV_CLIENT_EV_PROMPT) &&
	    k->len + ev->len < sizeof(k->text)) {
		memcpy(k->text + k->len, ev->text, ev->len);
		k->len += ev->len;
	}
	k->events++;
	return k->stop_after && k->events == k->stop_after ? 42 : 0;
}

static const char *const prompts[] = {
	"Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird",
};
#define N_PROMPTS 4

Test(client, blocking_callback_and_event_loop_give_the_same_bytes)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "three_ways", 2, NULL, NULL);
	skv_client *c = mp_connect(&d);
	struct collect want[N_PROMPTS] = { 0 };
	/* Callback, one stream at a time. */
	for (int i = 0; i < N_PROMPTS; i++) {
		skv_client_stream *s = open_greedy(c, 64);
		cr_assert_eq(skv_client_stream_generate(s, prompts[i], strlen(prompts[i]), 120,
							SKV_CLIENT_ENDLESS), 0);
		cr_assert_eq(skv_client_stream_run(s, collect_fn, &want[i]), 0);
		cr_assert_eq(skv_client_stream_pending(s), 0);
		skv_client_stream_close(s);
	}
	/* A callback that stops early gets its value back, and the request goes on. */
	skv_client_stream *s = open_greedy(c, 64);
	struct collect part = { .stop_after = 5 };
	cr_assert_eq(skv_client_stream_generate(s, prompts[0], strlen(prompts[0]), 120,
						SKV_CLIENT_ENDLESS), 0);
	cr_assert_eq(skv_client_stream_run(s, collect_fn, &part), 42);
	part.stop_after = 0;
	cr_assert_eq(skv_client_stream_run(s, collect_fn, &part), 0);
	cr_assert_eq(part.len, want[0].len);
	cr_assert(!memcmp(part.text, want[0].text, part.len));
	skv_client_stream_close(s);

	/* Event loop: all four at once on one connection, poll on skv_client_fd. */
	skv_client *e = mp_connect(&d);
	int fd = skv_client_fd(e);
	cr_assert(fd >= 0);
	cr_assert_eq(skv_client_fd(e), fd, "the fd is the client's, made once");
	skv_client_stream *ss[N_PROMPTS];
	struct collect got[N_PROMPTS] = { 0 };
	for (int i = 0; i < N_PROMPTS; i++) {
		ss[i] = open_greedy(e, 64);
		cr_assert_eq(skv_client_stream_generate(ss[i], prompts[i], strlen(prompts[i]), 120,
							SKV_CLIENT_ENDLESS), 0);
	}
	int done = 0, polls = 0;
	double deadline = mp_now() + 60.0;
	while (done < N_PROMPTS) {
		cr_assert(mp_now() < deadline, "the event loop stalled with %d of %d done", done,
			  N_PROMPTS);
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int p = poll(&pfd, 1, 5000);
		cr_assert(p == 1, "poll found nothing for 5 s with %d streams running",
			  N_PROMPTS - done);
		polls++;
		skv_client_stream *r;
		while (skv_client_wait(e, &r, 0) == 1) {
			int k = 0;
			while (ss[k] != r)
				k++;
			struct skv_client_event ev;
			while (skv_client_stream_read(r, &ev, 0) == 1) {
				collect_fn(r, &ev, &got[k]);
				done += ev.type == SKV_CLIENT_EV_DONE;
			}
		}
	}
	for (int i = 0; i < N_PROMPTS; i++) {
		cr_assert_eq(got[i].len, want[i].len, "stream %d: %zu bytes, alone %zu", i,
			     got[i].len, want[i].len);
		cr_assert(!memcmp(got[i].text, want[i].text, got[i].len), "stream %d differs", i);
	}
	/* The loop slept between bursts instead of spinning on a readable fd. */
	cr_assert(polls < 4 * 120, "%d polls for %d tokens", polls, 4 * 120);
	/* Idle now: the fd does not stay readable. (A wake-up the engine claimed as it ended its
	 * last step may still arrive: a spurious one, which the next check absorbs.) */
	mp_sleep_ms(100);
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	skv_client_stream *r;
	while (skv_client_wait(e, &r, 0) == 1) {
		struct skv_client_event ev;
		cr_assert_eq(skv_client_stream_read(r, &ev, 0), 0, "an event after every DONE");
	}
	struct epoll_event why[2];
	int nwhy = epoll_wait(fd, why, 2, 200);
	cr_assert_eq(nwhy, 0, "the fd is readable with nothing to read (%d: fd %d)", nwhy,
		     nwhy > 0 ? why[0].data.fd : -1);
	(void)pfd;
	skv_client_disconnect(e);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

Test(client, wait_serves_ready_streams_in_turn)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "wait_any", 1, NULL, NULL);
	skv_client *c = mp_connect(&d);
	skv_client_stream *ss[3];
	for (int i = 0; i < 3; i++) {
		ss[i] = open_greedy(c, -1);
		cr_assert_eq(skv_client_stream_generate(ss[i], "", 0, 20, SKV_CLIENT_ENDLESS), 0);
	}
	/* Let all three finish unread: all are ready, and each wait must move to the next. */
	mp_sleep_ms(1000);
	skv_client_stream *first, *second, *third;
	cr_assert_eq(skv_client_wait(c, &first, 0), 1);
	cr_assert_eq(skv_client_wait(c, &second, 0), 1);
	cr_assert_eq(skv_client_wait(c, &third, 0), 1);
	cr_assert(first != second && second != third && first != third,
		  "wait-any returned the same stream twice in a row");
	skv_client_disconnect(c);
}

/* ==== cancelling ============================================================================ */

/* Generate n tokens after prompt; all n come, and the request ends by length. */
static void expect_full_generation(skv_client_stream *s, const char *prompt, int n)
{
	struct skv_client_event ev;
	cr_assert_eq(skv_client_stream_generate(s, prompt, strlen(prompt), (uint64_t)n,
						SKV_CLIENT_ENDLESS), 0);
	int tokens = 0;
	do {
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
		tokens += ev.type == SKV_CLIENT_EV_TOKEN;
	} while (ev.type != SKV_CLIENT_EV_DONE);
	cr_assert_eq(ev.reason, SKV_CLIENT_DONE_LENGTH);
	cr_assert_eq(tokens, n);
}

Test(client, cancel_ends_the_request_and_queued_ones_and_the_stream_goes_on)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "cancel", 1, NULL, NULL);
	skv_client *c = mp_connect(&d);
	skv_client_stream *s = open_greedy(c, 64);
	cr_assert_eq(skv_client_stream_generate(s, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS), 0);
	cr_assert_eq(skv_client_stream_generate(s, " more", 5, 50, 0), 0);
	cr_assert_eq(skv_client_stream_pending(s), 2);
	struct skv_client_event ev;
	int tokens = 0;
	while (tokens < 30) {
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
		tokens += ev.type == SKV_CLIENT_EV_TOKEN;
	}
	cr_assert_eq(skv_client_stream_cancel(s), 0);
	/* Both requests end cancelled: the endless one after at most a few more tokens, the
	 * queued one before it starts. */
	int dones = 0, after = 0;
	while (dones < 2) {
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1, "%s",
			     skv_client_last_error(c));
		if (ev.type == SKV_CLIENT_EV_TOKEN && !dones)
			after++;
		cr_assert(ev.type != SKV_CLIENT_EV_TOKEN || !dones,
			  "the queued request ran after the cancel");
		if (ev.type == SKV_CLIENT_EV_DONE) {
			cr_assert_eq(ev.reason, SKV_CLIENT_DONE_CANCELLED, "DONE reason %d", ev.reason);
			dones++;
		}
	}
	cr_assert(after < 1100, "%d tokens after the cancel", after);
	cr_assert_eq(skv_client_stream_pending(s), 0);
	/* The stream serves the next request normally. */
	expect_full_generation(s, " The end", 7);
	/* A cancel with nothing in progress cancels nothing later. */
	cr_assert_eq(skv_client_stream_cancel(s), 0);
	expect_full_generation(s, "", 4);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== half-precision KV ===================================================================== */

Test(client, half_precision_streams_through_the_daemon_equal_local_mode)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "kv_f16", 1, NULL, NULL);
	char *local = MP_SKV("generate", "--kv", "f16", "--temp", "0", "-n", "400", "--window",
			     "50", "Lily and Tom");
	char *remote = MP_SKV("--socket", d.sock, "generate", "--kv", "f16", "--temp", "0", "-n",
			      "400", "--window", "50", "Lily and Tom");
	cr_assert_str_eq(remote, local, "through the daemon:\n%s\nlocal:\n%s", remote, local);
	free(local);
	free(remote);
	/* Its KV region is half the size of a float32 one. */
	skv_client *c = mp_connect(&d);
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_kv(o, (enum skv_client_kv)9), -EINVAL);
	skv_client_stream *a, *h;
	cr_assert_eq(skv_client_stream_open(c, o, &a), 0);
	cr_assert_eq(skv_client_opts_kv(o, SKV_CLIENT_KV_F16), 0);
	cr_assert_eq(skv_client_stream_open(c, o, &h), 0);
	skv_client_opts_free(o);
	struct skv_client_stream_info ia, ih;
	skv_client_stream_info(a, &ia);
	skv_client_stream_info(h, &ih);
	cr_assert_lt(ih.kv_bytes, ia.kv_bytes * 6 / 10, "f16 %llu bytes, f32 %llu",
		     (unsigned long long)ih.kv_bytes, (unsigned long long)ia.kv_bytes);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== 8-bit KV ============================================================================== */

/* q8 through the daemon (libskv's option, the wire, the daemon's check, an engine's KV region in
 * the shared arena) gives local mode's text byte for byte, evicting past its window; the
 * region's descriptor is the q8 layout (shm/kv-layout.h), 37.5% of float32's planes here. */
Test(client, q8_streams_through_the_daemon_equal_local_mode)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "kv_q8", 1, NULL, NULL);
	char *local = MP_SKV("generate", "--kv", "q8", "--temp", "0", "-n", "400", "--window",
			     "50", "Lily and Tom");
	char *remote = MP_SKV("--socket", d.sock, "generate", "--kv", "q8", "--temp", "0", "-n",
			      "400", "--window", "50", "Lily and Tom");
	cr_assert_str_eq(remote, local, "through the daemon:\n%s\nlocal:\n%s", remote, local);
	char *f32 = MP_SKV("generate", "--temp", "0", "-n", "400", "--window", "50",
			   "Lily and Tom");
	cr_log_info("q8 %s float32 over 400 greedy tokens", strcmp(local, f32) ? "differs from"
									       : "equals");
	free(f32);
	free(local);
	free(remote);
	skv_client *c = mp_connect(&d);
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	skv_client_stream *a, *q;
	cr_assert_eq(skv_client_stream_open(c, o, &a), 0);
	cr_assert_eq(skv_client_opts_kv(o, SKV_CLIENT_KV_Q8), 0);
	cr_assert_eq(skv_client_stream_open(c, o, &q), 0);
	skv_client_opts_free(o);
	struct skv_client_stream_info ia, iq;
	skv_client_stream_info(a, &ia);
	skv_client_stream_info(q, &iq);
	cr_assert_lt(iq.kv_bytes, ia.kv_bytes * 4 / 10, "q8 %llu bytes, f32 %llu",
		     (unsigned long long)iq.kv_bytes, (unsigned long long)ia.kv_bytes);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== no system call per token ============================================================== */

/* The engine's count of wake-ups that needed a system call, from its doorbell page. */
static uint64_t engine_wake_syscalls(skv_client_stream *s)
{
	const struct skv_engine_stats *st = libskv_stream_engine_stats(s);
	return __atomic_load_n(&st->wake_syscalls, __ATOMIC_ACQUIRE);
}

Test(client, a_busy_stream_costs_no_system_call_per_token)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "busy", 1, NULL, NULL);
	skv_client *c = mp_connect(&d);
	skv_client_stream *s = open_greedy(c, -1);
	const int tokens = 5000;
	cr_assert_eq(skv_client_stream_generate(s, "", 0, 20, SKV_CLIENT_ENDLESS), 0);
	struct skv_client_event ev;
	do
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
	while (ev.type != SKV_CLIENT_EV_DONE);
	mp_sleep_ms(200); /* the engine publishes its statistics after each step */
	uint64_t before = engine_wake_syscalls(s);
	cr_assert_eq(skv_client_stream_generate(s, "", 0, (uint64_t)tokens, SKV_CLIENT_ENDLESS), 0);
	int got = 0, long_gaps = 0;
	double last = mp_now();
	do {
		cr_assert_eq(skv_client_stream_read(s, &ev, 10000), 1);
		got += ev.type == SKV_CLIENT_EV_TOKEN;
		double now = mp_now();
		long_gaps += now - last > 150e-6;
		last = now;
	} while (ev.type != SKV_CLIENT_EV_DONE);
	cr_assert_eq(got, tokens);
	mp_sleep_ms(200);
	uint64_t wakes = engine_wake_syscalls(s) - before;
	/* The client spins 200 us between tokens (libskv), so the engine rings it without a
	 * system call; one is needed only where the client slept, after a wait longer than its
	 * spin: when this shared machine deschedules one side. So: at most one per gap of more
	 * than 150 us seen here (plus a few for the read calls' own set-up), and never one per
	 * token. */
	cr_assert(wakes <= (uint64_t)long_gaps + 20 && wakes < (uint64_t)tokens / 2,
		  "%llu wake-up system calls for %d tokens, %d of which came after a gap of more"
		  " than 150 us", (unsigned long long)wakes, tokens, long_gaps);
	skv_client_disconnect(c);
}

/* ==== slow readers ========================================================================== */

Test(client, a_slow_reader_holds_back_only_its_own_stream)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "slow_reader", 1, NULL, NULL);
	skv_client *slow = mp_connect(&d), *fast = mp_connect(&d);
	skv_client_stream *a = open_greedy(slow, -1), *b = open_greedy(fast, -1);
	/* a's output ring (1024 messages) fills and its engine stops feeding it. */
	cr_assert_eq(skv_client_stream_generate(a, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS), 0);
	cr_assert_eq(skv_client_stream_generate(b, "", 0, 5000, SKV_CLIENT_ENDLESS), 0);
	struct skv_client_event ev;
	int tokens = 0;
	double t0 = mp_now();
	while (tokens < 5000) {
		cr_assert_eq(skv_client_stream_read(b, &ev, 10000), 1, "the fast stream stalled");
		tokens += ev.type == SKV_CLIENT_EV_TOKEN;
	}
	cr_assert(mp_now() - t0 < 60.0);
	/* a kept every token it had room for, in order: nothing lost. */
	int got = 0;
	while (skv_client_stream_read(a, &ev, 0) == 1)
		got += ev.type == SKV_CLIENT_EV_TOKEN;
	cr_assert(got >= 1000 && got <= 1100, "the slow stream held %d tokens", got);
	cr_assert_eq(skv_client_stream_read(a, &ev, 5000), 1, "the slow stream does not resume");
	skv_client_disconnect(slow);
	skv_client_disconnect(fast);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}
