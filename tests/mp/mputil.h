/* Helpers of the multi-process suites: a real skv-cached (with its real skv-engine processes)
 * started per test on a socket in the test's scratch directory, the skv CLI run as a child,
 * libskv streams read to the end, raw protocol connections, and what /proc says about the
 * processes involved. Every helper asserts on failure (cr_assert), so a test never goes on with
 * a half-made fixture.
 *
 * Processes: mp_suite_init() makes the test process a child subreaper, so engines orphaned by a
 * killed daemon become its children (their exit status can be read and nothing is left behind);
 * every child is started with PR_SET_PDEATHSIG = SIGKILL so that even a crashed test leaves no
 * daemon running. mp_suite_fini() kills and reaps whatever a test left, also after a failed
 * assertion. */
#ifndef SKV_MPUTIL_H
#define SKV_MPUTIL_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "channel.h"
#include "libskv-pvt.h"
#include "proto.h"
#include "skv-client.h"

#define MP_MAX_ENGINES 16
#define NS_PER_S 1000000000ll
#define REQUEST_TIMEOUT_S 60.0       /* one request finishes within this */
#define LONG_GENERATION 1000000      /* tokens, past BOS: "forever" for these tests */

struct mp_daemon {
	pid_t pid;                    /* skv-cached, our child; 0 once reaped */
	int status;                   /* its wait status once reaped */
	unsigned engines;             /* --engines */
	char sock[108];               /* its socket, in the scratch directory */
	char log[PATH_MAX];           /* its stderr (and its engines') */
	int admin;                    /* our own admin connection, for stats */
};

/* Suite .init / .fini (see the file comment). */
void mp_suite_init(void);
void mp_suite_fini(void);
/* Criterion's skip ends the test process without its .fini: clean up first. */
#define MP_SKIP(...)                            \
	do {                                    \
		mp_suite_fini();                \
		cr_skip_test(__VA_ARGS__);      \
	} while (0)

double mp_now(void);
void mp_sleep_ms(unsigned ms);
const char *mp_env_path(const char *var);

/* Start skv-cached with --engines n (and wait_mode as --wait unless NULL, extra flags after it,
 * NULL-terminated, may be NULL) on <scratch of test>/cached.sock; wait until it accepts
 * connections and all its engines are ready. */
void mp_daemon_start(struct mp_daemon *d, const char *test, unsigned engines,
		     const char *wait_mode, const char *const *extra);
/* When non-zero, mp_daemon_start runs skv-cached (and so its engines) as this uid and gid,
 * with no supplementary groups (tests/mp/test-perms.c; the test process must be root and the
 * scratch directory the daemon's). */
extern uid_t mp_daemon_uid;
extern gid_t mp_daemon_gid;
/* Wait until stats report engines_ready == n (and every engine has a pid). */
void mp_daemon_wait_ready(struct mp_daemon *d, unsigned n, double timeout_s);
/* The daemon's stats over d->admin. */
void mp_stats(struct mp_daemon *d, struct skv_msg_stats *st);
/* Poll stats until streams == 0 and arena_used_bytes == 0; asserts within timeout_s. */
void mp_wait_streams_freed(struct mp_daemon *d, double timeout_s);
/* 1 while the daemon process exists and is not a zombie (does not reap it). */
int mp_daemon_alive(const struct mp_daemon *d);
/* Wait for the daemon to exit (reaps it); returns 1 if it did within timeout_s. */
int mp_daemon_reap(struct mp_daemon *d, double timeout_s);
/* The daemon's log so far (malloc'ed, NUL-terminated). */
char *mp_daemon_log(const struct mp_daemon *d);
/* Occurrences of needle in the daemon's log. */
unsigned mp_log_count(const struct mp_daemon *d, const char *needle);

/* Track a process for the final clean-up: pid must be our child, or pidfd >= 0 for another. */
void mp_track_child(pid_t pid);
int mp_track_pidfd(pid_t pid);
/* fork() with PR_SET_PDEATHSIG(SIGKILL) in the child, tracked. Returns the child's pid (0 in
 * the child, which must leave with _exit). */
pid_t mp_fork(void);

/* /proc view of any process. */
int mp_proc_gone(pid_t pid);           /* no /proc entry, or a zombie */
unsigned mp_fd_count(pid_t pid);
/* The kernel function the process sleeps in (/proc/PID/wchan), into buf ("0": running). */
void mp_wchan(pid_t pid, char *buf, size_t len);
/* Wait up to timeout_s for pid to sleep in a kernel function containing one of needles
 * (NULL-terminated; NULL needles: any). Returns 1, or 0 with the last wchan in buf. */
int mp_wait_wchan(pid_t pid, const char *const *needles, double timeout_s, char *buf,
		  size_t len);
/* Inodes of the stream channels (memfd "skv-chan-*") mapped by pid (0: this process). */
size_t mp_chan_inodes(pid_t pid, uint64_t *out, size_t cap);
int mp_maps_inode(pid_t pid, uint64_t inode);
/* Where this process maps the start of the channel with that inode. */
void *mp_chan_address(uint64_t inode);

/* Run an executable with args (NULL-terminated, without argv[0]), stdin /dev/null; stdout and
 * stderr captured (malloc'ed, NUL-terminated). Returns its wait status. */
int mp_run(const char *bin, const char *const *args, char **out, char **err);
/* The skv CLI ($SKV_BIN): asserts exit 0, returns stdout (malloc'ed). */
char *mp_skv(const char *const *args);
#define MP_SKV(...) mp_skv((const char *const[]){ __VA_ARGS__, NULL })
/* The text of "key": VALUE in skv's one-line JSON (copied into value). */
void mp_json_field(const char *json, const char *key, char *value, size_t value_len);
/* tests/data/llama2c-greedy-200.txt plus the newline skv prints at the end (malloc'ed). */
char *mp_greedy_reference(void);

/* ---- libskv ---------------------------------------------------------------------------- */

struct skv_client *mp_connect(const struct mp_daemon *d);
#define mp_client_of libskv_stream_owner
/* Stream parameters as the wire carries them: the defaults (sink, default sizes, greedy). */
void mp_params_default(struct skv_stream_params *p);
/* Options carrying exactly p (even values the public setters refuse: for daemon checks). */
skv_client_opts *mp_opts(const struct skv_stream_params *p);
/* Open with p; returns skv_client_stream_open's value, msg its last error. */
int mp_try_open(struct skv_client *c, const struct skv_stream_params *p,
		struct skv_client_stream **s, char *msg, size_t msg_len);
/* Open a stream and return the inode of its channel as this process maps it (for
 * mp_engine_serving). */
struct skv_client_stream *mp_open(struct skv_client *c, const struct skv_stream_params *p,
				  uint64_t *chan_inode);
/* Index (in stats engine_pid) of the engine that maps the channel; waits up to timeout_s. */
unsigned mp_engine_serving(struct mp_daemon *d, uint64_t chan_inode, double timeout_s);

/* What a request produced. text: ECHO and TOKEN bytes in order (NUL-terminated), as skv
 * prints them before its final newline. */
struct mp_result {
	char *text;
	size_t len, cap;
	uint64_t tokens;        /* TOKEN messages */
	int finished;           /* DONE, SCORED or ERROR seen */
	int done;
	uint32_t done_flags;
	uint64_t done_arg;
	int scored;
	double nll;
	uint64_t predictions;
	int error;
	int64_t error_code;
	char error_text[SKV_CHAN_DATA + 1];
};

/* Take one message (waiting up to timeout_ns) into r. Returns skv_client_stream_next's value;
 * msg receives its message. */
int mp_step(struct skv_client_stream *s, struct mp_result *r, int64_t timeout_ns, char *msg,
	    size_t msg_len);
/* Read until the request finishes; asserts it does within timeout_s with no stream error. */
void mp_collect(struct skv_client_stream *s, struct mp_result *r, double timeout_s);
void mp_result_free(struct mp_result *r);
/* Append the newline skv prints after a generation. */
void mp_result_append_nl(struct mp_result *r);
/* Send a request (asserts it was accepted). */
void mp_request(struct skv_client_stream *s, const char *text, uint32_t type, uint64_t arg);
/* The perplexity of a SCORED result, printed as skv ppl --json prints it. */
void mp_ppl_text(const struct mp_result *r, char *buf, size_t len);

/* ---- scenarios shared by the tests ----------------------------------------------------- */

/* Default parameters with this temperature (top-p 0.9, as skv) and seed. */
void mp_params_generate(struct skv_stream_params *p, float temperature, uint64_t seed);
/* Greedy 200 tokens from BOS on a fresh stream equal llama2.c's text: through libskv, and
 * through skv --socket. */
void mp_expect_greedy_libskv(struct skv_client *c);
void mp_expect_greedy_cli(const struct mp_daemon *d);
/* Wait for a process to be gone. Returns its wait status if it was (or became, as an orphan)
 * our child, -1 if someone else reaped it. */
int mp_wait_gone(pid_t pid, double timeout_s, const char *what);
/* Ask for a generation that does not end (LONG_GENERATION tokens, on past BOS), from where the
 * stream is. Returns skv_client_stream_request_flags's value (no assertion: children use it). */
int mp_request_endless(struct skv_client_stream *s, char *msg, size_t msg_len);
/* Keep a stream generating: read one message; should the generation end, ask for more.
 * Returns skv_client_stream_next's value. */
int mp_pump(struct skv_client_stream *s, struct mp_result *r, char *msg, size_t msg_len);
/* Pump until r counts tokens TOKEN messages (asserted within REQUEST_TIMEOUT_S). */
void mp_pump_until(struct skv_client_stream *s, struct mp_result *r, uint64_t tokens);
/* Pump a stream that must fail: what is still in its ring, then the error want (-EPIPE: its
 * engine or the daemon died; -SKV_EFORMAT: its channel was corrupted; -ETIMEDOUT: idle)
 * within bound_s (asserted); msg receives libskv's message. */
void mp_expect_failure(struct skv_client_stream *s, struct mp_result *r, double bound_s,
		       char *msg, size_t msg_len, const char *what, int want);
#define mp_expect_epipe(s, r, bound_s, msg, msg_len, what) \
	mp_expect_failure(s, r, bound_s, msg, msg_len, what, -EPIPE)
int mp_eventfd(void);
/* Wait until pid holds want fds (asserted within timeout_s). */
void mp_wait_fd_count(pid_t pid, unsigned want, double timeout_s, const char *what);
/* Fixed-seed generator (xorshift64*) and byte-wise mutation of len bytes of buf (cap bytes):
 * 1-4 edits, sometimes a shorter or longer message. Returns the new length. */
uint32_t mp_fuzz_u32(void);
size_t mp_fuzz_mutate(uint8_t *buf, size_t len, size_t cap);
/* In a child about to exercise libskv: make io_uring_setup fail with ENOSYS (seccomp), as
 * kernel.io_uring_disabled or a container profile would. 0, or -errno / -EPERM if the filter
 * does not take. */
int mp_deny_io_uring(void);

/* For forked children (no Criterion there): receive one message within 5 s into h and e (an
 * ERROR's body, zero-padded). Returns 1, 0 on hang-up, -ETIMEDOUT or -errno. */
int mp_child_recv(int fd, struct skv_msg_hdr *h, struct skv_msg_error *e);
/* Read exactly len bytes that a child writes in one go, waiting up to timeout_s: 1 or 0. */
int mp_read_timed(int fd, void *buf, size_t len, double timeout_s);

/* ---- raw protocol ---------------------------------------------------------------------- */

int mp_raw_connect(const char *sock);
/* Build header + body of type into buf (len = body_len, valid magic); returns bytes. */
size_t mp_raw_build(void *buf, uint16_t type, const void *body, size_t body_len);
/* sendmsg of len bytes with n_fds fds; returns 0 or -errno. */
int mp_raw_send(int fd, const void *buf, size_t len, const int *fds, int n_fds);
/* A valid client HELLO, and its HELLO_OK read back (asserted). */
void mp_raw_hello(int fd);
/* Receive one message within timeout_ms: returns 1 (hdr/body filled, fds closed), 0 on
 * hang-up, -ETIMEDOUT, or -errno. *n_fds receives how many fds came with it (may be NULL). */
int mp_raw_recv(int fd, int timeout_ms, struct skv_msg_hdr *hdr, void *body, size_t cap,
		int *n_fds);
/* Expect an ERROR whose text contains needle (NULL: any), then a hang-up; returns its code. */
int32_t mp_raw_expect_error_and_drop(int fd, const char *needle, const char *what);
/* Expect a hang-up (nothing else) within a bounded time. */
void mp_raw_expect_drop(int fd, const char *what);

/* A free TCP port on 127.0.0.1 (bound once and released); a connection to 127.0.0.1:port
 * (-1 if refused); a whole buffer written (asserting). */
uint16_t mp_free_port(void);
int mp_tcp_connect(uint16_t port);
void mp_write_all(int fd, const char *data, size_t len);

#endif
