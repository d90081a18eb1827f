/* skv-admin's reports. `info` keys are an interface: scripts grep them, dashboards parse them.
 * They are listed here, are unique across sections, carry their unit in their name (_bytes,
 * _seconds, _ratio, _total for counts since the daemon started) and are never renamed; new keys
 * may be added.
 *
 * # Server
 *   skv_version               the daemon's version string
 *   protocol_version          control protocol MAJOR.MINOR the daemon speaks
 *   instance_id               16 hex digits, random per daemon start (a restart changes it)
 *   process_id                the daemon's pid
 *   uptime_seconds            since the daemon started
 *   model_path                the model it serves, as it was given to the daemon
 *   socket_path               its control socket
 * # Memory
 *   arena_bytes               KV arenas, summed over NUMA nodes
 *   arena_used_bytes          handed out as KV regions
 *   arena_free_bytes          free for KV regions (the arenas' headers are neither used nor free)
 *   arena_largest_free_bytes  the largest free region of any arena: the biggest KV that fits
 *   used_memory_ratio         arena_used_bytes / arena_bytes
 *   kv_bytes                  KV regions of the streams in the table (sum of their kv_bytes)
 * # Arenas
 *   arenas                    count
 *   arenas_hugetlb            arenas backed by explicit huge pages
 *   arena<I>                  node=,backing=,page_bytes=,bytes=,used_bytes=,free_bytes=,
 *                             largest_free_bytes=,usage_ratio=,live_allocs=,free_extents=,
 *                             failed_allocs=,size_classes_used=   (node=-1: not bound)
 * # Engines
 *   engines                   known to the daemon
 *   engines_ready             serving
 *   engine<ID>                pid=,node=,state=,supervised=,cpus=,streams=,restarts=,
 *                             last_batch_rows=,steps=,tokens_generated=,prompt_tokens=,rows=,
 *                             wake_syscalls=,tokens_per_second=
 * # Streams
 *   streams                   in the table now (open, closing or failed)
 *   streams_open, streams_closing, streams_failed          by state
 *   streams_queued                                         OPENs in the admission queue
 *   streams_sink, streams_window, streams_dense, streams_recompute   by policy
 *   streams_evicting          streams that have evicted tokens
 *   sink_tokens               tokens held in sink slots, summed over streams
 *   window_tokens             tokens held in window slots, summed over streams
 *   window_slots              window capacity, summed over streams
 *   window_fill_ratio         window_tokens / window_slots
 * # Stats
 *   streams_opened_total, streams_closed_total, streams_failed_total
 *   engine_restarts_total
 *   tokens_generated_total    over the engines' lives
 *   prompt_tokens_total       prompt tokens fed, over the engines' lives
 *   tokens_evicted_total      evicted from KV windows, closed streams included
 *   wake_syscalls_total       ring wake-ups that needed a system call
 *   engine_steps_total        forward steps of all engines
 *   tokens_per_second         generated per second, summed over engines
 *   ttft_observations_total   requests whose first token came (time to first token measured)
 *   ttft_mean_seconds         mean time to first token (request taken -> first token)
 *   itl_observations_total    gaps between consecutive tokens of a request
 *   itl_mean_seconds          mean inter-token latency
 *   (the four ttft_/itl_ keys are absent when the daemon serves no histograms)
 */
#include "admin-report.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "arena.h"
#include "channel.h"
#include "stream.h"
#include "tokenizer.h"

/* The daemon's state numbers (cached/daemon-pvt.h: cached_stream_state, cached_engine_state),
 * which shm/proto.h names in comments only. */
static const char *const report_stream_states[] = { "none", "open", "closing", "failed" };
static const char *const report_engine_states[] = { "none", "starting", "ready", "lost",
						    "exited" };

const char *admin_stream_state_name(uint32_t state)
{
	return state < sizeof(report_stream_states) / sizeof(*report_stream_states) ?
		       report_stream_states[state] : "unknown";
}

const char *admin_engine_state_name(uint32_t state)
{
	return state < sizeof(report_engine_states) / sizeof(*report_engine_states) ?
		       report_engine_states[state] : "unknown";
}

static const char *report_policy_name(uint32_t policy)
{
	return policy <= SKV_POLICY_RECOMPUTE ? skv_policy_name((enum skv_policy_kind)policy) :
						"unknown";
}

static const char *report_evict_name(uint32_t evict)
{
	return evict == SKV_EVICT_TOKEN ? "token" : evict == SKV_EVICT_PROMPT ? "prompt" : "unknown";
}

void admin_human_bytes(uint64_t bytes, char *buf, size_t len)
{
	static const char units[] = "BKMGTPE";
	double v = (double)bytes;
	unsigned u = 0;
	while (v >= 1024.0 && u + 1 < sizeof(units) - 1) {
		v /= 1024.0;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 "B", bytes);
	else
		snprintf(buf, len, "%.1f%c", v, units[u]);
}

void admin_human_seconds(double s, char *buf, size_t len)
{
	if (!isfinite(s) || s < 0)
		s = 0;
	if (s < 60) {
		snprintf(buf, len, "%.1fs", s);
		return;
	}
	uint64_t t = (uint64_t)s;
	if (t < 3600)
		snprintf(buf, len, "%um%02us", (unsigned)(t / 60), (unsigned)(t % 60));
	else if (t < 86400)
		snprintf(buf, len, "%uh%02um%02us", (unsigned)(t / 3600), (unsigned)(t / 60 % 60),
			 (unsigned)(t % 60));
	else
		snprintf(buf, len, "%ud%02uh%02um", (unsigned)(t / 86400), (unsigned)(t / 3600 % 24),
			 (unsigned)(t / 60 % 60));
}

/* ---- JSON helpers ------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at p (at most rem bytes), 0 if it is not one. */
static size_t report_utf8_len(const unsigned char *p, size_t rem)
{
	if (p[0] < 0x80)
		return 1;
	size_t n;
	uint32_t cp;
	if ((p[0] & 0xe0) == 0xc0) {
		n = 2;
		cp = p[0] & 0x1fu;
	} else if ((p[0] & 0xf0) == 0xe0) {
		n = 3;
		cp = p[0] & 0x0fu;
	} else if ((p[0] & 0xf8) == 0xf0) {
		n = 4;
		cp = p[0] & 0x07u;
	} else {
		return 0;
	}
	if (n > rem)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3fu);
	}
	static const uint32_t min_cp[5] = { 0, 0, 0x80, 0x800, 0x10000 };
	if (cp < min_cp[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/* A JSON string of any bytes: invalid UTF-8 becomes U+FFFD (jansson takes only UTF-8). */
static json_t *report_string(const char *s, size_t len)
{
	json_t *j = json_stringn(s, len);
	if (j)
		return j;
	char *clean = malloc(3 * len + 1);
	if (!clean)
		return NULL;
	size_t o = 0;
	for (size_t i = 0; i < len;) {
		size_t n = report_utf8_len((const unsigned char *)s + i, len - i);
		if (n) {
			memcpy(clean + o, s + i, n);
			o += n;
			i += n;
		} else {
			memcpy(clean + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
		}
	}
	j = json_stringn(clean, o);
	free(clean);
	return j;
}

static void set_str(json_t *o, const char *key, const char *s)
{
	json_object_set_new(o, key, report_string(s, strlen(s)));
}

static void set_u64(json_t *o, const char *key, uint64_t v)
{
	json_object_set_new(o, key, json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v));
}

static void set_i64(json_t *o, const char *key, int64_t v)
{
	json_object_set_new(o, key, json_integer((json_int_t)v));
}

/* A measured figure rounded to decimals places; null if the daemon sent NaN or infinity. */
static void set_real(json_t *o, const char *key, double v, int decimals)
{
	if (!isfinite(v)) {
		json_object_set_new(o, key, json_null());
		return;
	}
	double scale = pow(10.0, decimals);
	json_object_set_new(o, key, json_real(round(v * scale) / scale));
}

static double report_ratio(uint64_t part, uint64_t whole)
{
	return whole ? (double)part / (double)whole : 0.0;
}

/* Text form of a JSON value: control bytes and backslashes escaped so that a value stays on
 * its line; in a k=v list, ',' and '=' are escaped too. */
static void report_print_string(FILE *out, const char *s, size_t len, int in_list)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch == '\\')
			fputs("\\\\", out);
		else if (ch == '\n')
			fputs("\\n", out);
		else if (ch == '\t')
			fputs("\\t", out);
		else if (ch < 0x20 || ch == 0x7f || (in_list && (ch == ',' || ch == '=')))
			fprintf(out, "\\x%02x", ch);
		else
			fputc(ch, out);
	}
}

static void report_print_value(FILE *out, const json_t *v, int in_list)
{
	switch (json_typeof(v)) {
	case JSON_INTEGER:
		fprintf(out, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		break;
	case JSON_REAL:
		fprintf(out, "%.15g", json_real_value(v));
		break;
	case JSON_STRING:
		report_print_string(out, json_string_value(v), json_string_length(v), in_list);
		break;
	case JSON_TRUE:
		fputs("1", out);
		break;
	case JSON_FALSE:
		fputs("0", out);
		break;
	case JSON_NULL:
		fputs("-", out);
		break;
	case JSON_ARRAY: {
		size_t i;
		json_t *item;
		json_array_foreach(v, i, item) {
			if (i)
				fputc(' ', out);
			report_print_value(out, item, 1);
		}
		break;
	}
	case JSON_OBJECT: {
		const char *key;
		json_t *item;
		int first = 1;
		json_object_foreach((json_t *)v, key, item) {
			fprintf(out, "%s%s=", first ? "" : ",", key);
			report_print_value(out, item, 1);
			first = 0;
		}
		break;
	}
	}
}

static void report_print_fields(FILE *out, const json_t *obj)
{
	const char *key;
	json_t *v;
	json_object_foreach((json_t *)obj, key, v) {
		fprintf(out, "%s:", key);
		report_print_value(out, v, 0);
		fputc('\n', out);
	}
}

/* ---- info --------------------------------------------------------------------------------- */

static const struct {
	const char *name;  /* JSON key and `info SECTION` argument */
	const char *title; /* text header */
	unsigned bit;
} report_sections[] = {
	{ "server", "Server", ADMIN_INFO_SERVER },
	{ "memory", "Memory", ADMIN_INFO_MEMORY },
	{ "arenas", "Arenas", ADMIN_INFO_ARENAS },
	{ "engines", "Engines", ADMIN_INFO_ENGINES },
	{ "streams", "Streams", ADMIN_INFO_STREAMS },
	{ "stats", "Stats", ADMIN_INFO_STATS },
};
#define REPORT_N_SECTIONS (sizeof(report_sections) / sizeof(*report_sections))

unsigned admin_info_section(const char *name)
{
	for (size_t i = 0; i < REPORT_N_SECTIONS; i++)
		if (strcasecmp(name, report_sections[i].name) == 0)
			return report_sections[i].bit;
	return 0;
}

const char *admin_info_section_names(void)
{
	return "server, memory, arenas, engines, streams, stats";
}

static json_t *report_arena_fields(const struct skv_admin_arena *a, int with_desc)
{
	json_t *o = json_object();
	set_u64(o, "index", a->index);
	set_i64(o, "node", a->node);
	set_str(o, "backing", skv_arena_backing_name(a->backing));
	if (with_desc)
		set_str(o, "backing_desc", a->backing_desc);
	set_u64(o, "page_bytes", a->page_bytes);
	set_u64(o, "bytes", a->bytes);
	set_u64(o, "used_bytes", a->used_bytes);
	set_u64(o, "free_bytes", a->free_bytes);
	set_u64(o, "largest_free_bytes", a->largest_free_bytes);
	set_real(o, "usage_ratio", report_ratio(a->used_bytes, a->bytes), 6);
	set_u64(o, "live_allocs", a->live_allocs);
	set_u64(o, "free_extents", a->free_extents);
	set_u64(o, "failed_allocs", a->failed_allocs);
	set_u64(o, "size_classes_used", a->size_classes_used);
	return o;
}

static json_t *report_engine_fields(const struct skv_admin_engine *e)
{
	json_t *o = json_object();
	set_u64(o, "id", e->id);
	set_u64(o, "pid", e->pid);
	set_i64(o, "node", e->node);
	set_str(o, "state", admin_engine_state_name(e->state));
	set_u64(o, "supervised", e->supervised);
	set_str(o, "cpus", e->cpus);
	set_u64(o, "streams", e->streams);
	set_u64(o, "restarts", e->restarts);
	set_u64(o, "last_batch_rows", e->last_batch_rows);
	set_u64(o, "steps", e->steps);
	set_u64(o, "tokens_generated", e->tokens_generated);
	set_u64(o, "prompt_tokens", e->prompt_tokens);
	set_u64(o, "rows", e->rows);
	set_u64(o, "wake_syscalls", e->wake_syscalls);
	set_real(o, "tokens_per_second", e->tokens_per_s, 1);
	return o;
}

static json_t *report_info_server(const struct admin_snapshot *snap)
{
	const struct skv_admin_server *s = &snap->server;
	json_t *o = json_object();
	char text[64];
	set_str(o, "skv_version", s->version);
	snprintf(text, sizeof(text), "%u.%u", s->proto_major, s->proto_minor);
	set_str(o, "protocol_version", text);
	snprintf(text, sizeof(text), "%016" PRIx64, s->instance);
	set_str(o, "instance_id", text);
	set_u64(o, "process_id", s->pid);
	set_real(o, "uptime_seconds", s->uptime_s, 3);
	set_str(o, "model_path", s->model_path);
	set_str(o, "socket_path", s->socket_path);
	return o;
}

static json_t *report_info_memory(const struct admin_snapshot *snap)
{
	const struct skv_admin_server *s = &snap->server;
	json_t *o = json_object();
	uint64_t largest = 0, kv = 0, free_bytes = 0;
	for (size_t i = 0; i < snap->n_arenas; i++) {
		free_bytes += snap->arenas[i].free_bytes;
		if (snap->arenas[i].largest_free_bytes > largest)
			largest = snap->arenas[i].largest_free_bytes;
	}
	for (size_t i = 0; i < snap->n_streams; i++)
		kv += snap->streams[i].kv_bytes;
	set_u64(o, "arena_bytes", s->arena_bytes);
	set_u64(o, "arena_used_bytes", s->arena_used_bytes);
	set_u64(o, "arena_free_bytes", free_bytes);
	set_u64(o, "arena_largest_free_bytes", largest);
	set_real(o, "used_memory_ratio", report_ratio(s->arena_used_bytes, s->arena_bytes), 6);
	set_u64(o, "kv_bytes", kv);
	return o;
}

static json_t *report_info_arenas(const struct admin_snapshot *snap)
{
	json_t *o = json_object();
	uint64_t hugetlb = 0;
	for (size_t i = 0; i < snap->n_arenas; i++)
		hugetlb += snap->arenas[i].backing == SKV_ARENA_BACKING_HUGETLB;
	set_u64(o, "arenas", snap->n_arenas);
	set_u64(o, "arenas_hugetlb", hugetlb);
	for (size_t i = 0; i < snap->n_arenas; i++) {
		char key[32];
		snprintf(key, sizeof(key), "arena%u", snap->arenas[i].index);
		json_t *a = report_arena_fields(&snap->arenas[i], 0);
		json_object_del(a, "index");
		json_object_set_new(o, key, a);
	}
	return o;
}

static json_t *report_info_engines(const struct admin_snapshot *snap)
{
	json_t *o = json_object();
	set_u64(o, "engines", snap->server.engines);
	set_u64(o, "engines_ready", snap->server.engines_ready);
	for (size_t i = 0; i < snap->n_engines; i++) {
		char key[32];
		snprintf(key, sizeof(key), "engine%u", snap->engines[i].id);
		json_t *e = report_engine_fields(&snap->engines[i]);
		json_object_del(e, "id");
		json_object_set_new(o, key, e);
	}
	return o;
}

static json_t *report_info_streams(const struct admin_snapshot *snap)
{
	uint64_t by_state[4] = { 0 }, by_policy[4] = { 0 }, evicting = 0;
	uint64_t sink_tokens = 0, window_tokens = 0, window_slots = 0;
	for (size_t i = 0; i < snap->n_streams; i++) {
		const struct skv_admin_stream *r = &snap->streams[i];
		if (r->state < 4)
			by_state[r->state]++;
		if (r->policy < 4)
			by_policy[r->policy]++;
		evicting += r->tokens_evicted > 0;
		sink_tokens += r->sink_fill;
		window_tokens += r->window_fill;
		window_slots += r->window_slots > 0 ? (uint64_t)r->window_slots : 0;
	}
	json_t *o = json_object();
	set_u64(o, "streams", snap->n_streams);
	set_u64(o, "streams_open", by_state[1]);
	set_u64(o, "streams_closing", by_state[2]);
	set_u64(o, "streams_failed", by_state[3]);
	set_u64(o, "streams_queued", snap->server.streams_queued);
	set_u64(o, "streams_sink", by_policy[SKV_POLICY_SINK]);
	set_u64(o, "streams_window", by_policy[SKV_POLICY_WINDOW]);
	set_u64(o, "streams_dense", by_policy[SKV_POLICY_DENSE]);
	set_u64(o, "streams_recompute", by_policy[SKV_POLICY_RECOMPUTE]);
	set_u64(o, "streams_evicting", evicting);
	set_u64(o, "sink_tokens", sink_tokens);
	set_u64(o, "window_tokens", window_tokens);
	set_u64(o, "window_slots", window_slots);
	set_real(o, "window_fill_ratio", report_ratio(window_tokens, window_slots), 6);
	return o;
}

static json_t *report_info_stats(const struct admin_snapshot *snap)
{
	const struct skv_admin_server *s = &snap->server;
	double rate = 0;
	for (size_t i = 0; i < snap->n_engines; i++)
		if (isfinite(snap->engines[i].tokens_per_s))
			rate += snap->engines[i].tokens_per_s;
	json_t *o = json_object();
	set_u64(o, "streams_opened_total", s->streams_opened);
	set_u64(o, "streams_closed_total", s->streams_closed);
	set_u64(o, "streams_failed_total", s->streams_failed);
	set_u64(o, "engine_restarts_total", s->engine_restarts);
	set_u64(o, "tokens_generated_total", s->tokens_generated);
	set_u64(o, "prompt_tokens_total", s->prompt_tokens);
	set_u64(o, "tokens_evicted_total", s->tokens_evicted);
	set_u64(o, "wake_syscalls_total", s->wake_syscalls);
	set_u64(o, "engine_steps_total", s->steps);
	set_real(o, "tokens_per_second", rate, 1);
	if (snap->have_hist) {
		const struct skv_admin_hist *h = &snap->hist;
		set_u64(o, "ttft_observations_total", h->ttft_count);
		set_real(o, "ttft_mean_seconds",
			 h->ttft_count ? (double)h->ttft_sum_ns * 1e-9 / (double)h->ttft_count : 0, 9);
		set_u64(o, "itl_observations_total", h->itl_count);
		set_real(o, "itl_mean_seconds",
			 h->itl_count ? (double)h->itl_sum_ns * 1e-9 / (double)h->itl_count : 0, 9);
	}
	return o;
}

json_t *admin_info_build(const struct admin_snapshot *snap, unsigned sections)
{
	json_t *(*const build[REPORT_N_SECTIONS])(const struct admin_snapshot *) = {
		report_info_server, report_info_memory, report_info_arenas,
		report_info_engines, report_info_streams, report_info_stats,
	};
	json_t *info = json_object();
	for (size_t i = 0; i < REPORT_N_SECTIONS; i++)
		if (sections & report_sections[i].bit)
			json_object_set_new(info, report_sections[i].name, build[i](snap));
	return info;
}

void admin_info_print(FILE *out, const json_t *info)
{
	int first = 1;
	for (size_t i = 0; i < REPORT_N_SECTIONS; i++) {
		const json_t *section = json_object_get(info, report_sections[i].name);
		if (!section)
			continue;
		fprintf(out, "%s# %s\n", first ? "" : "\n", report_sections[i].title);
		report_print_fields(out, section);
		first = 0;
	}
}

/* ---- streams ------------------------------------------------------------------------------ */

enum report_sort_key {
	SORT_ID, SORT_CLIENT_PID, SORT_ENGINE, SORT_NODE, SORT_POLICY, SORT_STATE,
	SORT_SINK_SLOTS, SORT_WINDOW_SLOTS, SORT_WINDOW_FILL, SORT_TOKENS_SEEN,
	SORT_TOKENS_EVICTED, SORT_KV_BYTES, SORT_AGE, SORT_RATE, SORT_N
};

static const struct {
	const char *name;   /* the JSON field */
	const char *column; /* the table column, lower case */
	int descending;
} report_sort_keys[SORT_N] = {
	[SORT_ID] = { "id", "id", 0 },
	[SORT_CLIENT_PID] = { "client_pid", "pid", 0 },
	[SORT_ENGINE] = { "engine", "eng", 0 },
	[SORT_NODE] = { "node", "node", 0 },
	[SORT_POLICY] = { "policy", "policy", 0 },
	[SORT_STATE] = { "state", "state", 0 },
	[SORT_SINK_SLOTS] = { "sink_slots", "sinks", 1 },
	[SORT_WINDOW_SLOTS] = { "window_slots", "window_slots", 1 },
	[SORT_WINDOW_FILL] = { "window_fill", "window", 1 },
	[SORT_TOKENS_SEEN] = { "tokens_seen", "seen", 1 },
	[SORT_TOKENS_EVICTED] = { "tokens_evicted", "evicted", 1 },
	[SORT_KV_BYTES] = { "kv_bytes", "kv", 1 },
	[SORT_AGE] = { "age_seconds", "age", 1 },
	[SORT_RATE] = { "tokens_per_second", "tok/s", 1 },
};

int admin_sort_parse(const char *text, struct admin_sort *sort)
{
	const char *colon = strchr(text, ':');
	size_t len = colon ? (size_t)(colon - text) : strlen(text);
	int dir = -1;
	if (colon) {
		if (strcmp(colon + 1, "asc") == 0)
			dir = 0;
		else if (strcmp(colon + 1, "desc") == 0)
			dir = 1;
		else
			return -EINVAL;
	}
	for (int k = 0; k < SORT_N; k++)
		if ((strlen(report_sort_keys[k].name) == len &&
		     strncasecmp(text, report_sort_keys[k].name, len) == 0) ||
		    (strlen(report_sort_keys[k].column) == len &&
		     strncasecmp(text, report_sort_keys[k].column, len) == 0)) {
			sort->key = k;
			sort->descending = dir >= 0 ? dir : report_sort_keys[k].descending;
			return 0;
		}
	return -EINVAL;
}

const char *admin_sort_key_names(void)
{
	return "id, client_pid, engine, node, policy, state, sink_slots, window_slots, "
	       "window_fill, tokens_seen, tokens_evicted, kv_bytes, age_seconds, "
	       "tokens_per_second (optionally :asc or :desc)";
}

static double report_sort_value(const struct skv_admin_stream *r, int key)
{
	switch (key) {
	case SORT_CLIENT_PID: return r->client_pid;
	case SORT_ENGINE: return r->engine;
	case SORT_NODE: return r->node;
	case SORT_POLICY: return r->policy;
	case SORT_STATE: return r->state;
	case SORT_SINK_SLOTS: return (double)r->sink_slots;
	case SORT_WINDOW_SLOTS: return (double)r->window_slots;
	case SORT_WINDOW_FILL: return r->window_fill;
	case SORT_TOKENS_SEEN: return (double)r->tokens_seen;
	case SORT_TOKENS_EVICTED: return (double)r->tokens_evicted;
	case SORT_KV_BYTES: return (double)r->kv_bytes;
	case SORT_AGE: return isfinite(r->age_s) ? r->age_s : 0;
	case SORT_RATE: return isfinite(r->tokens_per_s) ? r->tokens_per_s : 0;
	default: return (double)r->id;
	}
}

static int report_cmp_streams(const void *pa, const void *pb, void *arg)
{
	const struct admin_sort *sort = arg;
	const struct skv_admin_stream *a = pa, *b = pb;
	double va = report_sort_value(a, sort->key), vb = report_sort_value(b, sort->key);
	int c = (va > vb) - (va < vb);
	if (sort->descending)
		c = -c;
	if (c == 0)
		c = (a->id > b->id) - (a->id < b->id);
	return c;
}

void admin_sort_streams(struct skv_admin_stream *rows, size_t n, const struct admin_sort *sort)
{
	if (n > 1)
		qsort_r(rows, n, sizeof(*rows), report_cmp_streams, (void *)sort);
}

json_t *admin_stream_row_json(const struct skv_admin_stream *r)
{
	json_t *o = json_object();
	set_u64(o, "id", r->id);
	set_u64(o, "client_pid", r->client_pid);
	set_u64(o, "engine", r->engine);
	set_i64(o, "node", r->node);
	set_str(o, "state", admin_stream_state_name(r->state));
	set_str(o, "policy", report_policy_name(r->policy));
	set_str(o, "evict", report_evict_name(r->evict));
	set_str(o, "positions", r->abs_positions ? "abs" : "cache");
	set_str(o, "kv", skv_kv_dtype_name(r->kv_dtype));
	set_i64(o, "sink_slots", r->sink_slots);
	set_i64(o, "window_slots", r->window_slots);
	set_u64(o, "sink_fill", r->sink_fill);
	set_u64(o, "window_fill", r->window_fill);
	set_u64(o, "tokens_seen", r->tokens_seen);
	set_u64(o, "tokens_evicted", r->tokens_evicted);
	set_u64(o, "window_start", r->window_start);
	set_u64(o, "ring_head", r->ring_head);
	set_u64(o, "kv_bytes", r->kv_bytes);
	set_real(o, "age_seconds", r->age_s, 3);
	set_real(o, "tokens_per_second", r->tokens_per_s, 1);
	return o;
}

json_t *admin_streams_json(const struct skv_admin_stream *rows, size_t n)
{
	json_t *a = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(a, admin_stream_row_json(&rows[i]));
	return a;
}

#define STREAMS_FORMAT "%6s %7s %4s %4s %-9s %5s %11s %10s %10s %8s %-7s %9s %8s"

void admin_streams_header(char *buf, size_t len)
{
	snprintf(buf, len, STREAMS_FORMAT, "ID", "PID", "ENG", "NODE", "POLICY", "SINKS", "WINDOW",
		 "SEEN", "EVICTED", "KV", "STATE", "AGE", "TOK/S");
}

void admin_streams_line(const struct skv_admin_stream *r, char *buf, size_t len)
{
	char id[24], pid[16], eng[16], node[16], sinks[24], window[32], seen[24], evicted[24];
	char kv[16], age[24], rate[24];
	snprintf(id, sizeof(id), "%" PRIu64, r->id);
	if (r->client_pid)
		snprintf(pid, sizeof(pid), "%u", r->client_pid);
	else
		snprintf(pid, sizeof(pid), "-");
	if (r->engine != UINT32_MAX)
		snprintf(eng, sizeof(eng), "%u", r->engine);
	else
		snprintf(eng, sizeof(eng), "-");
	if (r->node >= 0)
		snprintf(node, sizeof(node), "%d", r->node);
	else
		snprintf(node, sizeof(node), "-");
	snprintf(sinks, sizeof(sinks), "%lld", (long long)r->sink_slots);
	snprintf(window, sizeof(window), "%u/%lld", r->window_fill, (long long)r->window_slots);
	snprintf(seen, sizeof(seen), "%" PRIu64, r->tokens_seen);
	snprintf(evicted, sizeof(evicted), "%" PRIu64, r->tokens_evicted);
	admin_human_bytes(r->kv_bytes, kv, sizeof(kv));
	admin_human_seconds(r->age_s, age, sizeof(age));
	snprintf(rate, sizeof(rate), "%.1f", isfinite(r->tokens_per_s) ? r->tokens_per_s : 0.0);
	snprintf(buf, len, STREAMS_FORMAT, id, pid, eng, node, report_policy_name(r->policy), sinks,
		 window, seen, evicted, kv, admin_stream_state_name(r->state), age, rate);
}

void admin_streams_print(FILE *out, const struct skv_admin_stream *rows, size_t n)
{
	char line[256];
	admin_streams_header(line, sizeof(line));
	fprintf(out, "%s\n", line);
	for (size_t i = 0; i < n; i++) {
		admin_streams_line(&rows[i], line, sizeof(line));
		fprintf(out, "%s\n", line);
	}
}

/* ---- one stream in depth ------------------------------------------------------------------ */

char *admin_decode(const struct skv_tokenizer *tok, const int32_t *ids, size_t n, int32_t prev,
		   size_t *len)
{
	size_t cap = 64, used = 0;
	char *text = malloc(cap);
	if (!text)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		char bad[24];
		size_t piece_len;
		const char *piece = skv_tokenizer_decode(tok, i ? ids[i - 1] : prev, ids[i],
							 &piece_len);
		if (!piece) {
			piece_len = (size_t)snprintf(bad, sizeof(bad), "<?%d>", ids[i]);
			piece = bad;
		}
		if (used + piece_len + 1 > cap) {
			while (used + piece_len + 1 > cap)
				cap *= 2;
			char *grown = realloc(text, cap);
			if (!grown) {
				free(text);
				return NULL;
			}
			text = grown;
		}
		memcpy(text + used, piece, piece_len);
		used += piece_len;
	}
	text[used] = '\0';
	*len = used;
	return text;
}

static json_t *report_ids(const int32_t *ids, size_t n)
{
	json_t *a = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(a, json_integer(ids[i]));
	return a;
}

/* [first, last] of a run of count items starting at first, null when empty. */
static json_t *report_range(uint64_t first, uint64_t count)
{
	if (!count)
		return json_null();
	return json_pack("[I, I]", (json_int_t)first, (json_int_t)(first + count - 1));
}

/* The ring: which window slot holds which absolute position, oldest first. The slot of
 * absolute position a is a for a < S, else S + (a - S) mod W (shm/kv-layout.h). */
static json_t *report_ring(const struct skv_admin_stream *r)
{
	json_t *ring = json_object();
	int64_t S = r->sink_slots, W = r->window_slots;
	uint64_t fill = r->window_fill;
	json_object_set_new(ring, "window_slot_range",
			    S >= 0 && W > 0 ? report_range((uint64_t)S, (uint64_t)W) : json_null());
	set_u64(ring, "ring_head", r->ring_head);
	set_u64(ring, "window_start", r->window_start);
	json_t *runs = json_array();
	if (S < 0 || W <= 0 || fill > (uint64_t)W || S > INT32_MAX || W > INT32_MAX) {
		set_str(ring, "note", "the daemon reports a shape that has no ring layout");
		json_object_set_new(ring, "runs", runs);
		return ring;
	}
	uint64_t a = r->window_start;
	uint64_t head = a < (uint64_t)S ? a : (uint64_t)S + (a - (uint64_t)S) % (uint64_t)W;
	if (fill && head != r->ring_head) {
		char note[160];
		snprintf(note, sizeof(note),
			 "ring_head %u disagrees with window_start %" PRIu64 " (slot %" PRIu64 ")",
			 r->ring_head, r->window_start, head);
		set_str(ring, "note", note);
	}
	/* At most two runs: from the head to the ring's end, then from its start. */
	uint64_t end = (uint64_t)S + (uint64_t)W;
	uint64_t left = fill;
	while (left) {
		uint64_t n = end - head < left ? end - head : left;
		json_t *run = json_object();
		json_object_set_new(run, "slots", report_range(head, n));
		json_object_set_new(run, "positions", report_range(a, n));
		json_array_append_new(runs, run);
		left -= n;
		a += n;
		head = (uint64_t)S;
	}
	json_object_set_new(ring, "runs", runs);
	return ring;
}

json_t *admin_stream_detail_json(const struct admin_stream_detail *d,
				 const struct skv_tokenizer *tok)
{
	const struct skv_admin_stream *r = &d->row;
	json_t *o = admin_stream_row_json(r);
	json_object_set_new(o, "sink_first_position", json_integer((json_int_t)d->sink_first_pos));
	json_object_set_new(o, "sink_ids", report_ids(d->sink_ids, d->n_sink));
	json_object_set_new(o, "window_first_position",
			    json_integer((json_int_t)d->window_first_pos));
	json_object_set_new(o, "window_ids", report_ids(d->window_ids, d->n_window));
	if (tok) {
		size_t len;
		char *text = admin_decode(tok, d->sink_ids, d->n_sink, -1, &len);
		json_object_set_new(o, "sink_text", text ? report_string(text, len) : json_null());
		free(text);
		/* The window's first token follows the last sink in the text only when nothing was
		 * evicted between them; otherwise the token before it is gone (and is not BOS). */
		int32_t prev = d->n_sink && d->window_first_pos == d->sink_first_pos + d->n_sink ?
				       d->sink_ids[d->n_sink - 1] : -1;
		text = admin_decode(tok, d->window_ids, d->n_window, prev, &len);
		json_object_set_new(o, "window_text", text ? report_string(text, len) : json_null());
		free(text);
	} else {
		json_object_set_new(o, "sink_text", json_null());
		json_object_set_new(o, "window_text", json_null());
	}
	/* What the model sees: sinks at 0..S-1, the window right after them (StreamingLLM's
	 * positions inside the cache), and where the window lies in the text. */
	json_t *pos = json_object();
	json_object_set_new(pos, "sinks_cache", report_range(0, d->n_sink));
	json_object_set_new(pos, "window_cache", report_range(d->n_sink, d->n_window));
	json_object_set_new(pos, "sinks_absolute", report_range(d->sink_first_pos, d->n_sink));
	json_object_set_new(pos, "window_absolute", report_range(d->window_first_pos, d->n_window));
	set_str(pos, "query_sees_sinks_at", r->abs_positions ? "absolute" : "cache");
	json_object_set_new(o, "model_positions", pos);
	json_object_set_new(o, "ring", report_ring(r));
	return o;
}

static void report_print_range(FILE *out, const json_t *range)
{
	if (!json_is_array(range) || json_array_size(range) != 2) {
		fputs("-", out);
		return;
	}
	fprintf(out, "%" JSON_INTEGER_FORMAT "..%" JSON_INTEGER_FORMAT,
		json_integer_value(json_array_get(range, 0)),
		json_integer_value(json_array_get(range, 1)));
}

static void report_print_quoted(FILE *out, const json_t *s)
{
	if (!json_is_string(s)) {
		fputs("-", out);
		return;
	}
	fputc('"', out);
	const char *p = json_string_value(s);
	size_t n = json_string_length(s);
	for (size_t i = 0; i < n; i++)
		if (p[i] == '"')
			fputs("\\\"", out);
		else
			report_print_string(out, p + i, 1, 0);
	fputc('"', out);
}

/* One part of a stream (sinks or window): count, positions in the text and in the cache, ids,
 * decoded text. name is the key prefix, pos_name the prefix in "model_positions". */
static void report_print_part(FILE *out, const json_t *d, const json_t *pos, const char *name,
			      const char *pos_name)
{
	char key[64];
	snprintf(key, sizeof(key), "%s_ids", name);
	const json_t *ids = json_object_get(d, key);
	fprintf(out, "%s_count:%zu\n%s_positions:", name, json_array_size(ids), name);
	snprintf(key, sizeof(key), "%s_absolute", pos_name);
	report_print_range(out, json_object_get(pos, key));
	fprintf(out, "\n%s_cache_positions:", name);
	snprintf(key, sizeof(key), "%s_cache", pos_name);
	report_print_range(out, json_object_get(pos, key));
	fprintf(out, "\n%s_ids:", name);
	report_print_value(out, ids, 0);
	fprintf(out, "\n%s_text:", name);
	snprintf(key, sizeof(key), "%s_text", name);
	report_print_quoted(out, json_object_get(d, key));
}

void admin_stream_detail_print(FILE *out, const json_t *d)
{
	static const char *const parts[] = { "sink_first_position", "sink_ids", "sink_text",
					     "window_first_position", "window_ids", "window_text",
					     "model_positions", "ring" };
	fputs("# Stream\n", out);
	const char *key;
	json_t *v;
	json_object_foreach((json_t *)d, key, v) {
		int part = 0;
		for (size_t i = 0; i < sizeof(parts) / sizeof(*parts); i++)
			part |= strcmp(key, parts[i]) == 0;
		if (part)
			continue;
		fprintf(out, "%s:", key);
		report_print_value(out, v, 0);
		fputc('\n', out);
	}
	const json_t *pos = json_object_get(d, "model_positions");
	fputs("\n# Sinks\n", out);
	report_print_part(out, d, pos, "sink", "sinks");
	fputs("\n\n# Window\n", out);
	report_print_part(out, d, pos, "window", "window");

	const json_t *ring = json_object_get(d, "ring");
	fputs("\n\n# Ring\n", out);
	fputs("window_slot_range:", out);
	report_print_range(out, json_object_get(ring, "window_slot_range"));
	fprintf(out, "\nring_head:%" JSON_INTEGER_FORMAT "\n",
		json_integer_value(json_object_get(ring, "ring_head")));
	fprintf(out, "window_start:%" JSON_INTEGER_FORMAT "\n",
		json_integer_value(json_object_get(ring, "window_start")));
	/* Oldest first: "slots 12..19 = positions 104..111, slots 4..11 = positions 112..119". */
	fputs("slot_order:", out);
	size_t i;
	json_t *run;
	const json_t *runs = json_object_get(ring, "runs");
	if (!json_array_size(runs))
		fputs("-", out);
	json_array_foreach(runs, i, run) {
		fputs(i ? ", slots " : "slots ", out);
		report_print_range(out, json_object_get(run, "slots"));
		fputs(" = positions ", out);
		report_print_range(out, json_object_get(run, "positions"));
	}
	fputc('\n', out);
	const json_t *note = json_object_get(ring, "note");
	if (json_is_string(note))
		fprintf(out, "ring_note:%s\n", json_string_value(note));
	fprintf(out, "query_sees_sinks_at:%s\n",
		json_string_value(json_object_get(pos, "query_sees_sinks_at")));
}

/* ---- arenas, engines ---------------------------------------------------------------------- */

json_t *admin_arenas_json(const struct admin_snapshot *snap)
{
	json_t *a = json_array();
	for (size_t i = 0; i < snap->n_arenas; i++)
		json_array_append_new(a, report_arena_fields(&snap->arenas[i], 1));
	return a;
}

void admin_arenas_print(FILE *out, const struct admin_snapshot *snap)
{
	fprintf(out, "%5s %4s %-8s %7s %9s %9s %9s %9s %7s %6s %7s %7s\n", "ARENA", "NODE",
		"BACKING", "PAGE", "TOTAL", "USED", "FREE", "LARGEST", "USE%", "ALLOCS", "EXTENTS",
		"CLASSES");
	for (size_t i = 0; i < snap->n_arenas; i++) {
		const struct skv_admin_arena *a = &snap->arenas[i];
		char node[16], page[16], total[16], used[16], free_b[16], largest[16];
		if (a->node >= 0)
			snprintf(node, sizeof(node), "%d", a->node);
		else
			snprintf(node, sizeof(node), "-");
		admin_human_bytes(a->page_bytes, page, sizeof(page));
		admin_human_bytes(a->bytes, total, sizeof(total));
		admin_human_bytes(a->used_bytes, used, sizeof(used));
		admin_human_bytes(a->free_bytes, free_b, sizeof(free_b));
		admin_human_bytes(a->largest_free_bytes, largest, sizeof(largest));
		fprintf(out, "%5u %4s %-8s %7s %9s %9s %9s %9s %7.2f %6" PRIu64 " %7" PRIu64 " %7u\n",
			a->index, node, skv_arena_backing_name(a->backing), page, total, used, free_b,
			largest, 100.0 * report_ratio(a->used_bytes, a->bytes), a->live_allocs,
			a->free_extents, a->size_classes_used);
		fputs("      backing: ", out);
		report_print_string(out, a->backing_desc, strlen(a->backing_desc), 0);
		if (a->failed_allocs)
			fprintf(out, "; %" PRIu64 " allocations failed", a->failed_allocs);
		fputc('\n', out);
	}
}

json_t *admin_engines_json(const struct admin_snapshot *snap)
{
	json_t *a = json_array();
	for (size_t i = 0; i < snap->n_engines; i++)
		json_array_append_new(a, report_engine_fields(&snap->engines[i]));
	return a;
}

void admin_engines_print(FILE *out, const struct admin_snapshot *snap)
{
	fprintf(out, "%4s %7s %-8s %4s %-8s %3s %7s %5s %10s %11s %10s %8s %8s\n", "ID", "PID",
		"CPUS", "NODE", "STATE", "SUP", "STREAMS", "BATCH", "STEPS", "GENERATED", "PROMPT",
		"TOK/S", "RESTARTS");
	for (size_t i = 0; i < snap->n_engines; i++) {
		const struct skv_admin_engine *e = &snap->engines[i];
		char pid[16], node[16];
		if (e->pid)
			snprintf(pid, sizeof(pid), "%u", e->pid);
		else
			snprintf(pid, sizeof(pid), "-");
		if (e->node >= 0)
			snprintf(node, sizeof(node), "%d", e->node);
		else
			snprintf(node, sizeof(node), "-");
		fprintf(out,
			"%4u %7s %-8s %4s %-8s %3s %7u %5u %10" PRIu64 " %11" PRIu64 " %10" PRIu64
			" %8.1f %8u\n",
			e->id, pid, e->cpus[0] ? e->cpus : "-", node,
			admin_engine_state_name(e->state), e->supervised ? "yes" : "no", e->streams,
			e->last_batch_rows, e->steps, e->tokens_generated, e->prompt_tokens,
			isfinite(e->tokens_per_s) ? e->tokens_per_s : 0.0, e->restarts);
	}
}

/* ---- metrics ------------------------------------------------------------------------------ */

/* Prometheus conventions: a streamkv_ prefix, base units (bytes, seconds), _total on
 * counters, _ratio for 0..1 gauges, labels for what varies within one metric. Counters are
 * what the daemon counts since it started, exited engines included (a daemon restart resets
 * them, which Prometheus' rate() handles; streamkv_info's instance_id label tells restarts
 * apart). The latency histograms are the engines' own measurements (ADMIN_HIST, bucket bounds
 * SKV_HIST_BOUNDS_S of shm/channel.h); a daemon without them gets a comment instead. */

static void metric_head(FILE *out, const char *name, const char *type, const char *help)
{
	fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metric_u64(FILE *out, const char *name, const char *type, const char *help,
		       uint64_t v)
{
	metric_head(out, name, type, help);
	fprintf(out, "%s %" PRIu64 "\n", name, v);
}

static void metric_node(char *buf, size_t len, int32_t node)
{
	if (node >= 0)
		snprintf(buf, len, "%d", node);
	else
		snprintf(buf, len, "none");
}

/* A label value: backslash, double quote and newline escaped as the format requires. */
static void metric_label_value(FILE *out, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\')
			fputs("\\\\", out);
		else if (*s == '"')
			fputs("\\\"", out);
		else if (*s == '\n')
			fputs("\\n", out);
		else
			fputc(*s, out);
	}
}

static void metric_double(FILE *out, double v)
{
	if (isnan(v))
		fputs("NaN", out);
	else if (isinf(v))
		fputs(v > 0 ? "+Inf" : "-Inf", out);
	else {
		/* The shortest of %.15g and %.17g that reads back as v. */
		char text[32];
		snprintf(text, sizeof(text), "%.15g", v);
		if (strtod(text, NULL) != v)
			snprintf(text, sizeof(text), "%.17g", v);
		fputs(text, out);
	}
}

/* A Prometheus histogram from per-bucket (not cumulative) counts. */
static void metric_histogram(FILE *out, const char *name, const char *help,
			     const uint64_t *bucket, uint64_t count, uint64_t sum_ns)
{
	static const double bounds[SKV_HIST_BUCKETS] = SKV_HIST_BOUNDS_S;
	metric_head(out, name, "histogram", help);
	uint64_t cumulative = 0;
	for (unsigned b = 0; b < SKV_HIST_BUCKETS; b++) {
		cumulative += bucket[b];
		if (bounds[b] >= 1e300)
			fprintf(out, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cumulative);
		else
			fprintf(out, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, bounds[b], cumulative);
	}
	fprintf(out, "%s_sum ", name);
	metric_double(out, (double)sum_ns * 1e-9);
	fprintf(out, "\n%s_count %" PRIu64 "\n", name, count);
}

void admin_metrics_print(FILE *out, const struct admin_snapshot *snap)
{
	_Static_assert(sizeof(snap->hist.ttft_bucket) / sizeof(*snap->hist.ttft_bucket) ==
			       SKV_HIST_BUCKETS, "ADMIN_HIST carries SKV_HIST_BUCKETS buckets");
	const struct skv_admin_server *s = &snap->server;
	char node[16];

	metric_head(out, "streamkv_info", "gauge",
		    "Constant 1; the labels name the daemon's version and instance (random per start).");
	fputs("streamkv_info{version=\"", out);
	metric_label_value(out, s->version);
	fprintf(out, "\",instance_id=\"%016" PRIx64 "\"} 1\n", s->instance);
	metric_head(out, "streamkv_uptime_seconds", "gauge", "Seconds since the daemon started.");
	fputs("streamkv_uptime_seconds ", out);
	metric_double(out, s->uptime_s);
	fputc('\n', out);

	metric_u64(out, "streamkv_tokens_generated_total", "counter",
		   "Tokens generated by the engines.", s->tokens_generated);
	metric_u64(out, "streamkv_prompt_tokens_total", "counter",
		   "Prompt tokens fed to the engines.", s->prompt_tokens);
	metric_u64(out, "streamkv_tokens_evicted_total", "counter",
		   "Tokens evicted from KV windows, closed streams included.",
		   s->tokens_evicted);
	metric_u64(out, "streamkv_streams_opened_total", "counter", "Streams opened.",
		   s->streams_opened);
	metric_u64(out, "streamkv_streams_closed_total", "counter", "Streams closed.",
		   s->streams_closed);
	metric_u64(out, "streamkv_streams_failed_total", "counter",
		   "Streams failed (their engine died or the stream hit an error).",
		   s->streams_failed);
	metric_u64(out, "streamkv_engine_restarts_total", "counter",
		   "Engine processes restarted by the daemon.", s->engine_restarts);
	metric_u64(out, "streamkv_ring_wakeups_total", "counter",
		   "Ring wake-ups that needed a system call (a consumer was asleep).",
		   s->wake_syscalls);
	metric_u64(out, "streamkv_engine_steps_total", "counter",
		   "Forward steps run by the engines.", s->steps);

	metric_u64(out, "streamkv_streams", "gauge", "Streams in the daemon's table.", s->streams);
	metric_u64(out, "streamkv_streams_queued", "gauge",
		   "Stream OPENs waiting in the admission queue (--admission queue).",
		   s->streams_queued);
	metric_u64(out, "streamkv_engines", "gauge", "Engines known to the daemon.", s->engines);
	metric_u64(out, "streamkv_engines_ready", "gauge", "Engines serving.", s->engines_ready);

	metric_head(out, "streamkv_arena_size_bytes", "gauge", "Size of each KV arena.");
	for (size_t i = 0; i < snap->n_arenas; i++) {
		metric_node(node, sizeof(node), snap->arenas[i].node);
		fprintf(out, "streamkv_arena_size_bytes{arena=\"%u\",node=\"%s\"} %" PRIu64 "\n",
			snap->arenas[i].index, node, snap->arenas[i].bytes);
	}
	metric_head(out, "streamkv_kv_bytes_in_use", "gauge",
		    "Bytes of each arena handed out as KV regions.");
	for (size_t i = 0; i < snap->n_arenas; i++) {
		metric_node(node, sizeof(node), snap->arenas[i].node);
		fprintf(out, "streamkv_kv_bytes_in_use{arena=\"%u\",node=\"%s\"} %" PRIu64 "\n",
			snap->arenas[i].index, node, snap->arenas[i].used_bytes);
	}
	metric_head(out, "streamkv_arena_largest_free_bytes", "gauge",
		    "The largest free region of each arena.");
	for (size_t i = 0; i < snap->n_arenas; i++) {
		metric_node(node, sizeof(node), snap->arenas[i].node);
		fprintf(out,
			"streamkv_arena_largest_free_bytes{arena=\"%u\",node=\"%s\"} %" PRIu64 "\n",
			snap->arenas[i].index, node, snap->arenas[i].largest_free_bytes);
	}
	metric_head(out, "streamkv_arena_usage_ratio", "gauge",
		    "Used bytes over size of each arena (0 to 1).");
	for (size_t i = 0; i < snap->n_arenas; i++) {
		metric_node(node, sizeof(node), snap->arenas[i].node);
		fprintf(out, "streamkv_arena_usage_ratio{arena=\"%u\",node=\"%s\"} ",
			snap->arenas[i].index, node);
		metric_double(out, report_ratio(snap->arenas[i].used_bytes, snap->arenas[i].bytes));
		fputc('\n', out);
	}

	metric_head(out, "streamkv_engine_streams", "gauge", "Streams served by each engine.");
	for (size_t i = 0; i < snap->n_engines; i++) {
		metric_node(node, sizeof(node), snap->engines[i].node);
		fprintf(out, "streamkv_engine_streams{engine=\"%u\",node=\"%s\"} %u\n",
			snap->engines[i].id, node, snap->engines[i].streams);
	}
	metric_head(out, "streamkv_engine_batch_rows", "gauge",
		    "Rows in each engine's last forward step (its batch size).");
	for (size_t i = 0; i < snap->n_engines; i++) {
		metric_node(node, sizeof(node), snap->engines[i].node);
		fprintf(out, "streamkv_engine_batch_rows{engine=\"%u\",node=\"%s\"} %u\n",
			snap->engines[i].id, node, snap->engines[i].last_batch_rows);
	}
	metric_head(out, "streamkv_engine_tokens_generated_total", "counter",
		    "Tokens generated by each engine (resets when the engine restarts).");
	for (size_t i = 0; i < snap->n_engines; i++) {
		metric_node(node, sizeof(node), snap->engines[i].node);
		fprintf(out,
			"streamkv_engine_tokens_generated_total{engine=\"%u\",node=\"%s\"} %" PRIu64
			"\n", snap->engines[i].id, node, snap->engines[i].tokens_generated);
	}

	if (!snap->have_hist) {
		fputs("# streamkv_time_to_first_token_seconds and streamkv_inter_token_latency_seconds:"
		      " this skv-cached serves no latency histograms\n", out);
		return;
	}
	const struct skv_admin_hist *h = &snap->hist;
	metric_histogram(out, "streamkv_time_to_first_token_seconds",
			 "From the engine taking a request to its first token.", h->ttft_bucket,
			 h->ttft_count, h->ttft_sum_ns);
	metric_histogram(out, "streamkv_inter_token_latency_seconds",
			 "Between consecutive tokens of one request.", h->itl_bucket, h->itl_count,
			 h->itl_sum_ns);
}

/* ---- events ------------------------------------------------------------------------------- */

const char *admin_event_name(uint32_t type)
{
	switch (type) {
	case SKV_EVENT_OPEN: return "open";
	case SKV_EVENT_CLOSE: return "close";
	case SKV_EVENT_FAIL: return "fail";
	case SKV_EVENT_EVICT: return "evict";
	case SKV_EVENT_ENGINE_START: return "engine-start";
	case SKV_EVENT_ENGINE_EXIT: return "engine-exit";
	default: return "unknown";
	}
}

static int report_event_has_stream(uint32_t type)
{
	return type >= SKV_EVENT_OPEN && type <= SKV_EVENT_EVICT;
}

/* ISO 8601 UTC with milliseconds. */
static void report_time(double t, char *buf, size_t len)
{
	if (!isfinite(t) || t < 0 || t > 4e12) {
		snprintf(buf, len, "-");
		return;
	}
	time_t sec = (time_t)t;
	struct tm tm;
	gmtime_r(&sec, &tm);
	char date[32];
	strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03dZ", date, (int)((t - (double)sec) * 1000.0));
}

json_t *admin_event_json(const struct skv_admin_event *ev)
{
	json_t *o = json_object();
	char when[48];
	report_time(ev->time_s, when, sizeof(when));
	set_str(o, "time", when);
	set_real(o, "time_seconds", ev->time_s, 6);
	set_str(o, "type", admin_event_name(ev->type));
	if (report_event_has_stream(ev->type))
		set_u64(o, "stream", ev->stream_id);
	else
		json_object_set_new(o, "stream", json_null());
	if (ev->engine != UINT32_MAX)
		set_u64(o, "engine", ev->engine);
	else
		json_object_set_new(o, "engine", json_null());
	set_u64(o, "arg", ev->arg);
	set_str(o, "text", ev->text);
	return o;
}

void admin_event_print(FILE *out, const struct skv_admin_event *ev)
{
	char when[48], stream[24], engine[16];
	report_time(ev->time_s, when, sizeof(when));
	if (report_event_has_stream(ev->type))
		snprintf(stream, sizeof(stream), "%" PRIu64, ev->stream_id);
	else
		snprintf(stream, sizeof(stream), "-");
	if (ev->engine != UINT32_MAX)
		snprintf(engine, sizeof(engine), "%u", ev->engine);
	else
		snprintf(engine, sizeof(engine), "-");
	fprintf(out, "%s %s stream=%s engine=%s arg=%" PRIu64 " ", when,
		admin_event_name(ev->type), stream, engine, ev->arg);
	report_print_string(out, ev->text, strlen(ev->text), 0);
	fputc('\n', out);
}
