/* skv-admin: see inside a running skv-cached (issue 6).
 *
 *   skv-admin [--socket PATH] [--json] COMMAND
 *     info [SECTION]        key:value lines by section (redis INFO style); keys: admin-report.c
 *     streams [--sort KEY]  one row per stream
 *     stream ID             one stream in depth: its sink and window tokens decoded to text, the
 *                           slot order of its ring, the positions the model sees
 *     arenas                KV arenas: node, backing, bytes total/used/free, largest free region
 *     engines               engine processes: pid, cores, node, streams, batch, steps, tokens/s
 *     top                   live view (ncurses); without a terminal on stdout: batch mode, as
 *                           top -b: --iterations frames (default 1) as plain text
 *     watch                 events (open, close, fail, evict, engine start/exit) as they happen
 *     metrics               Prometheus text exposition format
 *
 * It talks to the daemon only through the admin messages of shm/proto.h, as SKV_ROLE_ADMIN; to
 * turn token ids into text it opens the daemon's model and tokenizer read-only.
 *
 * Exit status: 0; 1 for a failure (unknown stream, the daemon went away or refused, write
 * error); 2 for a usage error or no daemon at the socket. Every failure is one line on stderr
 * starting with "skv-admin: ". */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "admin-conn.h"
#include "admin-report.h"
#include "admin-top.h"
#include "model.h"
#include "tokenizer.h"

#define EXIT_USAGE 2
#define EXIT_NO_DAEMON 2
#define ADMIN_INTERVAL_MIN_S 0.1
#define ADMIN_INTERVAL_MAX_S 3600.0
#define WATCH_POLL_MS 500 /* how soon an interrupt ends watch */

enum admin_command {
	CMD_INFO, CMD_STREAMS, CMD_STREAM, CMD_ARENAS, CMD_ENGINES, CMD_TOP, CMD_WATCH,
	CMD_METRICS, CMD_SNAPSHOT, CMD_RESTORE, CMD_N
};

static const char *const command_names[CMD_N] = {
	[CMD_INFO] = "info", [CMD_STREAMS] = "streams", [CMD_STREAM] = "stream",
	[CMD_ARENAS] = "arenas", [CMD_ENGINES] = "engines", [CMD_TOP] = "top",
	[CMD_WATCH] = "watch", [CMD_METRICS] = "metrics", [CMD_SNAPSHOT] = "snapshot",
	[CMD_RESTORE] = "restore",
};

/* Flags that only some commands take. */
enum {
	FLAG_SORT = 1u << 0,
	FLAG_INTERVAL = 1u << 1,
	FLAG_TOKENIZER = 1u << 2,
	FLAG_JSON = 1u << 3,
	FLAG_ITERATIONS = 1u << 4,
};

static const unsigned command_flags[CMD_N] = {
	[CMD_INFO] = FLAG_JSON,
	[CMD_STREAMS] = FLAG_JSON | FLAG_SORT,
	[CMD_STREAM] = FLAG_JSON | FLAG_TOKENIZER,
	[CMD_ARENAS] = FLAG_JSON,
	[CMD_ENGINES] = FLAG_JSON,
	[CMD_TOP] = FLAG_SORT | FLAG_INTERVAL | FLAG_ITERATIONS,
	[CMD_WATCH] = FLAG_JSON,
	[CMD_METRICS] = 0,
	[CMD_SNAPSHOT] = FLAG_JSON,
	[CMD_RESTORE] = FLAG_JSON,
};

struct admin_opts {
	const char *socket_path;
	const char *tokenizer_path;
	int json;
	struct admin_sort sort;
	double interval_s;
	long iterations;           /* top: frames, 0 = until q */
	unsigned given;            /* FLAG_* given on the command line */
	enum admin_command command;
	const char *arg;           /* info SECTION, stream ID, restore FILE */
	const char *arg2;          /* snapshot FILE */
};

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void die(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("skv-admin: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(code);
}

static void usage(FILE *out)
{
	fputs("usage: skv-admin [--socket PATH] [--json] COMMAND [ARGS]\n"
	      "commands:\n"
	      "  info [SECTION]      server, memory, arenas, engines, streams or stats (default: all)\n"
	      "  streams [--sort KEY[:asc|:desc]]   one row per stream\n"
	      "  stream ID [--tokenizer PATH]       one stream: tokens as text, ring order, positions\n"
	      "  arenas              KV arenas per NUMA node\n"
	      "  engines             engine processes\n"
	      "  top [--interval SECONDS] [--sort KEY] [-n|--iterations N]\n"
	      "                      live view, q quits; without a terminal: N frames as text (1)\n"
	      "  watch               events as they happen, one per line, until interrupted\n"
	      "  metrics             Prometheus text format (no --json)\n"
	      "  snapshot ID FILE    write stream ID's whole state to FILE (mode 0600: it holds the\n"
	      "                      stream's resume token), taken at its next request boundary\n"
	      "  restore FILE        bring a snapshot back as a detached resumable stream\n"
	      "--socket defaults to $XDG_RUNTIME_DIR/streamkv/cached.sock; --json: JSON output.\n"
	      "exit status: 0 ok, 1 failure, 2 usage error or no daemon\n",
	      out);
}

static double parse_interval(const char *text)
{
	char *end;
	errno = 0;
	double v = strtod(text, &end);
	if (errno || end == text || *end || !(v >= ADMIN_INTERVAL_MIN_S && v <= ADMIN_INTERVAL_MAX_S))
		die(EXIT_USAGE, "--interval: '%s' is not a number of seconds in [%g, %g]", text,
		    ADMIN_INTERVAL_MIN_S, ADMIN_INTERVAL_MAX_S);
	return v;
}

static long parse_iterations(const char *text)
{
	char *end;
	errno = 0;
	long v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < 1 || v > 1000000000L)
		die(EXIT_USAGE, "--iterations: '%s' is not a whole number in [1, 1000000000]", text);
	return v;
}

static uint64_t parse_stream_id(const char *text)
{
	char *end;
	errno = 0;
	if (text[0] < '0' || text[0] > '9')
		die(EXIT_USAGE, "stream: '%s' is not a stream id (a whole number; see skv-admin streams)",
		    text);
	unsigned long long v = strtoull(text, &end, 10);
	if (errno || *end)
		die(EXIT_USAGE, "stream: '%s' is not a stream id (a whole number; see skv-admin streams)",
		    text);
	return v;
}

static void parse_args(int argc, char **argv, struct admin_opts *o)
{
	static const struct option long_opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "sort", required_argument, NULL, 'o' },
		{ "interval", required_argument, NULL, 'i' },
		{ "tokenizer", required_argument, NULL, 't' },
		{ "iterations", required_argument, NULL, 'n' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	memset(o, 0, sizeof(*o));
	o->sort.key = 0; /* id, ascending */
	o->interval_s = 1.0;
	opterr = 0;
	int ch;
	while ((ch = getopt_long(argc, argv, ":hn:", long_opts, NULL)) != -1) {
		switch (ch) {
		case 's':
			o->socket_path = optarg;
			break;
		case 'j':
			o->json = 1;
			o->given |= FLAG_JSON;
			break;
		case 'o':
			if (admin_sort_parse(optarg, &o->sort) < 0)
				die(EXIT_USAGE, "--sort: unknown key '%s' (keys: %s)", optarg,
				    admin_sort_key_names());
			o->given |= FLAG_SORT;
			break;
		case 'i':
			o->interval_s = parse_interval(optarg);
			o->given |= FLAG_INTERVAL;
			break;
		case 'n':
			o->iterations = parse_iterations(optarg);
			o->given |= FLAG_ITERATIONS;
			break;
		case 't':
			o->tokenizer_path = optarg;
			o->given |= FLAG_TOKENIZER;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case ':':
			die(EXIT_USAGE, "%s needs a value (see skv-admin --help)", argv[optind - 1]);
		default:
			die(EXIT_USAGE, "unknown flag '%s' (see skv-admin --help)", argv[optind - 1]);
		}
	}
	if (optind >= argc)
		die(EXIT_USAGE, "no command given (info, streams, stream ID, arenas, engines, top, "
				"watch, metrics)");
	const char *name = argv[optind++];
	o->command = CMD_N;
	for (int c = 0; c < CMD_N; c++)
		if (strcmp(name, command_names[c]) == 0)
			o->command = (enum admin_command)c;
	if (o->command == CMD_N)
		die(EXIT_USAGE, "unknown command '%s' (info, streams, stream ID, arenas, engines, top, "
				"watch, metrics)", name);
	int n_args = argc - optind;
	int max_args = o->command == CMD_INFO || o->command == CMD_STREAM ||
				       o->command == CMD_RESTORE ? 1
		       : o->command == CMD_SNAPSHOT ? 2 : 0;
	if (n_args > max_args)
		die(EXIT_USAGE, "%s: unexpected argument '%s'", name, argv[optind + max_args]);
	if (o->command == CMD_SNAPSHOT && n_args != 2)
		die(EXIT_USAGE, "usage: skv-admin snapshot ID FILE");
	if (o->command == CMD_RESTORE && n_args != 1)
		die(EXIT_USAGE, "usage: skv-admin restore FILE");
	o->arg2 = n_args == 2 ? argv[optind + 1] : NULL;
	if (o->command == CMD_STREAM && n_args == 0)
		die(EXIT_USAGE, "stream: which one? (skv-admin stream ID; see skv-admin streams)");
	o->arg = n_args ? argv[optind] : NULL;
	unsigned wrong = o->given & ~command_flags[o->command];
	if (wrong & FLAG_JSON)
		die(EXIT_USAGE, "%s has no --json output", name);
	if (wrong & FLAG_SORT)
		die(EXIT_USAGE, "--sort is for streams and top, not %s", name);
	if (wrong & FLAG_INTERVAL)
		die(EXIT_USAGE, "--interval is for top, not %s", name);
	if (wrong & FLAG_ITERATIONS)
		die(EXIT_USAGE, "--iterations is for top, not %s", name);
	if (wrong & FLAG_TOKENIZER)
		die(EXIT_USAGE, "--tokenizer is for stream, not %s", name);
}

/* ---- commands ----------------------------------------------------------------------------- */

static void connect_or_die(struct admin_conn *c, const char *path)
{
	char msg[512] = "";
	if (admin_connect(c, path, msg, sizeof(msg)) < 0)
		die(EXIT_NO_DAEMON, "%s", msg);
}

/* A fetch that survives one hang-up between requests: reconnect once, and say so if it is a
 * new daemon (its instance id changed). */
static void fetch_or_die(struct admin_conn *c, const char *path, unsigned want,
			 struct admin_snapshot *snap)
{
	char msg[512] = "";
	int err = admin_fetch(c, want, snap, msg, sizeof(msg));
	if (err == -EPIPE) {
		uint64_t before = c->instance;
		admin_disconnect(c);
		if (admin_connect(c, path, msg, sizeof(msg)) < 0)
			die(1, "skv-cached at %s went away during the request (%s)", path, msg);
		if (c->instance != before)
			fprintf(stderr,
				"skv-admin: skv-cached restarted between requests (instance %016" PRIx64
				" -> %016" PRIx64 "); showing the new one\n", before, c->instance);
		err = admin_fetch(c, want, snap, msg, sizeof(msg));
	}
	if (err == -EREMOTEIO)
		die(1, "skv-cached refused the request: %s", msg);
	if (err < 0)
		die(1, "%s", msg);
}

static void json_out(json_t *j)
{
	if (!j)
		die(1, "out of memory");
	if (json_dumpf(j, stdout, ADMIN_JSON_FLAGS) < 0)
		die(1, "writing JSON failed");
	fputc('\n', stdout);
	json_decref(j);
}

static void cmd_info(const struct admin_opts *o, struct admin_conn *c, const char *path)
{
	unsigned sections = ADMIN_INFO_ALL;
	if (o->arg) {
		sections = admin_info_section(o->arg);
		if (!sections)
			die(EXIT_USAGE, "info: unknown section '%s' (%s)", o->arg,
			    admin_info_section_names());
	}
	struct admin_snapshot snap;
	fetch_or_die(c, path, ADMIN_WANT_ALL, &snap);
	json_t *info = admin_info_build(&snap, sections);
	if (o->json) {
		json_out(info);
	} else {
		admin_info_print(stdout, info);
		json_decref(info);
	}
	admin_snapshot_free(&snap);
}

static void cmd_streams(const struct admin_opts *o, struct admin_conn *c, const char *path)
{
	struct admin_snapshot snap;
	fetch_or_die(c, path, ADMIN_WANT_STREAMS, &snap);
	admin_sort_streams(snap.streams, snap.n_streams, &o->sort);
	if (o->json)
		json_out(admin_streams_json(snap.streams, snap.n_streams));
	else
		admin_streams_print(stdout, snap.streams, snap.n_streams);
	admin_snapshot_free(&snap);
}

static void cmd_stream(const struct admin_opts *o, struct admin_conn *c, const char *path)
{
	uint64_t id = parse_stream_id(o->arg);
	struct admin_stream_detail d;
	char msg[512] = "";
	int err = admin_fetch_stream(c, id, &d, msg, sizeof(msg));
	if (err == -EPIPE) {
		admin_disconnect(c);
		die(1, "skv-cached at %s went away during the request", path);
	}
	if (err == -EREMOTEIO && c->error_code == -ENOENT)
		die(1, "no stream %" PRIu64 " in skv-cached at %s (see skv-admin streams)", id, path);
	if (err == -EREMOTEIO)
		die(1, "stream %" PRIu64 ": %s", id, msg);
	if (err < 0)
		die(1, "%s", msg);
	/* Text needs the daemon's tokenizer; without it the ids are still worth showing. */
	struct skv_model *model = NULL;
	struct skv_tokenizer *tok = NULL;
	if (admin_tokenizer_open(c, o->tokenizer_path, &model, &tok, msg, sizeof(msg)) < 0)
		fprintf(stderr, "skv-admin: token ids shown without text: %s\n", msg);
	json_t *detail = admin_stream_detail_json(&d, tok);
	if (o->json) {
		json_out(detail);
	} else {
		admin_stream_detail_print(stdout, detail);
		json_decref(detail);
	}
	skv_tokenizer_free(tok);
	skv_model_close(model);
	admin_stream_detail_free(&d);
}

static void cmd_arenas_engines(const struct admin_opts *o, struct admin_conn *c,
			       const char *path)
{
	int arenas = o->command == CMD_ARENAS;
	struct admin_snapshot snap;
	fetch_or_die(c, path, arenas ? ADMIN_WANT_ARENAS : ADMIN_WANT_ENGINES, &snap);
	if (o->json)
		json_out(arenas ? admin_arenas_json(&snap) : admin_engines_json(&snap));
	else if (arenas)
		admin_arenas_print(stdout, &snap);
	else
		admin_engines_print(stdout, &snap);
	admin_snapshot_free(&snap);
}

static void cmd_metrics(struct admin_conn *c, const char *path)
{
	struct admin_snapshot snap;
	fetch_or_die(c, path, ADMIN_WANT_ARENAS | ADMIN_WANT_ENGINES | ADMIN_WANT_HIST, &snap);
	admin_metrics_print(stdout, &snap);
	admin_snapshot_free(&snap);
}

static volatile sig_atomic_t watch_stop;

static void watch_on_signal(int sig)
{
	(void)sig;
	watch_stop = 1;
}

/* Events until SIGINT/SIGTERM (exit 0) or the daemon goes away (exit 1). stdout is line
 * buffered so each event shows as it comes, also through a pipe. */
static int cmd_watch(const struct admin_opts *o, struct admin_conn *c, const char *path)
{
	struct sigaction sa = { .sa_handler = watch_on_signal };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	char msg[512] = "";
	int err = admin_watch_start(c, msg, sizeof(msg));
	while (err >= 0 && !watch_stop) {
		struct skv_admin_event ev;
		err = admin_watch_next(c, &ev, WATCH_POLL_MS, msg, sizeof(msg));
		if (err == 1) {
			if (o->json) {
				json_t *j = admin_event_json(&ev);
				if (!j || json_dumpf(j, stdout, JSON_COMPACT | JSON_REAL_PRECISION(15)) < 0)
					die(1, "writing JSON failed");
				json_decref(j);
				fputc('\n', stdout);
			} else {
				admin_event_print(stdout, &ev);
			}
			if (ferror(stdout))
				die(1, "writing output: %s", strerror(errno));
		}
	}
	if (err == -EPIPE)
		die(1, "skv-cached at %s went away", path);
	if (err == -EREMOTEIO)
		die(1, "skv-cached refused to watch: %s", msg);
	if (err < 0)
		die(1, "%s", msg);
	return 0;
}

/* snapshot ID FILE / restore FILE: the file is opened here, with our own permissions, and its
 * fd handed to the daemon, which never opens a path on an admin's behalf. */
static int cmd_snapshot_restore(const struct admin_opts *o, struct admin_conn *c,
				const char *path)
{
	int snap = o->command == CMD_SNAPSHOT;
	const char *file = snap ? o->arg2 : o->arg;
	int fd = snap ? open(file, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)
		      : open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die(1, "%s: %s", file, strerror(errno));
	struct skv_msg_admin_req req = { .stream_id = snap ? parse_stream_id(o->arg) : 0 };
	int err = skv_msg_send(c->sock, snap ? SKV_MSG_ADMIN_SNAPSHOT : SKV_MSG_ADMIN_RESTORE,
			       c->seq++, &req, &fd, 1);
	close(fd);
	if (err < 0)
		die(1, "skv-cached at %s went away", path);
	struct skv_msg_hdr h;
	union {
		struct skv_admin_result result;
		struct skv_msg_error error;
		uint8_t raw[2048];
	} body;
	for (;;) {
		struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
		/* A snapshot waits for the stream's request in progress to end. */
		if (poll(&pfd, 1, 600000) <= 0)
			die(1, "skv-cached did not answer within 600 s");
		int fds[SKV_MSG_MAX_FDS], n_fds = 0;
		int got = skv_msg_recv(c->sock, &h, &body, sizeof(body), fds, &n_fds);
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
		if (got <= 0)
			die(1, "skv-cached at %s went away", path);
		if (h.type == SKV_MSG_ERROR) {
			body.error.text[sizeof(body.error.text) - 1] = '\0';
			die(1, "%s", body.error.text);
		}
		if (h.type == SKV_MSG_ADMIN_RESULT)
			break;
	}
	struct skv_admin_result *r = &body.result;
	r->text[sizeof(r->text) - 1] = '\0';
	r->name[sizeof(r->name) - 1] = '\0';
	if (r->code < 0) {
		if (snap)
			unlink(file);
		die(1, "%s: %s", file, r->text);
	}
	if (o->json) {
		json_t *j = json_object();
		json_object_set_new(j, "stream", json_integer((json_int_t)r->stream_id));
		json_object_set_new(j, "name", json_string(r->name));
		json_object_set_new(j, "tokens_seen", json_integer((json_int_t)r->tokens_seen));
		json_object_set_new(j, "bytes", json_integer((json_int_t)r->bytes));
		if (snap)
			json_object_set_new(j, "held_ms", json_real((double)r->copy_ns * 1e-6));
		else
			json_object_set_new(j, "token", json_string(r->text));
		json_out(j);
	} else if (snap) {
		printf("stream %llu: %llu tokens, %llu bytes written to %s (the stream was held "
		       "%.3f ms for its copy)\n", (unsigned long long)r->stream_id,
		       (unsigned long long)r->tokens_seen, (unsigned long long)r->bytes, file,
		       (double)r->copy_ns * 1e-6);
	} else {
		printf("restored as stream %llu, name %s, token %s (detached: attach with name and "
		       "token)\n", (unsigned long long)r->stream_id, r->name, r->text);
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct admin_opts o;
	parse_args(argc, argv, &o);
	char default_path[108];
	const char *path = o.socket_path;
	if (!path) {
		if (skv_default_socket_path(default_path, sizeof(default_path)) < 0)
			die(EXIT_USAGE, "the default socket path is too long: pass --socket PATH");
		path = default_path;
	}
	if (o.command == CMD_INFO && o.arg && !admin_info_section(o.arg))
		die(EXIT_USAGE, "info: unknown section '%s' (%s)", o.arg, admin_info_section_names());
	if (o.command == CMD_STREAM)
		parse_stream_id(o.arg);

	struct admin_conn c;
	connect_or_die(&c, path);
	int status = 0;
	switch (o.command) {
	case CMD_INFO:
		cmd_info(&o, &c, path);
		break;
	case CMD_STREAMS:
		cmd_streams(&o, &c, path);
		break;
	case CMD_STREAM:
		cmd_stream(&o, &c, path);
		break;
	case CMD_ARENAS:
	case CMD_ENGINES:
		cmd_arenas_engines(&o, &c, path);
		break;
	case CMD_TOP:
		status = admin_top_run(&c, path, o.interval_s, o.iterations, &o.sort);
		break;
	case CMD_WATCH:
		status = cmd_watch(&o, &c, path);
		break;
	case CMD_METRICS:
		cmd_metrics(&c, path);
		break;
	case CMD_SNAPSHOT:
	case CMD_RESTORE:
		status = cmd_snapshot_restore(&o, &c, path);
		break;
	case CMD_N:
		break;
	}
	admin_disconnect(&c);
	if (fflush(stdout) != 0 || ferror(stdout))
		die(1, "writing output: %s", strerror(errno));
	return status;
}
