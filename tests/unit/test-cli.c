/* CLI tests: the real `skv` binary ($SKV_BIN), spawned without a shell, its stdout, stderr and
 * exit status captured. Local mode only: generate against llama2.c's greedy output on every
 * model source, flag placement, seeds, prompts, tokenize, ppl under every policy, chat (turn
 * sources, templates, eviction modes, token accounting), and the
 * contract for mistakes: exit 2 for usage, 1 for the rest, exactly one "skv: " line on stderr
 * naming the fault, nothing on stdout. */
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define CLI_EXIT_RUNTIME 1
#define CLI_EXIT_USAGE 2
#define CLI_MAX_ARGS 32
#define CLI_READ_CHUNK 4096
#define CLI_GREEDY_STEPS "200"

/* One finished run of skv. out and err are NUL-terminated. */
struct cli_run {
	int exit_code;  /* the exit status; the test fails if skv died of a signal */
	char *out;
	size_t out_len;
	char *err;
	size_t err_len;
};

struct cli_buf {
	char *data;
	size_t len;
	size_t cap;
};

static void suite_fini(void)
{
	tu_scratch_cleanup();
}

TestSuite(cli, .fini = suite_fini);

static const char *cli_bin(void)
{
	const char *bin = getenv("SKV_BIN");
	cr_assert(bin != NULL && *bin, "SKV_BIN is not set: run the tests through `meson test`");
	return bin;
}

/* Room for CLI_READ_CHUNK more bytes and the NUL; also gives an empty stream its buffer, so
 * callers can always use strcmp and strstr. */
static void cli_buf_reserve(struct cli_buf *b)
{
	if (b->cap - b->len >= CLI_READ_CHUNK + 1)
		return;
	b->cap = b->cap ? b->cap * 2 : 2 * CLI_READ_CHUNK;
	b->data = realloc(b->data, b->cap);
	cr_assert(b->data != NULL);
	b->data[b->len] = '\0';
}

/* Append whatever one read() returns; false at end of file. */
static bool cli_buf_read(struct cli_buf *b, int fd)
{
	cli_buf_reserve(b);
	ssize_t n;
	do
		n = read(fd, b->data + b->len, CLI_READ_CHUNK);
	while (n < 0 && errno == EINTR);
	cr_assert(n >= 0, "read from skv's pipe: %s", strerror(errno));
	b->len += (size_t)n;
	b->data[b->len] = '\0';
	return n > 0;
}

/* Run skv with args (NULL-terminated, without argv[0]). stdin is stdin_path, or /dev/null when
 * it is NULL; stdout goes to a pipe, or to stdout_path when it is not NULL. Both pipes are
 * drained together, so a chatty stderr cannot block the child while we wait on stdout. */
static void cli_spawn_in(struct cli_run *r, const char *stdin_path, const char *stdout_path,
			 const char *const *args)
{
	const char *argv[CLI_MAX_ARGS + 2];
	size_t argc = 0;
	argv[argc++] = cli_bin();
	for (; args[argc - 1]; argc++) {
		cr_assert(argc <= CLI_MAX_ARGS, "too many arguments for cli_spawn");
		argv[argc] = args[argc - 1];
	}
	argv[argc] = NULL;

	int out_pipe[2] = { -1, -1 }, err_pipe[2];
	if (!stdout_path)
		cr_assert(pipe2(out_pipe, O_CLOEXEC) == 0);
	cr_assert(pipe2(err_pipe, O_CLOEXEC) == 0);

	posix_spawn_file_actions_t fa;
	cr_assert(posix_spawn_file_actions_init(&fa) == 0);
	cr_assert(posix_spawn_file_actions_addopen(&fa, STDIN_FILENO,
						   stdin_path ? stdin_path : "/dev/null", O_RDONLY,
						   0) == 0);
	if (stdout_path)
		cr_assert(posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, stdout_path,
							   O_WRONLY, 0) == 0);
	else
		cr_assert(posix_spawn_file_actions_adddup2(&fa, out_pipe[1], STDOUT_FILENO) == 0);
	cr_assert(posix_spawn_file_actions_adddup2(&fa, err_pipe[1], STDERR_FILENO) == 0);

	pid_t pid;
	int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
	cr_assert(rc == 0, "posix_spawn %s: %s", argv[0], strerror(rc));
	posix_spawn_file_actions_destroy(&fa);
	if (!stdout_path)
		close(out_pipe[1]);
	close(err_pipe[1]);

	struct cli_buf out = { 0 }, err = { 0 };
	struct pollfd fds[2] = {
		{ .fd = stdout_path ? -1 : out_pipe[0], .events = POLLIN },
		{ .fd = err_pipe[0], .events = POLLIN },
	};
	while (fds[0].fd >= 0 || fds[1].fd >= 0) {
		int ready = poll(fds, 2, -1);
		if (ready < 0 && errno == EINTR)
			continue;
		cr_assert(ready > 0, "poll: %s", strerror(errno));
		if (fds[0].revents && !cli_buf_read(&out, fds[0].fd)) {
			close(fds[0].fd);
			fds[0].fd = -1;
		}
		if (fds[1].revents && !cli_buf_read(&err, fds[1].fd)) {
			close(fds[1].fd);
			fds[1].fd = -1;
		}
	}

	int status;
	while (waitpid(pid, &status, 0) < 0)
		cr_assert(errno == EINTR, "waitpid: %s", strerror(errno));
	cli_buf_reserve(&err);
	cr_assert(WIFEXITED(status), "skv died of signal %d; stderr: %s",
		  WIFSIGNALED(status) ? WTERMSIG(status) : 0, err.data);

	cli_buf_reserve(&out);
	cli_buf_reserve(&err);
	r->exit_code = WEXITSTATUS(status);
	r->out = out.data;
	r->out_len = out.len;
	r->err = err.data;
	r->err_len = err.len;
}

static void cli_spawn(struct cli_run *r, const char *stdout_path, const char *const *args)
{
	cli_spawn_in(r, NULL, stdout_path, args);
}

#define CLI_RUN(r, ...) cli_spawn((r), NULL, (const char *const[]){ __VA_ARGS__, NULL })
/* The same with stdin read from a file. */
#define CLI_RUN_STDIN(r, path, ...) \
	cli_spawn_in((r), (path), NULL, (const char *const[]){ __VA_ARGS__, NULL })

static void cli_run_free(struct cli_run *r)
{
	free(r->out);
	free(r->err);
	memset(r, 0, sizeof(*r));
}

static void cli_expect_success(const struct cli_run *r)
{
	cr_assert_eq(r->exit_code, 0, "skv exited %d; stderr: %s", r->exit_code, r->err);
	cr_assert_eq(strlen(r->out), r->out_len, "stdout holds a NUL byte");
}

/* The error contract: the exit code, nothing on stdout, and exactly one line on stderr that
 * starts with "skv: " and contains every needle (up to two; NULL for fewer). */
static void cli_expect_error(const struct cli_run *r, int exit_code, const char *needle,
			     const char *needle2)
{
	cr_assert_eq(r->exit_code, exit_code, "skv exited %d, expected %d; stderr: %s",
		     r->exit_code, exit_code, r->err);
	cr_assert_eq(r->out_len, 0, "an error printed %zu bytes on stdout: %s", r->out_len,
		     r->out);
	cr_assert(r->err_len > 0 && r->err[r->err_len - 1] == '\n',
		  "stderr is not one terminated line: '%s'", r->err);
	cr_assert_eq(strchr(r->err, '\n'), r->err + r->err_len - 1,
		     "stderr holds more than one line: '%s'", r->err);
	cr_assert_eq(strncmp(r->err, "skv: ", 5), 0, "stderr does not start with 'skv: ': %s",
		     r->err);
	cr_assert(strstr(r->err, needle) != NULL, "the message does not name '%s': %s", needle,
		  r->err);
	if (needle2)
		cr_assert(strstr(r->err, needle2) != NULL, "the message does not name '%s': %s",
			  needle2, r->err);
}

static char *cli_greedy_reference(void)
{
	size_t len;
	char *text = tu_read_file(tu_data_path("llama2c-greedy-200.txt"), &len);
	text = realloc(text, len + 2);
	cr_assert(text != NULL);
	memcpy(text + len, "\n", 2);
	return text;
}

/* The text of "key": VALUE in skv's one-line JSON, VALUE copied into value (without quotes for
 * strings). The key must appear exactly once. */
static void cli_json_field(const char *json, const char *key, char *value, size_t value_len)
{
	char pattern[64];
	snprintf(pattern, sizeof(pattern), "\"%s\": ", key);
	const char *at = strstr(json, pattern);
	cr_assert(at != NULL, "JSON has no key %s: %s", key, json);
	cr_assert(strstr(at + 1, pattern) == NULL, "JSON has key %s twice: %s", key, json);
	at += strlen(pattern);
	size_t n;
	if (*at == '"') {
		at++;
		n = strcspn(at, "\"");
		cr_assert(at[n] == '"', "unterminated string for %s: %s", key, json);
	} else {
		n = strcspn(at, ",}");
	}
	cr_assert(n > 0 && n < value_len, "bad value for %s: %s", key, json);
	memcpy(value, at, n);
	value[n] = '\0';
}

static long long cli_json_int(const char *json, const char *key)
{
	char text[64], *end;
	cli_json_field(json, key, text, sizeof(text));
	errno = 0;
	long long v = strtoll(text, &end, 10);
	cr_assert(!errno && end != text && !*end, "%s = '%s' is not an integer", key, text);
	return v;
}

struct cli_ppl {
	char ppl_text[64];  /* exactly as printed */
	double ppl;
	long long tokens;
	char policy[32];
	long long sink;
	long long window;
};

/* Run skv ppl --json over tokenizer-sample.txt with extra flags (NULL-terminated) and parse
 * its one JSON object. */
static void cli_ppl_json(struct cli_ppl *p, const char *const *flags)
{
	const char *args[CLI_MAX_ARGS + 1];
	size_t n = 0;
	args[n++] = "ppl";
	args[n++] = "--json";
	for (; *flags; flags++) {
		cr_assert(n < CLI_MAX_ARGS - 1);
		args[n++] = *flags;
	}
	args[n++] = tu_data_path("tokenizer-sample.txt");
	args[n] = NULL;

	struct cli_run r;
	cli_spawn(&r, NULL, args);
	cli_expect_success(&r);
	cr_assert(r.out_len > 2 && r.out[0] == '{' && !strcmp(r.out + r.out_len - 2, "}\n"),
		  "not one JSON object on one line: %s", r.out);
	cr_assert_eq(strchr(r.out, '\n'), r.out + r.out_len - 1, "more than one line: %s", r.out);

	char *end;
	cli_json_field(r.out, "ppl", p->ppl_text, sizeof(p->ppl_text));
	p->ppl = strtod(p->ppl_text, &end);
	cr_assert(end != p->ppl_text && !*end, "ppl '%s' is not a number", p->ppl_text);
	cr_assert(isfinite(p->ppl) && p->ppl > 1.0, "ppl %s is not a finite number > 1",
		  p->ppl_text);
	p->tokens = cli_json_int(r.out, "tokens");
	cli_json_field(r.out, "policy", p->policy, sizeof(p->policy));
	p->sink = cli_json_int(r.out, "sink");
	p->window = cli_json_int(r.out, "window");
	cli_run_free(&r);
}

#define CLI_PPL(p, ...) cli_ppl_json((p), (const char *const[]){ __VA_ARGS__, NULL })

/* --- generate ------------------------------------------------------------------------------ */

static void cli_expect_greedy_reference(const char *model)
{
	char *want = cli_greedy_reference();
	struct cli_run r;
	if (model)
		CLI_RUN(&r, "generate", "--temp", "0", "-n", CLI_GREEDY_STEPS, "--model", model);
	else
		CLI_RUN(&r, "generate", "--temp", "0", "-n", CLI_GREEDY_STEPS);
	cli_expect_success(&r);
	cr_assert_str_eq(r.out, want, "greedy output differs from llama2.c's (model %s)",
			 model ? model : "default");
	cr_assert_eq(r.err_len, 0, "generate without --stats wrote to stderr: %s", r.err);
	cli_run_free(&r);
	free(want);
}

Test(cli, generate_greedy_default_model_matches_llama2c)
{
	cli_expect_greedy_reference(NULL);
}

Test(cli, generate_greedy_bin_model_matches_llama2c)
{
	cli_expect_greedy_reference(tu_model_path("stories260K.bin"));
}

Test(cli, generate_greedy_gguf_model_matches_llama2c)
{
	cli_expect_greedy_reference(tu_model_path("stories260K.gguf"));
}

Test(cli, flags_before_and_after_the_command_agree)
{
	struct cli_run before, after, mixed;
	CLI_RUN(&before, "--temp", "0", "-n", "20", "generate");
	CLI_RUN(&after, "generate", "--temp", "0", "-n", "20");
	CLI_RUN(&mixed, "--temp", "0", "generate", "-n", "20");
	cli_expect_success(&before);
	cli_expect_success(&after);
	cli_expect_success(&mixed);
	cr_assert_str_eq(before.out, after.out);
	cr_assert_str_eq(mixed.out, after.out);

	/* Both flags took effect: greedy (a prefix of the reference story) and 20 tokens, far
	 * short of the reference's 200 and the default 256. */
	char *want = cli_greedy_reference();
	size_t text_len = after.out_len - 1;
	cr_assert(after.out_len > 1 && after.out[text_len] == '\n');
	cr_assert(text_len < strlen(want) / 2, "-n 20 printed %zu bytes", text_len);
	cr_assert_eq(memcmp(after.out, want, text_len), 0, "not greedy: %s", after.out);
	free(want);
	cli_run_free(&before);
	cli_run_free(&after);
	cli_run_free(&mixed);
}

Test(cli, same_seed_same_output)
{
	struct cli_run a, b;
	CLI_RUN(&a, "generate", "--temp", "1", "--seed", "42", "-n", "60");
	CLI_RUN(&b, "--seed", "42", "generate", "-n", "60", "--temp", "1");
	cli_expect_success(&a);
	cli_expect_success(&b);
	cr_assert(a.out_len > 1, "nothing generated");
	cr_assert_str_eq(a.out, b.out, "seed 42 gave two different stories");
	cli_run_free(&a);
	cli_run_free(&b);
}

Test(cli, different_seeds_different_output)
{
	static const char *const seeds[] = { "1", "2", "3", "4" };
	enum { N_SEEDS = sizeof(seeds) / sizeof(seeds[0]) };
	struct cli_run runs[N_SEEDS];
	for (size_t i = 0; i < N_SEEDS; i++) {
		CLI_RUN(&runs[i], "generate", "--temp", "1", "--seed", seeds[i], "-n", "60");
		cli_expect_success(&runs[i]);
	}
	for (size_t i = 0; i < N_SEEDS; i++)
		for (size_t j = i + 1; j < N_SEEDS; j++)
			cr_assert_str_neq(runs[i].out, runs[j].out,
					  "seeds %s and %s gave the same 60 tokens: %s", seeds[i],
					  seeds[j], runs[i].out);
	for (size_t i = 0; i < N_SEEDS; i++)
		cli_run_free(&runs[i]);
}

/* The greedy story from BOS opens with exactly the four tokens of "Once upon a time" (checked
 * below and in tokenize_once_upon_a_time). So prompting with them leaves the model where the
 * BOS run is after four steps, and greedy decoding must go on identically: the prompt run
 * (echo + 30 tokens) equals the BOS run with 34 tokens, byte for byte. This checks the prompt
 * is encoded with BOS, echoed once, prefilled in one chunk to the same state, and that -n
 * counts generated tokens only. */
Test(cli, prompt_continues_like_the_greedy_story)
{
	const char *prompt = "Once upon a time";
	struct cli_run head, prompted, from_bos;
	CLI_RUN(&head, "generate", "--temp", "0", "-n", "4");
	CLI_RUN(&prompted, "generate", "--temp", "0", "-n", "30", prompt);
	CLI_RUN(&from_bos, "generate", "--temp", "0", "-n", "34");
	cli_expect_success(&head);
	cli_expect_success(&prompted);
	cli_expect_success(&from_bos);

	cr_assert_str_eq(head.out, "Once upon a time\n", "the greedy story's first 4 tokens: %s",
			 head.out);
	cr_assert_eq(strncmp(prompted.out, prompt, strlen(prompt)), 0,
		     "the prompt is not echoed first: %s", prompted.out);
	cr_assert(prompted.out_len > strlen(prompt) + 1, "nothing generated after the prompt");
	cr_assert_str_eq(prompted.out, from_bos.out,
			 "prompted and BOS runs diverge:\n  prompt: %s  bos:    %s", prompted.out,
			 from_bos.out);

	char *want = cli_greedy_reference();
	cr_assert_eq(memcmp(prompted.out, want, prompted.out_len - 1), 0);
	free(want);
	cli_run_free(&head);
	cli_run_free(&prompted);
	cli_run_free(&from_bos);
}

/* --- tokenize ------------------------------------------------------------------------------ */

Test(cli, tokenize_once_upon_a_time)
{
	tu_scratch_dir("cli-tokenize");
	const char *path = tu_write_scratch("once.txt", "Once upon a time", 16);
	struct cli_run r;
	CLI_RUN(&r, "tokenize", path);
	cli_expect_success(&r);
	cr_assert_str_eq(r.out, "1 403 407 261 378\n");
	cli_run_free(&r);
}

/* tokenize prints the ids ppl scores: BOS first, on one line, and ppl over the whole file
 * scores one prediction fewer than there are ids. */
Test(cli, tokenize_prints_the_ids_ppl_scores)
{
	struct cli_run r;
	CLI_RUN(&r, "tokenize", tu_data_path("tokenizer-sample.txt"));
	cli_expect_success(&r);
	cr_assert_eq(strncmp(r.out, "1 ", 2), 0, "does not start with BOS: %.40s", r.out);
	cr_assert_eq(strchr(r.out, '\n'), r.out + r.out_len - 1, "not exactly one line");
	cr_assert_eq(strspn(r.out, "0123456789 "), r.out_len - 1, "not only ids and spaces");
	cr_assert(!strstr(r.out, "  ") && r.out[r.out_len - 2] != ' ', "stray separators");
	long long ids = 0;
	for (const char *p = r.out; *p; p++)
		ids += *p == ' ';
	ids++;
	cr_assert(ids > 1000, "only %lld ids for a 20 kB text", ids);

	struct cli_ppl p;
	CLI_PPL(&p, "--policy", "sink");
	cr_assert_eq(p.tokens, ids - 1, "ppl scored %lld predictions for %lld ids", p.tokens,
		     ids);
	cli_run_free(&r);
}

/* --- ppl ----------------------------------------------------------------------------------- */

Test(cli, ppl_json_default_is_sink_4_plus_508)
{
	struct cli_ppl p;
	CLI_PPL(&p, "--tokens", "200");
	cr_assert_eq(p.tokens, 200);
	cr_assert_str_eq(p.policy, "sink");
	cr_assert_eq(p.sink, 4);
	cr_assert_eq(p.window, 508);
}

Test(cli, ppl_json_window_policy)
{
	struct cli_ppl p;
	CLI_PPL(&p, "--tokens", "200", "--policy", "window");
	cr_assert_eq(p.tokens, 200);
	cr_assert_str_eq(p.policy, "window");
	cr_assert_eq(p.sink, 0);
	cr_assert_eq(p.window, 512);
}

Test(cli, ppl_json_dense_and_recompute)
{
	struct cli_ppl dense, recompute;
	CLI_PPL(&dense, "--tokens", "200", "--policy", "dense");
	CLI_PPL(&recompute, "--tokens", "200", "--policy", "recompute", "--window", "64");
	cr_assert_eq(dense.tokens, 200);
	cr_assert_str_eq(dense.policy, "dense");
	cr_assert_eq(dense.sink, 0);
	cr_assert_eq(recompute.tokens, 200);
	cr_assert_str_eq(recompute.policy, "recompute");
	cr_assert_eq(recompute.sink, 0);
	cr_assert_eq(recompute.window, 64);
	/* 200 tokens through a 64-token window lose context dense keeps. */
	cr_assert_str_neq(recompute.ppl_text, dense.ppl_text, "--window 64 had no effect");
}

/* With room for every token nothing is evicted, and the engine is bit-exact with dense then:
 * the printed ppl is the same string. A window that does evict must change it, so the
 * comparison is not vacuous. */
Test(cli, ppl_sink_without_eviction_equals_dense)
{
	struct cli_ppl dense, big_sink, big_window, small_sink;
	CLI_PPL(&dense, "--tokens", "200", "--policy", "dense");
	CLI_PPL(&big_sink, "--tokens", "200", "--policy", "sink", "--window", "2000");
	CLI_PPL(&big_window, "--tokens", "200", "--policy", "window");
	CLI_PPL(&small_sink, "--tokens", "200", "--policy", "sink", "--window", "64");
	cr_assert_eq(big_sink.window, 2000);
	cr_assert_str_eq(big_sink.ppl_text, dense.ppl_text);
	cr_assert_str_eq(big_window.ppl_text, dense.ppl_text);
	cr_assert_str_neq(small_sink.ppl_text, dense.ppl_text, "--window 64 had no effect");
}

/* --- usage errors: exit 2 ------------------------------------------------------------------ */

Test(cli, usage_unknown_long_flag)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--bogus");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--bogus", NULL);
	cli_run_free(&r);
}

Test(cli, usage_unknown_short_flag)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "-x");
	cli_expect_error(&r, CLI_EXIT_USAGE, "'-x'", NULL);
	cli_run_free(&r);
}

/* An unknown letter inside a cluster of short flags must be named, not the argument before
 * the cluster (getopt has not advanced optind yet; optopt holds the letter). */
Test(cli, usage_unknown_flag_in_a_cluster)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "-zq");
	cli_expect_error(&r, CLI_EXIT_USAGE, "-z", NULL);
	cli_run_free(&r);
}

Test(cli, usage_flag_without_value)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--temp");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--temp", NULL);
	cli_run_free(&r);
}

Test(cli, usage_n_not_a_number)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "-n", "abc");
	cli_expect_error(&r, CLI_EXIT_USAGE, "-n", "abc");
	cli_run_free(&r);
}

Test(cli, usage_n_negative)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "-n", "-5");
	cli_expect_error(&r, CLI_EXIT_USAGE, "-n", "-5");
	cli_run_free(&r);
}

Test(cli, usage_temp_negative)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--temp", "-1");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--temp", "-1");
	cli_run_free(&r);
}

Test(cli, usage_temp_nan)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--temp", "nan");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--temp", "nan");
	cli_run_free(&r);
}

Test(cli, usage_top_p_above_one)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--top-p", "2");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--top-p", "2");
	cli_run_free(&r);
}

Test(cli, usage_unknown_command)
{
	struct cli_run r;
	CLI_RUN(&r, "--temp", "0", "frobnicate");
	cli_expect_error(&r, CLI_EXIT_USAGE, "frobnicate", NULL);
	cli_run_free(&r);
}

Test(cli, usage_unknown_policy)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--policy", "lru");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--policy", "lru");
	cli_run_free(&r);
}

Test(cli, usage_sinks_with_window_policy)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--sink", "4", "--policy", "window");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--sink", NULL);
	cli_run_free(&r);
}

Test(cli, usage_limit_without_dense)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--limit", "50");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--limit", NULL);
	cli_run_free(&r);
}

Test(cli, usage_window_with_dense)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--window", "64", "--policy", "dense");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--window", NULL);
	cli_run_free(&r);
}

Test(cli, usage_ppl_without_file)
{
	struct cli_run r;
	CLI_RUN(&r, "ppl", "--tokens", "10");
	cli_expect_error(&r, CLI_EXIT_USAGE, "ppl", "FILE");
	cli_run_free(&r);
}

Test(cli, usage_tokenize_without_file)
{
	struct cli_run r;
	CLI_RUN(&r, "tokenize");
	cli_expect_error(&r, CLI_EXIT_USAGE, "tokenize", "FILE");
	cli_run_free(&r);
}

Test(cli, usage_generate_two_prompts)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "Once", "upon");
	cli_expect_error(&r, CLI_EXIT_USAGE, "PROMPT", NULL);
	cli_run_free(&r);
}

Test(cli, usage_no_command_is_one_line)
{
	struct cli_run r;
	CLI_RUN(&r, "--temp", "0");
	cli_expect_error(&r, CLI_EXIT_USAGE, "no command", "--help");
	cli_run_free(&r);
}

Test(cli, usage_flags_of_another_command)
{
	struct cli_run r;
	CLI_RUN(&r, "generate", "--json");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--json", "ppl");
	cli_run_free(&r);
	CLI_RUN(&r, "tokenize", "--tokens", "5", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--tokens", NULL);
	cli_run_free(&r);
	CLI_RUN(&r, "ppl", "-n", "5", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "-n", "generate");
	cli_run_free(&r);
	/* A policy mistake is reported before any file is read. */
	CLI_RUN(&r, "ppl", "--sink", "4", "--policy", "window", "missing.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--sink", "window");
	cli_run_free(&r);
}

Test(cli, help_prints_usage_on_stdout)
{
	static const char *const spellings[] = { "--help", "-h" };
	for (size_t i = 0; i < 2; i++) {
		struct cli_run r;
		CLI_RUN(&r, spellings[i]);
		cli_expect_success(&r);
		cr_assert_eq(strncmp(r.out, "usage: skv", 10), 0, "%s: %s", spellings[i], r.out);
		cr_assert(strstr(r.out, "generate") && strstr(r.out, "tokenize") &&
			  strstr(r.out, "ppl") && strstr(r.out, "--policy"));
		cr_assert_eq(r.err_len, 0, "%s wrote to stderr: %s", spellings[i], r.err);
		cli_run_free(&r);
	}
}

/* --- runtime errors: exit 1 ---------------------------------------------------------------- */

/* A scratch copy of the first len bytes of a shipped model file (all of it for SIZE_MAX). */
static const char *cli_copy_model_file(const char *name, const char *copy_name, size_t len,
				       size_t *copied)
{
	size_t file_len;
	char *data = tu_read_file(tu_model_path(name), &file_len);
	if (len > file_len)
		len = file_len;
	const char *path = tu_write_scratch(copy_name, data, len);
	free(data);
	if (copied)
		*copied = len;
	return path;
}

Test(cli, error_missing_model)
{
	char missing[PATH_MAX];
	snprintf(missing, sizeof(missing), "%s/no-such-model.bin", tu_scratch_dir("cli-no-model"));
	struct cli_run r;
	CLI_RUN(&r, "--model", missing, "generate");
	cli_expect_error(&r, CLI_EXIT_RUNTIME, missing, NULL);
	cli_run_free(&r);
}

Test(cli, error_empty_model)
{
	tu_scratch_dir("cli-empty-model");
	const char *path = tu_write_scratch("empty.bin", "", 0);
	struct cli_run r;
	CLI_RUN(&r, "generate", "--model", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, NULL);
	cli_run_free(&r);
}

Test(cli, error_truncated_model)
{
	tu_scratch_dir("cli-truncated-model");
	const char *path = cli_copy_model_file("stories260K.bin", "truncated.bin", 1000, NULL);
	struct cli_run r;
	CLI_RUN(&r, "generate", "--model", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, NULL);
	cli_run_free(&r);
}

Test(cli, error_gguf_with_flipped_magic)
{
	tu_scratch_dir("cli-gguf-magic");
	size_t len;
	char *data = tu_read_file(tu_model_path("stories260K.gguf"), &len);
	cr_assert(len > 4 && !memcmp(data, "GGUF", 4));
	data[0] ^= 0x20;
	const char *path = tu_write_scratch("flipped.gguf", data, len);
	free(data);
	struct cli_run r;
	CLI_RUN(&r, "generate", "--model", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, NULL);
	cli_run_free(&r);
}

Test(cli, error_truncated_tokenizer)
{
	tu_scratch_dir("cli-truncated-tok");
	const char *path = cli_copy_model_file("tok512.bin", "tok512.bin", 3000, NULL);
	struct cli_run r;
	CLI_RUN(&r, "generate", "--tokenizer", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, NULL);
	cli_run_free(&r);
}

/* tok512.bin with three well-formed entries appended: a 515-token vocabulary, which must be
 * refused as another model's rather than loaded with the extra pieces ignored. */
Test(cli, error_tokenizer_of_another_vocabulary)
{
	tu_scratch_dir("cli-other-vocab");
	size_t len;
	char *data = tu_read_file(tu_model_path("tok512.bin"), &len);
	static const char extra[] = "xyz";
	const size_t entry = sizeof(float) + sizeof(int32_t) + 3;
	data = realloc(data, len + 3 * entry);
	cr_assert(data != NULL);
	for (int i = 0; i < 3; i++) {
		float score = -1000.0f - (float)i;
		int32_t piece_len = 3;
		memcpy(data + len, &score, sizeof(score));
		memcpy(data + len + sizeof(score), &piece_len, sizeof(piece_len));
		memcpy(data + len + sizeof(score) + sizeof(piece_len), extra, 3);
		len += entry;
	}
	const char *path = tu_write_scratch("tok515.bin", data, len);
	free(data);
	struct cli_run r;
	CLI_RUN(&r, "generate", "--tokenizer", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, "515");
	cr_assert(strstr(r.err, "512") != NULL, "the model's vocabulary size is not named: %s",
		  r.err);
	cli_run_free(&r);
}

Test(cli, error_ppl_missing_file)
{
	char missing[PATH_MAX];
	snprintf(missing, sizeof(missing), "%s/no-such-text.txt", tu_scratch_dir("cli-no-text"));
	struct cli_run r;
	CLI_RUN(&r, "ppl", missing);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, missing, NULL);
	cli_run_free(&r);
}

Test(cli, error_ppl_empty_file)
{
	tu_scratch_dir("cli-ppl-empty");
	const char *path = tu_write_scratch("empty.txt", "", 0);
	struct cli_run r;
	CLI_RUN(&r, "ppl", path);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, path, "no text to score");
	cli_run_free(&r);
}

/* ppl's progress lines on a non-tty stderr come every 10 s; 50 tokens take milliseconds, so
 * the error is the only line. */
Test(cli, error_dense_cache_full)
{
	struct cli_run r;
	CLI_RUN(&r, "ppl", "--tokens", "200", "--policy", "dense", "--limit", "50",
		tu_data_path("tokenizer-sample.txt"));
	cli_expect_error(&r, CLI_EXIT_RUNTIME, "full", "--limit 50");
	cli_run_free(&r);
}

Test(cli, error_daemon_not_running)
{
	struct cli_run r;
	CLI_RUN(&r, "--socket", "/nonexistent/skv.sock", "generate");
	cli_expect_error(&r, CLI_EXIT_RUNTIME, "/nonexistent/skv.sock", "daemon running");
	cli_run_free(&r);
	CLI_RUN(&r, "--socket", "/nonexistent/skv.sock", "tokenize", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--socket", NULL);
	cli_run_free(&r);
}

/* Output that cannot be written is an error, not a success: a full disk must not leave a
 * truncated token list behind an exit status of 0. */
Test(cli, error_stdout_write_failure)
{
	if (access("/dev/full", W_OK) != 0)
		cr_skip_test("/dev/full is not available: %s", strerror(errno));
	struct cli_run r;
	cli_spawn(&r, "/dev/full",
		  (const char *const[]){ "tokenize", tu_data_path("tokenizer-sample.txt"), NULL });
	cli_expect_error(&r, CLI_EXIT_RUNTIME, strerror(ENOSPC), NULL);
	cli_run_free(&r);
}

/* --- chat ---------------------------------------------------------------------------------- */

#define CLI_CHAT_TEMPLATE "Tom said, \"%s\"\nMom said,"  /* the default, filled in */
#define CLI_CHAT_ANSWER "40"

static const char cli_chat_turns[] = "Can we play with the ball?\n"
				     "Where is the cat?\n"
				     "I am hungry.\n";

/* What skv chat says on stderr at the end (its last line). */
struct cli_chat_summary {
	unsigned long long turns, fed, kv;
	long long sinks, window;
	char policy[16], evict[16], constant[16];
};

static void cli_chat_summary(const char *err, struct cli_chat_summary *s)
{
	const char *line = NULL;
	for (const char *p = err; (p = strstr(p, "chat: ")); p++)
		if (p == err || p[-1] == '\n')
			line = p;
	cr_assert(line != NULL, "no chat summary on stderr: %s", err);
	int n = sscanf(line,
		       "chat: %llu turns, %llu tokens fed; cache %lld sinks + %lld window slots "
		       "(%15[a-z], evict %15[a-z]); kv %llu bytes, %15[a-z ]",
		       &s->turns, &s->fed, &s->sinks, &s->window, s->policy, s->evict, &s->kv,
		       s->constant);
	cr_assert_eq(n, 8, "the summary does not parse (%d fields): %s", n, line);
	cr_assert(strchr(line, '\n') && !strchr(line, '\n')[1], "the summary is not the last line");
}

/* The --stats line of every turn, in order: prompt tokens, answer tokens, how it ended, the
 * total fed after it, the stream's KV bytes. Returns how many. */
struct cli_chat_turn {
	unsigned long long prompt, answer, fed, kv;
	char end[24];
};

static size_t cli_chat_turns_of(const char *err, struct cli_chat_turn *t, size_t cap)
{
	size_t n = 0;
	for (const char *p = err; (p = strstr(p, "chat: turn ")); p++) {
		unsigned long long index;
		double ms;
		cr_assert(n < cap, "more turns than expected");
		int got = sscanf(p, "chat: turn %llu: %llu + %llu tokens (%23[a-z ]) in %lf ms; %llu "
				    "fed in all, kv %llu bytes",
				 &index, &t[n].prompt, &t[n].answer, t[n].end, &ms, &t[n].fed,
				 &t[n].kv);
		cr_assert_eq(got, 7, "a turn's stats line does not parse: %.120s", p);
		cr_assert_eq(index, n + 1, "turn %llu reported as number %zu", index, n + 1);
		n++;
	}
	return n;
}

/* Every turn adds its prompt and every answer token but the last one sampled (which is the
 * end-of-text token when the answer ended there): what the engine holds, counted as local
 * mode's stream counts it. */
static void cli_chat_expect_accounting(const struct cli_chat_turn *t, size_t n,
				       unsigned long long fed_total)
{
	unsigned long long fed = 0;
	for (size_t i = 0; i < n; i++) {
		fed += t[i].prompt + t[i].answer - 1 + (strcmp(t[i].end, "end of text") == 0);
		cr_assert_eq(t[i].fed, fed, "turn %zu: %llu fed, expected %llu", i + 1, t[i].fed,
			     fed);
		cr_assert_eq(t[i].kv, t[0].kv, "turn %zu: the stream's KV bytes changed", i + 1);
	}
	cr_assert_eq(fed_total, fed);
}

static const char *cli_chat_file(const char *test, const char *text)
{
	tu_scratch_dir(test);
	return tu_write_scratch("turns.txt", text, strlen(text));
}

/* The first answer is exactly what generate continues the filled-in template with: the same
 * stream from BOS, greedy. The other turns follow on the same stream. */
Test(cli, chat_first_answer_is_generate_continuation)
{
	const char *turns = cli_chat_file("cli-chat-first", cli_chat_turns);
	char prompt[128];
	snprintf(prompt, sizeof(prompt), CLI_CHAT_TEMPLATE, "Can we play with the ball?");
	struct cli_run gen, chat;
	CLI_RUN(&gen, "generate", "--temp", "0", "-n", CLI_CHAT_ANSWER, prompt);
	cli_expect_success(&gen);
	cr_assert(strncmp(gen.out, prompt, strlen(prompt)) == 0, "generate did not echo: %s",
		  gen.out);
	CLI_RUN(&chat, "chat", "--temp", "0", "--max-answer", CLI_CHAT_ANSWER, "--turns", turns,
		"--echo", "--stats");
	cli_expect_success(&chat);
	cr_assert(strncmp(chat.out, gen.out, gen.out_len) == 0,
		  "chat's first turn differs from generate:\n%s\n---\n%s", chat.out, gen.out);
	char second[128];
	snprintf(second, sizeof(second), CLI_CHAT_TEMPLATE, "Where is the cat?");
	cr_assert(strncmp(chat.out + gen.out_len, second, strlen(second)) == 0,
		  "the second turn does not follow the first answer: %s", chat.out + gen.out_len);

	struct cli_chat_summary s;
	cli_chat_summary(chat.err, &s);
	cr_assert_eq(s.turns, 3);
	cr_assert_eq(s.sinks, 4);
	cr_assert_eq(s.window, 508);
	cr_assert_str_eq(s.policy, "sink");
	cr_assert_str_eq(s.evict, "token");
	cr_assert_str_eq(s.constant, "constant");
	struct cli_chat_turn t[8];
	cr_assert_eq(cli_chat_turns_of(chat.err, t, 8), 3);
	cli_chat_expect_accounting(t, 3, s.fed);
	cr_assert_eq(s.kv, t[0].kv);
	cli_run_free(&gen);
	cli_run_free(&chat);
}

/* Without --echo only the answers are printed, one per turn, without their leading space; the
 * same turns from a file, from --turns - and from a non-terminal stdin give the same bytes, and
 * no "> " prompt is written when stdin is not a terminal. */
Test(cli, chat_turn_sources_agree)
{
	const char *turns = cli_chat_file("cli-chat-sources", cli_chat_turns);
	struct cli_run file, dash, plain, echo;
	CLI_RUN(&file, "chat", "--temp", "0", "--max-answer", "30", "--turns", turns);
	CLI_RUN_STDIN(&dash, turns, "chat", "--temp", "0", "--max-answer", "30", "--turns", "-");
	CLI_RUN_STDIN(&plain, turns, "chat", "--temp", "0", "--max-answer", "30");
	CLI_RUN(&echo, "chat", "--temp", "0", "--max-answer", "30", "--turns", turns, "--echo");
	cli_expect_success(&file);
	cli_expect_success(&dash);
	cli_expect_success(&plain);
	cli_expect_success(&echo);
	cr_assert_str_eq(dash.out, file.out);
	cr_assert_str_eq(plain.out, file.out);
	cr_assert(file.out_len > 0 && file.out[0] != ' ' && file.out[file.out_len - 1] == '\n',
		  "answers: '%s'", file.out);
	cr_assert(strstr(plain.err, "> ") == NULL, "a prompt on a pipe: %s", plain.err);
	cr_assert(strncmp(plain.err, "chat: 3 turns", 13) == 0 && !strchr(plain.err, '\n')[1],
		  "stderr is not the one summary line: %s", plain.err);
	/* The echoed transcript holds every answer, each after its turn. */
	const char *at = echo.out;
	const char *turn_texts[] = { "Can we play with the ball?", "Where is the cat?",
				     "I am hungry." };
	for (size_t i = 0; i < 3; i++) {
		char filled[128];
		snprintf(filled, sizeof(filled), CLI_CHAT_TEMPLATE, turn_texts[i]);
		at = strstr(at, filled);
		cr_assert(at != NULL, "turn %zu is not echoed in order: %s", i + 1, echo.out);
		at += strlen(filled);
	}
	cli_run_free(&file);
	cli_run_free(&dash);
	cli_run_free(&plain);
	cli_run_free(&echo);
}

/* Blank lines, lines of spaces, CRLF line ends and a last line without its newline change
 * nothing; the count of turns says so too. */
Test(cli, chat_blank_lines_and_crlf)
{
	const char *clean = cli_chat_file("cli-chat-blank", cli_chat_turns);
	const char *messy = tu_write_scratch("messy.txt",
					     "\n   \nCan we play with the ball?\r\n\t\r\n\n"
					     "Where is the cat?\n  \nI am hungry.",
					     strlen("\n   \nCan we play with the ball?\r\n\t\r\n\n"
						    "Where is the cat?\n  \nI am hungry."));
	struct cli_run a, b;
	CLI_RUN(&a, "chat", "--temp", "0", "--max-answer", "20", "--turns", clean);
	CLI_RUN(&b, "chat", "--temp", "0", "--max-answer", "20", "--turns", messy);
	cli_expect_success(&a);
	cli_expect_success(&b);
	cr_assert_str_eq(a.out, b.out);
	cr_assert_str_eq(a.err, b.err);
	struct cli_chat_summary s;
	cli_chat_summary(b.err, &s);
	cr_assert_eq(s.turns, 3);
	cli_run_free(&a);
	cli_run_free(&b);
}

/* --template: every {turn} is replaced, \n and \t and \\ are decoded, and the answer after it
 * is generate's continuation of the filled-in text. */
Test(cli, chat_template_escapes)
{
	const char *turns = cli_chat_file("cli-chat-template", "the ball\n");
	struct cli_run chat, gen;
	CLI_RUN(&chat, "chat", "--temp", "0", "--max-answer", "20", "--turns", turns, "--echo",
		"--template", "Q:\\t{turn} or {turn}?\\nA: a\\\\b");
	cli_expect_success(&chat);
	const char *filled = "Q:\tthe ball or the ball?\nA: a\\b";
	CLI_RUN(&gen, "generate", "--temp", "0", "-n", "20", filled);
	cli_expect_success(&gen);
	cr_assert(strncmp(chat.out, filled, strlen(filled)) == 0, "echo: %s", chat.out);
	cr_assert_str_eq(chat.out, gen.out);
	cli_run_free(&chat);
	cli_run_free(&gen);
}

/* Per-prompt eviction frees room for a turn and its answer at once. With a window that never
 * fills it never evicts, so it answers as per-token eviction does; with a small one, turns go
 * on in constant memory, evicting differently from per-token eviction. */
Test(cli, chat_evict_prompt_and_token)
{
	char many[4096] = "";
	static const char *const asks[] = { "Where is the dog?", "Can I play with the cat?",
					    "Look at the bird!", "I like the tree." };
	for (size_t i = 0; i < 24; i++) {
		strcat(many, asks[(i * 7) % 4]);
		strcat(many, "\n");
	}
	const char *small = cli_chat_file("cli-chat-evict", cli_chat_turns);
	const char *longer = tu_write_scratch("many.txt", many, strlen(many));
	struct cli_run tok, pr;
	CLI_RUN(&tok, "chat", "--temp", "0", "--max-answer", "24", "--turns", small);
	CLI_RUN(&pr, "chat", "--temp", "0", "--max-answer", "24", "--turns", small, "--evict",
		"prompt");
	cli_expect_success(&tok);
	cli_expect_success(&pr);
	cr_assert_str_eq(tok.out, pr.out, "nothing was evicted, yet the answers differ");
	cli_run_free(&tok);
	cli_run_free(&pr);

	CLI_RUN(&tok, "chat", "--temp", "0", "--max-answer", "24", "--window", "60", "--turns",
		longer, "--stats");
	CLI_RUN(&pr, "chat", "--temp", "0", "--max-answer", "24", "--window", "60", "--turns",
		longer, "--stats", "--evict", "prompt");
	cli_expect_success(&tok);
	cli_expect_success(&pr);
	cr_assert_str_neq(tok.out, pr.out, "per-prompt eviction answered as per-token eviction");
	struct cli_run *runs[] = { &tok, &pr };
	for (size_t i = 0; i < 2; i++) {
		struct cli_chat_summary s;
		cli_chat_summary(runs[i]->err, &s);
		struct cli_chat_turn t[32];
		cr_assert_eq(cli_chat_turns_of(runs[i]->err, t, 32), 24);
		cli_chat_expect_accounting(t, 24, s.fed);
		cr_assert_eq(s.turns, 24);
		cr_assert_gt(s.fed, 4 * (4 + 60), "the window never wrapped: %llu fed", s.fed);
		cr_assert_eq(s.window, 60);
		cr_assert_str_eq(s.evict, i ? "prompt" : "token");
		cr_assert_str_eq(s.constant, "constant");
	}
	cli_run_free(&tok);
	cli_run_free(&pr);
}

Test(cli, usage_chat_template)
{
	struct cli_run r;
	CLI_RUN(&r, "chat", "--template", "User: {tur}\\nBot:");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--template", "{turn}");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--template", "{turn}\\q");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--template", "'\\q'");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--template", "{turn}\\");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--template", "backslash");
	cli_run_free(&r);
}

Test(cli, usage_chat_flags)
{
	struct cli_run r;
	CLI_RUN(&r, "chat", "--max-answer", "0");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--max-answer", "'0'");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--max-answer", "-3");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--max-answer", NULL);
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--echo");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--echo", "--turns");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--turns", "");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--turns", NULL);
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--turns");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--turns", "value");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--tunrs", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "unknown flag", "--tunrs");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "Hello there");
	cli_expect_error(&r, CLI_EXIT_USAGE, "no arguments", "--turns");
	cli_run_free(&r);
	/* Flags of the other commands, and chat's flags on them. */
	CLI_RUN(&r, "chat", "-n", "5");
	cli_expect_error(&r, CLI_EXIT_USAGE, "-n", "--max-answer");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--json");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--json", "ppl");
	cli_run_free(&r);
	CLI_RUN(&r, "generate", "--turns", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--turns", "chat");
	cli_run_free(&r);
	CLI_RUN(&r, "ppl", "--max-answer", "3", "x.txt");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--max-answer", "chat");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--evict", "prompt", "--policy", "dense");
	cli_expect_error(&r, CLI_EXIT_USAGE, "--evict prompt", NULL);
	cli_run_free(&r);
}

/* Per-prompt eviction needs room for a turn and its whole answer: an answer as long as the
 * window is a usage error, found before any turn is read. */
Test(cli, usage_chat_answer_fills_the_window)
{
	const char *turns = cli_chat_file("cli-chat-fill", cli_chat_turns);
	struct cli_run r;
	CLI_RUN(&r, "chat", "--evict", "prompt", "--window", "64", "--turns", turns);
	cli_expect_error(&r, CLI_EXIT_USAGE, "--max-answer 128", "64 window slots");
	cli_run_free(&r);
	/* Per-token eviction has no such limit. */
	CLI_RUN(&r, "chat", "--window", "64", "--max-answer", "100", "--temp", "0", "--turns",
		turns);
	cli_expect_success(&r);
	cli_run_free(&r);
}

/* A turn that does not fit the window with its answer: the file and the line are named, and
 * nothing was answered before it. */
Test(cli, error_chat_turn_too_long_for_evict_prompt)
{
	const char *turns = cli_chat_file(
		"cli-chat-long", "\n\nOnce upon a time there was a little girl named Lily who "
				 "loved to play in the park with her big red ball every day.\n"
				 "Where is the cat?\n");
	struct cli_run r;
	CLI_RUN(&r, "chat", "--evict", "prompt", "--window", "40", "--max-answer", "16",
		"--turns", turns);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, ":3: the turn is", "--window");
	cli_run_free(&r);
	/* The same turn fits a larger window. */
	CLI_RUN(&r, "chat", "--evict", "prompt", "--window", "80", "--max-answer", "16",
		"--temp", "0", "--turns", turns);
	cli_expect_success(&r);
	cli_run_free(&r);
}

Test(cli, error_chat_turns_files)
{
	char missing[PATH_MAX];
	const char *dir = tu_scratch_dir("cli-chat-files");
	snprintf(missing, sizeof(missing), "%s/no-such-turns.txt", dir);
	struct cli_run r;
	CLI_RUN(&r, "chat", "--turns", missing);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, missing, "cannot open");
	cli_run_free(&r);
	const char *empty = tu_write_scratch("empty.txt", "", 0);
	CLI_RUN(&r, "chat", "--turns", empty);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, empty, "no turns");
	cli_run_free(&r);
	const char *blank = tu_write_scratch("blank.txt", "\n  \n\t\r\n\n", 7);
	CLI_RUN(&r, "chat", "--turns", blank);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, blank, "no turns");
	cli_run_free(&r);
	CLI_RUN_STDIN(&r, empty, "chat", "--turns", "-");
	cli_expect_error(&r, CLI_EXIT_RUNTIME, "stdin", "no turns");
	cli_run_free(&r);
	CLI_RUN(&r, "chat", "--turns", dir);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, dir, "directory");
	cli_run_free(&r);
	const char *nul = tu_write_scratch("nul.txt", "a\0b\n", 4);
	CLI_RUN(&r, "chat", "--turns", nul);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, ":1:", "NUL");
	cli_run_free(&r);
	/* Without --turns, an empty stdin is simply the end of the conversation. */
	CLI_RUN_STDIN(&r, empty, "chat");
	cli_expect_success(&r);
	cr_assert_eq(r.out_len, 0);
	cr_assert(strncmp(r.err, "chat: 0 turns", 13) == 0, "%s", r.err);
	cli_run_free(&r);
}

/* A dense cache fills up during the conversation: one clear line, exit 1. */
Test(cli, error_chat_dense_cache_full)
{
	const char *turns = cli_chat_file(
		"cli-chat-dense", "Once upon a time there was a little girl named Lily who loved to "
				  "play in the park with her big red ball every day.\n");
	struct cli_run r;
	CLI_RUN(&r, "chat", "--policy", "dense", "--limit", "20", "--turns", turns);
	cli_expect_error(&r, CLI_EXIT_RUNTIME, "full", "--limit 20");
	cli_run_free(&r);
}
