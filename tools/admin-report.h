/* What skv-admin prints: every read command's data is built once as a jansson value, then either
 * dumped (--json) or rendered as text from that same value, so the two never disagree. The
 * Prometheus exposition (metrics) and the streams table are rendered from the snapshot.
 *
 * Rendering functions write to a FILE and leave error checking (ferror) to the caller. */
#ifndef SKV_ADMIN_REPORT_H
#define SKV_ADMIN_REPORT_H

#include <jansson.h>
#include <stdio.h>

#include "admin-conn.h"

struct skv_tokenizer;

/* JSON numbers: 15 significant digits, so rounded figures print as they were rounded. */
#define ADMIN_JSON_FLAGS (JSON_INDENT(2) | JSON_REAL_PRECISION(15))

/* ---- info ---------------------------------------------------------------------------------- */

enum {
	ADMIN_INFO_SERVER = 1u << 0,
	ADMIN_INFO_MEMORY = 1u << 1,
	ADMIN_INFO_ARENAS = 1u << 2,
	ADMIN_INFO_ENGINES = 1u << 3,
	ADMIN_INFO_STREAMS = 1u << 4,
	ADMIN_INFO_STATS = 1u << 5,
	ADMIN_INFO_ALL = 0x3fu,
};

/* The section bit for a name ("server", ... case-insensitive), 0 if unknown. */
unsigned admin_info_section(const char *name);
/* The section names, comma-separated (for usage messages). */
const char *admin_info_section_names(void);
/* {"server": {...}, "memory": {...}, ...} with the sections asked for (new reference). */
json_t *admin_info_build(const struct admin_snapshot *snap, unsigned sections);
/* "# Server" then key:value lines per section; object values as k=v,k=v (redis INFO style). */
void admin_info_print(FILE *out, const json_t *info);

/* ---- streams ------------------------------------------------------------------------------- */

struct admin_sort {
	int key;        /* index into the sort keys */
	int descending;
};

/* Parse KEY[:asc|:desc] (keys: the JSON field names of a stream, or the table's column
 * names); default direction: ascending for id, client_pid, engine, node, policy and state,
 * descending (largest first) for quantities. -EINVAL for an unknown key. */
int admin_sort_parse(const char *text, struct admin_sort *sort);
/* The sort keys, comma-separated (for usage messages). */
const char *admin_sort_key_names(void);
/* Sort rows in place; ties by id. */
void admin_sort_streams(struct skv_admin_stream *rows, size_t n, const struct admin_sort *sort);

json_t *admin_stream_row_json(const struct skv_admin_stream *row);
json_t *admin_streams_json(const struct skv_admin_stream *rows, size_t n);
/* One header line and one line per row, each at most width columns (0: no limit). */
void admin_streams_header(char *buf, size_t len);
void admin_streams_line(const struct skv_admin_stream *row, char *buf, size_t len);
void admin_streams_print(FILE *out, const struct skv_admin_stream *rows, size_t n);

/* One stream in depth; tok may be NULL (ids without text). */
json_t *admin_stream_detail_json(const struct admin_stream_detail *d,
				 const struct skv_tokenizer *tok);
void admin_stream_detail_print(FILE *out, const json_t *detail);

/* The decoded text of ids (llama2.c's decode, prev token = the previous id; prev is the id
 * before ids[0], or -1 when it is unknown or there is none), malloc'ed, *len bytes, plus a NUL.
 * Ids out of the vocabulary become "<?ID>". NULL on ENOMEM. */
char *admin_decode(const struct skv_tokenizer *tok, const int32_t *ids, size_t n, int32_t prev,
		   size_t *len);

/* ---- arenas, engines ----------------------------------------------------------------------- */

json_t *admin_arenas_json(const struct admin_snapshot *snap);
void admin_arenas_print(FILE *out, const struct admin_snapshot *snap);
json_t *admin_engines_json(const struct admin_snapshot *snap);
void admin_engines_print(FILE *out, const struct admin_snapshot *snap);

/* ---- metrics, events ----------------------------------------------------------------------- */

/* The Prometheus text exposition format (version 0.0.4). */
void admin_metrics_print(FILE *out, const struct admin_snapshot *snap);

const char *admin_event_name(uint32_t type);
json_t *admin_event_json(const struct skv_admin_event *ev);
void admin_event_print(FILE *out, const struct skv_admin_event *ev);

/* ---- small formatters shared with top ------------------------------------------------------ */

const char *admin_stream_state_name(uint32_t state);
const char *admin_engine_state_name(uint32_t state);
void admin_human_bytes(uint64_t bytes, char *buf, size_t len);  /* "64.0M" */
void admin_human_seconds(double s, char *buf, size_t len);      /* "1h02m03s" */

#endif
