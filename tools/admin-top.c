#include "admin-top.h"

#include <curses.h>
#include <errno.h>
#include <inttypes.h>
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TOP_LINE 512
#define TOP_HEADER_LINES 7
#define TOP_KEY_POLL_MS 100  /* how often a quit key or a signal is noticed */

struct top_frame {
	char (*lines)[TOP_LINE];
	size_t n, cap;
	size_t table_header;      /* index of the table's header line */
};

struct top {
	struct admin_conn *conn;
	const char *path;
	struct admin_sort sort;
	double interval_s;
	struct admin_snapshot snap; /* the last good one (kept on screen while the daemon is away) */
	int have_snap;
	uint64_t instance;        /* the instance whose figures are shown */
	char restart_note[TOP_LINE];
	char down_note[TOP_LINE];
	double down_since;        /* CLOCK_REALTIME, 0 while connected */
	int batch;                /* plain text frames, no keys */
};

static volatile sig_atomic_t top_stop;

static void top_on_signal(int sig)
{
	(void)sig;
	top_stop = 1;
}

static void top_addf(struct top_frame *f, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void top_addf(struct top_frame *f, const char *fmt, ...)
{
	if (f->n == f->cap) {
		size_t cap = f->cap ? 2 * f->cap : 64;
		void *grown = realloc(f->lines, cap * sizeof(*f->lines));
		if (!grown)
			return; /* a shorter frame: the next refresh tries again */
		f->lines = grown;
		f->cap = cap;
	}
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(f->lines[f->n], TOP_LINE, fmt, ap);
	va_end(ap);
	f->n++;
}

static void top_clock(double t, char *buf, size_t len)
{
	time_t sec = (time_t)t;
	struct tm tm;
	localtime_r(&sec, &tm);
	strftime(buf, len, "%H:%M:%S", &tm);
}

static double top_realtime(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double top_monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Connect if needed, then fetch. Keeps the previous snapshot when the daemon is unreachable. */
static void top_refresh(struct top *t)
{
	char msg[TOP_LINE] = "";
	if (t->conn->sock < 0) {
		if (admin_connect(t->conn, t->path, msg, sizeof(msg)) < 0) {
			if (!t->down_since)
				t->down_since = top_realtime();
			char since[16];
			top_clock(t->down_since, since, sizeof(since));
			snprintf(t->down_note, sizeof(t->down_note),
				 "skv-cached unreachable since %s (%s); figures below are from then; "
				 "retrying", since, msg);
			return;
		}
		if (t->have_snap && t->conn->instance != t->instance) {
			char now[16];
			top_clock(top_realtime(), now, sizeof(now));
			snprintf(t->restart_note, sizeof(t->restart_note),
				 "skv-cached restarted (seen at %s): instance %016" PRIx64 " -> %016" PRIx64
				 "; counters start again", now, t->instance, t->conn->instance);
		}
	}
	struct admin_snapshot snap;
	int err = admin_fetch(t->conn, ADMIN_WANT_ALL, &snap, msg, sizeof(msg));
	if (err < 0) {
		admin_disconnect(t->conn);
		if (!t->down_since)
			t->down_since = top_realtime();
		char since[16];
		top_clock(t->down_since, since, sizeof(since));
		snprintf(t->down_note, sizeof(t->down_note),
			 "lost skv-cached at %s (%s); figures below are from then; retrying", since,
			 msg);
		return;
	}
	admin_snapshot_free(&t->snap);
	t->snap = snap;
	t->have_snap = 1;
	t->instance = t->conn->instance;
	t->down_since = 0;
	t->down_note[0] = '\0';
	admin_sort_streams(t->snap.streams, t->snap.n_streams, &t->sort);
}

/* "  TTFT mean 1.2 ms  ITL mean 0.05 ms", or "" without histograms. */
static const char *top_latency(const struct admin_snapshot *snap)
{
	static char text[96];
	text[0] = '\0';
	const struct skv_admin_hist *h = &snap->hist;
	if (snap->have_hist && h->ttft_count && h->itl_count)
		snprintf(text, sizeof(text), "  TTFT mean %.2f ms  ITL mean %.3f ms",
			 (double)h->ttft_sum_ns * 1e-6 / (double)h->ttft_count,
			 (double)h->itl_sum_ns * 1e-6 / (double)h->itl_count);
	return text;
}

static void top_build(const struct top *t, struct top_frame *f)
{
	f->n = 0;
	const struct admin_snapshot *snap = &t->snap;
	const struct skv_admin_server *s = &snap->server;
	char now[16], up[32], used[16], total[16], largest[16];
	top_clock(top_realtime(), now, sizeof(now));
	admin_human_seconds(s->uptime_s, up, sizeof(up));
	uint64_t largest_free = 0;
	double rate = 0;
	for (size_t i = 0; i < snap->n_arenas; i++)
		if (snap->arenas[i].largest_free_bytes > largest_free)
			largest_free = snap->arenas[i].largest_free_bytes;
	for (size_t i = 0; i < snap->n_engines; i++)
		if (isfinite(snap->engines[i].tokens_per_s))
			rate += snap->engines[i].tokens_per_s;
	admin_human_bytes(s->arena_used_bytes, used, sizeof(used));
	admin_human_bytes(s->arena_bytes, total, sizeof(total));
	admin_human_bytes(largest_free, largest, sizeof(largest));

	top_addf(f, "skv-cached %s  pid %u  instance %016" PRIx64 "  up %s  %s", s->version, s->pid,
		 s->instance, up, now);
	top_addf(f, "engines %u/%u ready  streams %" PRIu64 " (opened %" PRIu64 ", closed %" PRIu64
		 ", failed %" PRIu64 ")  engine restarts %" PRIu64,
		 s->engines_ready, s->engines, s->streams, s->streams_opened, s->streams_closed,
		 s->streams_failed, s->engine_restarts);
	top_addf(f, "KV arenas %u: %s of %s used (%.1f%%), largest free %s", s->arenas, used, total,
		 s->arena_bytes ? 100.0 * (double)s->arena_used_bytes / (double)s->arena_bytes : 0.0,
		 largest);
	top_addf(f, "tokens %.1f/s  generated %" PRIu64 "  prompt %" PRIu64 "  evicted %" PRIu64
		 "  steps %" PRIu64 "  wake syscalls %" PRIu64 "%s",
		 rate, s->tokens_generated, s->prompt_tokens, s->tokens_evicted, s->steps,
		 s->wake_syscalls, top_latency(snap));
	if (t->down_note[0])
		top_addf(f, "%s", t->down_note);
	else if (t->restart_note[0])
		top_addf(f, "%s", t->restart_note);
	else if (t->batch)
		top_addf(f, "batch mode (stdout is not a terminal), refresh every %.1f s",
			 t->interval_s);
	else
		top_addf(f, "refresh every %.1f s, q quits", t->interval_s);
	top_addf(f, "%s", "");
	f->table_header = f->n;
	char line[256];
	admin_streams_header(line, sizeof(line));
	top_addf(f, "%s", line);
	for (size_t i = 0; i < snap->n_streams; i++) {
		admin_streams_line(&snap->streams[i], line, sizeof(line));
		top_addf(f, "%s", line);
	}
}

static void top_draw(const struct top_frame *f)
{
	erase();
	int rows = LINES, cols = COLS;
	for (size_t i = 0; i < f->n && (int)i < rows; i++) {
		if (i == f->table_header)
			attron(A_REVERSE);
		mvaddnstr((int)i, 0, f->lines[i], cols);
		if (i == f->table_header) {
			/* The header bar spans the screen. */
			for (int x = (int)strlen(f->lines[i]); x < cols; x++)
				mvaddch((int)i, x, ' ');
			attroff(A_REVERSE);
		}
	}
	refresh();
}

static void top_sleep(double seconds)
{
	struct timespec ts = { .tv_sec = (time_t)seconds,
			       .tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9) };
	nanosleep(&ts, NULL); /* a signal ends it early, which is what we want */
}

/* Not a terminal: frames as plain text, as top -b. */
static int top_batch(struct top *t, struct top_frame *f, long iterations)
{
	for (long i = 0; i < iterations && !top_stop; i++) {
		if (i) {
			top_sleep(t->interval_s);
			if (top_stop)
				break;
			top_refresh(t);
			fputc('\n', stdout);
		}
		top_build(t, f);
		for (size_t k = 0; k < f->n; k++)
			printf("%s\n", f->lines[k]);
		if (fflush(stdout) != 0) {
			fprintf(stderr, "skv-admin: writing output: %s\n", strerror(errno));
			return 1;
		}
	}
	return 0;
}

int admin_top_run(struct admin_conn *c, const char *socket_path, double interval_s,
		  long iterations, const struct admin_sort *sort)
{
	struct top t = { .conn = c, .path = socket_path, .sort = *sort, .interval_s = interval_s,
			 .batch = !isatty(STDOUT_FILENO) };
	struct top_frame f = { 0 };
	int status = 0;
	top_refresh(&t);
	if (!t.have_snap) {
		fprintf(stderr, "skv-admin: %s\n", t.down_note);
		admin_disconnect(c);
		return 1;
	}
	struct sigaction sa = { .sa_handler = top_on_signal };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	if (t.batch) {
		status = top_batch(&t, &f, iterations > 0 ? iterations : 1);
		goto out;
	}

	setlocale(LC_ALL, "");
	SCREEN *screen = newterm(NULL, stdout, stdin);
	if (!screen) {
		fprintf(stderr, "skv-admin: top: cannot drive this terminal (TERM=%s)\n",
			getenv("TERM") ? getenv("TERM") : "");
		status = 1;
		goto out;
	}
	cbreak();
	noecho();
	nonl();
	keypad(stdscr, TRUE);
	curs_set(0);
	timeout(TOP_KEY_POLL_MS);
	double next = top_monotonic();
	long frames = 0;
	while (!top_stop) {
		double now = top_monotonic();
		if (now >= next) {
			if (iterations > 0 && frames == iterations)
				break;
			if (frames++) /* the first frame's figures are already fetched */
				top_refresh(&t);
			top_build(&t, &f);
			top_draw(&f);
			next = now + interval_s;
		}
		int ch = getch();
		if (ch == 'q' || ch == 'Q')
			break;
		if (ch == KEY_RESIZE) {
			top_build(&t, &f);
			top_draw(&f);
		}
	}
	endwin();
	delscreen(screen);
out:
	free(f.lines);
	admin_snapshot_free(&t.snap);
	admin_disconnect(c);
	return status;
}
