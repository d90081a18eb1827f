/* Multi-process tests of the data path: a real skv-cached with real skv-engine processes per
 * test (socket and logs in a scratch directory named after the pid and the test), driven
 * through the skv CLI's --socket mode, through libskv, and through raw protocol connections.
 * Processes are killed for real: engines with SIGKILL in the middle of a generation, clients
 * with SIGKILL, the daemon with SIGKILL and SIGTERM. Every check is an assertion; every wait
 * is bounded.
 *
 * Through the daemon, output must equal local mode byte for byte: greedy generation against
 * llama2.c's own output, sampling with a fixed seed, perplexity under every policy, also with
 * several streams on two engines at once. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"

#define FAIL_NOTICE_S 5.0        /* a client learns of a failure within this */
#define EXIT_NOTICE_S 10.0       /* processes that must exit do so within this */
#define NOBODY 65534

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(daemon, .init = suite_init, .fini = suite_fini, .timeout = 120);

/* ---- helpers ------------------------------------------------------------------------------ */

static const char *sample_path(void)
{
	return tu_data_path("tokenizer-sample.txt");
}

/* ==== 1. through the daemon, output equals local mode ===================================== */

Test(daemon, cli_greedy_and_sampled_generate_match_local)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "cli_generate", 2, NULL, NULL);
	mp_expect_greedy_cli(&d);

	/* The same binary in local mode prints the same bytes. */
	char *local = MP_SKV("generate", "--temp", "0", "-n", "200");
	char *want = mp_greedy_reference();
	cr_assert_str_eq(local, want);
	free(local);
	free(want);

	/* A prompt, sampling with a fixed seed, and a policy that evicts during generation. */
	const char *prompt = "Once upon a time, a little dog";
	local = MP_SKV("generate", "--temp", "0.8", "--top-p", "0.9", "--seed", "42", "-n",
		       "150", "--policy", "window", "--window", "48", prompt);
	char *remote = MP_SKV("--socket", d.sock, "generate", "--temp", "0.8", "--top-p", "0.9",
			      "--seed", "42", "-n", "150", "--policy", "window", "--window", "48",
			      prompt);
	cr_assert(strncmp(local, prompt, strlen(prompt)) == 0, "local mode did not echo the prompt");
	cr_assert(strlen(local) > strlen(prompt) + 100, "local mode generated little: %s", local);
	cr_assert_str_eq(remote, local, "skv --socket:\n%s\nlocal:\n%s", remote, local);
	free(local);
	free(remote);

	local = MP_SKV("generate", "--temp", "1.0", "--seed", "7", "-n", "120", "--policy",
		       "sink", "--sink", "4", "--window", "40", "--evict", "prompt", "The cat");
	remote = MP_SKV("--socket", d.sock, "generate", "--temp", "1.0", "--seed", "7", "-n", "120",
			"--policy", "sink", "--sink", "4", "--window", "40", "--evict", "prompt",
			"The cat");
	cr_assert_str_eq(remote, local, "skv --socket:\n%s\nlocal:\n%s", remote, local);
	free(local);
	free(remote);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* Each policy, with windows small enough that 300 tokens evict. */
static const char *const ppl_policies[][7] = {
	{ "--policy", "sink", "--sink", "4", "--window", "60", NULL },
	{ "--policy", "window", "--window", "64", NULL },
	{ "--policy", "dense", NULL },
	{ "--policy", "recompute", "--window", "64", NULL },
};

Test(daemon, cli_ppl_every_policy_matches_local)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "cli_ppl", 2, NULL, NULL);
	for (size_t i = 0; i < sizeof(ppl_policies) / sizeof(*ppl_policies); i++) {
		const char *args[16];
		unsigned n = 0, first_local;
		args[n++] = "--socket";
		args[n++] = d.sock;
		first_local = n;
		args[n++] = "ppl";
		args[n++] = "--json";
		args[n++] = "--tokens";
		args[n++] = "300";
		for (unsigned k = 0; ppl_policies[i][k]; k++)
			args[n++] = ppl_policies[i][k];
		args[n++] = sample_path();
		args[n] = NULL;
		char *remote = mp_skv(args);
		char *local = mp_skv(args + first_local);
		cr_assert_str_eq(remote, local, "policy %s: skv --socket: %s local: %s",
				 ppl_policies[i][1], remote, local);
		char tokens[32], policy[32];
		mp_json_field(remote, "tokens", tokens, sizeof(tokens));
		mp_json_field(remote, "policy", policy, sizeof(policy));
		cr_assert_str_eq(tokens, "300");
		cr_assert_str_eq(policy, ppl_policies[i][1]);
		free(remote);
		free(local);
	}
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

Test(daemon, libskv_greedy_and_prompt_match_local)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "libskv_local", 2, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	mp_expect_greedy_libskv(c);

	/* A prompt: ECHO (the prompt as the engine decoded it) then TOKENs, as skv prints. */
	const char *prompt = "Lily wanted to play with the big red ball";
	char *local = MP_SKV("generate", "--temp", "0.5", "--seed", "1234", "-n", "100", prompt);
	struct skv_stream_params p;
	mp_params_generate(&p, 0.5f, 1234);
	struct skv_client_stream *s = mp_open(c, &p, NULL);
	mp_request(s, prompt, SKV_CHAN_GENERATE, 100);
	struct mp_result r = { 0 };
	mp_collect(s, &r, REQUEST_TIMEOUT_S);
	mp_result_append_nl(&r);
	cr_assert_str_eq(r.text, local, "libskv:\n%s\nlocal:\n%s", r.text, local);
	cr_assert(r.tokens > 0 && r.tokens <= 100);
	mp_result_free(&r);
	free(local);

	/* Scoring on a fresh stream equals skv ppl. */
	skv_client_stream_close(s);
	local = MP_SKV("ppl", "--json", "--tokens", "250", "--policy", "sink", "--window", "60",
		       sample_path());
	mp_params_default(&p);
	p.window_slots = 60;
	s = mp_open(c, &p, NULL);
	char *text = tu_read_file(sample_path(), NULL);
	mp_request(s, text, SKV_CHAN_SCORE, 250);
	free(text);
	mp_collect(s, &r, REQUEST_TIMEOUT_S);
	cr_assert_eq(r.predictions, 250);
	char ppl[64], want[64];
	mp_ppl_text(&r, ppl, sizeof(ppl));
	mp_json_field(local, "ppl", want, sizeof(want));
	cr_assert_str_eq(ppl, want);
	mp_result_free(&r);
	free(local);
	skv_client_stream_close(s);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

Test(daemon, cli_without_daemon_says_so)
{
	const char *dir = tu_scratch_dir("cli_nodaemon");
	char sock[PATH_MAX];
	snprintf(sock, sizeof(sock), "%s/nobody-listens.sock", dir);
	char *out, *err;
	int status = mp_run(mp_env_path("SKV_BIN"),
			    (const char *const[]){ "--socket", sock, "generate", "-n", "5", NULL },
			    &out, &err);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status 0x%x", status);
	cr_assert_str_eq(out, "");
	cr_assert(strstr(err, "skv: ") == err && strstr(err, sock) && strstr(err, "daemon running"),
		  "stderr: %s", err);
	free(out);
	free(err);
}

/* ==== 2. several streams at once on two engines ============================================ */

struct concurrent_case {
	const char *what;
	struct skv_stream_params params;
	const char *prompt;        /* generate: the prompt; score: NULL (the sample text) */
	uint64_t arg;
	char *want;                /* generate: stdout of local skv; score: its ppl text */
	struct skv_client_stream *s;
	uint64_t inode;
	unsigned engine;
	struct mp_result r;
};

Test(daemon, concurrent_streams_on_two_engines_match_local)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "concurrent", 2, NULL, NULL);
	struct concurrent_case cases[6];
	memset(cases, 0, sizeof(cases));

	cases[0].what = "greedy from BOS";
	mp_params_generate(&cases[0].params, 0.0f, 1);
	cases[0].prompt = "";
	cases[0].arg = 200;
	cases[0].want = mp_greedy_reference();

	cases[1].what = "sampled prompt";
	mp_params_generate(&cases[1].params, 0.8f, 42);
	cases[1].prompt = "The little bird";
	cases[1].arg = 150;
	cases[1].want = MP_SKV("generate", "--temp", "0.8", "--seed", "42", "-n", "150",
			       "The little bird");

	cases[2].what = "greedy prompt through a small window";
	mp_params_generate(&cases[2].params, 0.0f, 1);
	cases[2].params.policy = 1; /* window */
	cases[2].params.window_slots = 64;
	cases[2].prompt = "Once upon a time";
	cases[2].arg = 100;
	cases[2].want = MP_SKV("generate", "--temp", "0", "-n", "100", "--policy", "window",
			       "--window", "64", "Once upon a time");

	char ppl[64];
	static const struct {
		uint32_t policy;
		int64_t window;
		const char *name, *window_text;
		uint64_t tokens;
	} scores[3] = {
		{ 0, 60, "sink", "60", 400 },
		{ 2, -1, "dense", NULL, 300 },
		{ 3, 64, "recompute", "64", 120 },
	};
	for (unsigned i = 0; i < 3; i++) {
		struct concurrent_case *k = &cases[3 + i];
		k->what = scores[i].name;
		mp_params_default(&k->params);
		k->params.policy = scores[i].policy;
		k->params.window_slots = scores[i].window;
		k->params.temperature = 1.0f;
		k->params.seed = 1;
		k->arg = scores[i].tokens;
		char tokens[16];
		snprintf(tokens, sizeof(tokens), "%llu", (unsigned long long)scores[i].tokens);
		char *json = scores[i].window_text
				     ? MP_SKV("ppl", "--json", "--tokens", tokens, "--policy",
					      scores[i].name, "--window", scores[i].window_text,
					      sample_path())
				     : MP_SKV("ppl", "--json", "--tokens", tokens, "--policy",
					      scores[i].name, sample_path());
		mp_json_field(json, "ppl", ppl, sizeof(ppl));
		k->want = strdup(ppl);
		free(json);
	}

	/* Two clients, three streams each, spread over both engines. */
	struct skv_client *clients[2] = { mp_connect(&d), mp_connect(&d) };
	unsigned per_engine[2] = { 0, 0 };
	for (unsigned i = 0; i < 6; i++) {
		cases[i].s = mp_open(clients[i % 2], &cases[i].params, &cases[i].inode);
		cases[i].engine = mp_engine_serving(&d, cases[i].inode, FAIL_NOTICE_S);
		cr_assert(cases[i].engine < 2);
		per_engine[cases[i].engine]++;
	}
	cr_assert(per_engine[0] == 3 && per_engine[1] == 3,
		  "the daemon put %u and %u streams on the two engines", per_engine[0],
		  per_engine[1]);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 6);

	/* Requests go out in turn and every stream is read a message at a time, round robin. */
	char *text = tu_read_file(sample_path(), NULL);
	char msg[256] = "";
	for (unsigned i = 0; i < 6; i++) {
		if (cases[i].prompt)
			mp_request(cases[i].s, cases[i].prompt, SKV_CHAN_GENERATE, cases[i].arg);
		else
			mp_request(cases[i].s, text, SKV_CHAN_SCORE, cases[i].arg);
		for (unsigned j = 0; j <= i; j++) {
			int rc = mp_step(cases[j].s, &cases[j].r, 0, msg, sizeof(msg));
			cr_assert(rc >= 0, "%s: %s", cases[j].what, msg);
		}
	}
	free(text);
	double deadline = mp_now() + REQUEST_TIMEOUT_S;
	for (unsigned finished = 0; finished < 6;) {
		cr_assert(mp_now() < deadline, "streams did not finish in %.0f s", REQUEST_TIMEOUT_S);
		finished = 0;
		for (unsigned i = 0; i < 6; i++) {
			if (cases[i].r.finished) {
				finished++;
				continue;
			}
			int rc = mp_step(cases[i].s, &cases[i].r, 1000000, msg, sizeof(msg));
			cr_assert(rc >= 0, "%s: %s", cases[i].what, msg);
		}
	}
	for (unsigned i = 0; i < 6; i++) {
		struct concurrent_case *k = &cases[i];
		cr_assert(!k->r.error, "%s: engine error %s", k->what, k->r.error_text);
		if (k->prompt) {
			mp_result_append_nl(&k->r);
			cr_assert_str_eq(k->r.text, k->want, "%s:\n%s\nlocal:\n%s", k->what, k->r.text,
					 k->want);
		} else {
			cr_assert_eq(k->r.predictions, k->arg, "%s", k->what);
			mp_ppl_text(&k->r, ppl, sizeof(ppl));
			cr_assert_str_eq(ppl, k->want, "%s: ppl %s, local %s", k->what, ppl, k->want);
		}
		mp_result_free(&k->r);
		free(k->want);
		skv_client_stream_close(k->s);
	}
	skv_client_disconnect(clients[0]);
	skv_client_disconnect(clients[1]);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== 3. an engine killed in the middle of a generation ==================================== */

Test(daemon, engine_killed_mid_generation)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "engine_kill", 2, NULL, NULL);
	struct skv_client *ca = mp_connect(&d), *cb = mp_connect(&d);

	/* A: a long generation. B: a long text to score, on the other engine. */
	struct skv_stream_params p;
	mp_params_generate(&p, 1.0f, 99);
	uint64_t inode_a, inode_b;
	struct skv_client_stream *a = mp_open(ca, &p, &inode_a);
	mp_params_default(&p);
	p.window_slots = 2000;
	p.temperature = 1.0f;
	p.seed = 1;
	struct skv_client_stream *b = mp_open(cb, &p, &inode_b);
	unsigned engine_a = mp_engine_serving(&d, inode_a, FAIL_NOTICE_S);
	unsigned engine_b = mp_engine_serving(&d, inode_b, FAIL_NOTICE_S);
	cr_assert_neq(engine_a, engine_b, "both streams are on engine %u", engine_a);
	char *local = MP_SKV("ppl", "--json", "--policy", "sink", "--window", "2000",
			     sample_path());
	char want_ppl[64], want_tokens[32];
	mp_json_field(local, "ppl", want_ppl, sizeof(want_ppl));
	mp_json_field(local, "tokens", want_tokens, sizeof(want_tokens));
	free(local);

	struct skv_msg_stats before;
	mp_stats(&d, &before);
	pid_t victim = before.engine_pid[engine_a];
	int victim_fd = mp_track_pidfd(victim);
	cr_assert(victim_fd >= 0);

	struct mp_result ra = { 0 }, rb = { 0 };
	cr_assert_eq(mp_request_endless(a, NULL, 0), 0);
	mp_pump_until(a, &ra, 300);
	char *text = tu_read_file(sample_path(), NULL);
	mp_request(b, text, SKV_CHAN_SCORE, 0);
	free(text);

	cr_assert(syscall(SYS_pidfd_send_signal, victim_fd, SIGKILL, NULL, 0) == 0);
	char msg[256] = "";
	mp_expect_epipe(a, &ra, FAIL_NOTICE_S, msg, sizeof(msg), "the killed engine's stream");
	cr_assert(strstr(msg, "engine") != NULL, "the failure does not say why: %s", msg);
	/* B's only output is its final SCORED: an empty output ring means B is still at work. */
	struct skv_chan_hdr *chan_b = mp_chan_address(inode_b);
	struct skv_ring_hdr *out_b = (struct skv_ring_hdr *)((char *)chan_b + chan_b->out_offset);
	cr_assert_eq(__atomic_load_n(&out_b->head, __ATOMIC_ACQUIRE), 0,
		     "B finished before A's failure was noticed: the test proves nothing");

	/* The stream stays failed: a new request is refused the same way. */
	int err = skv_client_stream_generate(a, "more", 4, 5, 0);
	cr_assert_eq(err, -EPIPE, "a request on a failed stream returned %d", err);

	/* B, on the other engine, goes on and finishes exactly as local mode. */
	mp_collect(b, &rb, REQUEST_TIMEOUT_S);
	char ppl[64];
	mp_ppl_text(&rb, ppl, sizeof(ppl));
	cr_assert_eq(rb.predictions, strtoull(want_tokens, NULL, 10));
	cr_assert_str_eq(ppl, want_ppl, "B's ppl %s, local %s", ppl, want_ppl);

	/* The daemon restarts the killed engine. */
	cr_assert_geq(mp_wait_gone(victim, EXIT_NOTICE_S, "the killed engine"), -1);
	mp_daemon_wait_ready(&d, 2, 30.0);
	struct skv_msg_stats after;
	mp_stats(&d, &after);
	cr_assert_eq(after.engine_restarts, before.engine_restarts + 1);
	cr_assert_neq(after.engine_pid[engine_a], victim);
	cr_assert_eq(after.engine_pid[engine_b], before.engine_pid[engine_b],
		     "the other engine was restarted too");
	cr_assert_geq(after.streams_failed, before.streams_failed + 1);
	mp_track_pidfd(after.engine_pid[engine_a]);

	/* A's connection still works: close the failed stream, open a new one, on the new engine. */
	skv_client_stream_close(a);
	struct skv_stream_params g;
	mp_params_generate(&g, 0.0f, 1);
	uint64_t inode_c;
	struct skv_client_stream *c = mp_open(ca, &g, &inode_c);
	cr_assert_eq(mp_engine_serving(&d, inode_c, FAIL_NOTICE_S), engine_a,
		     "the new stream did not go to the restarted (idle) engine");
	mp_request(c, "", SKV_CHAN_GENERATE, 200);
	struct mp_result rc = { 0 };
	mp_collect(c, &rc, REQUEST_TIMEOUT_S);
	mp_result_append_nl(&rc);
	char *want = mp_greedy_reference();
	cr_assert_str_eq(rc.text, want);
	free(want);
	mp_result_free(&rc);
	mp_result_free(&ra);
	mp_result_free(&rb);
	skv_client_stream_close(c);
	skv_client_stream_close(b);
	skv_client_disconnect(ca);
	skv_client_disconnect(cb);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* ==== 4. a client killed with SIGKILL ====================================================== */

/* The child: two endless streams, one read all along, one never read (its engine stalls on
 * the full output ring). Says 'R' when both run. */
static void client_child(const char *sock, int ready_fd)
{
	struct skv_client *c;
	char msg[256];
	if (skv_client_connect(sock, &c, msg, sizeof(msg)) < 0)
		_exit(10);
	struct skv_stream_params p;
	mp_params_default(&p);
	p.temperature = 1.0f;
	p.seed = 5;
	struct skv_client_stream *read_s, *stalled_s;
	if (mp_try_open(c, &p, &read_s, msg, sizeof(msg)) < 0 ||
	    mp_try_open(c, &p, &stalled_s, msg, sizeof(msg)) < 0)
		_exit(11);
	if (mp_request_endless(stalled_s, msg, sizeof(msg)) < 0 ||
	    mp_request_endless(read_s, msg, sizeof(msg)) < 0)
		_exit(12);
	for (uint64_t got = 0;; got++) {
		struct skv_client_event m;
		if (skv_client_stream_read(read_s, &m, -1) < 0)
			_exit(13);
		if (m.type != SKV_CLIENT_EV_TOKEN)
			_exit(14);
		if (got == 200 && write(ready_fd, "R", 1) != 1)
			_exit(15);
	}
}

Test(daemon, client_killed_frees_its_streams)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "client_kill", 2, NULL, NULL);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	uint64_t idle_used = st.arena_used_bytes;
	cr_assert_eq(idle_used, 0);

	for (int round = 0; round < 2; round++) {
		int pipe_fds[2];
		cr_assert(pipe2(pipe_fds, O_CLOEXEC) == 0);
		pid_t child = mp_fork();
		if (child == 0)
			client_child(d.sock, pipe_fds[1]);
		close(pipe_fds[1]);
		char ready = 0;
		if (!mp_read_timed(pipe_fds[0], &ready, 1, REQUEST_TIMEOUT_S) || ready != 'R') {
			int status = 0;
			kill(child, SIGKILL);
			waitpid(child, &status, 0);
			cr_assert_fail("the client child did not start generating (status 0x%x)",
				       status);
		}
		close(pipe_fds[0]);
		mp_sleep_ms(50); /* the unread stream fills its ring */
		mp_stats(&d, &st);
		cr_assert_eq(st.streams, 2);
		cr_assert_gt(st.arena_used_bytes, 0);
		uint64_t closed_before = st.streams_closed;

		cr_assert(kill(child, SIGKILL) == 0);
		int status;
		cr_assert_eq(waitpid(child, &status, 0), child);
		cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

		mp_wait_streams_freed(&d, FAIL_NOTICE_S);
		mp_stats(&d, &st);
		cr_assert_eq(st.streams_closed, closed_before + 2);
		cr_assert_eq(st.engines_ready, 2);
		cr_assert_eq(st.engine_restarts, 0, "killing a client cost an engine");
	}
	/* The engines serve new streams normally. */
	struct skv_client *c = mp_connect(&d);
	mp_expect_greedy_libskv(c);
	skv_client_disconnect(c);
}

/* ==== 5. the daemon dies while its engines run ============================================= */

struct waiter_arg {
	struct skv_client_stream *s;
	int rc;
	char msg[256];
};

static void *waiter_thread(void *arg)
{
	struct waiter_arg *w = arg;
	struct skv_client_event m;
	w->rc = skv_client_stream_read(w->s, &m, 30000);
	snprintf(w->msg, sizeof(w->msg), "%s", skv_client_last_error(mp_client_of(w->s)));
	return NULL;
}

static void daemon_dies(const char *test, const char *wait_mode, int sig)
{
	struct mp_daemon d;
	mp_daemon_start(&d, test, 2, wait_mode, NULL);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	uint64_t instance = st.instance;
	pid_t engines[2] = { st.engine_pid[0], st.engine_pid[1] };

	/* One client generating, one waiting in stream_next on an idle stream. */
	struct skv_client *busy = mp_connect(&d), *idle = mp_connect(&d);
	struct skv_stream_params p;
	mp_params_generate(&p, 1.0f, 3);
	struct skv_client_stream *gen = mp_open(busy, &p, NULL);
	struct skv_client_stream *quiet = mp_open(idle, &p, NULL);
	struct mp_result r = { 0 };
	cr_assert_eq(mp_request_endless(gen, NULL, 0), 0);
	mp_pump_until(gen, &r, 100);
	struct waiter_arg w = { .s = quiet, .rc = 1 };
	pthread_t thread;
	cr_assert(pthread_create(&thread, NULL, waiter_thread, &w) == 0);
	mp_sleep_ms(100);

	cr_assert(kill(d.pid, sig) == 0);
	struct timespec join_by;
	clock_gettime(CLOCK_REALTIME, &join_by);
	join_by.tv_sec += (time_t)FAIL_NOTICE_S;
	int joined = pthread_timedjoin_np(thread, NULL, &join_by);
	if (joined != 0) {
		/* Do not leave the thread blocked on our stack frame. */
		pthread_cancel(thread);
		pthread_join(thread, NULL);
	}
	cr_assert_eq(joined, 0, "a client waiting in stream_next did not notice the daemon's death "
				"within %.0f s", FAIL_NOTICE_S);
	cr_assert_eq(w.rc, -EPIPE, "stream_next returned %d (%s), not -EPIPE", w.rc, w.msg);
	cr_assert(strstr(w.msg, "skv-cached") != NULL, "the failure does not say why: %s", w.msg);

	char msg[256] = "";
	mp_expect_epipe(gen, &r, FAIL_NOTICE_S, msg, sizeof(msg), "the generating stream");
	struct skv_client_stream *none = NULL;
	int err = mp_try_open(busy, &p, &none, msg, sizeof(msg));
	cr_assert_eq(err, -EPIPE, "opening a stream on a dead daemon returned %d", err);

	cr_assert(mp_daemon_reap(&d, EXIT_NOTICE_S), "the daemon did not exit after signal %d",
		  sig);
	if (sig == SIGKILL) {
		cr_assert(WIFSIGNALED(d.status) && WTERMSIG(d.status) == SIGKILL);
	} else {
		cr_assert(WIFEXITED(d.status) && WEXITSTATUS(d.status) == 0,
			  "skv-cached exited with status 0x%x after SIGTERM", d.status);
		cr_assert(access(d.sock, F_OK) < 0 && errno == ENOENT,
			  "skv-cached left its socket behind");
	}
	/* Its engines exit on their own: on the hang-up (status 0) or, at the latest, by the
	 * parent-death signal the daemon set (SIGTERM); never by the daemon's SIGKILL fallback. */
	for (unsigned i = 0; i < 2; i++) {
		int status = mp_wait_gone(engines[i], EXIT_NOTICE_S, "an engine");
		if (status != -1)
			cr_assert((WIFEXITED(status) && WEXITSTATUS(status) == 0) ||
					  (WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM),
				  "engine %d ended with status 0x%x", (int)engines[i], status);
		cr_assert(mp_proc_gone(engines[i]));
	}
	if (sig == SIGTERM)
		cr_assert_eq(mp_log_count(&d, "the daemon went away; exiting"), 2,
			     "on SIGTERM the engines did not exit through the hang-up (the daemon "
			     "had to kill them); log:\n%s",
			     mp_daemon_log(&d));
	mp_result_free(&r);
	skv_client_disconnect(busy);
	skv_client_disconnect(idle);

	/* A new daemon on the same socket is a new instance and serves at once. */
	struct mp_daemon again;
	mp_daemon_start(&again, test, 2, wait_mode, NULL);
	mp_stats(&again, &st);
	cr_assert_neq(st.instance, instance);
	mp_expect_greedy_cli(&again);
}

Test(daemon, daemon_sigkill_uring)
{
	daemon_dies("kill_uring", "uring", SIGKILL);
}

Test(daemon, daemon_sigkill_futex)
{
	daemon_dies("kill_futex", "futex", SIGKILL);
}

Test(daemon, daemon_sigterm_uring)
{
	daemon_dies("term_uring", "uring", SIGTERM);
}

/* Regression: with --wait futex the engines sleep in FUTEX_WAIT and do not see their sockets
 * close; the shutdown must ring their doorbells so that they exit cleanly, not get SIGKILLed. */
Test(daemon, daemon_sigterm_futex)
{
	daemon_dies("term_futex", "futex", SIGTERM);
}

/* ==== 8. both wake-up paths ================================================================ */

static const char *const futex_sleep[] = { "futex", NULL };
static const char *const uring_sleep[] = { "io_cqring", "io_uring", NULL };

static void expect_engines_sleep_in(struct mp_daemon *d, const char *const *needles)
{
	struct skv_msg_stats st;
	mp_stats(d, &st);
	for (unsigned i = 0; i < 2; i++) {
		char wchan[128];
		cr_assert(mp_wait_wchan(st.engine_pid[i], needles, FAIL_NOTICE_S, wchan,
					sizeof(wchan)),
			  "idle engine %u sleeps in '%s', not in %s", i, wchan, needles[0]);
	}
}

static void wake_path(const char *test, const char *mode)
{
	struct mp_daemon d;
	mp_daemon_start(&d, test, 2, mode, NULL);
	/* The daemon idles in epoll_wait: if even it shows no wchan, the kernel does not say. */
	char wchan[128];
	if (!mp_wait_wchan(d.pid, NULL, FAIL_NOTICE_S, wchan, sizeof(wchan)))
		MP_SKIP("/proc/PID/wchan shows nothing here ('%s'): cannot tell how engines sleep",
			wchan);
	const char *const *sleep_in = strcmp(mode, "futex") ? uring_sleep : futex_sleep;
	expect_engines_sleep_in(&d, sleep_in);

	/* Each request wakes a sleeping engine; clients wake on its output. */
	struct skv_client *c = mp_connect(&d);
	for (unsigned i = 0; i < 3; i++) {
		mp_expect_greedy_libskv(c);
		expect_engines_sleep_in(&d, sleep_in);
	}
	mp_expect_greedy_cli(&d);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

Test(daemon, wait_futex_greedy_matches_llama2c)
{
	wake_path("wait_futex", "futex");
}

Test(daemon, wait_uring_greedy_matches_llama2c)
{
	FILE *f = fopen("/proc/sys/kernel/io_uring_disabled", "re");
	int disabled = 0;
	if (f) {
		if (fscanf(f, "%d", &disabled) != 1)
			disabled = 0;
		fclose(f);
	}
	if (disabled)
		MP_SKIP("io_uring is disabled here (kernel.io_uring_disabled = %d)", disabled);
	wake_path("wait_uring", "uring");
}

/* ==== more failure paths =================================================================== */

struct closer_arg {
	struct skv_client_stream *s;
	int done;
};

static void *closer_thread(void *arg)
{
	struct closer_arg *a = arg;
	skv_client_stream_close(a->s);
	__atomic_store_n(&a->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/* A client closes a stream while its engine is dying (the daemon has sent DROP, the engine
 * dies before DROPPED): the close must return promptly and the stream must leave the table.
 * BUG (cached/daemon.c cached_engine_lost / cached_engine_exited): the engine's death turns the
 * CLOSING stream into FAILED and sends FAILED instead of CLOSED; the entry is kept "until the
 * client closes it", which it already did: skv_client_stream_close waits its full 30 s reply
 * timeout and the stream stays in the table until the client disconnects. */
Test(daemon, close_while_its_engine_dies)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "close_dies", 2, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	struct skv_stream_params p;
	mp_params_generate(&p, 1.0f, 11);
	uint64_t inode;
	struct skv_client_stream *s = mp_open(c, &p, &inode);
	unsigned engine = mp_engine_serving(&d, inode, FAIL_NOTICE_S);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	int victim = mp_track_pidfd(st.engine_pid[engine]);
	cr_assert(victim >= 0);
	struct mp_result r = { 0 };
	cr_assert_eq(mp_request_endless(s, NULL, 0), 0);
	mp_pump_until(s, &r, 50);
	mp_result_free(&r);

	/* Freeze the engine so that DROP stays unanswered, close, then kill it. */
	cr_assert(syscall(SYS_pidfd_send_signal, victim, SIGSTOP, NULL, 0) == 0);
	struct closer_arg arg = { .s = s };
	pthread_t thread;
	cr_assert(pthread_create(&thread, NULL, closer_thread, &arg) == 0);
	mp_sleep_ms(200);
	cr_assert(!__atomic_load_n(&arg.done, __ATOMIC_ACQUIRE),
		  "close returned while the engine could not have answered DROP");
	cr_assert(syscall(SYS_pidfd_send_signal, victim, SIGKILL, NULL, 0) == 0);
	struct timespec join_by;
	clock_gettime(CLOCK_REALTIME, &join_by);
	join_by.tv_sec += (time_t)FAIL_NOTICE_S;
	int joined = pthread_timedjoin_np(thread, NULL, &join_by);
	if (joined != 0) {
		pthread_cancel(thread);
		pthread_join(thread, NULL);
	}
	cr_assert_eq(joined, 0, "skv_client_stream_close hung after the engine died");
	mp_daemon_wait_ready(&d, 2, 30.0);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
	mp_expect_greedy_libskv(c);
	skv_client_disconnect(c);
}

/* An engine started by hand (HELLO with engine id UINT32_MAX) that comes and goes: once its
 * process has exited, the daemon must hold nothing of it.
 * BUG (cached/daemon.c cached_engine_exited): for an unsupervised engine the doorbell memfd
 * (and its mapping) and the eventfd made in cached_engine_hello are never released, 2 fds per
 * engine; its slot in d->engines is never reused either (n_engines only grows). */
Test(daemon, hand_engine_that_exits_leaves_nothing)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "hand_engine", 2, NULL, NULL);
	unsigned fds_before = mp_fd_count(d.pid);
	for (unsigned i = 0; i < 3; i++) {
		pid_t child = mp_fork();
		if (child == 0) {
			struct sockaddr_un sa = { .sun_family = AF_UNIX };
			snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", d.sock);
			int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
			if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
				_exit(10);
			struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR,
						       .minor = SKV_PROTO_MINOR,
						       .role = SKV_ROLE_ENGINE,
						       .pid = (uint32_t)getpid(),
						       .engine_id = UINT32_MAX,
						       .node = UINT32_MAX };
			struct skv_msg_hdr h;
			union {
				struct skv_msg_hello_ok ok;
				struct skv_msg_error error;
			} body;
			int got[SKV_MSG_MAX_FDS], n_got = 0;
			if (skv_msg_send(fd, SKV_MSG_HELLO, 0, &hello, NULL, 0) < 0 ||
			    skv_msg_recv(fd, &h, &body, sizeof(body), got, &n_got) != 1 ||
			    h.type != SKV_MSG_HELLO_OK || n_got != 4)
				_exit(11);
			_exit(0);
		}
		int status;
		cr_assert_eq(waitpid(child, &status, 0), child);
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			  "the hand engine was not accepted (status 0x%x)", status);
	}
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.engines_ready, 2);
	mp_wait_fd_count(d.pid, fds_before, FAIL_NOTICE_S, "after three hand engines came and went");
}

/* ==== libskv's futex fall-back ============================================================= */

/* Where io_uring is unavailable (kernel.io_uring_disabled, a container's seccomp profile)
 * libskv's waiter falls back to futex waits. A client asleep there must still learn that its
 * stream failed or that the daemon died. The child below denies itself io_uring_setup with a
 * seccomp filter, so that libskv's AUTO wait mode falls back exactly as it would there. */

struct futex_report {
	int stage;    /* -2 no seccomp, -1 set-up failed, 1 generating, 2 stream_next gave < 0 */
	int rc;
	char msg[256];
};

static void futex_report(int fd, int stage, int rc, const char *msg)
{
	struct futex_report rep = { .stage = stage, .rc = rc };
	snprintf(rep.msg, sizeof(rep.msg), "%s", msg);
	if (write(fd, &rep, sizeof(rep)) != (ssize_t)sizeof(rep))
		_exit(2);
}

static void futex_client_child(const char *sock, int report_fd)
{
	char msg[256] = "";
	int err = mp_deny_io_uring();
	if (err < 0) {
		futex_report(report_fd, -2, err, "cannot deny io_uring with seccomp");
		_exit(1);
	}
	struct skv_client *c;
	struct skv_client_stream *s;
	struct skv_stream_params p;
	mp_params_generate(&p, 1.0f, 21);
	if (skv_client_connect(sock, &c, msg, sizeof(msg)) < 0 ||
	    mp_try_open(c, &p, &s, msg, sizeof(msg)) < 0 ||
	    mp_request_endless(s, msg, sizeof(msg)) < 0) {
		futex_report(report_fd, -1, -EIO, msg);
		_exit(1);
	}
	for (uint64_t got = 0;; got++) {
		struct skv_client_event m;
		int rc = skv_client_stream_read(s, &m, -1);
		snprintf(msg, sizeof(msg), "%s", skv_client_last_error(c));
		if (rc < 0) {
			futex_report(report_fd, 2, rc, msg);
			_exit(0);
		}
		if (m.type != SKV_CLIENT_EV_TOKEN) {
			futex_report(report_fd, -1, -EPROTO, "not a TOKEN");
			_exit(1);
		}
		if (got == 100)
			futex_report(report_fd, 1, 0, "");
	}
}

static void futex_client(const char *test, int kill_daemon)
{
	struct mp_daemon d;
	mp_daemon_start(&d, test, 2, NULL, NULL);
	int pipe_fds[2];
	cr_assert(pipe2(pipe_fds, O_CLOEXEC) == 0);
	pid_t child = mp_fork();
	if (child == 0)
		futex_client_child(d.sock, pipe_fds[1]);
	close(pipe_fds[1]);
	struct futex_report rep;
	cr_assert(mp_read_timed(pipe_fds[0], &rep, sizeof(rep), REQUEST_TIMEOUT_S), "the client child is silent");
	if (rep.stage == -2)
		MP_SKIP("seccomp cannot deny io_uring_setup here (%s)", strerror(-rep.rc));
	cr_assert_eq(rep.stage, 1, "the client child failed: %s (%d)", rep.msg, rep.rc);
	/* It really waits on a futex: the fall-back is in use. */
	char wchan[128];
	cr_assert(mp_wait_wchan(child, futex_sleep, FAIL_NOTICE_S, wchan, sizeof(wchan)),
		  "the client does not sleep on a futex ('%s')", wchan);

	if (kill_daemon) {
		cr_assert(kill(d.pid, SIGKILL) == 0);
	} else {
		uint64_t inode;
		cr_assert_eq(mp_chan_inodes(child, &inode, 1), 1);
		unsigned engine = mp_engine_serving(&d, inode, FAIL_NOTICE_S);
		struct skv_msg_stats st;
		mp_stats(&d, &st);
		int victim = mp_track_pidfd(st.engine_pid[engine]);
		cr_assert(victim >= 0);
		cr_assert(syscall(SYS_pidfd_send_signal, victim, SIGKILL, NULL, 0) == 0);
	}
	cr_assert(mp_read_timed(pipe_fds[0], &rep, sizeof(rep), FAIL_NOTICE_S),
		  "a client sleeping on the futex fall-back did not notice the %s's death within "
		  "%.0f s",
		  kill_daemon ? "daemon" : "engine", FAIL_NOTICE_S);
	cr_assert_eq(rep.stage, 2);
	cr_assert_eq(rep.rc, -EPIPE, "stream_next returned %d: %s", rep.rc, rep.msg);
	close(pipe_fds[0]);
}

/* Regression for a fixed bug (client/libskv.c skv_client_stream_next + shm/wake.c futex path): on the futex
 * fall-back the client checks its control socket only before FUTEX_WAIT; the daemon's FAILED
 * (or its hang-up) arrives on the socket while the client sleeps and nobody rings the client's
 * wake word, so stream_next with no timeout never returns. */
Test(daemon, futex_fallback_client_notices_engine_death)
{
	futex_client("futex_engine", 0);
}

/* Regression for a fixed bug: as above, for the daemon's death (nobody is left to ring the wake word at all). Fails
 * most runs: it passes only when the hang-up lands while the client is still spinning. */
Test(daemon, futex_fallback_client_notices_daemon_death)
{
	futex_client("futex_daemon", 1);
}
