/* Multi-process tests of scale and of the daemon's admission control and idle time-outs: a real
 * skv-cached with real skv-engine processes per test, driven through the public libskv API.
 *
 *   - a thousand default streams on one client, each generating the greedy text local mode
 *     gives for its prompt, then closed with the arena back to empty, reopened in the same
 *     room, and dropped all at once by a disconnect;
 *   - --max-streams refusing with -ENOSPC; --admission queue answering QUEUED, placing in
 *     order when streams close, timing out with -ETIMEDOUT, forgetting a client that dies,
 *     refusing beyond --queue-max;
 *   - --idle-timeout and a stream's own time-out failing idle streams with -ETIMEDOUT and
 *     freeing their KV while a busy stream on the same engine goes on;
 *   - a client with hundreds of generating streams killed with SIGKILL: its KV freed, another
 *     client's generations unaffected, byte for byte.
 * Every check is an assertion; every wait is bounded. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"

#define SCALE_STREAMS 1000
#define SCALE_TOKENS 8           /* a short generation per stream */
#define NOTICE_S 10.0            /* the daemon frees, places or fails within this */
#define IDLE_S 2                 /* --idle-timeout of the idle test */

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(scale, .init = suite_init, .fini = suite_fini, .timeout = 300);

/* ---- helpers ------------------------------------------------------------------------------ */

static const char *const prompts[] = {
	"Once upon a time",
	"The little dog",
	"Lily and Ben went to the park",
	"One day, a big red ball",
};
#define N_PROMPTS (sizeof(prompts) / sizeof(*prompts))

/* What local mode prints for a greedy generation of n tokens after prompt. */
static char *local_greedy(const char *prompt, unsigned n)
{
	char n_text[16];
	snprintf(n_text, sizeof(n_text), "%u", n);
	return MP_SKV("generate", "--temp", "0", "-n", n_text, prompt);
}

/* Default stream (sink, greedy) with the given idle time-out (0: the daemon's). */
static struct skv_client_stream *open_default(struct skv_client *c, uint32_t idle_s)
{
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	p.idle_timeout_s = idle_s;
	struct skv_client_stream *s = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, &p, &s, msg, sizeof(msg));
	cr_assert(err == 0, "stream open: %s (%d)", msg, err);
	return s;
}

/* "arena 0 holds N default streams", as skv-cached --verbose logs it. */
static uint64_t logged_capacity(const struct mp_daemon *d)
{
	char *log = mp_daemon_log(d);
	const char *at = strstr(log, "arena 0 holds ");
	unsigned long long n = 0;
	cr_assert(at && sscanf(at, "arena 0 holds %llu default streams", &n) == 1,
		  "the daemon did not log its arena's capacity:\n%s", log);
	free(log);
	return n;
}

/* Wait (bounded) until stats satisfy want(st, arg). */
static void wait_stats(struct mp_daemon *d, int (*want)(const struct skv_msg_stats *, uint64_t),
		       uint64_t arg, const char *what)
{
	double deadline = mp_now() + NOTICE_S;
	struct skv_msg_stats st;
	for (;;) {
		mp_stats(d, &st);
		if (want(&st, arg))
			return;
		cr_assert(mp_now() < deadline,
			  "%s: after %.0f s the daemon has %llu streams, %llu queued, %llu arena bytes",
			  what, NOTICE_S, (unsigned long long)st.streams,
			  (unsigned long long)st.streams_queued,
			  (unsigned long long)st.arena_used_bytes);
		mp_sleep_ms(10);
	}
}

static int queued_is(const struct skv_msg_stats *st, uint64_t n)
{
	return st->streams_queued == n;
}

static int streams_are(const struct skv_msg_stats *st, uint64_t n)
{
	return st->streams == n;
}

static int used_is(const struct skv_msg_stats *st, uint64_t bytes)
{
	return st->arena_used_bytes == bytes;
}

/* A client in its own thread that opens one stream (blocking: it may be queued) and, when
 * that worked, generates a few tokens on it. No assertions in the thread: the test checks
 * what it recorded after joining. */
struct opener {
	const char *sock;
	int rc;                  /* skv_client_stream_open's value */
	int generated;           /* 1 when the stream then produced a DONE */
	char msg[256];
	struct skv_client *c;
	struct skv_client_stream *s;
};

static void *opener_main(void *arg)
{
	struct opener *o = arg;
	int rc = skv_client_connect(o->sock, &o->c, o->msg, sizeof(o->msg));
	skv_client_opts *opts = NULL;
	if (!rc)
		rc = skv_client_opts_new(&opts);
	if (!rc)
		rc = skv_client_stream_open(o->c, opts, &o->s);
	skv_client_opts_free(opts);
	__atomic_store_n(&o->rc, rc, __ATOMIC_RELEASE); /* 1 until the OPEN is answered */
	if (rc < 0) {
		if (o->c)
			snprintf(o->msg, sizeof(o->msg), "%s", skv_client_last_error(o->c));
		return NULL;
	}
	if (skv_client_stream_generate(o->s, "Once", 4, 4, 0) < 0)
		return NULL;
	struct skv_client_event ev;
	while ((rc = skv_client_stream_read(o->s, &ev, (int)(REQUEST_TIMEOUT_S * 1000))) == 1)
		if (ev.type == SKV_CLIENT_EV_DONE) {
			o->generated = 1;
			break;
		}
	return NULL;
}

static void opener_start(struct opener *o, pthread_t *t, const char *sock)
{
	memset(o, 0, sizeof(*o));
	o->sock = sock;
	o->rc = 1; /* not answered yet */
	cr_assert(pthread_create(t, NULL, opener_main, o) == 0);
}

static void opener_finish(struct opener *o)
{
	skv_client_stream_close(o->s);
	skv_client_disconnect(o->c);
	o->s = NULL;
	o->c = NULL;
}

/* ==== 1. a thousand streams on one client =================================================== */

Test(scale, thousand_streams_generate_close_and_reopen)
{
	struct mp_daemon d;
	/* 751 MiB: room for a thousand default regions with their size-class rounding. */
	mp_daemon_start(&d, "thousand", 2, NULL,
			(const char *const[]){ "--arena-mb", "751", "--verbose", NULL });
	uint64_t capacity = logged_capacity(&d);
	cr_assert(capacity >= SCALE_STREAMS, "the arena holds %llu default streams, not %d",
		  (unsigned long long)capacity, SCALE_STREAMS);
	char *want[N_PROMPTS];
	for (size_t k = 0; k < N_PROMPTS; k++)
		want[k] = local_greedy(prompts[k], SCALE_TOKENS);

	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream **s = calloc(capacity + 1, sizeof(*s));
	cr_assert(s != NULL);
	for (unsigned i = 0; i < SCALE_STREAMS; i++)
		s[i] = open_default(c, 0);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, SCALE_STREAMS);
	uint64_t used_thousand = st.arena_used_bytes;
	cr_assert(used_thousand > 0 && used_thousand % SCALE_STREAMS == 0,
		  "%llu bytes for %d equal streams", (unsigned long long)used_thousand,
		  SCALE_STREAMS);

	/* Exactly what the daemon said fits, fits; one more is refused, saying why. */
	for (uint64_t i = SCALE_STREAMS; i < capacity; i++)
		s[i] = open_default(c, 0);
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *extra = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, &p, &extra, msg, sizeof(msg));
	cr_assert_eq(err, -ENOSPC, "stream %llu of an arena for %llu: %d (%s)",
		     (unsigned long long)capacity + 1, (unsigned long long)capacity, err, msg);
	cr_assert(strstr(msg, "arena") && strstr(msg, "--arena-mb"), "message: %s", msg);
	for (uint64_t i = SCALE_STREAMS; i < capacity; i++)
		skv_client_stream_close(s[i]);

	/* Every stream generates at once (one batch per engine step), each its prompt's text. */
	for (unsigned i = 0; i < SCALE_STREAMS; i++) {
		const char *prompt = prompts[i % N_PROMPTS];
		err = skv_client_stream_generate(s[i], prompt, strlen(prompt), SCALE_TOKENS, 0);
		cr_assert(err == 0, "generate on stream %u: %s", i, skv_client_last_error(c));
	}
	for (unsigned i = 0; i < SCALE_STREAMS; i++) {
		struct mp_result r = { 0 };
		mp_collect(s[i], &r, REQUEST_TIMEOUT_S);
		mp_result_append_nl(&r);
		cr_assert_str_eq(r.text, want[i % N_PROMPTS], "stream %u:\n%s\nlocal mode:\n%s", i,
				 r.text, want[i % N_PROMPTS]);
		mp_result_free(&r);
	}
	for (unsigned i = 0; i < SCALE_STREAMS; i++)
		skv_client_stream_close(s[i]);
	mp_wait_streams_freed(&d, NOTICE_S);

	/* The same room serves a thousand again (no region leaked), and they work. */
	for (unsigned i = 0; i < SCALE_STREAMS; i++)
		s[i] = open_default(c, 0);
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, SCALE_STREAMS);
	cr_assert_eq(st.arena_used_bytes, used_thousand);
	for (unsigned i = 0; i < SCALE_STREAMS; i += 97) {
		const char *prompt = prompts[i % N_PROMPTS];
		struct mp_result r = { 0 };
		mp_request(s[i], prompt, SKV_CHAN_GENERATE, SCALE_TOKENS);
		mp_collect(s[i], &r, REQUEST_TIMEOUT_S);
		mp_result_append_nl(&r);
		cr_assert_str_eq(r.text, want[i % N_PROMPTS], "reopened stream %u", i);
		mp_result_free(&r);
	}
	/* A disconnect drops a thousand streams at once: every region comes back. */
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
	mp_stats(&d, &st);
	cr_assert_eq(st.streams_opened, 2 * SCALE_STREAMS + (capacity - SCALE_STREAMS));
	for (size_t k = 0; k < N_PROMPTS; k++)
		free(want[k]);
	free(s);
}

/* ==== 2. admission control ================================================================= */

Test(scale, max_streams_rejects_with_enospc)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "reject", 1, NULL,
			(const char *const[]){ "--max-streams", "3", NULL });
	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream *s[3];
	for (int i = 0; i < 3; i++)
		s[i] = open_default(c, 0);
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *fourth = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, &p, &fourth, msg, sizeof(msg));
	cr_assert_eq(err, -ENOSPC, "the 4th OPEN gave %d (%s)", err, msg);
	cr_assert(strstr(msg, "the daemon's stream limit (3) is reached"), "message: %s", msg);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 3);
	cr_assert_eq(st.streams_queued, 0);

	/* A closed stream makes room at once. */
	skv_client_stream_close(s[0]);
	s[0] = open_default(c, 0);
	for (int i = 0; i < 3; i++)
		skv_client_stream_close(s[i]);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
}

Test(scale, queue_places_in_order_when_streams_close)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "queue_order", 1, NULL,
			(const char *const[]){ "--max-streams", "3", "--admission", "queue",
					       "--queue-timeout", "60", NULL });
	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream *s[3];
	for (int i = 0; i < 3; i++)
		s[i] = open_default(c, 0);

	/* Two OPENs wait, first A then B. */
	struct opener a, b;
	pthread_t ta, tb;
	opener_start(&a, &ta, d.sock);
	wait_stats(&d, queued_is, 1, "A queued");
	opener_start(&b, &tb, d.sock);
	wait_stats(&d, queued_is, 2, "B queued");
	cr_assert_eq(__atomic_load_n(&a.rc, __ATOMIC_ACQUIRE), 1,
		     "A was answered while no stream closed");
	cr_assert_eq(__atomic_load_n(&b.rc, __ATOMIC_ACQUIRE), 1,
		     "B was answered while no stream closed");

	/* One close places A, not B; the next places B. */
	skv_client_stream_close(s[0]);
	cr_assert(pthread_join(ta, NULL) == 0);
	cr_assert_eq(a.rc, 0, "A: %d (%s)", a.rc, a.msg);
	cr_assert(a.generated, "A's stream did not generate");
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams_queued, 1, "B was placed before a second stream closed");
	cr_assert_eq(__atomic_load_n(&b.rc, __ATOMIC_ACQUIRE), 1, "B was answered before its turn");
	skv_client_stream_close(s[1]);
	cr_assert(pthread_join(tb, NULL) == 0);
	cr_assert_eq(b.rc, 0, "B: %d (%s)", b.rc, b.msg);
	cr_assert(b.generated, "B's stream did not generate");
	mp_stats(&d, &st);
	cr_assert_eq(st.streams_queued, 0);
	cr_assert_eq(st.streams, 3);

	opener_finish(&a);
	opener_finish(&b);
	skv_client_stream_close(s[2]);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
}

Test(scale, queue_times_out_with_etimedout)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "queue_timeout", 1, NULL,
			(const char *const[]){ "--max-streams", "1", "--admission", "queue",
					       "--queue-timeout", "1", NULL });
	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream *held = open_default(c, 0);
	struct opener o;
	pthread_t t;
	opener_start(&o, &t, d.sock);
	wait_stats(&d, queued_is, 1, "the OPEN queued");
	cr_assert(pthread_join(t, NULL) == 0);
	cr_assert_eq(o.rc, -ETIMEDOUT, "the queued OPEN gave %d (%s)", o.rc, o.msg);
	cr_assert(strstr(o.msg, "waited 1 s in the admission queue") &&
			  strstr(o.msg, "stream limit"),
		  "message: %s", o.msg);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams_queued, 0);
	cr_assert_eq(st.streams, 1);
	/* The client that timed out can still open once there is room. */
	skv_client_stream_close(held);
	struct skv_client_stream *later = open_default(o.c, 0);
	skv_client_stream_close(later);
	opener_finish(&o);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
}

Test(scale, queued_client_that_dies_leaves_the_queue)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "queue_death", 1, NULL,
			(const char *const[]){ "--max-streams", "2", "--admission", "queue",
					       "--queue-max", "1", NULL });
	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream *s[2] = { open_default(c, 0), open_default(c, 0) };
	/* A stats round trip: the daemon has finished with the OPENs (closed their fds). */
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	unsigned fds_before = mp_fd_count(d.pid);

	pid_t child = mp_fork();
	if (child == 0) {
		struct skv_client *cc = NULL;
		struct skv_client_stream *cs = NULL;
		if (skv_client_connect(d.sock, &cc, NULL, 0) < 0)
			_exit(1);
		skv_client_stream_open(cc, NULL, &cs); /* waits in the queue until killed */
		_exit(2);
	}
	wait_stats(&d, queued_is, 1, "the child's OPEN queued");

	/* --queue-max 1: a second waiting OPEN is refused at once. */
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *refused = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, &p, &refused, msg, sizeof(msg));
	cr_assert_eq(err, -ENOSPC, "OPEN beyond --queue-max: %d (%s)", err, msg);
	cr_assert(strstr(msg, "admission queue is full"), "message: %s", msg);

	cr_assert(kill(child, SIGKILL) == 0);
	mp_wait_gone(child, NOTICE_S, "the queued child");
	wait_stats(&d, queued_is, 0, "the dead child's OPEN left the queue");
	/* Its socket, doorbell and the OPEN's eventfd are closed. */
	mp_wait_fd_count(d.pid, fds_before, NOTICE_S, "after the queued child died");

	/* Room that comes free now is not given to the dead client. */
	skv_client_stream_close(s[0]);
	mp_sleep_ms(200);
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 1, "a stream was placed for a client that is gone");
	skv_client_stream_close(s[1]);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
}

/* ==== 3. idle time-outs ===================================================================== */

struct pumped {
	struct skv_client_stream *s;
	struct mp_result r;
};

/* Keep the busy stream moving (its output ring must not fill, or it would be idle too) while
 * waiting for cond(arg) to hold; asserts within NOTICE_S plus the idle time-out. */
static void pump_until(struct pumped *busy, int (*cond)(void *), void *arg, const char *what)
{
	double deadline = mp_now() + NOTICE_S + IDLE_S;
	char msg[256] = "";
	while (!cond(arg)) {
		cr_assert(mp_now() < deadline, "%s: not within %.0f s", what, NOTICE_S + IDLE_S);
		int rc = mp_pump(busy->s, &busy->r, msg, sizeof(msg));
		cr_assert(rc >= 0, "the busy stream failed: %s (%d)", msg, rc);
	}
}

struct failure_probe {
	struct skv_client_stream *s;
	int rc;
	char msg[256];
};

static int stream_failed(void *arg)
{
	struct failure_probe *f = arg;
	struct skv_client_event ev;
	f->rc = skv_client_stream_read(f->s, &ev, 0);
	if (f->rc < 0)
		snprintf(f->msg, sizeof(f->msg), "%s", skv_client_last_error(mp_client_of(f->s)));
	return f->rc < 0;
}

struct stats_probe {
	struct mp_daemon *d;
	uint64_t used;
};

static int used_dropped_to(void *arg)
{
	struct stats_probe *p = arg;
	struct skv_msg_stats st;
	mp_stats(p->d, &st);
	return st.arena_used_bytes == p->used;
}

struct unmap_probe {
	pid_t engine;
	uint64_t inode;
};

static int engine_let_go(void *arg)
{
	struct unmap_probe *u = arg;
	return !mp_maps_inode(u->engine, u->inode);
}

Test(scale, idle_streams_time_out_while_busy_ones_go_on)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "idle", 1, NULL,
			(const char *const[]){ "--idle-timeout", "2", NULL });
	struct skv_client *c = mp_connect(&d);

	/* idle: the daemon's time-out; quick: its own shorter one (the public setter); patient:
	 * its own longer one; busy: generating all along. All on the one engine. */
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	uint64_t idle_inode;
	struct skv_client_stream *idle = mp_open(c, &p, &idle_inode);
	skv_client_opts *o = NULL;
	cr_assert(skv_client_opts_new(&o) == 0);
	cr_assert(skv_client_opts_idle_timeout(o, 1) == 0);
	struct skv_client_stream *quick = NULL;
	cr_assert(skv_client_stream_open(c, o, &quick) == 0, "%s", skv_client_last_error(c));
	skv_client_opts_free(o);
	struct skv_client_stream *patient = open_default(c, 3600);
	struct pumped busy = { .s = open_default(c, 0) };
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	uint64_t region = st.arena_used_bytes / 4;
	cr_assert_eq(st.arena_used_bytes, 4 * region);
	pid_t engine = st.engine_pid[0];
	cr_assert_eq(mp_engine_serving(&d, idle_inode, NOTICE_S), 0);

	/* Each is used once, then left alone; the busy one streams on. */
	struct skv_client_stream *used[3] = { idle, quick, patient };
	for (int i = 0; i < 3; i++) {
		struct mp_result r = { 0 };
		mp_request(used[i], "Once", SKV_CHAN_GENERATE, 4);
		mp_collect(used[i], &r, REQUEST_TIMEOUT_S);
		mp_result_free(&r);
	}
	double quiet_since = mp_now();
	char emsg[256] = "";
	cr_assert(mp_request_endless(busy.s, emsg, sizeof(emsg)) == 0, "%s", emsg);

	struct failure_probe fq = { .s = quick }, fi = { .s = idle };
	pump_until(&busy, stream_failed, &fq, "the stream with a 1 s time-out fails");
	cr_assert_eq(fq.rc, -ETIMEDOUT, "quick: %d (%s)", fq.rc, fq.msg);
	cr_assert(strstr(fq.msg, "idle for 1 s: closed by the daemon's idle time-out"),
		  "quick: %s", fq.msg);
	pump_until(&busy, stream_failed, &fi, "the stream with the daemon's 2 s time-out fails");
	cr_assert_eq(fi.rc, -ETIMEDOUT, "idle: %d (%s)", fi.rc, fi.msg);
	cr_assert(strstr(fi.msg, "idle for 2 s: closed by the daemon's idle time-out"),
		  "idle: %s", fi.msg);
	cr_assert(mp_now() - quiet_since >= IDLE_S, "failed before its time-out");

	/* Their KV goes back to the arena once the engine let go of them. */
	struct stats_probe two_left = { .d = &d, .used = 2 * region };
	pump_until(&busy, used_dropped_to, &two_left, "the idle streams' KV is freed");
	struct unmap_probe u = { .engine = engine, .inode = idle_inode };
	pump_until(&busy, engine_let_go, &u, "the engine unmaps the idle stream's channel");

	/* The busy stream went on all along, and goes on. */
	uint64_t before = busy.r.tokens;
	mp_pump_until(busy.s, &busy.r, before + 200);
	/* The patient stream, idle longer than the daemon's time-out, still works. */
	while (mp_now() - quiet_since < IDLE_S + 1.5) {
		char msg[256];
		cr_assert(mp_pump(busy.s, &busy.r, msg, sizeof(msg)) >= 0, "%s", msg);
	}
	struct mp_result r = { 0 };
	mp_request(patient, " The", SKV_CHAN_GENERATE, 4);
	mp_collect(patient, &r, REQUEST_TIMEOUT_S);
	cr_assert(r.done, "the patient stream did not generate");
	mp_result_free(&r);

	/* The failed streams' entries go with their CLOSE; the rest as usual. */
	skv_client_stream_close(idle);
	skv_client_stream_close(quick);
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 2);
	skv_client_stream_close(patient);
	skv_client_stream_close(busy.s);
	mp_result_free(&busy.r);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
}

/* ==== 4. a client with many streams killed mid-generation ================================= */

#define VICTIM_STREAMS 998

Test(scale, killed_client_frees_its_streams_others_go_on)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "killed", 2, NULL, (const char *const[]){ "--arena-mb", "751", NULL });
	const char *survivor_prompts[2] = { prompts[0], prompts[2] };
	char *want[2] = { local_greedy(survivor_prompts[0], 150),
			  local_greedy(survivor_prompts[1], 150) };

	int pipe_fds[2];
	cr_assert(pipe(pipe_fds) == 0);
	pid_t child = mp_fork();
	if (child == 0) {
		/* The victim: many streams, all generating endlessly, read as they come. */
		struct skv_client *vc = NULL;
		if (skv_client_connect(d.sock, &vc, NULL, 0) < 0)
			_exit(1);
		for (int i = 0; i < VICTIM_STREAMS; i++) {
			struct skv_client_stream *vs = NULL;
			if (skv_client_stream_open(vc, NULL, &vs) < 0 ||
			    skv_client_stream_generate(vs, "", 0, LONG_GENERATION,
						       SKV_CLIENT_ENDLESS) < 0)
				_exit(2);
		}
		if (write(pipe_fds[1], "R", 1) != 1)
			_exit(3);
		for (;;) {
			struct skv_client_stream *ready = NULL;
			struct skv_client_event ev;
			if (skv_client_wait(vc, &ready, 1000) == 1)
				while (skv_client_stream_read(ready, &ev, 0) == 1)
					;
		}
	}
	close(pipe_fds[1]);
	char ready = 0;
	cr_assert(mp_read_timed(pipe_fds[0], &ready, 1, REQUEST_TIMEOUT_S) && ready == 'R',
		  "the victim did not open its streams");
	close(pipe_fds[0]);

	struct skv_client *c = mp_connect(&d);
	struct skv_client_stream *s[2] = { open_default(c, 0), open_default(c, 0) };
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, VICTIM_STREAMS + 2);
	uint64_t region = st.arena_used_bytes / (VICTIM_STREAMS + 2);
	struct mp_result r[2] = { { 0 } };
	for (int i = 0; i < 2; i++)
		mp_request(s[i], survivor_prompts[i], SKV_CHAN_GENERATE, 150);
	/* Kill the victim in the middle of both survivors' generations. */
	char msg[256] = "";
	for (int i = 0; i < 2; i++)
		while (r[i].tokens < 20)
			cr_assert(mp_step(s[i], &r[i], NS_PER_S, msg, sizeof(msg)) >= 0, "%s", msg);
	cr_assert(kill(child, SIGKILL) == 0);
	mp_wait_gone(child, NOTICE_S, "the victim");
	for (int i = 0; i < 2; i++) {
		mp_collect(s[i], &r[i], REQUEST_TIMEOUT_S);
		mp_result_append_nl(&r[i]);
		cr_assert_str_eq(r[i].text, want[i], "survivor %d:\n%s\nlocal mode:\n%s", i,
				 r[i].text, want[i]);
		mp_result_free(&r[i]);
	}
	/* All of the victim's KV is back; the survivors' is not touched. */
	wait_stats(&d, streams_are, 2, "the victim's streams are gone");
	wait_stats(&d, used_is, 2 * region, "the victim's KV is freed");
	for (int i = 0; i < 2; i++) {
		mp_request(s[i], " The end", SKV_CHAN_GENERATE, 5);
		mp_collect(s[i], &r[i], REQUEST_TIMEOUT_S);
		mp_result_free(&r[i]);
		skv_client_stream_close(s[i]);
	}
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, NOTICE_S);
	free(want[0]);
	free(want[1]);
}
