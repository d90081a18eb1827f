/* Multi-process tests of what the daemon refuses: peers of a foreign uid, protocol garbage and
 * fuzzing over raw connections, bad stream parameters, and clients that corrupt their
 * channels. A real skv-cached with real skv-engine processes per test (tests/mp/mputil.h); after
 * every refusal the daemon must still serve correctly and must not leak descriptors. Every check
 * is an assertion; every wait is bounded. */
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

TestSuite(protocol, .init = suite_init, .fini = suite_fini, .timeout = 120);

/* ---- helpers ------------------------------------------------------------------------------ */

static const char *sample_path(void)
{
	return tu_data_path("tokenizer-sample.txt");
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

Test(protocol, foreign_uid_is_refused)
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
Test(protocol, foreign_uid_libskv_says_permission_denied)
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

Test(protocol, protocol_garbage_is_refused_without_leaks)
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
Test(protocol, hello_with_fds_leaks_nothing)
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

Test(protocol, protocol_fuzz_never_kills_the_daemon)
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

/* ==== 9. bad stream parameters ============================================================= */

static void expect_open_refused(struct skv_client *c, const struct skv_stream_params *p,
				int want, const char *needle, const char *what)
{
	struct skv_client_stream *s = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, p, &s, msg, sizeof(msg));
	cr_assert_eq(err, want, "%s: open returned %d (%s), want %d", what, err, msg, want);
	cr_assert(s == NULL || err == 0);
	cr_assert(strstr(msg, needle) != NULL, "%s: the message does not mention '%s': %s", what,
		  needle, msg);
}

Test(protocol, bad_stream_parameters_leave_the_connection_usable)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "bad_params", 2, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	struct skv_stream_params p;

	mp_params_default(&p);
	p.policy = 1; /* window */
	p.sink_slots = 4;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "keeps no sinks", "window with 4 sinks");
	mp_params_default(&p);
	p.policy = 1;
	p.window_slots = 0;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "at least 1", "window 0");
	mp_params_default(&p);
	p.window_slots = 0;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "at least 1", "sink with window 0");
	mp_params_default(&p);
	p.policy = 3; /* recompute */
	p.sink_slots = 2;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "keeps no sinks", "recompute with sinks");
	mp_params_default(&p);
	p.sink_slots = 1 << 24;
	expect_open_refused(c, &p, -SKV_EINVAL_POLICY, "exceed", "more slots than the limit");
	mp_params_default(&p);
	p.policy = 7;
	expect_open_refused(c, &p, -EINVAL, "invalid policy", "policy 7");
	mp_params_default(&p);
	p.evict = 9;
	expect_open_refused(c, &p, -EINVAL, "invalid policy", "evict mode 9");
	mp_params_default(&p);
	p.temperature = NAN;
	expect_open_refused(c, &p, -EINVAL, "sampling", "temperature NaN");
	mp_params_default(&p);
	p.temperature = -1.0f;
	expect_open_refused(c, &p, -EINVAL, "sampling", "temperature -1");
	mp_params_default(&p);
	p.top_p = NAN;
	expect_open_refused(c, &p, -EINVAL, "sampling", "top-p NaN");
	mp_params_default(&p);
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

/* ==== a client that corrupts its channel =================================================== */

/* The engine never trusts a ring index it reads from shared memory (shm/ring.h): a client that
 * corrupts its own input ring loses that stream (ERROR or -EPIPE), the engine goes on serving
 * its other streams and goes back to sleep when idle (it used to busy-loop for good). */
Test(protocol, corrupt_input_ring_fails_only_that_stream)
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
	cr_assert(rc == -SKV_EFORMAT || (rc == 1 && r.error),
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
Test(protocol, corrupt_output_ring_fails_only_that_stream)
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
	mp_expect_failure(bad, &r, FAIL_NOTICE_S, msg, sizeof(msg), "the corrupt stream",
			  -SKV_EFORMAT);
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
