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
	skv_client_params_default(&p);
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
		skv_client_params_default(&k->params);
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
	skv_client_params_default(&p);
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
	int err = skv_client_stream_request(a, "more", 4, SKV_CHAN_GENERATE, 5, msg, sizeof(msg));
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
	skv_client_params_default(&p);
	p.temperature = 1.0f;
	p.seed = 5;
	struct skv_client_stream *read_s, *stalled_s;
	if (skv_client_stream_open(c, &p, &read_s, msg, sizeof(msg)) < 0 ||
	    skv_client_stream_open(c, &p, &stalled_s, msg, sizeof(msg)) < 0)
		_exit(11);
	if (mp_request_endless(stalled_s, msg, sizeof(msg)) < 0 ||
	    mp_request_endless(read_s, msg, sizeof(msg)) < 0)
		_exit(12);
	for (uint64_t got = 0;; got++) {
		struct skv_chan_msg m;
		if (skv_client_stream_next(read_s, &m, -1, msg, sizeof(msg)) < 0)
			_exit(13);
		if (m.type != SKV_CHAN_TOKEN)
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
	struct skv_chan_msg m;
	w->rc = skv_client_stream_next(w->s, &m, 30 * NS_PER_S, w->msg, sizeof(w->msg));
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
	int err = skv_client_stream_open(busy, &p, &none, msg, sizeof(msg));
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

/* ==== 6. a peer of a foreign uid ========================================================== */

struct foreign_report {
	int setup_errno;          /* setgroups/setgid/setuid failed */
	uint32_t uid;
	int connect_rc;           /* skv_client_connect */
	char connect_msg[256];
	int raw_connect_errno;
	int raw_rc;               /* 1: a message came, 0: hang-up, <0: -errno or -ETIMEDOUT */
	uint16_t raw_type;
	int32_t raw_code;
	char raw_text[SKV_MSG_TEXT];
	int raw_then;             /* after it: 0 hang-up, 1 another message, <0 error */
};

static void foreign_child(const char *sock, int report_fd)
{
	struct foreign_report rep;
	memset(&rep, 0, sizeof(rep));
	if (setgroups(0, NULL) < 0 || setgid(NOBODY) < 0 || setuid(NOBODY) < 0) {
		rep.setup_errno = errno;
		goto out;
	}
	rep.uid = (uint32_t)getuid();
	struct skv_client *c = NULL;
	rep.connect_rc = skv_client_connect(sock, &c, rep.connect_msg, sizeof(rep.connect_msg));
	if (rep.connect_rc == 0)
		skv_client_disconnect(c);

	/* Raw: the daemon answers the connection itself, before any HELLO. */
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rep.raw_connect_errno = errno;
		goto out;
	}
	struct skv_msg_hdr h;
	struct skv_msg_error e;
	rep.raw_rc = mp_child_recv(fd, &h, &e);
	if (rep.raw_rc == 1) {
		rep.raw_type = h.type;
		rep.raw_code = e.code;
		memcpy(rep.raw_text, e.text, sizeof(rep.raw_text));
		rep.raw_text[sizeof(rep.raw_text) - 1] = '\0';
		rep.raw_then = mp_child_recv(fd, &h, &e);
	}
	close(fd);
out:
	if (write(report_fd, &rep, sizeof(rep)) != (ssize_t)sizeof(rep))
		_exit(2);
	_exit(0);
}

/* Start a daemon whose socket a uid-65534 peer can reach, run foreign_child as that uid. */
static void foreign_run(struct mp_daemon *d, const char *test, struct foreign_report *rep)
{
	if (geteuid() != 0)
		MP_SKIP("switching to uid %d (nobody) needs root; running as uid %d", NOBODY,
			     (int)geteuid());
	mp_daemon_start(d, test, 2, NULL, NULL);
	/* The daemon makes its socket 0600 in our 0700 scratch directory: open both up so that
	 * the foreign peer's connect() reaches the daemon's SO_PEERCRED check. */
	cr_assert(chmod(tu_scratch_dir(test), 0755) == 0);
	cr_assert(chmod(d->sock, 0666) == 0);

	int pipe_fds[2];
	cr_assert(pipe2(pipe_fds, O_CLOEXEC) == 0);
	pid_t child = mp_fork();
	if (child == 0)
		foreign_child(d->sock, pipe_fds[1]);
	close(pipe_fds[1]);
	cr_assert(mp_read_timed(pipe_fds[0], rep, sizeof(*rep), REQUEST_TIMEOUT_S),
		  "the uid %d child did not report", NOBODY);
	close(pipe_fds[0]);
	int status;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	cr_assert_eq(rep->setup_errno, 0, "cannot become uid %d: %s", NOBODY,
		     strerror(rep->setup_errno));
	cr_assert_eq(rep->uid, NOBODY);
	cr_assert_eq(rep->raw_connect_errno, 0,
		     "uid %d cannot even connect (%s): a directory above %s is not traversable",
		     NOBODY, strerror(rep->raw_connect_errno), d->sock);
}

Test(daemon, foreign_uid_is_refused)
{
	struct mp_daemon d;
	struct foreign_report rep;
	foreign_run(&d, "foreign_uid", &rep);
	/* On the wire: one ERROR naming the uid, then the hang-up. */
	cr_assert_eq(rep.raw_rc, 1, "a raw connection got no ERROR (%d)", rep.raw_rc);
	cr_assert_eq(rep.raw_type, SKV_MSG_ERROR, "a raw connection got %s",
		     skv_msg_name(rep.raw_type));
	cr_assert_eq(rep.raw_code, -EACCES);
	cr_assert(strcasestr(rep.raw_text, "permission") && strstr(rep.raw_text, "uid 65534"),
		  "ERROR text: %s", rep.raw_text);
	cr_assert_eq(rep.raw_then, 0, "the connection was not closed after the ERROR (%d)",
		     rep.raw_then);
	/* libskv fails too (what it says is the next test's business). */
	cr_assert_lt(rep.connect_rc, 0, "uid %d got a connection", NOBODY);

	cr_assert_eq(mp_log_count(&d, "refused a peer of uid 65534"), 2);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 0);
	/* Only our admin connection is left: the refused ones hold nothing. */
	struct skv_client *c = mp_connect(&d);
	mp_expect_greedy_libskv(c);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* Regression for a fixed bug (client/libskv.c skv_client_connect, with cached/daemon.c cached_accept): the daemon
 * refuses a foreign uid at accept time and closes the connection with the client's HELLO
 * unread; the client's recv then fails with ECONNRESET (or its HELLO send with EPIPE, if the
 * close came first) before the queued ERROR, and libskv reports "no valid answer from
 * skv-cached ...: Connection reset by peer" instead of the daemon's "permission denied". */
Test(daemon, foreign_uid_libskv_says_permission_denied)
{
	struct mp_daemon d;
	struct foreign_report rep;
	foreign_run(&d, "foreign_libskv", &rep);
	cr_assert_eq(rep.connect_rc, -EACCES, "skv_client_connect as uid %d returned %d: %s",
		     NOBODY, rep.connect_rc, rep.connect_msg);
	cr_assert(strcasestr(rep.connect_msg, "permission denied") &&
			  strstr(rep.connect_msg, "65534"),
		  "the message does not say why: %s", rep.connect_msg);
}

/* ==== 7. protocol garbage ================================================================== */

/* One bad message on a fresh connection (after a valid HELLO if hello_first): the daemon must
 * answer ERROR (mentioning needle) and drop the connection. */
static int32_t garbage(const struct mp_daemon *d, int hello_first, const void *bytes, size_t len,
		       const int *fds, int n_fds, const char *needle, const char *what)
{
	int fd = mp_raw_connect(d->sock);
	if (hello_first)
		mp_raw_hello(fd);
	int err = mp_raw_send(fd, bytes, len, fds, n_fds);
	cr_assert_eq(err, 0, "%s: send: %s", what, strerror(-err));
	int32_t code = mp_raw_expect_error_and_drop(fd, needle, what);
	close(fd);
	return code;
}

Test(daemon, protocol_garbage_is_refused_without_leaks)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "garbage", 2, NULL, NULL);
	unsigned fds_before = mp_fd_count(d.pid);
	uint8_t buf[8192];
	size_t n;
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_CLIENT, .engine_id = UINT32_MAX,
				       .node = UINT32_MAX };
	struct skv_msg_open open = { .params = { .sink_slots = -1, .window_slots = -1,
						 .top_p = 0.9f } };
	struct skv_msg_stream stream = { .stream_id = 1 };
	int efd = mp_eventfd();

	/* Random bytes, truncated headers, sizes that disagree with the type, bad magic. */
	uint64_t x = 0x9e3779b97f4a7c15ull;
	for (unsigned i = 0; i < 200; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
	garbage(&d, 0, buf, 200, NULL, 0, "malformed", "random bytes");
	garbage(&d, 1, buf, 57, NULL, 0, "malformed", "random bytes after HELLO");
	n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	garbage(&d, 0, buf, 8, NULL, 0, "malformed", "a truncated header");
	garbage(&d, 0, buf, 15, NULL, 0, "malformed", "a header one byte short");
	garbage(&d, 0, buf, sizeof(struct skv_msg_hdr), NULL, 0, "malformed",
		"a HELLO header without its body");
	garbage(&d, 0, buf, n - 1, NULL, 0, "malformed", "a HELLO one byte short");
	((struct skv_msg_hdr *)buf)->len = sizeof(hello) - 4;
	garbage(&d, 0, buf, n - 4, NULL, 0, "malformed", "a header whose len is not HELLO's");
	((struct skv_msg_hdr *)buf)->len = sizeof(hello) + 8;
	memset(buf + n, 0, 8);
	garbage(&d, 0, buf, n + 8, NULL, 0, "malformed", "a HELLO with trailing bytes");
	n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	((struct skv_msg_hdr *)buf)->magic = 0x50564b54u;
	garbage(&d, 0, buf, n, NULL, 0, "malformed", "a wrong magic");
	n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	((struct skv_msg_hdr *)buf)->flags = 1;
	garbage(&d, 0, buf, n, NULL, 0, "malformed", "non-zero header flags");
	n = mp_raw_build(buf, 99, &stream, sizeof(stream));
	garbage(&d, 0, buf, n, NULL, 0, "malformed", "an unknown type");
	garbage(&d, 1, buf, n, NULL, 0, "malformed", "an unknown type after HELLO");
	n = mp_raw_build(buf, 0, &stream, sizeof(stream));
	garbage(&d, 1, buf, n, NULL, 0, "malformed", "type 0");
	memset(buf, 0xa5, 3000);
	mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	garbage(&d, 0, buf, 3000, NULL, 0, "malformed", "an oversized message");

	/* Well-formed messages at the wrong time or from the wrong role. */
	struct skv_msg_hello bad = hello;
	bad.major = 99;
	n = mp_raw_build(buf, SKV_MSG_HELLO, &bad, sizeof(bad));
	cr_assert_eq(garbage(&d, 0, buf, n, NULL, 0, "protocol 99", "HELLO major 99"),
		     -SKV_EVERSION);
	bad = hello;
	bad.role = 7;
	n = mp_raw_build(buf, SKV_MSG_HELLO, &bad, sizeof(bad));
	garbage(&d, 0, buf, n, NULL, 0, "role", "HELLO with role 7");
	bad = hello;
	bad.role = SKV_ROLE_ENGINE;
	bad.engine_id = 0;
	n = mp_raw_build(buf, SKV_MSG_HELLO, &bad, sizeof(bad));
	cr_assert_eq(garbage(&d, 0, buf, n, NULL, 0, "not one this daemon started",
			     "HELLO posing as supervised engine 0"),
		     -EPERM);
	n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	garbage(&d, 1, buf, n, NULL, 0, "unexpected HELLO", "a second HELLO");
	n = mp_raw_build(buf, SKV_MSG_OPEN, &open, sizeof(open));
	garbage(&d, 0, buf, n, &efd, 1, "before HELLO", "OPEN before HELLO");
	n = mp_raw_build(buf, SKV_MSG_STATS_REQ, &stream, sizeof(stream));
	garbage(&d, 0, buf, n, NULL, 0, "before HELLO", "STATS_REQ before HELLO");
	n = mp_raw_build(buf, SKV_MSG_DROPPED, &stream, sizeof(stream));
	garbage(&d, 1, buf, n, NULL, 0, "unexpected DROPPED", "DROPPED from a client");
	struct skv_msg_failed failed = { .stream_id = 1, .code = -EIO };
	n = mp_raw_build(buf, SKV_MSG_STREAM_ERROR, &failed, sizeof(failed));
	garbage(&d, 1, buf, n, NULL, 0, "unexpected STREAM_ERROR", "STREAM_ERROR from a client");
	struct skv_msg_assign assign = { .stream_id = 1 };
	n = mp_raw_build(buf, SKV_MSG_ASSIGN, &assign, sizeof(assign));
	garbage(&d, 1, buf, n, NULL, 0, "unexpected ASSIGN", "ASSIGN from a client");
	struct skv_msg_error error = { .code = -EIO };
	n = mp_raw_build(buf, SKV_MSG_ERROR, &error, sizeof(error));
	garbage(&d, 1, buf, n, NULL, 0, "unexpected ERROR", "ERROR from a client");

	/* File descriptors where none belong, too few, too many, far too many. */
	int many[200];
	for (unsigned i = 0; i < 200; i++)
		many[i] = efd;
	n = mp_raw_build(buf, SKV_MSG_CLOSE, &stream, sizeof(stream));
	garbage(&d, 1, buf, n, &efd, 1, "1 fds", "CLOSE with an fd");
	n = mp_raw_build(buf, SKV_MSG_STATS_REQ, &stream, sizeof(stream));
	garbage(&d, 1, buf, n, many, 3, "3 fds", "STATS_REQ with 3 fds");
	n = mp_raw_build(buf, SKV_MSG_OPEN, &open, sizeof(open));
	garbage(&d, 1, buf, n, NULL, 0, "0 fds", "OPEN without its eventfd");
	garbage(&d, 1, buf, n, many, 2, "2 fds", "OPEN with 2 fds");
	garbage(&d, 1, buf, n, many, 10, "unexpected OPEN", "OPEN with 10 fds");
	garbage(&d, 1, buf, n, many, 200, "malformed", "OPEN with 200 fds");
	n = mp_raw_build(buf, SKV_MSG_STATS_REQ, &stream, sizeof(stream));
	garbage(&d, 0, buf, n, many, 200, "malformed", "200 fds before HELLO");
	garbage(&d, 0, buf, 0, many, 5, "malformed", "fds with an empty message");

	/* Peers that say nothing: an empty datagram (read as a hang-up), or just a close. */
	for (unsigned i = 0; i < 20; i++) {
		int fd = mp_raw_connect(d.sock);
		if (i % 2) {
			cr_assert_eq(mp_raw_send(fd, buf, 0, NULL, 0), 0);
			mp_raw_expect_drop(fd, "an empty datagram");
		}
		close(fd);
	}

	/* CLOSE of another client's stream: refused, but that client and this connection live. */
	struct skv_client *owner = mp_connect(&d);
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *owned = mp_open(owner, &p, NULL);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 1);
	int fd = mp_raw_connect(d.sock);
	mp_raw_hello(fd);
	struct skv_msg_hdr h;
	union {
		struct skv_msg_error error;
		struct skv_msg_stats stats;
		uint8_t raw[2048];
	} reply;
	for (uint64_t id = 0; id < 4; id++) {
		stream.stream_id = id;
		n = mp_raw_build(buf, SKV_MSG_CLOSE, &stream, sizeof(stream));
		cr_assert_eq(mp_raw_send(fd, buf, n, NULL, 0), 0);
		cr_assert_eq(mp_raw_recv(fd, 5000, &h, &reply, sizeof(reply), NULL), 1);
		cr_assert_eq(h.type, SKV_MSG_ERROR, "CLOSE of stream %llu answered %s",
			     (unsigned long long)id, skv_msg_name(h.type));
		cr_assert_eq(reply.error.code, -ENOENT);
	}
	n = mp_raw_build(buf, SKV_MSG_STATS_REQ, &stream, sizeof(stream));
	cr_assert_eq(mp_raw_send(fd, buf, n, NULL, 0), 0);
	cr_assert_eq(mp_raw_recv(fd, 5000, &h, &reply, sizeof(reply), NULL), 1);
	cr_assert_eq(h.type, SKV_MSG_STATS, "the connection is not usable after a refused CLOSE");
	cr_assert_eq(reply.stats.streams, 1, "a foreign CLOSE removed the stream");
	close(fd);
	mp_request(owned, "", SKV_CHAN_GENERATE, 200);
	struct mp_result r = { 0 };
	mp_collect(owned, &r, REQUEST_TIMEOUT_S);
	mp_result_append_nl(&r);
	char *want = mp_greedy_reference();
	cr_assert_str_eq(r.text, want);
	free(want);
	mp_result_free(&r);
	skv_client_stream_close(owned);
	skv_client_disconnect(owner);

	close(efd);
	cr_assert(mp_daemon_alive(&d));
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
	mp_wait_fd_count(d.pid, fds_before, FAIL_NOTICE_S, "after the garbage");
	mp_stats(&d, &st);
	cr_assert_eq(st.engines_ready, 2);
	cr_assert_eq(st.engine_restarts, 0);
	struct skv_client *c = mp_connect(&d);
	mp_expect_greedy_libskv(c);
	skv_client_disconnect(c);
}

/* A HELLO that carries an fd: the daemon ignores (closes) the fd and accepts the HELLO; it must
 * at least not leak it. */
Test(daemon, hello_with_fds_leaks_nothing)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "hello_fds", 2, NULL, NULL);
	unsigned fds_before = mp_fd_count(d.pid);
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_CLIENT, .engine_id = UINT32_MAX,
				       .node = UINT32_MAX };
	uint8_t buf[256];
	size_t n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	int efds[4] = { mp_eventfd(), mp_eventfd(), mp_eventfd(), mp_eventfd() };
	for (unsigned i = 0; i < 8; i++) {
		int fd = mp_raw_connect(d.sock);
		cr_assert_eq(mp_raw_send(fd, buf, n, efds, 4), 0);
		struct skv_msg_hdr h;
		uint8_t body[2048];
		int rc = mp_raw_recv(fd, 5000, &h, body, sizeof(body), NULL);
		cr_assert(rc == 1 && (h.type == SKV_MSG_HELLO_OK || h.type == SKV_MSG_ERROR),
			  "HELLO with fds: rc %d", rc);
		close(fd);
	}
	for (unsigned i = 0; i < 4; i++)
		close(efds[i]);
	mp_wait_fd_count(d.pid, fds_before, FAIL_NOTICE_S, "after HELLOs with fds");
}

#define FUZZ_ROUNDS 3000

Test(daemon, protocol_fuzz_never_kills_the_daemon)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "fuzz", 2, NULL, NULL);
	unsigned fds_before = mp_fd_count(d.pid);
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_CLIENT, .engine_id = UINT32_MAX,
				       .node = UINT32_MAX };
	struct skv_msg_open open = { .params = { .sink_slots = -1, .window_slots = -1,
						 .top_p = 0.9f, .seed = 1 } };
	struct skv_msg_stream stream = { .stream_id = 1 };
	int efd = mp_eventfd();
	int fds[6] = { efd, efd, efd, efd, efd, efd };
	unsigned hand_engines = 0, replies = 0, drops = 0;
	uint8_t buf[512];
	for (unsigned round = 0; round < FUZZ_ROUNDS; round++) {
		unsigned kind = mp_fuzz_u32() % 5;
		int fd = mp_raw_connect(d.sock);
		size_t len;
		int n_fds = 0;
		switch (kind) {
		case 0: /* random bytes */
			len = mp_fuzz_u32() % 300;
			for (size_t i = 0; i < len; i++)
				buf[i] = (uint8_t)mp_fuzz_u32();
			break;
		case 1: /* a mutated HELLO */
			len = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
			len = mp_fuzz_mutate(buf, len, sizeof(buf));
			break;
		case 2: /* a mutated OPEN, mostly with its eventfd */
			mp_raw_hello(fd);
			len = mp_raw_build(buf, SKV_MSG_OPEN, &open, sizeof(open));
			len = mp_fuzz_mutate(buf, len, sizeof(buf));
			n_fds = mp_fuzz_u32() % 4 ? 1 : (int)(mp_fuzz_u32() % 7);
			break;
		case 3: /* a mutated CLOSE or STATS_REQ */
			mp_raw_hello(fd);
			stream.stream_id = mp_fuzz_u32() % 8;
			len = mp_raw_build(buf, mp_fuzz_u32() % 2 ? SKV_MSG_CLOSE : SKV_MSG_STATS_REQ,
					   &stream, sizeof(stream));
			len = mp_fuzz_mutate(buf, len, sizeof(buf));
			break;
		default: { /* any type with a random body of that type's size */
			mp_raw_hello(fd);
			uint16_t type = (uint16_t)(mp_fuzz_u32() % (SKV_MSG_TYPE_END + 2));
			size_t body = skv_msg_body_size(type);
			if (!body || body > sizeof(buf) - sizeof(struct skv_msg_hdr))
				body = mp_fuzz_u32() % 64;
			uint8_t random_body[sizeof(buf)];
			for (size_t i = 0; i < body; i++)
				random_body[i] = (uint8_t)mp_fuzz_u32();
			len = mp_raw_build(buf, type, random_body, body);
			n_fds = mp_fuzz_u32() % 8 ? 0 : 1;
			break;
		}
		}
		int err = mp_raw_send(fd, buf, len, fds, n_fds);
		cr_assert(err == 0 || err == -EPIPE || err == -ECONNRESET, "round %u: send: %s", round,
			  strerror(-err));
		/* The daemon answers every message or drops the connection: never silence. */
		struct skv_msg_hdr h;
		uint8_t body[2048];
		int got_fds = 0;
		int rc = mp_raw_recv(fd, 5000, &h, body, sizeof(body), &got_fds);
		cr_assert(rc == 0 || rc == 1, "round %u (kind %u, %zu bytes): no answer (%d)", round,
			  kind, len, rc);
		if (rc == 1 && h.type == SKV_MSG_HELLO_OK && got_fds == 4)
			hand_engines++; /* a mutated HELLO that registered an engine by hand */
		replies += rc == 1;
		drops += rc == 0;
		close(fd);
		if (round % 250 == 0)
			cr_assert(mp_daemon_alive(&d), "the daemon died in round %u; log:\n%s", round,
				  mp_daemon_log(&d));
	}
	close(efd);
	cr_assert(mp_daemon_alive(&d), "the daemon died; log:\n%s", mp_daemon_log(&d));
	cr_assert(replies > FUZZ_ROUNDS / 2 && drops > 0, "%u replies, %u bare drops", replies,
		  drops);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.engines_ready, 2);
	cr_assert_eq(st.engine_restarts, 0, "the fuzz killed an engine");
	/* An engine registered by hand keeps its pidfd, doorbell and eventfd while its process
	 * (this one) lives: its KV regions stay reserved until it exits. */
	mp_wait_fd_count(d.pid, fds_before + 3 * hand_engines, FAIL_NOTICE_S, "after the fuzz");
	struct skv_client *c = mp_connect(&d);
	mp_expect_greedy_libskv(c);
	skv_client_disconnect(c);
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

/* ==== 9. bad stream parameters ============================================================= */

static void expect_open_refused(struct skv_client *c, const struct skv_stream_params *p,
				int want, const char *needle, const char *what)
{
	struct skv_client_stream *s = NULL;
	char msg[256] = "";
	int err = skv_client_stream_open(c, p, &s, msg, sizeof(msg));
	cr_assert_eq(err, want, "%s: open returned %d (%s), want %d", what, err, msg, want);
	cr_assert(s == NULL || err == 0);
	cr_assert(strstr(msg, needle) != NULL, "%s: the message does not mention '%s': %s", what,
		  needle, msg);
}

Test(daemon, bad_stream_parameters_leave_the_connection_usable)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "bad_params", 2, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	struct skv_stream_params p;

	skv_client_params_default(&p);
	p.policy = 1; /* window */
	p.sink_slots = 4;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "keeps no sinks", "window with 4 sinks");
	skv_client_params_default(&p);
	p.policy = 1;
	p.window_slots = 0;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "at least 1", "window 0");
	skv_client_params_default(&p);
	p.window_slots = 0;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "at least 1", "sink with window 0");
	skv_client_params_default(&p);
	p.policy = 3; /* recompute */
	p.sink_slots = 2;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "keeps no sinks", "recompute with sinks");
	skv_client_params_default(&p);
	p.sink_slots = 1 << 24;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "exceed", "more slots than the limit");
	skv_client_params_default(&p);
	p.policy = 7;
	expect_open_refused(c, &p, -EINVAL, "invalid policy", "policy 7");
	skv_client_params_default(&p);
	p.evict = 9;
	expect_open_refused(c, &p, -EINVAL, "invalid policy", "evict mode 9");
	skv_client_params_default(&p);
	p.temperature = NAN;
	expect_open_refused(c, &p, -EINVAL, "sampling", "temperature NaN");
	skv_client_params_default(&p);
	p.temperature = -1.0f;
	expect_open_refused(c, &p, -EINVAL, "sampling", "temperature -1");
	skv_client_params_default(&p);
	p.top_p = NAN;
	expect_open_refused(c, &p, -EINVAL, "sampling", "top-p NaN");
	skv_client_params_default(&p);
	p.policy = 2; /* dense, 16M tokens: larger than the 64 MiB arena */
	p.window_slots = (1 << 24) - 1;
	expect_open_refused(c, &p, -ENOSPC, "--arena-mb", "a stream larger than the arena");

	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 0, "refused OPENs left %llu streams",
		     (unsigned long long)st.streams);
	cr_assert_eq(st.arena_used_bytes, 0);
	/* The same connection opens a good stream. */
	mp_expect_greedy_libskv(c);
	/* And the CLI turns the daemon's refusal into one line. */
	char *out, *err;
	int status = mp_run(mp_env_path("SKV_BIN"),
			    (const char *const[]){ "--socket", d.sock, "ppl", "--policy", "dense",
						   "--limit", "16000000", sample_path(), NULL },
			    &out, &err);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status 0x%x: %s", status, err);
	cr_assert_str_eq(out, "");
	cr_assert(strncmp(err, "skv: ", 5) == 0 && strstr(err, "arena") &&
			  strchr(err, '\n') == err + strlen(err) - 1,
		  "stderr: %s", err);
	free(out);
	free(err);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
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
	    skv_client_stream_open(c, &p, &s, msg, sizeof(msg)) < 0 ||
	    mp_request_endless(s, msg, sizeof(msg)) < 0) {
		futex_report(report_fd, -1, -EIO, msg);
		_exit(1);
	}
	for (uint64_t got = 0;; got++) {
		struct skv_chan_msg m;
		int rc = skv_client_stream_next(s, &m, -1, msg, sizeof(msg));
		if (rc < 0) {
			futex_report(report_fd, 2, rc, msg);
			_exit(0);
		}
		if (m.type != SKV_CHAN_TOKEN) {
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

/* ==== a client that corrupts its channel =================================================== */

/* The engine never trusts a ring index it reads from shared memory (shm/ring.h): a client that
 * corrupts its own input ring loses that stream (ERROR or -EPIPE), the engine goes on serving
 * its other streams and goes back to sleep when idle (it used to busy-loop for good). */
Test(daemon, corrupt_input_ring_fails_only_that_stream)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "corrupt_ring", 1, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	uint64_t inode;
	struct skv_client_stream *bad = mp_open(c, &p, &inode);
	struct skv_client_stream *good = mp_open(c, &p, NULL);
	cr_assert_eq(mp_engine_serving(&d, inode, FAIL_NOTICE_S), 0);
	struct skv_chan_hdr *chan = mp_chan_address(inode);
	struct skv_ring_hdr *in = (struct skv_ring_hdr *)((char *)chan + chan->in_offset);
	uint32_t tail = __atomic_load_n(&in->tail, __ATOMIC_ACQUIRE);
	__atomic_store_n(&in->head, tail + 0x100000u, __ATOMIC_RELEASE);

	/* A request on the good stream rings the engine's doorbell: it sees both. */
	mp_request(good, "", SKV_CHAN_GENERATE, 200);
	struct mp_result r = { 0 };
	mp_collect(good, &r, 2 * FAIL_NOTICE_S);
	mp_result_append_nl(&r);
	char *want = mp_greedy_reference();
	cr_assert_str_eq(r.text, want);
	free(want);
	mp_result_free(&r);

	/* The corrupt stream fails, visibly. */
	char msg[256] = "";
	double deadline = mp_now() + FAIL_NOTICE_S;
	int rc = 0;
	while (!r.finished && rc >= 0 && mp_now() < deadline)
		rc = mp_step(bad, &r, NS_PER_S / 10, msg, sizeof(msg));
	cr_assert(rc == -EPIPE || (rc == 1 && r.error),
		  "the stream with a corrupt ring did not fail within %.0f s (rc %d)", FAIL_NOTICE_S,
		  rc);
	cr_assert(strstr(rc < 0 ? msg : r.error_text, "corrupt") != NULL,
		  "the failure does not say why: %s", rc < 0 ? msg : r.error_text);
	mp_result_free(&r);

	/* And the engine sleeps again instead of spinning on the corrupt ring. */
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	char wchan[128];
	cr_assert(mp_wait_wchan(st.engine_pid[0],
				(const char *const[]){ "futex", "io_cqring", "io_uring", NULL },
				FAIL_NOTICE_S, wchan, sizeof(wchan)),
		  "the idle engine does not sleep (wchan '%s'): it spins", wchan);
	skv_client_stream_close(bad);
	skv_client_stream_close(good);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}

/* The same for the output ring: a client that corrupts the consumer index of its output ring
 * (the engine reloads it when the ring looks full) loses that stream only (stream_flush used to
 * retry forever, hanging the engine and every stream it serves). */
Test(daemon, corrupt_output_ring_fails_only_that_stream)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "corrupt_out", 1, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	struct skv_stream_params p;
	mp_params_generate(&p, 1.0f, 8);
	uint64_t inode;
	struct skv_client_stream *bad = mp_open(c, &p, &inode);
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *good = mp_open(c, &p, NULL);
	cr_assert_eq(mp_engine_serving(&d, inode, FAIL_NOTICE_S), 0);
	struct skv_chan_hdr *chan = mp_chan_address(inode);
	struct skv_ring_hdr *out = (struct skv_ring_hdr *)((char *)chan + chan->out_offset);
	uint32_t head = __atomic_load_n(&out->head, __ATOMIC_ACQUIRE);
	__atomic_store_n(&out->tail, head + 0x100000u, __ATOMIC_RELEASE);

	/* More output than the ring holds, never read: once the ring looks full the engine reads
	 * the index, and must fail the stream (the daemon counts it) without dying. */
	cr_assert_eq(mp_request_endless(bad, NULL, 0), 0);
	double deadline = mp_now() + FAIL_NOTICE_S;
	while (__atomic_load_n(&out->head, __ATOMIC_ACQUIRE) - head < SKV_CHAN_RING_CAPACITY) {
		cr_assert(mp_now() < deadline, "the engine did not fill the output ring");
		mp_sleep_ms(1);
	}
	struct skv_msg_stats st;
	deadline = mp_now() + FAIL_NOTICE_S;
	for (;;) {
		mp_stats(&d, &st);
		if (st.streams_failed || st.engine_restarts || mp_now() > deadline)
			break;
		mp_sleep_ms(1);
	}
	cr_assert_eq(st.engine_restarts, 0, "a client's corrupt ring killed the engine; log:\n%s",
		     mp_daemon_log(&d));
	cr_assert_eq(st.streams_failed, 1, "the stream with a corrupt ring was not failed");
	struct mp_result r = { 0 };
	char msg[256] = "";
	mp_expect_epipe(bad, &r, FAIL_NOTICE_S, msg, sizeof(msg), "the corrupt stream");
	cr_assert(strstr(msg, "corrupt") != NULL, "the failure does not say why: %s", msg);
	mp_result_free(&r);

	mp_request(good, "", SKV_CHAN_GENERATE, 200);
	mp_collect(good, &r, 2 * FAIL_NOTICE_S);
	mp_result_append_nl(&r);
	char *want = mp_greedy_reference();
	cr_assert_str_eq(r.text, want);
	free(want);
	mp_result_free(&r);
	skv_client_stream_close(bad);
	skv_client_stream_close(good);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, FAIL_NOTICE_S);
}
