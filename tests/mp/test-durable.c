/* Streams that outlive their client (issue 14): resumable streams detach when their client
 * disconnects or dies and continue byte for byte when a client attaches with name and token;
 * every refusal (wrong token, a name in use, a stream attached elsewhere, a closed stream, a
 * detach time-out) is one clear error; `skv --stream NAME` keeps a conversation across runs. */
#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nettle/sha2.h>

#include "channel.h"
#include "kv-layout.h"
#include "mputil.h"
#include "snapshot.h"
#include "skv-error.h"
#include "testutil.h"

#define PROMPT "Once upon a time"

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(durable, .init = suite_init, .fini = suite_fini, .timeout = 240);

static skv_client_stream *open_resumable(skv_client *c, const char *name, int *err_out)
{
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_resumable(o, name), 0);
	skv_client_stream *s = NULL;
	int err = skv_client_stream_open(c, o, &s);
	skv_client_opts_free(o);
	if (err_out) {
		*err_out = err;
		return err < 0 ? NULL : s;
	}
	cr_assert_eq(err, 0, "open %s: %s", name, skv_client_last_error(c));
	return s;
}

/* What an uninterrupted stream produces for the same requests (greedy): a plain stream. */
static char *reference(skv_client *c, const char *const *prompts, const uint64_t *steps,
		       size_t n)
{
	skv_client_stream *s = NULL;
	cr_assert_eq(skv_client_stream_open(c, NULL, &s), 0, "%s", skv_client_last_error(c));
	struct mp_result all = { 0 };
	for (size_t i = 0; i < n; i++) {
		mp_request(s, prompts[i], SKV_CHAN_GENERATE, steps[i]);
		all.finished = 0;
		mp_collect(s, &all, REQUEST_TIMEOUT_S);
	}
	skv_client_stream_close(s);
	return all.text ? all.text : strdup("");
}

/* Attach, giving the daemon a moment to see the previous connection's hang-up (until then
 * the stream is still attached to it: -EBUSY). */
static int attach_retry(skv_client *c, const char *name, const char *token, skv_client_stream **t)
{
	int err = -EBUSY;
	for (int i = 0; i < 200 && err == -EBUSY; i++) {
		err = skv_client_stream_attach(c, name, token, t);
		if (err == -EBUSY)
			mp_sleep_ms(10);
	}
	return err;
}

/* Read s until its request ends, appending TOKEN/ECHO bytes to r. */
static void collect_into(skv_client_stream *s, struct mp_result *r)
{
	r->finished = 0;
	mp_collect(s, r, REQUEST_TIMEOUT_S);
}

Test(durable, detach_on_disconnect_then_attach_continues_byte_for_byte)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-attach", 1, NULL, NULL);
	skv_client *ref = mp_connect(&d);
	char *want = reference(ref, (const char *const[]){ PROMPT, "" },
			       (const uint64_t[]){ 120, 40 }, 2);

	skv_client *c1 = mp_connect(&d);
	skv_client_stream *s = open_resumable(c1, "story-1", NULL);
	struct skv_client_resume res;
	cr_assert_eq(skv_client_stream_resume_info(s, &res), 0);
	cr_assert_str_eq(res.name, "story-1");
	cr_assert_eq(strlen(res.token), 32);
	mp_request(s, PROMPT, SKV_CHAN_GENERATE, 120);
	struct mp_result got = { 0 };
	/* Read a part, then drop the connection in the middle of the request. */
	while (got.tokens < 30) {
		char msg[256];
		cr_assert(mp_step(s, &got, NS_PER_S, msg, sizeof(msg)) >= 0, "%s", msg);
	}
	skv_client_disconnect(c1);

	skv_client *c2 = mp_connect(&d);
	skv_client_stream *t = NULL;
	int err = attach_retry(c2, "story-1", res.token, &t);
	cr_assert_eq(err, 0, "attach: %s", skv_client_last_error(c2));
	cr_assert_eq(skv_client_stream_pending(t), 1, "the request in progress is ours to read");
	collect_into(t, &got);
	cr_assert_eq(got.done_arg, 120);
	mp_request(t, "", SKV_CHAN_GENERATE, 40);
	collect_into(t, &got);
	cr_assert_str_eq(got.text, want, "attached:\n%s\nuninterrupted:\n%s", got.text, want);
	mp_result_free(&got);

	/* Close ends it for good: the token opens nothing any more, the arena is empty. */
	skv_client_stream_close(t);
	err = skv_client_stream_attach(c2, "story-1", res.token, &t);
	cr_assert_eq(err, -ENOENT, "attach after close: %d", err);
	cr_assert(strstr(skv_client_last_error(c2), "no resumable stream"), "%s",
		  skv_client_last_error(c2));
	skv_client_disconnect(c2);
	skv_client_disconnect(ref);
	free(want);
	mp_wait_streams_freed(&d, 10.0);
}

Test(durable, client_killed_mid_generation_and_mid_prompt)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-kill", 1, NULL, NULL);
	skv_client *ref = mp_connect(&d);
	char *want = reference(ref, (const char *const[]){ PROMPT, " The cat" },
			       (const uint64_t[]){ 300, 30 }, 2);
	skv_client_disconnect(ref);

	int pipefd[2];
	cr_assert_eq(pipe(pipefd), 0);
	pid_t pid = mp_fork();
	if (pid == 0) {
		/* The child: open, start 300 tokens, leave a half-sent prompt in the input ring,
		 * hand the token over and wait to be killed. */
		close(pipefd[0]);
		skv_client *c = NULL;
		if (skv_client_connect(d.sock, &c, NULL, 0) < 0)
			_exit(2);
		skv_client_opts *o;
		skv_client_opts_new(&o);
		skv_client_opts_resumable(o, "killed");
		skv_client_stream *s;
		if (skv_client_stream_open(c, o, &s) < 0 ||
		    skv_client_stream_generate(s, PROMPT, strlen(PROMPT), 300, 0) < 0)
			_exit(3);
		struct skv_client_event ev;
		for (int i = 0; i < 20; i++)
			if (skv_client_stream_read(s, &ev, 10000) != 1)
				_exit(4);
		uint64_t inode[4];
		if (mp_chan_inodes(0, inode, 4) != 1)
			_exit(5);
		struct skv_chan ch;
		if (skv_chan_attach(&ch, mp_chan_address(inode[0]), skv_chan_bytes(), 0) < 0)
			_exit(6);
		struct skv_chan_msg half = { .type = SKV_CHAN_TEXT, .n = 9 };
		memcpy(half.data, "GARBAGE! ", 9);
		if (skv_ring_push(&ch.in, &half) < 0)
			_exit(7);
		struct skv_client_resume r;
		skv_client_stream_resume_info(s, &r);
		if (write(pipefd[1], r.token, 32) != 32)
			_exit(8);
		pause();
		_exit(0);
	}
	close(pipefd[1]);
	char token[33] = "";
	cr_assert(mp_read_timed(pipefd[0], token, 32, 30.0), "the child gave no token");
	close(pipefd[0]);
	kill(pid, SIGKILL);
	mp_wait_gone(pid, 10.0, "the client");

	skv_client *c = mp_connect(&d);
	skv_client_stream *t = NULL;
	int err = attach_retry(c, "killed", token, &t);
	cr_assert_eq(err, 0, "attach: %s", skv_client_last_error(c));
	cr_assert_eq(skv_client_stream_pending(t), 1);
	struct mp_result got = { 0 };
	collect_into(t, &got);
	cr_assert_eq(got.done_arg, 300);
	/* The whole of the killed client's request, minus what it read, then ours: the
	 * continuation equals the uninterrupted stream's, and the garbage was dropped. */
	struct mp_result next = { 0 };
	mp_request(t, " The cat", SKV_CHAN_GENERATE, 30);
	collect_into(t, &next);
	const char *tail = strstr(want, " The cat");
	cr_assert(tail, "reference: %s", want);
	while (strstr(tail + 1, " The cat"))
		tail = strstr(tail + 1, " The cat");
	cr_assert_str_eq(next.text, tail, "continuation:\n%s\nuninterrupted:\n%s", next.text,
			 tail);
	size_t got_len = strlen(got.text);
	cr_assert(got_len > 0 && strstr(want, got.text), "the rest of the first answer is not "
		  "the uninterrupted one's:\n%s", got.text);
	mp_result_free(&got);
	mp_result_free(&next);
	skv_client_stream_close(t);
	skv_client_disconnect(c);
	free(want);
	mp_wait_streams_freed(&d, 10.0);
}

Test(durable, refusals_each_say_why)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-refuse", 1, NULL,
			(const char *const[]){ "--detach-timeout", "1", NULL });
	skv_client *c1 = mp_connect(&d);
	skv_client_stream *s = open_resumable(c1, "dup", NULL);
	struct skv_client_resume res;
	cr_assert_eq(skv_client_stream_resume_info(s, &res), 0);

	/* A second stream of the same name. */
	int err;
	cr_assert_null(open_resumable(c1, "dup", &err));
	cr_assert_eq(err, -EEXIST, "%d", err);
	cr_assert(strstr(skv_client_last_error(c1), "already have a stream named dup"), "%s",
		  skv_client_last_error(c1));
	/* Names the library refuses before asking. */
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_resumable(o, "a/b"), -EINVAL);
	cr_assert_eq(skv_client_opts_resumable(o, "0123456789012345678901234567890123456789"
						  "012345678901234567890123"), -EINVAL);
	skv_client_opts_free(o);

	skv_client *c2 = mp_connect(&d);
	skv_client_stream *t = NULL;
	/* Attached elsewhere. */
	err = skv_client_stream_attach(c2, "dup", res.token, &t);
	cr_assert_eq(err, -EBUSY, "%d: %s", err, skv_client_last_error(c2));
	/* A wrong token and an unknown name answer alike. */
	char wrong[33];
	memcpy(wrong, res.token, 33);
	wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
	err = skv_client_stream_attach(c2, "dup", wrong, &t);
	cr_assert_eq(err, -ENOENT, "%d", err);
	char msg_wrong[320];
	snprintf(msg_wrong, sizeof(msg_wrong), "%s", skv_client_last_error(c2));
	err = skv_client_stream_attach(c2, "nobody", res.token, &t);
	cr_assert_eq(err, -ENOENT, "%d", err);
	cr_assert(strstr(msg_wrong, "no resumable stream 'dup' of yours with that token"), "%s",
		  msg_wrong);
	err = skv_client_stream_attach(c2, "dup", "short", &t);
	cr_assert_eq(err, -EINVAL, "%d", err);

	/* Detach explicitly: the other connection may take it; a plain stream cannot detach. */
	cr_assert_eq(skv_client_stream_detach(s), 0, "%s", skv_client_last_error(c1));
	err = skv_client_stream_attach(c2, "dup", res.token, &t);
	cr_assert_eq(err, 0, "%s", skv_client_last_error(c2));
	skv_client_stream *plain = NULL;
	cr_assert_eq(skv_client_stream_open(c1, NULL, &plain), 0);
	cr_assert_eq(skv_client_stream_detach(plain), -EINVAL);

	/* Detached for longer than --detach-timeout: closed, its KV freed. */
	skv_client_disconnect(c2);
	skv_client_disconnect(c1);
	mp_wait_streams_freed(&d, 10.0);
	cr_assert(mp_log_count(&d, "detached for 1 s; closing it") == 1);
	skv_client *c3 = mp_connect(&d);
	err = skv_client_stream_attach(c3, "dup", res.token, &t);
	cr_assert_eq(err, -ENOENT, "%d", err);
	skv_client_disconnect(c3);
}

/* skv --stream NAME: the first run creates the stream and its token file (0600), the next
 * run continues it; the two runs print what one run of both requests prints. */
Test(durable, cli_stream_continues_across_runs)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-cli", 1, NULL, NULL);
	const char *dir = tu_scratch_dir("durable-cli-tokens");
	setenv("SKV_STREAM_DIR", dir, 1);
	char *a = MP_SKV("--socket", d.sock, "generate", "--stream", "tale", "--temp", "0", "-n",
			 "50", PROMPT);
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/tale.token", dir);
	struct stat st;
	cr_assert_eq(stat(path, &st), 0, "no token file %s", path);
	cr_assert_eq(st.st_mode & 0777, 0600);
	char *b = MP_SKV("--socket", d.sock, "generate", "--stream", "tale", "--temp", "0", "-n",
			 "30", "--stream-close", "");
	cr_assert_neq(stat(path, &st), 0, "--stream-close leaves %s", path);
	unsetenv("SKV_STREAM_DIR");

	skv_client *ref = mp_connect(&d);
	char *want = reference(ref, (const char *const[]){ PROMPT, "" },
			       (const uint64_t[]){ 50, 30 }, 2);
	skv_client_disconnect(ref);
	/* skv prints a newline after each run. */
	size_t la = strlen(a), lb = strlen(b);
	cr_assert(la && a[la - 1] == '\n' && lb && b[lb - 1] == '\n');
	a[la - 1] = '\0';
	b[lb - 1] = '\0';
	char both[8192];
	snprintf(both, sizeof(both), "%s%s", a, b);
	cr_assert_str_eq(both, want, "two runs:\n%s\none stream:\n%s", both, want);
	free(a);
	free(b);
	free(want);
	mp_wait_streams_freed(&d, 10.0);
}

/* ==== snapshots (item 3) ===================================================================== */

/* skv-admin with args: its exit status, stdout and stderr (malloc'ed). */
static int admin_run(const struct mp_daemon *d, const char *const *args, char **out, char **err)
{
	const char *argv[16] = { "--socket", d->sock };
	size_t n = 2;
	for (size_t i = 0; args[i] && n < 15; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	int st = mp_run(mp_env_path("SKV_ADMIN_BIN"), argv, out, err);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* Open a resumable greedy stream, run one request, and leave it detached; its token in tok. */
static uint64_t open_run_detach(const struct mp_daemon *d, const char *name, const char *prompt,
				uint64_t steps, struct mp_result *r, char tok[33])
{
	skv_client *c = mp_connect(d);
	skv_client_stream *s = open_resumable(c, name, NULL);
	mp_request(s, prompt, SKV_CHAN_GENERATE, steps);
	mp_collect(s, r, REQUEST_TIMEOUT_S);
	struct skv_client_resume res;
	cr_assert_eq(skv_client_stream_resume_info(s, &res), 0);
	memcpy(tok, res.token, 33);
	cr_assert_eq(skv_client_stream_detach(s), 0, "%s", skv_client_last_error(c));
	skv_client_disconnect(c);
	return res.id;
}

/* Attach (waiting for a restore to finish), run one more request, close. */
static void attach_and_continue(const struct mp_daemon *d, const char *name, const char *tok,
				const char *prompt, uint64_t steps, struct mp_result *r)
{
	skv_client *c = mp_connect(d);
	skv_client_stream *t = NULL;
	int err = -ENOENT;
	for (int i = 0; i < 300 && (err == -ENOENT || err == -EBUSY); i++) {
		err = skv_client_stream_attach(c, name, tok, &t);
		if (err)
			mp_sleep_ms(20);
	}
	cr_assert_eq(err, 0, "attach %s: %s", name, skv_client_last_error(c));
	cr_assert_eq(skv_client_stream_pending(t), 0);
	mp_request(t, prompt, SKV_CHAN_GENERATE, steps);
	r->finished = 0;
	mp_collect(t, r, REQUEST_TIMEOUT_S);
	skv_client_stream_close(t);
	skv_client_disconnect(c);
}

Test(durable, state_dir_restart_continues_byte_for_byte)
{
	struct mp_daemon d;
	const char *dir = tu_scratch_dir("durable-state");
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/state", dir);
	cr_assert_eq(mkdir(state, 0700), 0);
	const char *const flags[] = { "--state-dir", state, NULL };
	mp_daemon_start(&d, "durable-state", 1, NULL, flags);
	struct mp_result got = { 0 };
	char tok[33];
	open_run_detach(&d, "across-restarts", PROMPT, 150, &got, tok);

	/* A clean stop snapshots it; a new daemon restores it; its owner attaches. */
	kill(d.pid, SIGTERM);
	cr_assert(mp_daemon_reap(&d, 30.0), "the daemon did not stop");
	cr_assert(WIFEXITED(d.status) && WEXITSTATUS(d.status) == 0, "status 0x%x", d.status);
	char snap[PATH_MAX + 64];
	snprintf(snap, sizeof(snap), "%s/%u-across-restarts.snap", state, (unsigned)getuid());
	struct stat st;
	cr_assert_eq(stat(snap, &st), 0, "no %s", snap);
	cr_assert_eq(st.st_mode & 0777, 0600);
	mp_daemon_start(&d, "durable-state", 1, NULL, flags);
	attach_and_continue(&d, "across-restarts", tok, "", 60, &got);
	/* Closed for good: its file goes (the daemon unlinks it right after CLOSED). */
	double gone_by = mp_now() + 5.0;
	while (stat(snap, &st) == 0 && mp_now() < gone_by)
		mp_sleep_ms(10);
	cr_assert_neq(stat(snap, &st), 0, "the closed stream's snapshot stays in the directory");

	skv_client *ref = mp_connect(&d);
	char *want = reference(ref, (const char *const[]){ PROMPT, "" },
			       (const uint64_t[]){ 150, 60 }, 2);
	skv_client_disconnect(ref);
	cr_assert_str_eq(got.text, want, "restarted:\n%s\nuninterrupted:\n%s", got.text, want);
	free(want);
	mp_result_free(&got);
	mp_wait_streams_freed(&d, 10.0);
}

/* The sha256 of a snapshot file with its sha256 field zero, written into it (to forge files
 * that pass the checksum and must be refused for what they say). */
static void reseal(uint8_t *file, size_t len)
{
	struct skv_snap_header *h = (struct skv_snap_header *)file;
	memset(h->sha256, 0, sizeof(h->sha256));
	struct sha256_ctx ctx;
	sha256_init(&ctx);
	sha256_update(&ctx, len, file);
	sha256_digest(&ctx, 32, h->sha256);
}

static void expect_refusal(const struct mp_daemon *d, const char *dir, const char *name,
			   const uint8_t *bytes, size_t len, const char *needle)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	cr_assert(f && fwrite(bytes, 1, len, f) == len && fclose(f) == 0);
	char *out = NULL, *err = NULL;
	int st = admin_run(d, (const char *const[]){ "restore", path, NULL }, &out, &err);
	cr_assert_eq(st, 1, "%s: exit %d: %s%s", name, st, out, err);
	cr_assert(strstr(err, needle) && !strchr(strchr(err, '\n') + 1, '\n'),
		  "%s: not one line saying '%s': %s", name, needle, err);
	free(out);
	free(err);
}

Test(durable, admin_snapshot_restore_and_every_refusal)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-snap", 1, NULL, NULL);
	const char *dir = tu_scratch_dir("durable-snap");
	struct mp_result got = { 0 };
	char tok[33], id[32], file[PATH_MAX];
	uint64_t sid = open_run_detach(&d, "snapped", PROMPT, 80, &got, tok);
	snprintf(id, sizeof(id), "%llu", (unsigned long long)sid);
	snprintf(file, sizeof(file), "%s/snapped.snap", dir);
	char *out = NULL, *err = NULL;
	int st = admin_run(&d, (const char *const[]){ "snapshot", id, file, NULL }, &out, &err);
	cr_assert_eq(st, 0, "snapshot: %s%s", out, err);
	cr_assert(strstr(out, "written to"), "%s", out);
	free(out);
	free(err);

	/* The original goes; the snapshot brings it back under the same name and token. */
	skv_client *c = mp_connect(&d);
	skv_client_stream *t = NULL;
	cr_assert_eq(attach_retry(c, "snapped", tok, &t), 0, "%s", skv_client_last_error(c));
	skv_client_stream_close(t);
	skv_client_disconnect(c);
	st = admin_run(&d, (const char *const[]){ "restore", file, NULL }, &out, &err);
	cr_assert_eq(st, 0, "restore: %s%s", out, err);
	cr_assert(strstr(out, "name snapped"), "%s", out);
	free(out);
	free(err);
	attach_and_continue(&d, "snapped", tok, "", 40, &got);
	skv_client *ref = mp_connect(&d);
	char *want = reference(ref, (const char *const[]){ PROMPT, "" },
			       (const uint64_t[]){ 80, 40 }, 2);
	skv_client_disconnect(ref);
	cr_assert_str_eq(got.text, want, "restored:\n%s\nuninterrupted:\n%s", got.text, want);
	free(want);
	mp_result_free(&got);

	/* Refusals, each one line. */
	size_t len = 0;
	uint8_t *bytes = (uint8_t *)tu_read_file(file, &len);
	cr_assert(bytes && len > sizeof(struct skv_snap_header));
	uint8_t *copy = malloc(len);
	cr_assert(copy);
	expect_refusal(&d, dir, "truncated.snap", bytes, len - 100, "truncated snapshot");
	expect_refusal(&d, dir, "short.snap", bytes, 100, "truncated snapshot");
	memcpy(copy, bytes, len);
	copy[len - 7] ^= 0x40;
	expect_refusal(&d, dir, "corrupt.snap", copy, len, "sha256 does not match");
	memcpy(copy, bytes, len);
	((struct skv_snap_header *)copy)->major = SKV_SNAP_MAJOR + 1;
	expect_refusal(&d, dir, "newer.snap", copy, len, "is newer than this daemon's");
	memcpy(copy, bytes, len);
	((struct skv_snap_header *)copy)->model_id[0] ^= 1;
	reseal(copy, len);
	expect_refusal(&d, dir, "model.snap", copy, len, "snapshot of another model");
	memcpy(copy, bytes, len);
	((struct skv_snap_header *)copy)->kv_dtype = 9;
	reseal(copy, len);
	expect_refusal(&d, dir, "kvtype.snap", copy, len, "snapshot of another KV type");
	expect_refusal(&d, dir, "garbage.snap", (const uint8_t *)"hello world, no snapshot", 24,
		       "not a streamkv snapshot");
	free(copy);
	free(bytes);
	/* A snapshot of a stream that does not exist. */
	st = admin_run(&d, (const char *const[]){ "snapshot", "999999", file, NULL }, &out, &err);
	cr_assert_eq(st, 1);
	cr_assert(strstr(err, "no stream 999999"), "%s", err);
	free(out);
	free(err);
	mp_wait_streams_freed(&d, 10.0);
}

/* A recompute stream keeps its window's token ids outside its KV region (the region is
 * scratch it re-runs at every token): its snapshot carries them, and the restored stream
 * continues byte for byte, past a window that has wrapped. */
Test(durable, recompute_stream_snapshot_restore_continues_byte_for_byte)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "durable-recompute", 1, NULL, NULL);
	const char *dir = tu_scratch_dir("durable-recompute");
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_policy_name(o, "recompute"), 0);
	cr_assert_eq(skv_client_opts_window(o, 24), 0);
	/* The uninterrupted stream: 70 tokens (the window of 24 wraps), then 30 more. */
	skv_client *ref = mp_connect(&d);
	skv_client_stream *r = NULL;
	cr_assert_eq(skv_client_stream_open(ref, o, &r), 0, "%s", skv_client_last_error(ref));
	struct mp_result want = { 0 };
	mp_request(r, PROMPT, SKV_CHAN_GENERATE, 70);
	collect_into(r, &want);
	mp_request(r, "", SKV_CHAN_GENERATE, 30);
	collect_into(r, &want);
	skv_client_stream_close(r);
	skv_client_disconnect(ref);

	cr_assert_eq(skv_client_opts_resumable(o, "recomputed"), 0);
	skv_client *c = mp_connect(&d);
	skv_client_stream *s = NULL;
	cr_assert_eq(skv_client_stream_open(c, o, &s), 0, "%s", skv_client_last_error(c));
	skv_client_opts_free(o);
	struct mp_result got = { 0 };
	mp_request(s, PROMPT, SKV_CHAN_GENERATE, 70);
	collect_into(s, &got);
	struct skv_client_resume res;
	cr_assert_eq(skv_client_stream_resume_info(s, &res), 0);
	cr_assert_eq(skv_client_stream_detach(s), 0, "%s", skv_client_last_error(c));
	skv_client_disconnect(c);
	char id[32], file[PATH_MAX];
	snprintf(id, sizeof(id), "%llu", (unsigned long long)res.id);
	snprintf(file, sizeof(file), "%s/recomputed.snap", dir);
	char *out = NULL, *err = NULL;
	int st = admin_run(&d, (const char *const[]){ "snapshot", id, file, NULL }, &out, &err);
	cr_assert_eq(st, 0, "snapshot: %s%s", out, err);
	free(out);
	free(err);
	/* The window's ids are in the file: the restore needs nothing else. */
	size_t len = 0;
	uint8_t *bytes = (uint8_t *)tu_read_file(file, &len);
	cr_assert(bytes && len > SKV_SNAP_ALIGN);
	const struct skv_snap_header *h = (const struct skv_snap_header *)bytes;
	cr_assert_eq(h->params.policy, SKV_CLIENT_RECOMPUTE);
	cr_assert_eq(h->state.tokens_seen, h->tokens_seen);
	cr_assert_gt(h->tokens_seen, 70, "%llu tokens", (unsigned long long)h->tokens_seen);

	c = mp_connect(&d);
	skv_client_stream *t = NULL;
	cr_assert_eq(attach_retry(c, "recomputed", res.token, &t), 0, "%s", skv_client_last_error(c));
	skv_client_stream_close(t);
	skv_client_disconnect(c);
	st = admin_run(&d, (const char *const[]){ "restore", file, NULL }, &out, &err);
	cr_assert_eq(st, 0, "restore: %s%s", out, err);
	free(out);
	free(err);
	/* Restored, it holds what it was: a snapshot of it now is the same region, the same
	 * state (this model continues alike from a short context, so the text alone would not
	 * tell a lost window). */
	char again[PATH_MAX + 8];
	snprintf(again, sizeof(again), "%s.again", file);
	uint64_t restored_id = 0;
	c = mp_connect(&d);
	cr_assert_eq(attach_retry(c, "recomputed", res.token, &t), 0, "%s", skv_client_last_error(c));
	struct skv_client_resume res2;
	cr_assert_eq(skv_client_stream_resume_info(t, &res2), 0);
	restored_id = res2.id;
	cr_assert_eq(skv_client_stream_detach(t), 0);
	skv_client_disconnect(c);
	snprintf(id, sizeof(id), "%llu", (unsigned long long)restored_id);
	st = admin_run(&d, (const char *const[]){ "snapshot", id, again, NULL }, &out, &err);
	cr_assert_eq(st, 0, "snapshot of the restored stream: %s%s", out, err);
	free(out);
	free(err);
	size_t len2 = 0;
	uint8_t *bytes2 = (uint8_t *)tu_read_file(again, &len2);
	cr_assert(bytes2 && len2 == len, "%zu bytes, then %zu", len, len2);
	const struct skv_snap_header *h2 = (const struct skv_snap_header *)bytes2;
	cr_assert_eq(h2->tokens_seen, h->tokens_seen);
	cr_assert(h2->state.rng == h->state.rng && h2->state.prev_token == h->state.prev_token &&
		  h2->state.next_token == h->state.next_token &&
		  h2->state.tokens_seen == h->state.tokens_seen, "engine state differs");
	/* Byte for byte but the ring's seqlock word, which every write of the ring advances. */
	size_t seq_at = SKV_SNAP_ALIGN + SKV_KV_RING_OFFSET + offsetof(struct skv_kv_ring, seq);
	for (size_t k = SKV_SNAP_ALIGN; k < len; k++)
		cr_assert(bytes2[k] == bytes[k] || (k >= seq_at && k < seq_at + sizeof(uint64_t)),
			  "the restored region differs from the snapshot's at byte %zu of %zu",
			  k - SKV_SNAP_ALIGN, len - SKV_SNAP_ALIGN);
	free(bytes2);
	free(bytes);
	attach_and_continue(&d, "recomputed", res.token, "", 30, &got);
	cr_assert_str_eq(got.text, want.text, "restored:\n%s\nuninterrupted:\n%s", got.text,
			 want.text);
	mp_result_free(&got);
	mp_result_free(&want);
	mp_wait_streams_freed(&d, 10.0);
}

/* ==== kill -9 of the daemon (item 4) ========================================================= */

/* Streams under load, periodic snapshots, kill -9 of the daemon, restart: every stream comes
 * back at its last snapshot (never half-written: the file is renamed into place whole) and
 * continues as the uninterrupted stream does from there. */
Test(durable, kill9_of_the_daemon_under_load)
{
	struct mp_daemon d;
	const char *dir = tu_scratch_dir("durable-kill9");
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/state", dir);
	cr_assert_eq(mkdir(state, 0700), 0);
	const char *const flags[] = { "--state-dir", state, "--snapshot-interval", "1", NULL };
	mp_daemon_start(&d, "durable-kill9", 2, NULL, flags);
	enum { N = 3 };
	const char *names[N] = { "load-0", "load-1", "load-2" };
	char tokens[N][33];
	struct mp_result r[N];
	memset(r, 0, sizeof(r));
	skv_client *c = mp_connect(&d);
	skv_client_stream *s[N];
	char msg[256];
	for (int i = 0; i < N; i++) {
		s[i] = open_resumable(c, names[i], NULL);
		struct skv_client_resume res;
		cr_assert_eq(skv_client_stream_resume_info(s[i], &res), 0);
		memcpy(tokens[i], res.token, 33);
		cr_assert_eq(mp_request_endless(s[i], msg, sizeof(msg)), 0, "%s", msg);
	}
	/* Run across at least two checkpoints, then kill the daemon mid-step. */
	double until = mp_now() + 2.5;
	while (mp_now() < until)
		for (int i = 0; i < N; i++)
			cr_assert(mp_pump(s[i], &r[i], msg, sizeof(msg)) >= 0, "%s", msg);
	kill(d.pid, SIGKILL);
	cr_assert(mp_daemon_reap(&d, 10.0));
	skv_client_disconnect(c);

	mp_daemon_start(&d, "durable-kill9", 2, NULL, flags);
	skv_client *ref_c = mp_connect(&d);
	for (int i = 0; i < N; i++) {
		skv_client *a = mp_connect(&d);
		skv_client_stream *t = NULL;
		int err = -ENOENT;
		for (int k = 0; k < 300 && err == -ENOENT; k++)
			if ((err = skv_client_stream_attach(a, names[i], tokens[i], &t)) == -ENOENT)
				mp_sleep_ms(20);
		cr_assert_eq(err, 0, "attach %s: %s", names[i], skv_client_last_error(a));
		struct skv_client_resume res;
		cr_assert_eq(skv_client_stream_resume_info(t, &res), 0);
		/* BOS and the generated tokens fed; the last one sampled is not fed yet. */
		uint64_t kept = res.tokens_seen;
		cr_assert(kept > 1, "%s came back empty", names[i]);
		struct mp_result cont = { 0 };
		/* Past a story's end too, as the uninterrupted stream below goes. */
		cr_assert_eq(skv_client_stream_generate(t, "", 0, 40, SKV_CLIENT_ENDLESS), 0);
		mp_collect(t, &cont, REQUEST_TIMEOUT_S);
		skv_client_stream_close(t);
		skv_client_disconnect(a);
		/* The uninterrupted stream, far enough to hold the continuation. */
		skv_client_stream *ref = NULL;
		cr_assert_eq(skv_client_stream_open(ref_c, NULL, &ref), 0);
		cr_assert_eq(skv_client_stream_generate(ref, "", 0, kept + 60, SKV_CLIENT_ENDLESS), 0);
		struct mp_result want = { 0 };
		mp_collect(ref, &want, REQUEST_TIMEOUT_S);
		skv_client_stream_close(ref);
		cr_assert(cont.len > 20 && strstr(want.text, cont.text),
			  "%s: the continuation from token %llu is not the uninterrupted text:\n%s",
			  names[i], (unsigned long long)kept, cont.text);
		/* Its snapshot is at most what the client had before the kill plus the ring. */
		cr_assert(kept <= r[i].tokens + SKV_CHAN_RING_CAPACITY + 1, "%llu kept of %llu read",
			  (unsigned long long)kept, (unsigned long long)r[i].tokens);
		mp_result_free(&cont);
		mp_result_free(&want);
		mp_result_free(&r[i]);
	}
	skv_client_disconnect(ref_c);
	mp_wait_streams_freed(&d, 10.0);
}

/* ==== kill -9 of an engine ============================================================== */

/* Read a request's token ids until its DONE; no error allowed. */
static size_t read_ids(skv_client_stream *s, int32_t *ids, size_t cap)
{
	size_t n = 0;
	struct skv_client_event ev;
	for (;;) {
		int rc = skv_client_stream_read(s, &ev, 20000);
		cr_assert_eq(rc, 1, "read: %d (%s)", rc, skv_client_last_error(mp_client_of(s)));
		cr_assert_neq(ev.type, SKV_CLIENT_EV_ERROR, "%.*s", (int)ev.len, ev.text);
		if (ev.type == SKV_CLIENT_EV_TOKEN && n < cap)
			ids[n++] = ev.token;
		if (ev.type == SKV_CLIENT_EV_DONE)
			return n;
	}
}

/* Streams under load, periodic snapshots, kill -9 of their one engine: instead of ending with
 * it, each resumable stream is restored from its last snapshot onto the restarted engine; its
 * client is told so, with the token it was restored at (-SKV_ERESTORED), attaches again and
 * continues exactly as the uninterrupted stream does from that token. */
Test(durable, kill9_of_an_engine_restores_its_streams_from_their_snapshots)
{
	struct mp_daemon d;
	const char *dir = tu_scratch_dir("durable-engine9");
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/state", dir);
	cr_assert_eq(mkdir(state, 0700), 0);
	const char *const flags[] = { "--state-dir", state, "--snapshot-interval", "1", NULL };
	mp_daemon_start(&d, "durable-engine9", 1, NULL, flags);
	enum { N = 2, CONT = 40 };
	const char *names[N] = { "engine9-0", "engine9-1" };
	char tokens[N][33];
	uint64_t read_before[N] = { 0 };
	skv_client *c[N];
	skv_client_stream *s[N];
	char msg[256];
	for (int i = 0; i < N; i++) {
		c[i] = mp_connect(&d);
		s[i] = open_resumable(c[i], names[i], NULL);
		struct skv_client_resume res;
		cr_assert_eq(skv_client_stream_resume_info(s[i], &res), 0);
		memcpy(tokens[i], res.token, 33);
		cr_assert_eq(mp_request_endless(s[i], msg, sizeof(msg)), 0, "%s", msg);
	}
	struct mp_result r[N];
	memset(r, 0, sizeof(r));
	double until = mp_now() + 2.5;
	while (mp_now() < until)
		for (int i = 0; i < N; i++)
			cr_assert(mp_pump(s[i], &r[i], msg, sizeof(msg)) >= 0, "%s", msg);
	struct skv_msg_stats stats;
	mp_stats(&d, &stats);
	pid_t victim = stats.engine_pid[0];
	cr_assert_gt(victim, 0);
	kill(victim, SIGKILL);
	mp_wait_gone(victim, 10.0, "the engine");

	uint64_t at[N];
	for (int i = 0; i < N; i++) {
		/* What is left in the ring, then the error that says where the stream is now. */
		int rc = 0;
		double by = mp_now() + 30.0;
		while (rc >= 0) {
			cr_assert(mp_now() < by, "%s: no error after its engine died", names[i]);
			rc = mp_step(s[i], &r[i], NS_PER_S / 10, msg, sizeof(msg));
			cr_assert(!r[i].error, "%s: %s", names[i], r[i].error_text);
		}
		const char *why = skv_client_last_error(c[i]);
		cr_assert_eq(rc, -SKV_ERESTORED, "%s: %d (%s)", names[i], rc, why);
		const char *tok = strstr(why, "at token ");
		cr_assert(tok && strstr(why, "attach"), "%s: %s", names[i], why);
		at[i] = strtoull(tok + strlen("at token "), NULL, 10);
		read_before[i] = r[i].tokens;
		cr_assert(at[i] > 1 && at[i] <= read_before[i] + SKV_CHAN_RING_CAPACITY + 1,
			  "%s: restored at %llu, %llu read", names[i], (unsigned long long)at[i],
			  (unsigned long long)read_before[i]);
		skv_client_stream_close(s[i]);
		skv_client_disconnect(c[i]);
		mp_result_free(&r[i]);
	}
	cr_assert_eq(mp_log_count(&d, "restored from its snapshot as stream"), N);
	skv_client *ref_c = mp_connect(&d);
	for (int i = 0; i < N; i++) {
		skv_client *a = mp_connect(&d);
		skv_client_stream *t = NULL;
		cr_assert_eq(attach_retry(a, names[i], tokens[i], &t), 0, "attach %s: %s", names[i],
			     skv_client_last_error(a));
		struct skv_client_resume res;
		cr_assert_eq(skv_client_stream_resume_info(t, &res), 0);
		cr_assert_eq(res.tokens_seen, at[i], "%s", names[i]);
		cr_assert_eq(skv_client_stream_pending(t), 0);
		int32_t cont[CONT];
		cr_assert_eq(skv_client_stream_generate(t, "", 0, CONT, SKV_CLIENT_ENDLESS), 0);
		cr_assert_eq(read_ids(t, cont, CONT), CONT);
		skv_client_stream_close(t);
		skv_client_disconnect(a);
		/* The uninterrupted stream: BOS, then generated token k at index k; restored at
		 * at[i] tokens seen, the continuation starts with generated token at[i]. */
		skv_client_stream *ref = NULL;
		cr_assert_eq(skv_client_stream_open(ref_c, NULL, &ref), 0);
		size_t need = (size_t)at[i] + CONT;
		int32_t *want = malloc(need * sizeof(*want));
		cr_assert(want);
		cr_assert_eq(skv_client_stream_generate(ref, "", 0, need, SKV_CLIENT_ENDLESS), 0);
		cr_assert_eq(read_ids(ref, want, need), need);
		skv_client_stream_close(ref);
		for (int k = 0; k < CONT; k++)
			cr_assert_eq(cont[k], want[at[i] + (uint64_t)k],
				     "%s: token %llu after the restore is %d, uninterrupted %d",
				     names[i], (unsigned long long)(at[i] + (uint64_t)k), cont[k],
				     want[at[i] + (uint64_t)k]);
		free(want);
	}
	skv_client_disconnect(ref_c);
	mp_wait_streams_freed(&d, 10.0);
	/* Closed for good: their files go too. */
	double gone_by = mp_now() + 5.0;
	char snap[PATH_MAX + 64];
	struct stat st;
	for (int i = 0; i < N; i++) {
		snprintf(snap, sizeof(snap), "%s/%u-%s.snap", state, (unsigned)getuid(), names[i]);
		while (stat(snap, &st) == 0 && mp_now() < gone_by)
			mp_sleep_ms(10);
		cr_assert_neq(stat(snap, &st), 0, "%s stays", snap);
	}
}
