/* Who may see what (issue 14), with real uids and groups: the daemon runs as an unprivileged
 * uid with --group and --admin-group; forked children drop to a member of the group, a member
 * of the admin group and an outsider, and try every role. A group member is a client and sees
 * only its own streams; it may not be an engine (the arena fd would give it every stream's KV),
 * read another user's stream, attach to it even with its token, or close it; an admin-group
 * member reads contents; an outsider is refused. Needs root (to drop privileges) and
 * groupadd: otherwise a skip that says so. */
#include <criterion/criterion.h>
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "channel.h"
#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"

/* Unused ids: no passwd entries, so group membership is the primary gid SO_PEERCRED shows. */
#define DAEMON_UID 61401u
#define MEMBER_UID 61402u
#define ADMIN_UID 61403u
#define OUTSIDER_UID 61404u
#define OTHER_UID 61405u
#define USERS_GID 61410u
#define ADMINS_GID 61411u
#define NOBODY_GID 61412u
#define USERS_GROUP "skvtest-users"
#define ADMINS_GROUP "skvtest-admins"

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_daemon_uid = 0;
	mp_daemon_gid = 0;
	mp_suite_fini();
}

TestSuite(perms, .init = suite_init, .fini = suite_fini, .timeout = 240);

/* The group of that name with that gid, made with groupadd when missing: 1, or 0 (skip). */
static int ensure_group(const char *name, gid_t gid, char *why, size_t why_len)
{
	struct group *g = getgrnam(name);
	if (g) {
		if (g->gr_gid == gid)
			return 1;
		snprintf(why, why_len, "group %s exists with gid %u, not %u", name,
			 (unsigned)g->gr_gid, (unsigned)gid);
		return 0;
	}
	char gid_text[16];
	snprintf(gid_text, sizeof(gid_text), "%u", (unsigned)gid);
	char *out = NULL, *err = NULL;
	int st = mp_run("/usr/sbin/groupadd", (const char *const[]){ "-g", gid_text, name, NULL },
			&out, &err);
	int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
	if (!ok)
		snprintf(why, why_len, "groupadd %s failed: %s", name, err ? err : "");
	free(out);
	free(err);
	return ok && getgrnam(name);
}

static void start_daemon(struct mp_daemon *d, const char *test)
{
	char why[256] = "";
	if (geteuid() != 0)
		MP_SKIP("needs root to run the daemon and its peers under other uids");
	if (access("/usr/sbin/groupadd", X_OK) < 0)
		MP_SKIP("needs groupadd (passwd) to make the test groups");
	if (!ensure_group(USERS_GROUP, USERS_GID, why, sizeof(why)) ||
	    !ensure_group(ADMINS_GROUP, ADMINS_GID, why, sizeof(why)))
		MP_SKIP("%s", why);
	const char *dir = tu_scratch_dir(test);
	cr_assert_eq(chown(dir, DAEMON_UID, DAEMON_UID), 0, "chown %s: %s", dir, strerror(errno));
	mp_daemon_uid = DAEMON_UID;
	mp_daemon_gid = USERS_GID; /* chown of the socket to --group needs it */
	mp_daemon_start(d, test, 1, NULL,
			(const char *const[]){ "--group", USERS_GROUP, "--admin-group", ADMINS_GROUP,
					       NULL });
	mp_daemon_uid = 0;
	/* The scratch directory is the daemon's: let the group reach the socket inside. */
	cr_assert_eq(chmod(dir, 0755), 0);
}

/* ---- children: each runs one scenario as (uid, gid) and exits 0, or 1 with a line on the
 * pipe saying what went wrong. */

static int child_pipe = -1;

static int child_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int child_fail(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n > 0 && write(child_pipe, line, strlen(line)) < 0)
		_exit(3);
	_exit(1);
}

#define CHILD_CHECK(cond, ...)                        \
	do {                                          \
		if (!(cond))                          \
			child_fail(__VA_ARGS__);      \
	} while (0)

typedef void (*child_fn)(const struct mp_daemon *d, const void *arg);

/* As uid with primary gid (what SO_PEERCRED shows the daemon) and, if extra_gid, that
 * supplementary group (what the file system checks on the socket). */
static void run_as(uid_t uid, gid_t gid, gid_t extra_gid, child_fn fn, const struct mp_daemon *d,
		   const void *arg, const char *what)
{
	int p[2];
	cr_assert_eq(pipe(p), 0);
	pid_t pid = mp_fork();
	if (pid == 0) {
		close(p[0]);
		child_pipe = p[1];
		if (setgroups(extra_gid ? 1 : 0, &extra_gid) < 0 || setresgid(gid, gid, gid) < 0 ||
		    setresuid(uid, uid, uid) < 0)
			child_fail("cannot become uid %u gid %u: %s", uid, gid, strerror(errno));
		fn(d, arg);
		_exit(0);
	}
	close(p[1]);
	int status = mp_wait_gone(pid, 60.0, what);
	char line[513] = "";
	ssize_t n = read(p[0], line, sizeof(line) - 1);
	close(p[0]);
	if (n > 0)
		line[n] = '\0';
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s (uid %u): %s (status 0x%x)",
		  what, uid, line, status);
}

/* A HELLO of role on a raw connection: the first answer's type, code and text. */
static int raw_hello(const char *sock, uint32_t role, struct skv_msg_error *e, int *n_fds)
{
	int fd = mp_raw_connect(sock);
	if (fd < 0)
		return fd;
	struct skv_msg_hello h = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				   .role = role, .pid = (uint32_t)getpid(),
				   .engine_id = UINT32_MAX, .node = UINT32_MAX };
	uint8_t buf[256];
	size_t len = mp_raw_build(buf, SKV_MSG_HELLO, &h, sizeof(h));
	mp_raw_send(fd, buf, len, NULL, 0);
	struct skv_msg_hdr hdr;
	union {
		struct skv_msg_error error;
		uint8_t raw[2048];
	} body;
	memset(&body, 0, sizeof(body));
	int got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), n_fds);
	/* A peer refused at accept is answered and hung up on before its HELLO arrives: the
	 * read may see the reset first, with the ERROR still queued behind it. */
	if (got == 0)
		got = mp_raw_recv(fd, 1000, &hdr, &body, sizeof(body), n_fds);
	if (got == 1 && hdr.type == SKV_MSG_ERROR)
		*e = body.error;
	close(fd);
	return got == 1 ? hdr.type : got;
}

/* What a stream of another uid looks like to the children. */
struct victim {
	uint64_t id;
	char name[64];
	char token[33];
};

static void member_tries_every_role(const struct mp_daemon *d, const void *arg)
{
	const struct victim *v = arg;
	struct skv_msg_error e = { 0 };
	int n_fds = -1;
	/* Engine: refused, and no fd (the arena) came with the refusal. */
	int type = raw_hello(d->sock, SKV_ROLE_ENGINE, &e, &n_fds);
	CHILD_CHECK(type == SKV_MSG_ERROR && e.code == -EACCES && n_fds == 0 &&
			    strstr(e.text, "may serve as an engine"),
		    "engine HELLO: type %d code %d fds %d: %s", type, e.code, n_fds, e.text);

	/* Client: works, on its own streams. */
	skv_client *c = NULL;
	char msg[256] = "";
	CHILD_CHECK(skv_client_connect(d->sock, &c, msg, sizeof(msg)) == 0, "connect: %s", msg);
	skv_client_opts *o;
	skv_client_opts_new(&o);
	skv_client_opts_resumable(o, v->name); /* the same name: names are per uid */
	skv_client_stream *s = NULL;
	CHILD_CHECK(skv_client_stream_open(c, o, &s) == 0, "open: %s", skv_client_last_error(c));
	skv_client_opts_free(o);
	CHILD_CHECK(skv_client_stream_generate(s, "Once", 4, 10, 0) == 0, "generate");
	struct skv_client_event ev;
	do {
		CHILD_CHECK(skv_client_stream_read(s, &ev, 30000) == 1, "read: %s",
			    skv_client_last_error(c));
	} while (ev.type != SKV_CLIENT_EV_DONE);
	/* None of the fds this process holds is a KV arena. */
	char link[PATH_MAX], path[64];
	for (int fd = 0; fd < 1024; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t n = readlink(path, link, sizeof(link) - 1);
		if (n <= 0)
			continue;
		link[n] = '\0';
		CHILD_CHECK(!strstr(link, "skv-arena"), "a client holds fd %d: %s", fd, link);
	}
	/* Another uid's stream, even with its token: not found, exactly as a wrong name. */
	skv_client_stream *t = NULL;
	int err = skv_client_stream_attach(c, v->name, v->token, &t);
	CHILD_CHECK(err < 0 && t == NULL, "attached to uid %u's stream", OTHER_UID);
	skv_client_stream_close(s);
	skv_client_disconnect(c);

	/* CLOSE of another uid's stream id: refused. */
	int fd = mp_raw_connect(d->sock);
	CHILD_CHECK(fd >= 0, "connect");
	struct skv_msg_hello h = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				   .role = SKV_ROLE_CLIENT, .engine_id = UINT32_MAX,
				   .node = UINT32_MAX };
	uint8_t buf[256];
	size_t len = mp_raw_build(buf, SKV_MSG_HELLO, &h, sizeof(h));
	mp_raw_send(fd, buf, len, NULL, 0);
	struct skv_msg_hdr hdr;
	union {
		struct skv_msg_error error;
		struct skv_admin_stream row;
		uint8_t raw[2048];
	} body;
	int got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_HELLO_OK, "client HELLO");
	struct skv_msg_stream m = { .stream_id = v->id };
	len = mp_raw_build(buf, SKV_MSG_CLOSE, &m, sizeof(m));
	mp_raw_send(fd, buf, len, NULL, 0);
	got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_ERROR && body.error.code == -ENOENT,
		    "CLOSE of another's stream: type %u", hdr.type);
	close(fd);

	/* Admin: it lists only its own streams, and another's contents are not there. */
	fd = mp_raw_connect(d->sock);
	h.role = SKV_ROLE_ADMIN;
	len = mp_raw_build(buf, SKV_MSG_HELLO, &h, sizeof(h));
	mp_raw_send(fd, buf, len, NULL, 0);
	got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_HELLO_OK, "admin HELLO");
	struct skv_msg_admin_req req = { .what = SKV_ADMIN_STREAMS };
	len = mp_raw_build(buf, SKV_MSG_ADMIN_REQ, &req, sizeof(req));
	mp_raw_send(fd, buf, len, NULL, 0);
	for (;;) {
		got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
		CHILD_CHECK(got == 1, "listing");
		if (hdr.type == SKV_MSG_ADMIN_END)
			break;
		CHILD_CHECK(hdr.type == SKV_MSG_ADMIN_STREAM && body.row.id != v->id,
			    "the listing shows stream %llu of uid %u",
			    (unsigned long long)body.row.id, OTHER_UID);
	}
	req = (struct skv_msg_admin_req){ .what = SKV_ADMIN_STREAM, .stream_id = v->id };
	len = mp_raw_build(buf, SKV_MSG_ADMIN_REQ, &req, sizeof(req));
	mp_raw_send(fd, buf, len, NULL, 0);
	got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_ERROR && body.error.code == -ENOENT,
		    "ADMIN_STREAM of another's stream: type %u", hdr.type);
	close(fd);
}

static void admin_member_reads_contents(const struct mp_daemon *d, const void *arg)
{
	const struct victim *v = arg;
	int fd = mp_raw_connect(d->sock);
	CHILD_CHECK(fd >= 0, "connect");
	struct skv_msg_hello h = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				   .role = SKV_ROLE_ADMIN, .engine_id = UINT32_MAX,
				   .node = UINT32_MAX };
	uint8_t buf[256];
	size_t len = mp_raw_build(buf, SKV_MSG_HELLO, &h, sizeof(h));
	mp_raw_send(fd, buf, len, NULL, 0);
	struct skv_msg_hdr hdr;
	union {
		struct skv_admin_stream row;
		struct skv_admin_tokens tokens;
		uint8_t raw[2048];
	} body;
	int got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_HELLO_OK, "admin HELLO");
	struct skv_msg_admin_req req = { .what = SKV_ADMIN_STREAM, .stream_id = v->id };
	len = mp_raw_build(buf, SKV_MSG_ADMIN_REQ, &req, sizeof(req));
	mp_raw_send(fd, buf, len, NULL, 0);
	got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
	CHILD_CHECK(got == 1 && hdr.type == SKV_MSG_ADMIN_STREAM && body.row.id == v->id,
		    "ADMIN_STREAM: type %u", hdr.type);
	uint32_t ids = 0;
	for (;;) {
		got = mp_raw_recv(fd, 5000, &hdr, &body, sizeof(body), NULL);
		CHILD_CHECK(got == 1, "tokens");
		if (hdr.type == SKV_MSG_ADMIN_END)
			break;
		CHILD_CHECK(hdr.type == SKV_MSG_ADMIN_TOKENS, "type %u", hdr.type);
		ids += body.tokens.n;
	}
	CHILD_CHECK(ids > 10, "only %u token ids", ids);
	/* Still no engine. */
	struct skv_msg_error e = { 0 };
	int n_fds = -1;
	int type = raw_hello(d->sock, SKV_ROLE_ENGINE, &e, &n_fds);
	CHILD_CHECK(type == SKV_MSG_ERROR && e.code == -EACCES && n_fds == 0, "engine HELLO");
	close(fd);
}

static void outsider_is_refused(const struct mp_daemon *d, const void *arg)
{
	(void)arg;
	struct skv_msg_error e = { 0 };
	int n_fds = -1;
	for (uint32_t role = SKV_ROLE_CLIENT; role <= SKV_ROLE_ADMIN; role++) {
		int type = raw_hello(d->sock, role, &e, &n_fds);
		CHILD_CHECK(type == SKV_MSG_ERROR && e.code == -EACCES && n_fds == 0 &&
				    strstr(e.text, "may not use this daemon"),
			    "role %u: type %d code %d: %s", role, type, e.code, e.text);
	}
}

/* A victim stream, opened as OTHER_UID (a group member too), kept attached by a child. */
static pid_t open_victim(const struct mp_daemon *d, struct victim *v)
{
	int p[2];
	cr_assert_eq(pipe(p), 0);
	pid_t pid = mp_fork();
	if (pid == 0) {
		close(p[0]);
		if (setgroups(0, NULL) < 0 || setresgid(USERS_GID, USERS_GID, USERS_GID) < 0 ||
		    setresuid(OTHER_UID, OTHER_UID, OTHER_UID) < 0)
			_exit(2);
		skv_client *c = NULL;
		if (skv_client_connect(d->sock, &c, NULL, 0) < 0)
			_exit(3);
		skv_client_opts *o;
		skv_client_opts_new(&o);
		skv_client_opts_resumable(o, "secret-diary");
		skv_client_stream *s;
		if (skv_client_stream_open(c, o, &s) < 0 ||
		    skv_client_stream_generate(s, "Once upon a time", 16, 20, 0) < 0)
			_exit(4);
		struct skv_client_event ev;
		do {
			if (skv_client_stream_read(s, &ev, 30000) != 1)
				_exit(5);
		} while (ev.type != SKV_CLIENT_EV_DONE);
		struct skv_client_resume r;
		skv_client_stream_resume_info(s, &r);
		struct victim out = { .id = r.id };
		snprintf(out.name, sizeof(out.name), "%s", r.name);
		memcpy(out.token, r.token, 33);
		/* Detach it, so that only name and token stand between it and an attacker. */
		if (skv_client_stream_detach(s) < 0 || write(p[1], &out, sizeof(out)) != sizeof(out))
			_exit(6);
		pause();
		_exit(0);
	}
	close(p[1]);
	cr_assert(mp_read_timed(p[0], v, sizeof(*v), 30.0), "the victim's child said nothing");
	close(p[0]);
	return pid;
}

Test(perms, group_member_tries_each_forbidden_role)
{
	struct mp_daemon d;
	start_daemon(&d, "perms-roles");
	struct victim v;
	pid_t holder = open_victim(&d, &v);
	run_as(MEMBER_UID, USERS_GID, 0, member_tries_every_role, &d, &v, "the group member");
	/* An admin-group member must reach the socket (mode 0660, --group): here through a
	 * supplementary membership of --group. */
	run_as(ADMIN_UID, ADMINS_GID, USERS_GID, admin_member_reads_contents, &d, &v,
	       "the admin member");
	/* The outsider reaches the socket the same way, and the daemon still refuses it. */
	run_as(OUTSIDER_UID, NOBODY_GID, USERS_GID, outsider_is_refused, &d, NULL, "the outsider");
	cr_assert(mp_log_count(&d, "refused an engine of uid 61402") == 1);
	cr_assert(mp_log_count(&d, "refused ATTACH to 'secret-diary' by uid 61402") == 1);
	/* The owner's stream is untouched: root (the test) attaches with the token. */
	skv_client *c = mp_connect(&d);
	skv_client_stream *t = NULL;
	cr_assert_eq(skv_client_stream_attach(c, v.name, v.token, &t), 0, "%s",
		     skv_client_last_error(c));
	skv_client_stream_close(t);
	skv_client_disconnect(c);
	kill(holder, SIGKILL);
	mp_wait_gone(holder, 10.0, "the victim's holder");
	mp_wait_streams_freed(&d, 10.0);
}

Test(perms, daemon_uid_keeps_its_engines)
{
	/* Under another uid than root, the daemon's own engines (its uid) still serve. */
	struct mp_daemon d;
	start_daemon(&d, "perms-own");
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.engines_ready, 1, "the daemon's own engine (uid %u) is ready", DAEMON_UID);
}
