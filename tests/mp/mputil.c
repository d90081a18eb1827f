#include "mputil.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

extern char **environ;

#define MP_MAX_TRACKED 64
#define MP_START_TIMEOUT_S 30.0
#define MP_REAP_TIMEOUT_S 5.0
#define MP_RAW_TIMEOUT_MS 5000

/* Processes to kill at the end of the test: our children by pid, others by pidfd (a pid alone
 * could name a reused process). */
static pid_t mp_children[MP_MAX_TRACKED];
static unsigned mp_n_children;
static int mp_pidfds[MP_MAX_TRACKED];
static unsigned mp_n_pidfds;

double mp_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void mp_sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

const char *mp_env_path(const char *var)
{
	const char *v = getenv(var);
	cr_assert(v != NULL && *v, "%s is not set: run the tests through `meson test`", var);
	return v;
}

void mp_suite_init(void)
{
	signal(SIGPIPE, SIG_IGN);
	cr_assert(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0, "PR_SET_CHILD_SUBREAPER: %s",
		  strerror(errno));
}

void mp_track_child(pid_t pid)
{
	cr_assert(mp_n_children < MP_MAX_TRACKED);
	mp_children[mp_n_children++] = pid;
}

int mp_track_pidfd(pid_t pid)
{
	int fd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (fd < 0)
		return -errno;
	cr_assert(mp_n_pidfds < MP_MAX_TRACKED);
	mp_pidfds[mp_n_pidfds++] = fd;
	return fd;
}

/* Admin connections opened by mp_daemon_start, closed by mp_suite_fini. */
static int mp_admins[MP_MAX_TRACKED];
static unsigned mp_n_admins;

void mp_suite_fini(void)
{
	/* Best effort, no assertions: this also runs after a failed one. */
	for (unsigned i = 0; i < mp_n_admins; i++)
		close(mp_admins[i]);
	mp_n_admins = 0;
	for (unsigned i = 0; i < mp_n_children; i++)
		if (mp_children[i] > 0)
			kill(mp_children[i], SIGKILL);
	for (unsigned i = 0; i < mp_n_pidfds; i++) {
		syscall(SYS_pidfd_send_signal, mp_pidfds[i], SIGKILL, NULL, 0);
		close(mp_pidfds[i]);
	}
	mp_n_children = mp_n_pidfds = 0;
	/* As subreaper we inherit orphaned engines: reap everything that is left. */
	double deadline = mp_now() + MP_REAP_TIMEOUT_S;
	while (mp_now() < deadline) {
		pid_t p = waitpid(-1, NULL, WNOHANG);
		if (p < 0 && errno == ECHILD)
			break;
		if (p <= 0)
			mp_sleep_ms(5);
	}
	tu_scratch_cleanup();
}

pid_t mp_fork(void)
{
	pid_t parent = getpid();
	fflush(NULL);
	pid_t pid = fork();
	cr_assert(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127);
		return 0;
	}
	mp_track_child(pid);
	return pid;
}

/* ---- /proc -------------------------------------------------------------------------------- */

int mp_proc_gone(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = '\0';
	/* "pid (comm) S ...": the state follows the last ')'. */
	const char *rp = strrchr(buf, ')');
	return !rp || rp[1] != ' ' || rp[2] == 'Z' || rp[2] == 'X';
}

unsigned mp_fd_count(pid_t pid)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	DIR *dir = opendir(path);
	cr_assert(dir != NULL, "opendir %s: %s", path, strerror(errno));
	unsigned n = 0;
	struct dirent *e;
	while ((e = readdir(dir)))
		if (e->d_name[0] != '.')
			n++;
	closedir(dir);
	return n;
}

void mp_wchan(pid_t pid, char *buf, size_t len)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/wchan", (int)pid);
	buf[0] = '\0';
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = read(fd, buf, len - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
}

int mp_wait_wchan(pid_t pid, const char *const *needles, double timeout_s, char *buf,
		  size_t len)
{
	double deadline = mp_now() + timeout_s;
	for (;;) {
		mp_wchan(pid, buf, len);
		if (buf[0] && strcmp(buf, "0") != 0) {
			if (!needles)
				return 1;
			for (unsigned k = 0; needles[k]; k++)
				if (strstr(buf, needles[k]))
					return 1;
		}
		if (mp_now() > deadline)
			return 0;
		mp_sleep_ms(2);
	}
}

size_t mp_chan_inodes(pid_t pid, uint64_t *out, size_t cap)
{
	char path[64];
	if (pid)
		snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	else
		snprintf(path, sizeof(path), "/proc/self/maps");
	FILE *f = fopen(path, "re");
	if (!f)
		return 0;
	char *line = NULL;
	size_t line_cap = 0, n = 0;
	while (getline(&line, &line_cap, f) > 0) {
		if (!strstr(line, "/memfd:skv-chan-"))
			continue;
		/* address perms offset dev inode path */
		unsigned long long inode;
		if (sscanf(line, "%*s %*s %*s %*s %llu", &inode) != 1)
			continue;
		int seen = 0;
		for (size_t i = 0; i < n; i++)
			seen |= out[i] == inode;
		if (!seen && n < cap)
			out[n++] = inode;
	}
	free(line);
	fclose(f);
	return n;
}

int mp_maps_inode(pid_t pid, uint64_t inode)
{
	uint64_t inodes[256];
	size_t n = mp_chan_inodes(pid, inodes, 256);
	for (size_t i = 0; i < n; i++)
		if (inodes[i] == inode)
			return 1;
	return 0;
}

void *mp_chan_address(uint64_t inode)
{
	FILE *f = fopen("/proc/self/maps", "re");
	cr_assert(f != NULL);
	char *line = NULL;
	size_t cap = 0;
	void *found = NULL;
	while (!found && getline(&line, &cap, f) > 0) {
		unsigned long long start, offset, ino;
		if (!strstr(line, "/memfd:skv-chan-") ||
		    sscanf(line, "%llx-%*x %*s %llx %*s %llu", &start, &offset, &ino) != 3)
			continue;
		if (ino == inode && offset == 0)
			found = (void *)(uintptr_t)start;
	}
	free(line);
	fclose(f);
	cr_assert(found != NULL, "channel inode %llu is not mapped here", (unsigned long long)inode);
	return found;
}

/* ---- the daemon --------------------------------------------------------------------------- */

char *mp_daemon_log(const struct mp_daemon *d)
{
	return tu_read_file(d->log, NULL);
}

unsigned mp_log_count(const struct mp_daemon *d, const char *needle)
{
	char *log = mp_daemon_log(d);
	unsigned n = 0;
	for (const char *p = log; (p = strstr(p, needle)); p += strlen(needle))
		n++;
	free(log);
	return n;
}

int mp_daemon_alive(const struct mp_daemon *d)
{
	return d->pid > 0 && !mp_proc_gone(d->pid);
}

int mp_daemon_reap(struct mp_daemon *d, double timeout_s)
{
	if (d->pid <= 0)
		return 1;
	double deadline = mp_now() + timeout_s;
	for (;;) {
		int status;
		pid_t p = waitpid(d->pid, &status, WNOHANG);
		cr_assert(p >= 0, "waitpid daemon: %s", strerror(errno));
		if (p == d->pid) {
			d->status = status;
			for (unsigned i = 0; i < mp_n_children; i++)
				if (mp_children[i] == d->pid)
					mp_children[i] = 0;
			d->pid = 0;
			return 1;
		}
		if (mp_now() > deadline)
			return 0;
		mp_sleep_ms(5);
	}
}

/* An admin connection: HELLO as SKV_ROLE_ADMIN, HELLO_OK read back (asserted). */
static void mp_admin_hello(int fd)
{
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_ADMIN, .pid = (uint32_t)getpid(),
				       .engine_id = UINT32_MAX, .node = UINT32_MAX };
	cr_assert(skv_msg_send(fd, SKV_MSG_HELLO, 0, &hello, NULL, 0) == 0);
	struct skv_msg_hdr h;
	uint8_t body[2048];
	int rc = mp_raw_recv(fd, MP_RAW_TIMEOUT_MS, &h, body, sizeof(body), NULL);
	cr_assert_eq(rc, 1, "no answer to the admin HELLO (%d)", rc);
	cr_assert_eq(h.type, SKV_MSG_HELLO_OK, "HELLO answered with %s", skv_msg_name(h.type));
}

void mp_stats(struct mp_daemon *d, struct skv_msg_stats *st)
{
	cr_assert(d->admin >= 0);
	struct skv_msg_stream req = { 0 };
	cr_assert(skv_msg_send(d->admin, SKV_MSG_STATS_REQ, 0, &req, NULL, 0) == 0,
		  "stats: the daemon went away");
	struct skv_msg_hdr h;
	union {
		struct skv_msg_stats stats;
		uint8_t raw[2048];
	} body;
	int rc = mp_raw_recv(d->admin, MP_RAW_TIMEOUT_MS, &h, &body, sizeof(body), NULL);
	cr_assert(rc == 1 && h.type == SKV_MSG_STATS, "stats: no STATS answer (%d, %s)", rc,
		  rc == 1 ? skv_msg_name(h.type) : "-");
	*st = body.stats;
}

void mp_daemon_wait_ready(struct mp_daemon *d, unsigned n, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	struct skv_msg_stats st;
	for (;;) {
		mp_stats(d, &st);
		unsigned with_pid = 0;
		for (unsigned i = 0; i < st.engines && i < MP_MAX_ENGINES; i++)
			with_pid += st.engine_pid[i] > 0;
		if (st.engines_ready == n && with_pid >= n)
			return;
		if (mp_now() > deadline) {
			char *log = mp_daemon_log(d);
			cr_assert_fail("%u of %u engines ready after %.0f s; daemon log:\n%s",
				       st.engines_ready, n, timeout_s, log);
		}
		mp_sleep_ms(10);
	}
}

uid_t mp_daemon_uid;
gid_t mp_daemon_gid;

void mp_daemon_start(struct mp_daemon *d, const char *test, unsigned engines,
		     const char *wait_mode, const char *const *extra)
{
	memset(d, 0, sizeof(*d));
	d->engines = engines;
	const char *dir = tu_scratch_dir(test);
	int n = snprintf(d->sock, sizeof(d->sock), "%s/cached.sock", dir);
	cr_assert(n > 0 && n < (int)sizeof(d->sock), "socket path too long: %s", dir);
	snprintf(d->log, sizeof(d->log), "%s/daemon.log", dir);

	char engines_text[16];
	snprintf(engines_text, sizeof(engines_text), "%u", engines);
	const char *argv[32];
	unsigned argc = 0;
	argv[argc++] = mp_env_path("SKV_CACHED_BIN");
	argv[argc++] = "--socket";
	argv[argc++] = d->sock;
	argv[argc++] = "--engines";
	argv[argc++] = engines_text;
	argv[argc++] = "--engine-bin";
	argv[argc++] = mp_env_path("SKV_ENGINE_BIN");
	argv[argc++] = "--arena-mb";
	argv[argc++] = "64";
	if (wait_mode) {
		argv[argc++] = "--wait";
		argv[argc++] = wait_mode;
	}
	for (unsigned i = 0; extra && extra[i]; i++) {
		cr_assert(argc < 31);
		argv[argc++] = extra[i];
	}
	argv[argc] = NULL;

	int log_fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	cr_assert(log_fd >= 0, "%s: %s", d->log, strerror(errno));
	pid_t pid = mp_fork();
	if (pid == 0) {
		int null_fd = open("/dev/null", O_RDWR);
		dup2(null_fd, STDIN_FILENO);
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		if (mp_daemon_uid) {
			if (setgroups(0, NULL) < 0 || setresgid(mp_daemon_gid, mp_daemon_gid,
								 mp_daemon_gid) < 0 ||
			    setresuid(mp_daemon_uid, mp_daemon_uid, mp_daemon_uid) < 0)
				_exit(126);
			/* A change of credentials clears the parent-death signal. */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
		}
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(log_fd);
	d->pid = pid;

	/* It accepts connections once its arenas are made; its engines come up after that. */
	double deadline = mp_now() + MP_START_TIMEOUT_S;
	char msg[256] = "";
	for (;;) {
		d->admin = skv_msg_connect(d->sock);
		if (d->admin >= 0) {
			mp_admin_hello(d->admin);
			if (mp_n_admins < MP_MAX_TRACKED)
				mp_admins[mp_n_admins++] = d->admin;
			break;
		}
		snprintf(msg, sizeof(msg), "%s", strerror(-d->admin));
		if (!mp_daemon_alive(d) || mp_now() > deadline) {
			char *log = mp_daemon_log(d);
			cr_assert_fail("skv-cached did not come up (%s); log:\n%s", msg, log);
		}
		mp_sleep_ms(10);
	}
	mp_daemon_wait_ready(d, engines, MP_START_TIMEOUT_S);
	/* Engines are not our children: track them by pidfd for the final clean-up. */
	struct skv_msg_stats st;
	mp_stats(d, &st);
	for (unsigned i = 0; i < engines && i < MP_MAX_ENGINES; i++)
		mp_track_pidfd(st.engine_pid[i]);
}

void mp_wait_streams_freed(struct mp_daemon *d, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	struct skv_msg_stats st;
	for (;;) {
		mp_stats(d, &st);
		if (st.streams == 0 && st.arena_used_bytes == 0)
			return;
		cr_assert(mp_now() < deadline,
			  "after %.0f s the daemon still holds %llu streams and %llu arena bytes",
			  timeout_s, (unsigned long long)st.streams,
			  (unsigned long long)st.arena_used_bytes);
		mp_sleep_ms(10);
	}
}

/* ---- running programs --------------------------------------------------------------------- */

static char *mp_slurp_fd(int fd)
{
	size_t cap = 4096, len = 0;
	char *buf = malloc(cap);
	cr_assert(buf != NULL);
	cr_assert(lseek(fd, 0, SEEK_SET) == 0);
	for (;;) {
		if (cap - len < 4096) {
			cap *= 2;
			buf = realloc(buf, cap);
			cr_assert(buf != NULL);
		}
		ssize_t n = read(fd, buf + len, cap - len - 1);
		cr_assert(n >= 0, "read: %s", strerror(errno));
		if (n == 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	return buf;
}

int mp_run(const char *bin, const char *const *args, char **out, char **err)
{
	const char *argv[40];
	unsigned argc = 0;
	argv[argc++] = bin;
	for (unsigned i = 0; args[i]; i++) {
		cr_assert(argc < 39);
		argv[argc++] = args[i];
	}
	argv[argc] = NULL;
	/* Files, not pipes: nothing can block on a full pipe while we wait. */
	int out_fd = (int)syscall(SYS_memfd_create, "mp-stdout", 1u /* MFD_CLOEXEC */);
	int err_fd = (int)syscall(SYS_memfd_create, "mp-stderr", 1u);
	cr_assert(out_fd >= 0 && err_fd >= 0, "memfd_create: %s", strerror(errno));
	posix_spawn_file_actions_t fa;
	cr_assert(posix_spawn_file_actions_init(&fa) == 0);
	cr_assert(posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0) ==
		  0);
	cr_assert(posix_spawn_file_actions_adddup2(&fa, out_fd, STDOUT_FILENO) == 0);
	cr_assert(posix_spawn_file_actions_adddup2(&fa, err_fd, STDERR_FILENO) == 0);
	pid_t pid;
	int rc = posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ);
	cr_assert(rc == 0, "posix_spawn %s: %s", bin, strerror(rc));
	posix_spawn_file_actions_destroy(&fa);
	mp_track_child(pid);
	int status;
	while (waitpid(pid, &status, 0) < 0)
		cr_assert(errno == EINTR, "waitpid: %s", strerror(errno));
	for (unsigned i = 0; i < mp_n_children; i++)
		if (mp_children[i] == pid)
			mp_children[i] = 0;
	*out = mp_slurp_fd(out_fd);
	*err = mp_slurp_fd(err_fd);
	close(out_fd);
	close(err_fd);
	return status;
}

char *mp_skv(const char *const *args)
{
	char *out, *err;
	int status = mp_run(mp_env_path("SKV_BIN"), args, &out, &err);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "skv %s %s ... failed (status 0x%x): %s", args[0], args[1] ? args[1] : "",
		  status, err);
	free(err);
	return out;
}

void mp_json_field(const char *json, const char *key, char *value, size_t value_len)
{
	char pattern[64];
	snprintf(pattern, sizeof(pattern), "\"%s\": ", key);
	const char *at = strstr(json, pattern);
	cr_assert(at != NULL, "JSON has no key %s: %s", key, json);
	at += strlen(pattern);
	if (*at == '"')
		at++;
	size_t n = strcspn(at, "\",}");
	cr_assert(n > 0 && n < value_len, "bad value for %s: %s", key, json);
	memcpy(value, at, n);
	value[n] = '\0';
}

char *mp_greedy_reference(void)
{
	size_t len;
	char *text = tu_read_file(tu_data_path("llama2c-greedy-200.txt"), &len);
	text = realloc(text, len + 2);
	cr_assert(text != NULL);
	memcpy(text + len, "\n", 2);
	return text;
}

/* ---- libskv ------------------------------------------------------------------------------- */

struct skv_client *mp_connect(const struct mp_daemon *d)
{
	struct skv_client *c = NULL;
	char msg[256] = "";
	int err = skv_client_connect(d->sock, &c, msg, sizeof(msg));
	cr_assert(err == 0, "connect: %s (%d)", msg, err);
	return c;
}

void mp_params_default(struct skv_stream_params *p)
{
	memset(p, 0, sizeof(*p));
	p->sink_slots = -1;
	p->window_slots = -1;
	p->top_p = 0.9f;
}

skv_client_opts *mp_opts(const struct skv_stream_params *p)
{
	skv_client_opts *o = NULL;
	cr_assert(skv_client_opts_new(&o) == 0);
	/* Out-of-range numbers are for the daemon to refuse: no client-side check here. */
	o->p = *p;
	return o;
}

int mp_try_open(struct skv_client *c, const struct skv_stream_params *p,
		struct skv_client_stream **s, char *msg, size_t msg_len)
{
	skv_client_opts *o = mp_opts(p);
	int err = skv_client_stream_open(c, o, s);
	skv_client_opts_free(o);
	if (err < 0 && msg)
		snprintf(msg, msg_len, "%s", skv_client_last_error(c));
	return err;
}

struct skv_client_stream *mp_open(struct skv_client *c, const struct skv_stream_params *p,
				  uint64_t *chan_inode)
{
	uint64_t before[256], after[256];
	size_t n_before = mp_chan_inodes(0, before, 256);
	struct skv_client_stream *s = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, p, &s, msg, sizeof(msg));
	cr_assert(err == 0, "stream open: %s (%d)", msg, err);
	size_t n_after = mp_chan_inodes(0, after, 256);
	uint64_t found = 0;
	unsigned n_new = 0;
	for (size_t i = 0; i < n_after; i++) {
		int old = 0;
		for (size_t j = 0; j < n_before; j++)
			old |= before[j] == after[i];
		if (!old) {
			found = after[i];
			n_new++;
		}
	}
	cr_assert_eq(n_new, 1, "opening a stream mapped %u new channels", n_new);
	if (chan_inode)
		*chan_inode = found;
	return s;
}

unsigned mp_engine_serving(struct mp_daemon *d, uint64_t chan_inode, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	struct skv_msg_stats st;
	for (;;) {
		mp_stats(d, &st);
		for (unsigned i = 0; i < st.engines && i < MP_MAX_ENGINES; i++)
			if (st.engine_pid[i] > 0 && mp_maps_inode(st.engine_pid[i], chan_inode))
				return i;
		cr_assert(mp_now() < deadline, "no engine maps the stream's channel (inode %llu)",
			  (unsigned long long)chan_inode);
		mp_sleep_ms(5);
	}
}

static void mp_result_append(struct mp_result *r, const uint8_t *data, size_t n)
{
	if (r->len + n + 1 > r->cap) {
		r->cap = r->cap ? r->cap * 2 : 4096;
		while (r->cap < r->len + n + 1)
			r->cap *= 2;
		r->text = realloc(r->text, r->cap);
		cr_assert(r->text != NULL);
	}
	memcpy(r->text + r->len, data, n);
	r->len += n;
	r->text[r->len] = '\0';
}

int mp_step(struct skv_client_stream *s, struct mp_result *r, int64_t timeout_ns, char *msg,
	    size_t msg_len)
{
	struct skv_client_event ev;
	int timeout_ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
	int rc = skv_client_stream_read(s, &ev, timeout_ms);
	if (rc < 0 && msg)
		snprintf(msg, msg_len, "%s", skv_client_last_error(mp_client_of(s)));
	if (rc != 1)
		return rc;
	switch (ev.type) {
	case SKV_CLIENT_EV_PROMPT:
		mp_result_append(r, (const uint8_t *)ev.text, ev.len);
		break;
	case SKV_CLIENT_EV_TOKEN:
		r->tokens++;
		mp_result_append(r, (const uint8_t *)ev.text, ev.len);
		break;
	case SKV_CLIENT_EV_DONE:
		r->finished = r->done = 1;
		r->done_flags = (uint32_t)ev.reason;
		r->done_arg = ev.count;
		break;
	case SKV_CLIENT_EV_SCORED:
		r->finished = r->scored = 1;
		r->nll = ev.nll;
		r->predictions = ev.count;
		break;
	case SKV_CLIENT_EV_ERROR:
		r->finished = r->error = 1;
		r->error_code = ev.error;
		snprintf(r->error_text, sizeof(r->error_text), "%.*s", (int)ev.len, ev.text);
		break;
	default:
		cr_assert_fail("unknown event type %d", (int)ev.type);
	}
	return rc;
}

void mp_collect(struct skv_client_stream *s, struct mp_result *r, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	char msg[256] = "";
	while (!r->finished) {
		cr_assert(mp_now() < deadline, "the request did not finish within %.0f s", timeout_s);
		int rc = mp_step(s, r, 100000000, msg, sizeof(msg));
		cr_assert(rc >= 0, "stream_next: %s (%d)", msg, rc);
	}
	cr_assert(!r->error, "the engine answered ERROR %lld: %s", (long long)r->error_code,
		  r->error_text);
}

void mp_result_append_nl(struct mp_result *r)
{
	mp_result_append(r, (const uint8_t *)"\n", 1);
}

void mp_result_free(struct mp_result *r)
{
	free(r->text);
	memset(r, 0, sizeof(*r));
}

void mp_request(struct skv_client_stream *s, const char *text, uint32_t type, uint64_t arg)
{
	int err = type == SKV_CHAN_SCORE
			  ? skv_client_stream_score(s, text, strlen(text), arg)
			  : skv_client_stream_generate(s, text, strlen(text), arg, 0);
	cr_assert(err == 0, "request: %s (%d)", skv_client_last_error(mp_client_of(s)), err);
}

void mp_ppl_text(const struct mp_result *r, char *buf, size_t len)
{
	cr_assert(r->scored && r->predictions > 0);
	snprintf(buf, len, "%.6f", exp(r->nll / (double)r->predictions));
}

/* ---- raw protocol ------------------------------------------------------------------------- */

int mp_raw_connect(const char *sock)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	cr_assert(strlen(sock) < sizeof(sa.sun_path));
	strcpy(sa.sun_path, sock);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	cr_assert(fd >= 0, "socket: %s", strerror(errno));
	cr_assert(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0, "connect %s: %s", sock,
		  strerror(errno));
	return fd;
}

size_t mp_raw_build(void *buf, uint16_t type, const void *body, size_t body_len)
{
	struct skv_msg_hdr h = { .magic = SKV_PROTO_MAGIC, .type = type,
				 .len = (uint32_t)body_len, .seq = 1 };
	memcpy(buf, &h, sizeof(h));
	if (body_len)
		memcpy((char *)buf + sizeof(h), body, body_len);
	return sizeof(h) + body_len;
}

int mp_raw_send(int fd, const void *buf, size_t len, const int *fds, int n_fds)
{
	struct iovec iov = { .iov_base = (void *)(uintptr_t)buf, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	char *ctl = NULL;
	if (n_fds > 0) {
		size_t space = CMSG_SPACE(sizeof(int) * (size_t)n_fds);
		ctl = calloc(1, space);
		cr_assert(ctl != NULL);
		mh.msg_control = ctl;
		mh.msg_controllen = space;
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n_fds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n_fds);
	}
	ssize_t n;
	do
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	int err = n < 0 ? -errno : 0;
	free(ctl);
	return err;
}

int mp_raw_recv(int fd, int timeout_ms, struct skv_msg_hdr *hdr, void *body, size_t cap,
		int *n_fds)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int r;
	do
		r = poll(&pfd, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	if (r == 0)
		return -ETIMEDOUT;
	if (r < 0)
		return -errno;
	uint8_t buf[4096];
	union {
		char buf[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			     .msg_controllen = sizeof(ctl.buf) };
	ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0)
		return errno == ECONNRESET ? 0 : -errno;
	int got = 0;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count; i++) {
			int one;
			memcpy(&one, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			close(one);
			got++;
		}
	}
	if (n_fds)
		*n_fds = got;
	if (n == 0 && !got)
		return 0;
	cr_assert((size_t)n >= sizeof(*hdr), "the daemon sent a %zd-byte message", n);
	memcpy(hdr, buf, sizeof(*hdr));
	cr_assert_eq(hdr->magic, SKV_PROTO_MAGIC, "the daemon's reply has a bad magic");
	cr_assert_eq(hdr->len + sizeof(*hdr), (size_t)n, "the daemon's reply has a bad length");
	size_t body_len = (size_t)n - sizeof(*hdr);
	memcpy(body, buf + sizeof(*hdr), body_len < cap ? body_len : cap);
	return 1;
}

void mp_raw_hello(int fd)
{
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_CLIENT, .pid = (uint32_t)getpid(),
				       .engine_id = UINT32_MAX, .node = UINT32_MAX };
	uint8_t buf[256];
	size_t n = mp_raw_build(buf, SKV_MSG_HELLO, &hello, sizeof(hello));
	cr_assert(mp_raw_send(fd, buf, n, NULL, 0) == 0);
	struct skv_msg_hdr h;
	uint8_t body[2048];
	int rc = mp_raw_recv(fd, MP_RAW_TIMEOUT_MS, &h, body, sizeof(body), NULL);
	cr_assert_eq(rc, 1, "no answer to HELLO (%d)", rc);
	cr_assert_eq(h.type, SKV_MSG_HELLO_OK, "HELLO answered with %s", skv_msg_name(h.type));
}

int32_t mp_raw_expect_error_and_drop(int fd, const char *needle, const char *what)
{
	struct skv_msg_hdr h;
	union {
		struct skv_msg_error error;
		uint8_t raw[2048];
	} body;
	int n_fds = 0;
	int rc = mp_raw_recv(fd, MP_RAW_TIMEOUT_MS, &h, &body, sizeof(body), &n_fds);
	cr_assert_eq(rc, 1, "%s: no ERROR reply (%d)", what, rc);
	cr_assert_eq(h.type, SKV_MSG_ERROR, "%s: answered with %s", what, skv_msg_name(h.type));
	cr_assert_eq(h.len, sizeof(struct skv_msg_error));
	cr_assert_eq(n_fds, 0, "%s: the ERROR carried %d fds", what, n_fds);
	body.error.text[sizeof(body.error.text) - 1] = '\0';
	cr_assert(body.error.code < 0, "%s: ERROR code %d is not negative", what, body.error.code);
	cr_assert(body.error.text[0] != '\0', "%s: the ERROR has no text", what);
	if (needle)
		cr_assert(strcasestr(body.error.text, needle) != NULL,
			  "%s: the ERROR '%s' does not mention '%s'", what, body.error.text, needle);
	mp_raw_expect_drop(fd, what);
	return body.error.code;
}

void mp_raw_expect_drop(int fd, const char *what)
{
	struct skv_msg_hdr h;
	uint8_t body[2048];
	int rc = mp_raw_recv(fd, MP_RAW_TIMEOUT_MS, &h, body, sizeof(body), NULL);
	cr_assert_eq(rc, 0, "%s: the daemon did not drop the connection (%d%s%s)", what, rc,
		     rc == 1 ? ", it sent " : "", rc == 1 ? skv_msg_name(h.type) : "");
}

/* ---- scenarios shared by the tests -------------------------------------------------------- */

void mp_params_generate(struct skv_stream_params *p, float temperature, uint64_t seed)
{
	mp_params_default(p);
	p->temperature = temperature;
	p->top_p = 0.9f;
	p->seed = seed;
}

/* libskv: greedy 200 tokens from BOS on a fresh stream must be llama2.c's text. */
void mp_expect_greedy_libskv(struct skv_client *c)
{
	struct skv_stream_params p;
	mp_params_generate(&p, 0.0f, 1);
	struct skv_client_stream *s = mp_open(c, &p, NULL);
	mp_request(s, "", SKV_CHAN_GENERATE, 200);
	struct mp_result r = { 0 };
	mp_collect(s, &r, REQUEST_TIMEOUT_S);
	char *want = mp_greedy_reference();
	cr_assert(r.done && r.done_flags == SKV_DONE_LENGTH && r.done_arg == 200,
		  "DONE flags %u after %llu tokens", r.done_flags, (unsigned long long)r.done_arg);
	mp_result_append_nl(&r);
	cr_assert_str_eq(r.text, want, "through the daemon:\n%s\nllama2.c:\n%s", r.text, want);
	free(want);
	mp_result_free(&r);
	skv_client_stream_close(s);
}

/* skv --socket generate --temp 0 -n 200 prints llama2.c's text, as local mode does. */
void mp_expect_greedy_cli(const struct mp_daemon *d)
{
	char *want = mp_greedy_reference();
	char *remote = MP_SKV("--socket", d->sock, "generate", "--temp", "0", "-n", "200");
	cr_assert_str_eq(remote, want, "skv --socket:\n%s\nllama2.c:\n%s", remote, want);
	free(remote);
	free(want);
}

int mp_wait_gone(pid_t pid, double timeout_s, const char *what)
{
	double deadline = mp_now() + timeout_s;
	for (;;) {
		int status;
		pid_t r = waitpid(pid, &status, WNOHANG);
		if (r == pid)
			return status;
		if (r < 0 && mp_proc_gone(pid))
			return -1;
		cr_assert(mp_now() < deadline, "%s (pid %d) still runs after %.0f s", what, (int)pid,
			  timeout_s);
		mp_sleep_ms(5);
	}
}

int mp_request_endless(struct skv_client_stream *s, char *msg, size_t msg_len)
{
	int err = skv_client_stream_generate(s, "", 0, LONG_GENERATION, SKV_CLIENT_ENDLESS);
	if (err < 0 && msg)
		snprintf(msg, msg_len, "%s", skv_client_last_error(mp_client_of(s)));
	return err;
}

int mp_pump(struct skv_client_stream *s, struct mp_result *r, char *msg, size_t msg_len)
{
	int rc = mp_step(s, r, NS_PER_S / 10, msg, msg_len);
	if (rc == 1 && r->finished) {
		cr_assert(!r->error, "engine error: %s", r->error_text);
		r->finished = r->done = 0;
		int err = mp_request_endless(s, msg, msg_len);
		if (err < 0)
			return err;
	}
	return rc;
}

void mp_pump_until(struct skv_client_stream *s, struct mp_result *r, uint64_t tokens)
{
	double deadline = mp_now() + REQUEST_TIMEOUT_S;
	char msg[256] = "";
	while (r->tokens < tokens) {
		cr_assert(mp_now() < deadline, "only %llu tokens after %.0f s",
			  (unsigned long long)r->tokens, REQUEST_TIMEOUT_S);
		int rc = mp_pump(s, r, msg, sizeof(msg));
		cr_assert(rc >= 0, "stream_next: %s (%d)", msg, rc);
	}
}

/* Read a stream that must fail: whatever is still in its ring, then -EPIPE within bound_s.
 * Returns the message libskv gave. */
void mp_expect_failure(struct skv_client_stream *s, struct mp_result *r, double bound_s,
		       char *msg, size_t msg_len, const char *what, int want)
{
	double deadline = mp_now() + bound_s;
	for (;;) {
		int rc = mp_pump(s, r, msg, msg_len);
		if (rc < 0) {
			cr_assert_eq(rc, want, "%s: the read returned %d (%s), not %d", what, rc, msg,
				     want);
			return;
		}
		cr_assert(mp_now() < deadline, "%s: no failure within %.0f s", what, bound_s);
	}
}

int mp_eventfd(void)
{
	int fd = eventfd(0, EFD_CLOEXEC);
	cr_assert(fd >= 0, "eventfd: %s", strerror(errno));
	return fd;
}

void mp_wait_fd_count(pid_t pid, unsigned want, double timeout_s, const char *what)
{
	double deadline = mp_now() + timeout_s;
	unsigned n;
	while ((n = mp_fd_count(pid)) != want && mp_now() < deadline)
		mp_sleep_ms(10);
	cr_assert_eq(n, want, "%s: the daemon holds %u fds, %u before", what, n, want);
}

/* The fuzzer: xorshift64*, fixed seed. */
static uint64_t mp_fuzz_state = 0x5eed5eed12345678ull;

uint32_t mp_fuzz_u32(void)
{
	mp_fuzz_state ^= mp_fuzz_state >> 12;
	mp_fuzz_state ^= mp_fuzz_state << 25;
	mp_fuzz_state ^= mp_fuzz_state >> 27;
	return (uint32_t)((mp_fuzz_state * 0x2545F4914F6CDD1Dull) >> 32);
}

/* Mutate len bytes at buf byte-wise; sometimes change the length. Returns the new length. */
size_t mp_fuzz_mutate(uint8_t *buf, size_t len, size_t cap)
{
	unsigned edits = 1 + mp_fuzz_u32() % 4;
	for (unsigned i = 0; i < edits && len; i++) {
		size_t at = mp_fuzz_u32() % len;
		switch (mp_fuzz_u32() % 4) {
		case 0: buf[at] = (uint8_t)mp_fuzz_u32(); break;
		case 1: buf[at] ^= (uint8_t)(1u << (mp_fuzz_u32() % 8)); break;
		case 2: buf[at] = (uint8_t)(mp_fuzz_u32() % 2 ? 0xff : 0x00); break;
		default: buf[at] = (uint8_t)(buf[at] + 1); break;
		}
	}
	if (mp_fuzz_u32() % 8 == 0) {
		if (mp_fuzz_u32() % 2 && len)
			len = mp_fuzz_u32() % len;
		else
			for (unsigned extra = 1 + mp_fuzz_u32() % 32; extra && len < cap; extra--)
				buf[len++] = (uint8_t)mp_fuzz_u32();
	}
	return len;
}

int mp_deny_io_uring(void)
{
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 425 /* io_uring_setup */, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof(filter) / sizeof(*filter), .filter = filter };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
		return -errno;
	uint8_t params[120] = { 0 };
	long r = syscall(425, 4, params);
	return r < 0 && errno == ENOSYS ? 0 : -EPERM;
}


int mp_child_recv(int fd, struct skv_msg_hdr *h, struct skv_msg_error *e)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int r = poll(&pfd, 1, 5000);
	if (r == 0)
		return -ETIMEDOUT;
	if (r < 0)
		return -errno;
	uint8_t buf[4096];
	ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
	if (n < 0)
		return errno == ECONNRESET ? 0 : -errno;
	if (n == 0)
		return 0;
	if ((size_t)n < sizeof(*h))
		return -EPROTO;
	memcpy(h, buf, sizeof(*h));
	size_t body = (size_t)n - sizeof(*h);
	memset(e, 0, sizeof(*e));
	memcpy(e, buf + sizeof(*h), body < sizeof(*e) ? body : sizeof(*e));
	return 1;
}

int mp_read_timed(int fd, void *buf, size_t len, double timeout_s)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	if (poll(&pfd, 1, (int)(timeout_s * 1000)) != 1)
		return 0;
	return read(fd, buf, len) == (ssize_t)len;
}

/* ---- TCP on loopback (the HTTP suites) ---------------------------------------------------- */

uint16_t mp_free_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert(fd >= 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	cr_assert(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0, "bind: %s", strerror(errno));
	socklen_t sl = sizeof(sa);
	cr_assert(getsockname(fd, (struct sockaddr *)&sa, &sl) == 0);
	close(fd);
	return ntohs(sa.sin_port);
}

int mp_tcp_connect(uint16_t port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert(fd >= 0, "socket: %s", strerror(errno));
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

void mp_write_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = write(fd, data, len);
		cr_assert(n > 0, "write: %s", strerror(errno));
		data += n;
		len -= (size_t)n;
	}
}
