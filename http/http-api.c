/* The OpenAI API's request and response shapes: request bodies parsed with jansson and checked
 * field by field (unknown fields ignored as OpenAI does, a known field of the wrong type is a
 * 400 naming it), and the bodies and SSE chunks written back. Chunks are written by hand (one
 * per token: no jansson tree per token); their strings go through gw_json_string, which also
 * turns invalid UTF-8 into U+FFFD so that every body is valid JSON. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http-gw.h"
#include "skv-client.h"

/* ---- buffers --------------------------------------------------------------------------- */

int gw_buf_put(struct gw_buf *b, const void *data, size_t len)
{
	if (b->len + len + 1 > b->cap) {
		size_t cap = b->cap ? b->cap * 2 : 256;
		while (cap < b->len + len + 1)
			cap *= 2;
		char *d = realloc(b->data, cap);
		if (!d)
			return -ENOMEM;
		b->data = d;
		b->cap = cap;
	}
	if (len)
		memcpy(b->data + b->len, data, len);
	b->len += len;
	b->data[b->len] = '\0';
	return 0;
}

int gw_buf_puts(struct gw_buf *b, const char *s)
{
	return gw_buf_put(b, s, strlen(s));
}

int gw_buf_printf(struct gw_buf *b, const char *fmt, ...)
{
	char small[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(small, sizeof(small), fmt, ap);
	va_end(ap);
	if (n < 0)
		return -EINVAL;
	if ((size_t)n < sizeof(small))
		return gw_buf_put(b, small, (size_t)n);
	char *big = malloc((size_t)n + 1);
	if (!big)
		return -ENOMEM;
	va_start(ap, fmt);
	vsnprintf(big, (size_t)n + 1, fmt, ap);
	va_end(ap);
	int err = gw_buf_put(b, big, (size_t)n);
	free(big);
	return err;
}

void gw_buf_free(struct gw_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

/* ---- UTF-8 ----------------------------------------------------------------------------- */

/* The length of the valid UTF-8 sequence at s (rem bytes left), 0 if invalid or cut short. */
static size_t api_utf8_seq(const unsigned char *s, size_t rem)
{
	unsigned char c = s[0];
	size_t n;
	uint32_t cp;
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2;
		cp = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		cp = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		cp = c & 0x07;
	} else {
		return 0;
	}
	if (rem < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

size_t gw_utf8_complete(const char *s, size_t len)
{
	const unsigned char *u = (const unsigned char *)s;
	/* A lead byte in the last three whose sequence runs past the end: stop before it. */
	for (size_t back = 1; back <= 3 && back <= len; back++) {
		unsigned char c = u[len - back];
		if ((c & 0xc0) == 0x80)
			continue;
		size_t need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
		return need > back ? len - back : len;
	}
	return len;
}

int gw_utf8_clean(struct gw_buf *b, const char *s, size_t len)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t i = 0, run = 0;
	while (i < len) {
		size_t n = api_utf8_seq(u + i, len - i);
		if (n) {
			i += n;
			continue;
		}
		if (gw_buf_put(b, s + run, i - run) < 0 || gw_buf_put(b, "\xef\xbf\xbd", 3) < 0)
			return -ENOMEM;
		i++;
		run = i;
	}
	return gw_buf_put(b, s + run, len - run);
}

int gw_json_string(struct gw_buf *b, const char *s, size_t len)
{
	const unsigned char *u = (const unsigned char *)s;
	if (gw_buf_put(b, "\"", 1) < 0)
		return -ENOMEM;
	size_t i = 0, run = 0;
	while (i < len) {
		unsigned char c = u[i];
		char esc[8];
		const char *rep = NULL;
		size_t rep_len = 0, skip = 1;
		if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
			i++;
			continue;
		}
		if (c >= 0x80) {
			size_t n = api_utf8_seq(u + i, len - i);
			if (n) {
				i += n;
				continue;
			}
			rep = "\\ufffd";
			rep_len = 6;
		} else if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			rep = esc;
			rep_len = 2;
		} else if (c == '\n') {
			rep = "\\n";
			rep_len = 2;
		} else if (c == '\t') {
			rep = "\\t";
			rep_len = 2;
		} else if (c == '\r') {
			rep = "\\r";
			rep_len = 2;
		} else {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			rep = esc;
			rep_len = 6;
		}
		if (gw_buf_put(b, s + run, i - run) < 0 || gw_buf_put(b, rep, rep_len) < 0)
			return -ENOMEM;
		i += skip;
		run = i;
	}
	if (gw_buf_put(b, s + run, len - run) < 0 || gw_buf_put(b, "\"", 1) < 0)
		return -ENOMEM;
	return 0;
}

/* ---- errors ---------------------------------------------------------------------------- */

static int api_put_nullable(struct gw_buf *b, const char *s)
{
	return s ? gw_json_string(b, s, strlen(s)) : gw_buf_puts(b, "null");
}

int gw_error_body(struct gw_buf *b, const char *message, const char *type, const char *param,
		  const char *code)
{
	b->len = 0;
	if (gw_buf_puts(b, "{\"error\":{\"message\":") < 0 ||
	    gw_json_string(b, message, strlen(message)) < 0 || gw_buf_puts(b, ",\"type\":") < 0 ||
	    api_put_nullable(b, type) < 0 || gw_buf_puts(b, ",\"param\":") < 0 ||
	    api_put_nullable(b, param) < 0 || gw_buf_puts(b, ",\"code\":") < 0 ||
	    api_put_nullable(b, code) < 0 || gw_buf_puts(b, "}}\n") < 0)
		return -ENOMEM;
	return 0;
}

/* ---- requests -------------------------------------------------------------------------- */

static int api_bad(struct gw_buf *b, const char *param, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int api_bad(struct gw_buf *b, const char *param, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	gw_error_body(b, msg, "invalid_request_error", param, NULL);
	return 400;
}

int gw_conv_id_valid(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > GW_CONV_ID_MAX)
		return 0;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == ':' || c == '-'))
			return 0;
	}
	return 1;
}

/* A field that may be absent or null: NULL then. */
static json_t *api_field(json_t *root, const char *name)
{
	json_t *v = json_object_get(root, name);
	return v && !json_is_null(v) ? v : NULL;
}

static int api_number(json_t *root, const char *name, double lo, double hi, float *out,
		      struct gw_buf *err)
{
	json_t *v = api_field(root, name);
	if (!v)
		return 0;
	if (!json_is_number(v))
		return api_bad(err, name, "'%s' must be a number", name);
	double d = json_number_value(v);
	if (!(d >= lo && d <= hi))
		return api_bad(err, name, "'%s' must be in [%g, %g], got %g", name, lo, hi, d);
	*out = (float)d;
	return 0;
}

static int api_bool(json_t *root, const char *name, int *out, struct gw_buf *err)
{
	json_t *v = api_field(root, name);
	if (!v)
		return 0;
	if (!json_is_boolean(v))
		return api_bad(err, name, "'%s' must be a boolean", name);
	*out = json_is_true(v);
	return 0;
}

/* An integer field in [lo, hi]; 0 absent (out untouched), 1 present, or a status. */
static int api_int(json_t *root, const char *name, long long lo, long long hi, long long *out,
		   struct gw_buf *err)
{
	json_t *v = api_field(root, name);
	if (!v)
		return 0;
	if (!json_is_integer(v))
		return -api_bad(err, name, "'%s' must be an integer", name);
	long long x = json_integer_value(v);
	if (x < lo || x > hi)
		return -api_bad(err, name, "'%s' must be in [%lld, %lld], got %lld", name, lo, hi, x);
	*out = x;
	return 1;
}

static int api_messages(json_t *root, struct gw_request *r, struct gw_buf *err)
{
	json_t *msgs = api_field(root, "messages");
	if (!msgs)
		return api_bad(err, "messages", "'messages' is required");
	if (!json_is_array(msgs) || json_array_size(msgs) == 0)
		return api_bad(err, "messages", "'messages' must be a non-empty array");
	r->n_messages = json_array_size(msgs);
	r->messages = calloc(r->n_messages, sizeof(*r->messages));
	if (!r->messages)
		return api_bad(err, NULL, "out of memory");
	for (size_t i = 0; i < r->n_messages; i++) {
		json_t *m = json_array_get(msgs, i);
		char param[64];
		snprintf(param, sizeof(param), "messages[%zu]", i);
		if (!json_is_object(m))
			return api_bad(err, param, "'%s' must be an object", param);
		json_t *role = json_object_get(m, "role");
		if (!json_is_string(role))
			return api_bad(err, param, "'%s.role' must be a string", param);
		const char *rs = json_string_value(role);
		if (strcmp(rs, "system") && strcmp(rs, "developer") && strcmp(rs, "user") &&
		    strcmp(rs, "assistant"))
			return api_bad(err, param,
				       "'%s.role' must be system, developer, user or assistant", param);
		r->messages[i].role = rs;
		json_t *content = json_object_get(m, "content");
		if (json_is_string(content)) {
			r->messages[i].content = json_string_value(content);
			r->messages[i].content_len = json_string_length(content);
		} else if (json_is_null(content) && !strcmp(rs, "assistant")) {
			r->messages[i].content = "";
		} else if (json_is_array(content)) {
			/* Content parts: the text parts, joined (images are for other models). */
			struct gw_buf joined = { 0 };
			for (size_t k = 0; k < json_array_size(content); k++) {
				json_t *part = json_array_get(content, k);
				json_t *text = json_object_get(part, "text");
				if (!json_is_object(part) || !json_is_string(text)) {
					gw_buf_free(&joined);
					return api_bad(err, param,
						       "'%s.content' parts must be {\"type\": \"text\", "
						       "\"text\": ...}", param);
				}
				gw_buf_put(&joined, json_string_value(text), json_string_length(text));
			}
			/* Keep it alive with the body: replace the array by the joined string. */
			json_t *s = json_stringn(joined.data ? joined.data : "", joined.len);
			gw_buf_free(&joined);
			if (!s || json_object_set_new(m, "content", s) < 0)
				return api_bad(err, NULL, "out of memory");
			r->messages[i].content = json_string_value(s);
			r->messages[i].content_len = json_string_length(s);
		} else {
			return api_bad(err, param, "'%s.content' must be a string", param);
		}
	}
	return 0;
}

static int api_prompt(json_t *root, struct gw_request *r, struct gw_buf *err)
{
	json_t *p = api_field(root, "prompt");
	r->prompt = "";
	if (!p)
		return 0;
	if (json_is_array(p)) {
		if (json_array_size(p) != 1 || !json_is_string(json_array_get(p, 0)))
			return api_bad(err, "prompt",
				       "'prompt' must be a string or an array of one string");
		p = json_array_get(p, 0);
	}
	if (!json_is_string(p))
		return api_bad(err, "prompt", "'prompt' must be a string");
	r->prompt = json_string_value(p);
	r->prompt_len = json_string_length(p);
	return 0;
}

static int api_stop(json_t *root, struct gw_request *r, struct gw_buf *err)
{
	json_t *s = api_field(root, "stop");
	if (!s)
		return 0;
	if (json_is_string(s)) {
		if (json_string_length(s)) {
			r->stop[0] = json_string_value(s);
			r->stop_len[0] = json_string_length(s);
			r->n_stop = 1;
		}
		return 0;
	}
	if (!json_is_array(s) || json_array_size(s) > GW_MAX_STOP)
		return api_bad(err, "stop", "'stop' must be a string or an array of up to %d strings",
			       GW_MAX_STOP);
	for (size_t i = 0; i < json_array_size(s); i++) {
		json_t *e = json_array_get(s, i);
		if (!json_is_string(e))
			return api_bad(err, "stop", "'stop' must hold strings only");
		if (!json_string_length(e))
			continue;
		r->stop[r->n_stop] = json_string_value(e);
		r->stop_len[r->n_stop++] = json_string_length(e);
	}
	return 0;
}

static int api_cache(const struct gw_opts *o, json_t *root, struct gw_request *r,
		     struct gw_buf *err)
{
	r->policy = -1;
	r->sinks = -1;
	r->window = -1;
	json_t *p = api_field(root, "policy");
	if (p) {
		static const char *const names[] = { "sink", "window", "dense", "recompute" };
		if (!json_is_string(p))
			return api_bad(err, "policy", "'policy' must be a string");
		for (int i = 0; i < 4; i++)
			if (!strcmp(json_string_value(p), names[i]))
				r->policy = i;
		if (r->policy < 0)
			return api_bad(err, "policy",
				       "'policy' must be sink, window, dense or recompute");
	}
	long long v = 0;
	int got = api_int(root, "sink", 0, o->max_sink, &v, err);
	if (got < 0)
		return -got;
	if (got)
		r->sinks = v;
	got = api_int(root, "window", 1, o->max_window, &v, err);
	if (got < 0)
		return -got;
	if (got)
		r->window = v;
	return 0;
}

int gw_request_parse(const struct gw_opts *o, const char *model_name, enum gw_kind kind,
		     const char *body, size_t len, struct gw_request *r, struct gw_buf *err)
{
	memset(r, 0, sizeof(*r));
	r->kind = kind;
	r->temperature = 1.0f; /* OpenAI's defaults */
	r->top_p = 1.0f;
	r->max_tokens = kind == GW_COMPLETION ? 16 : 256;
	if (r->max_tokens > o->max_tokens)
		r->max_tokens = o->max_tokens;
	json_error_t jerr;
	r->root = json_loadb(body, len, 0, &jerr);
	if (!r->root)
		return api_bad(err, NULL, "the body is not valid JSON: %s (line %d, column %d)",
			       jerr.text, jerr.line, jerr.column);
	json_t *root = r->root;
	if (!json_is_object(root))
		return api_bad(err, NULL, "the body must be a JSON object");

	json_t *model = api_field(root, "model");
	if (model && !json_is_string(model))
		return api_bad(err, "model", "'model' must be a string");
	if (model && strcmp(json_string_value(model), model_name)) {
		char msg[GW_MODEL_NAME_MAX + 160];
		snprintf(msg, sizeof(msg), "The model '%.128s' does not exist (this server has '%s')",
			 json_string_value(model), model_name);
		gw_error_body(err, msg, "invalid_request_error", "model", "model_not_found");
		return 404;
	}
	int status = kind == GW_CHAT ? api_messages(root, r, err) : api_prompt(root, r, err);
	if (status)
		return status;

	long long v = 0;
	const char *mt = kind == GW_CHAT && api_field(root, "max_completion_tokens")
				 ? "max_completion_tokens" : "max_tokens";
	int got = api_int(root, mt, 1, (long long)o->max_tokens, &v, err);
	if (got < 0)
		return -got;
	if (got)
		r->max_tokens = (uint64_t)v;
	if ((status = api_number(root, "temperature", 0.0, 2.0, &r->temperature, err)))
		return status;
	if ((status = api_number(root, "top_p", 1e-6, 1.0, &r->top_p, err)))
		return status;
	got = api_int(root, "seed", 0, INT64_MAX, &v, err);
	if (got < 0)
		return -got;
	if (got) {
		r->seed = (uint64_t)v;
		r->have_seed = 1;
	}
	got = api_int(root, "n", 1, 1, &v, err);
	if (got < 0)
		return -got;
	if ((status = api_stop(root, r, err)) || (status = api_bool(root, "stream", &r->stream, err)))
		return status;
	json_t *so = api_field(root, "stream_options");
	if (so) {
		if (!json_is_object(so))
			return api_bad(err, "stream_options", "'stream_options' must be an object");
		if ((status = api_bool(so, "include_usage", &r->include_usage, err)))
			return status;
	}
	if (kind == GW_COMPLETION && (status = api_bool(root, "echo", &r->echo, err)))
		return status;
	if ((status = api_bool(root, "ignore_eos", &r->ignore_eos, err)))
		return status;
	json_t *conv = api_field(root, "conversation");
	if (conv) {
		if (!json_is_string(conv) || !gw_conv_id_valid(json_string_value(conv)))
			return api_bad(err, "conversation",
				       "'conversation' must be a string of 1 to %d letters, digits "
				       "and . _ : -", GW_CONV_ID_MAX);
		snprintf(r->conversation, sizeof(r->conversation), "%s", json_string_value(conv));
	}
	return api_cache(o, root, r, err);
}

void gw_request_free(struct gw_request *r)
{
	json_decref(r->root);
	free(r->messages);
	memset(r, 0, sizeof(*r));
}

/* ---- responses ------------------------------------------------------------------------- */

static int api_head(struct gw_buf *b, const struct gw_job *j, const char *model, const char *object)
{
	if (gw_buf_printf(b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":", j->id,
			  object, (long long)j->created) < 0 ||
	    gw_json_string(b, model, strlen(model)) < 0)
		return -ENOMEM;
	if (j->req.conversation[0] &&
	    (gw_buf_puts(b, ",\"conversation\":") < 0 ||
	     gw_json_string(b, j->req.conversation, strlen(j->req.conversation)) < 0))
		return -ENOMEM;
	return 0;
}

static int api_finish(struct gw_buf *b, const char *finish_reason)
{
	if (!finish_reason)
		return gw_buf_puts(b, "\"finish_reason\":null");
	return gw_buf_printf(b, "\"finish_reason\":\"%s\"", finish_reason);
}

static int api_usage(struct gw_buf *b, const struct gw_job *j)
{
	return gw_buf_printf(b,
			     "\"usage\":{\"prompt_tokens\":%llu,\"completion_tokens\":%llu,"
			     "\"total_tokens\":%llu}",
			     (unsigned long long)j->prompt_tokens,
			     (unsigned long long)j->completion_tokens,
			     (unsigned long long)(j->prompt_tokens + j->completion_tokens));
}

int gw_sse_chunk(struct gw_buf *b, const struct gw_job *j, const char *model, const char *text,
		 size_t len, const char *finish_reason)
{
	int chat = j->req.kind == GW_CHAT;
	int err = gw_buf_puts(b, "data: ");
	if (!err)
		err = api_head(b, j, model, chat ? "chat.completion.chunk" : "text_completion");
	if (!err && chat) {
		err = gw_buf_puts(b, ",\"choices\":[{\"index\":0,\"delta\":{");
		if (!err && !j->sent_role)
			err = gw_buf_puts(b, "\"role\":\"assistant\"");
		if (!err && (len || !finish_reason))
			err = gw_buf_printf(b, "%s\"content\":", j->sent_role ? "" : ",");
		if (!err && (len || !finish_reason))
			err = gw_json_string(b, text, len);
		if (!err)
			err = gw_buf_puts(b, "},\"logprobs\":null,");
	} else if (!err) {
		err = gw_buf_puts(b, ",\"choices\":[{\"index\":0,\"text\":");
		if (!err)
			err = gw_json_string(b, text, len);
		if (!err)
			err = gw_buf_puts(b, ",\"logprobs\":null,");
	}
	if (!err)
		err = api_finish(b, finish_reason);
	if (!err)
		err = gw_buf_puts(b, "}]}\n\n");
	return err;
}

int gw_sse_end(struct gw_buf *b, const struct gw_job *j, const char *model)
{
	int err = 0;
	if (j->req.include_usage) {
		err = gw_buf_puts(b, "data: ");
		if (!err)
			err = api_head(b, j, model,
				       j->req.kind == GW_CHAT ? "chat.completion.chunk"
							      : "text_completion");
		if (!err)
			err = gw_buf_puts(b, ",\"choices\":[],");
		if (!err)
			err = api_usage(b, j);
		if (!err)
			err = gw_buf_puts(b, "}\n\n");
	}
	if (!err)
		err = gw_buf_puts(b, "data: [DONE]\n\n");
	return err;
}

int gw_response_body(struct gw_buf *b, const struct gw_job *j, const char *model)
{
	int chat = j->req.kind == GW_CHAT;
	const char *text = j->content.data ? j->content.data : "";
	int err = api_head(b, j, model, chat ? "chat.completion" : "text_completion");
	if (!err && chat)
		err = gw_buf_puts(b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
				     "\"content\":");
	else if (!err)
		err = gw_buf_puts(b, ",\"choices\":[{\"index\":0,\"text\":");
	if (!err)
		err = gw_json_string(b, text, j->content.len);
	if (!err)
		err = gw_buf_puts(b, chat ? "},\"logprobs\":null," : ",\"logprobs\":null,");
	if (!err)
		err = api_finish(b, j->finish_reason ? j->finish_reason : "stop");
	if (!err)
		err = gw_buf_puts(b, "}],");
	if (!err)
		err = api_usage(b, j);
	if (!err)
		err = gw_buf_puts(b, "}\n");
	return err;
}
