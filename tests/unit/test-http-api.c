/* http/http-api.c and http/http-template.c: OpenAI request bodies parsed and checked against
 * the operator's limits, JSON strings (invalid UTF-8 as U+FFFD), where a UTF-8 sequence may
 * still be completed, error bodies, SSE chunks and whole bodies, the chat templates. */
#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http-gw.h"

static struct gw_opts opts(void)
{
	struct gw_opts o = { .max_body = 1 << 20, .max_concurrent = 8, .max_tokens = 100,
			     .conversation_idle = 60, .max_window = 300, .max_sink = 8 };
	o.tmpl = gw_template_find("story");
	return o;
}

static int parse(enum gw_kind kind, const char *body, struct gw_request *r, struct gw_buf *err)
{
	struct gw_opts o = opts();
	err->len = 0;
	return gw_request_parse(&o, "stories260K", kind, body, strlen(body), r, err);
}

/* The error body is OpenAI's shape and names param. */
static void expect_bad(enum gw_kind kind, const char *body, int status, const char *param)
{
	struct gw_request r;
	struct gw_buf err = { 0 };
	cr_assert_eq(parse(kind, body, &r, &err), status, "%s", body);
	json_error_t je;
	json_t *v = json_loads(err.data, 0, &je);
	cr_assert(v, "error body not JSON: %s", err.data);
	json_t *e = json_object_get(v, "error");
	cr_assert(json_is_string(json_object_get(e, "message")));
	cr_assert(json_object_get(e, "type") && json_object_get(e, "code"));
	json_t *p = json_object_get(e, "param");
	if (param)
		cr_assert_str_eq(json_string_value(p), param, "%s", err.data);
	json_decref(v);
	gw_request_free(&r);
	gw_buf_free(&err);
}

Test(http_api, completion_fields)
{
	struct gw_request r;
	struct gw_buf err = { 0 };
	cr_assert_eq(parse(GW_COMPLETION,
			   "{\"model\":\"stories260K\",\"prompt\":[\"Hi there\"],\"max_tokens\":7,"
			   "\"temperature\":0,\"top_p\":0.5,\"seed\":42,\"stop\":[\"\\n\",\"x\"],"
			   "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"echo\":true,"
			   "\"conversation\":\"a.b:c-1\",\"policy\":\"window\",\"window\":64,"
			   "\"sink\":2,\"ignore_eos\":true,\"logit_bias\":{},\"user\":\"u\"}",
			   &r, &err), 0, "%s", err.data);
	cr_assert_str_eq(r.prompt, "Hi there");
	cr_assert_eq(r.max_tokens, 7u);
	cr_assert_float_eq(r.temperature, 0.0f, 1e-9);
	cr_assert_float_eq(r.top_p, 0.5f, 1e-6);
	cr_assert(r.have_seed && r.seed == 42);
	cr_assert_eq(r.n_stop, 2);
	cr_assert_str_eq(r.stop[0], "\n");
	cr_assert(r.stream && r.include_usage && r.echo && r.ignore_eos);
	cr_assert_str_eq(r.conversation, "a.b:c-1");
	cr_assert_eq(r.policy, 1);
	cr_assert_eq(r.window, 64);
	cr_assert_eq(r.sinks, 2);
	gw_request_free(&r);
	gw_buf_free(&err);
}

Test(http_api, defaults)
{
	struct gw_request r;
	struct gw_buf err = { 0 };
	cr_assert_eq(parse(GW_COMPLETION, "{}", &r, &err), 0);
	cr_assert_str_eq(r.prompt, "");
	cr_assert_eq(r.max_tokens, 16u, "OpenAI's default for completions");
	cr_assert_float_eq(r.temperature, 1.0f, 1e-9);
	cr_assert(!r.stream && !r.have_seed && r.n_stop == 0 && !r.conversation[0]);
	cr_assert_eq(r.policy, -1);
	gw_request_free(&r);
	cr_assert_eq(parse(GW_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}", &r,
			   &err), 0);
	cr_assert_eq(r.max_tokens, 100u, "chat: 256, capped by --max-tokens");
	gw_request_free(&r);
	gw_buf_free(&err);
}

Test(http_api, chat_messages)
{
	struct gw_request r;
	struct gw_buf err = { 0 };
	cr_assert_eq(parse(GW_CHAT,
			   "{\"messages\":[{\"role\":\"system\",\"content\":\"Be kind.\"},"
			   "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hel\"},"
			   "{\"type\":\"text\",\"text\":\"lo\"}]},"
			   "{\"role\":\"assistant\",\"content\":null}],"
			   "\"max_completion_tokens\":9}",
			   &r, &err), 0, "%s", err.data);
	cr_assert_eq(r.n_messages, 3u);
	cr_assert_str_eq(r.messages[1].role, "user");
	cr_assert_str_eq(r.messages[1].content, "Hello");
	cr_assert_eq(r.messages[1].content_len, 5u);
	cr_assert_str_eq(r.messages[2].content, "");
	cr_assert_eq(r.max_tokens, 9u);
	struct gw_buf text = { 0 };
	const struct skv_chat_template *t = gw_template_find("story");
	cr_assert_eq(gw_template_render(t, r.messages, r.n_messages, 0, &text), 0);
	cr_assert_str_eq(text.data, "Be kind.\nTom said, \"Hello\"\nMom said, ");
	cr_assert(gw_template_trims(t));
	cr_assert(!gw_template_trims(gw_template_find("raw")));
	cr_assert_null(gw_template_find("nope"));
	gw_buf_free(&text);
	gw_request_free(&r);
	gw_buf_free(&err);
}

/* --chat-template auto: the format the model file names; story for one that names none (a
 * llama2.c file, a GGUF without tokenizer.chat_template); a template none of the formats match
 * (Phi-3's <|user|>) and a missing file refused in one line. */
Test(http_api, template_auto)
{
	const char *models = getenv("SKV_MODEL_DIR"), *vocab = getenv("SKV_VOCAB_DIR");
	cr_assert(models && vocab, "SKV_MODEL_DIR, SKV_VOCAB_DIR: run the tests through meson");
	char path[4096], msg[512];
	const struct skv_chat_template *t = NULL;
	snprintf(path, sizeof(path), "%s/stories260K.bin", models);
	cr_assert_eq(gw_template_auto(path, &t, msg, sizeof(msg)), 1);
	cr_assert_str_eq(gw_template_name(t), "story");
	snprintf(path, sizeof(path), "%s/stories260K.gguf", models);
	t = NULL;
	cr_assert_eq(gw_template_auto(path, &t, msg, sizeof(msg)), 1);
	cr_assert_eq(t, gw_template_find("story"));
	snprintf(path, sizeof(path), "%s/ggml-vocab-phi-3.gguf", vocab);
	cr_assert_eq(gw_template_auto(path, &t, msg, sizeof(msg)), -ENOENT);
	cr_assert_null(t);
	cr_assert(strstr(msg, "none of the formats") && strstr(msg, "--chat-template NAME") &&
		  !strchr(msg, '\n'), "%s", msg);
	snprintf(path, sizeof(path), "%s/no-such-model.gguf", models);
	cr_assert_eq(gw_template_auto(path, &t, msg, sizeof(msg)), -ENOENT);
	cr_assert(strstr(msg, "no-such-model.gguf"), "%s", msg);
}

Test(http_api, refusals)
{
	expect_bad(GW_COMPLETION, "{\"prompt\": ", 400, NULL);
	expect_bad(GW_COMPLETION, "[]", 400, NULL);
	expect_bad(GW_COMPLETION, "{\"prompt\":1}", 400, "prompt");
	expect_bad(GW_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}", 400, "prompt");
	expect_bad(GW_COMPLETION, "{\"max_tokens\":1.5}", 400, "max_tokens");
	expect_bad(GW_COMPLETION, "{\"max_tokens\":0}", 400, "max_tokens");
	expect_bad(GW_COMPLETION, "{\"max_tokens\":101}", 400, "max_tokens");
	expect_bad(GW_COMPLETION, "{\"temperature\":\"hot\"}", 400, "temperature");
	expect_bad(GW_COMPLETION, "{\"temperature\":2.5}", 400, "temperature");
	expect_bad(GW_COMPLETION, "{\"top_p\":0}", 400, "top_p");
	expect_bad(GW_COMPLETION, "{\"seed\":-1}", 400, "seed");
	expect_bad(GW_COMPLETION, "{\"n\":2}", 400, "n");
	expect_bad(GW_COMPLETION, "{\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, "stop");
	expect_bad(GW_COMPLETION, "{\"stop\":{}}", 400, "stop");
	expect_bad(GW_COMPLETION, "{\"stream\":\"yes\"}", 400, "stream");
	expect_bad(GW_COMPLETION, "{\"conversation\":\"a b\"}", 400, "conversation");
	expect_bad(GW_COMPLETION, "{\"conversation\":7}", 400, "conversation");
	expect_bad(GW_COMPLETION, "{\"policy\":\"lru\"}", 400, "policy");
	expect_bad(GW_COMPLETION, "{\"window\":301}", 400, "window");
	expect_bad(GW_COMPLETION, "{\"sink\":9}", 400, "sink");
	expect_bad(GW_COMPLETION, "{\"model\":\"gpt-4\"}", 404, "model");
	expect_bad(GW_COMPLETION, "{\"model\":4}", 400, "model");
	expect_bad(GW_CHAT, "{}", 400, "messages");
	expect_bad(GW_CHAT, "{\"messages\":{}}", 400, "messages");
	expect_bad(GW_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0]");
	expect_bad(GW_CHAT, "{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}", 400,
		   "messages[0]");
}

Test(http_api, json_strings)
{
	struct gw_buf b = { 0 };
	cr_assert_eq(gw_json_string(&b, "a\"\\\n\t\x01\xc3\xa9", 8), 0);
	cr_assert_str_eq(b.data, "\"a\\\"\\\\\\n\\t\\u0001\xc3\xa9\"");
	b.len = 0;
	/* A lone continuation byte, a truncated sequence, an overlong and a surrogate. */
	cr_assert_eq(gw_json_string(&b, "x\x80y\xe2\x82z\xc0\xafw\xed\xa0\x80", 12), 0);
	json_error_t e;
	json_t *v = json_loadb(b.data, b.len, JSON_DECODE_ANY, &e);
	cr_assert(v, "not JSON: %s", b.data);
	cr_assert_str_eq(json_string_value(v),
			 "x\xef\xbf\xbdy\xef\xbf\xbd\xef\xbf\xbdz\xef\xbf\xbd\xef\xbf\xbdw"
			 "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
	json_decref(v);
	b.len = 0;
	cr_assert_eq(gw_utf8_clean(&b, "ok\xff!", 4), 0);
	cr_assert_str_eq(b.data, "ok\xef\xbf\xbd!");
	gw_buf_free(&b);
}

Test(http_api, utf8_complete)
{
	cr_assert_eq(gw_utf8_complete("abc", 3), 3u);
	cr_assert_eq(gw_utf8_complete("ab\xc3", 3), 2u, "a 2-byte lead at the end waits");
	cr_assert_eq(gw_utf8_complete("ab\xc3\xa9", 4), 4u);
	cr_assert_eq(gw_utf8_complete("a\xe2\x82", 3), 1u);
	cr_assert_eq(gw_utf8_complete("a\xe2\x82\xac", 4), 4u);
	cr_assert_eq(gw_utf8_complete("\xf0\x9f\x98", 3), 0u);
	cr_assert_eq(gw_utf8_complete("\xf0\x9f\x98\x80", 4), 4u);
	cr_assert_eq(gw_utf8_complete("", 0), 0u);
}

Test(http_api, bodies)
{
	struct gw_buf b = { 0 };
	cr_assert_eq(gw_error_body(&b, "no \"key\"", "invalid_request_error", NULL, "invalid_api_key"),
		     0);
	cr_assert_str_eq(b.data, "{\"error\":{\"message\":\"no \\\"key\\\"\",\"type\":"
				 "\"invalid_request_error\",\"param\":null,\"code\":"
				 "\"invalid_api_key\"}}\n");
	struct gw_job j = { .id = "chatcmpl-1", .created = 5, .prompt_tokens = 3,
			    .completion_tokens = 2 };
	j.req.kind = GW_CHAT;
	j.req.include_usage = 1;
	b.len = 0;
	cr_assert_eq(gw_sse_chunk(&b, &j, "m", "Hi", 2, NULL), 0);
	cr_assert_str_eq(b.data,
			 "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
			 "\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":"
			 "{\"role\":\"assistant\",\"content\":\"Hi\"},\"logprobs\":null,"
			 "\"finish_reason\":null}]}\n\n");
	j.sent_role = 1;
	b.len = 0;
	cr_assert_eq(gw_sse_chunk(&b, &j, "m", "", 0, "length"), 0);
	cr_assert(strstr(b.data, "\"delta\":{}") && strstr(b.data, "\"finish_reason\":\"length\""),
		  "%s", b.data);
	b.len = 0;
	cr_assert_eq(gw_sse_end(&b, &j, "m"), 0);
	cr_assert(strstr(b.data, "\"choices\":[],\"usage\":{\"prompt_tokens\":3,"
				 "\"completion_tokens\":2,\"total_tokens\":5}"), "%s", b.data);
	cr_assert(strstr(b.data, "data: [DONE]\n\n"));
	b.len = 0;
	j.req.kind = GW_COMPLETION;
	snprintf(j.req.conversation, sizeof(j.req.conversation), "c1");
	gw_buf_puts(&j.content, "Once");
	j.finish_reason = "stop";
	cr_assert_eq(gw_response_body(&b, &j, "m"), 0);
	json_error_t e;
	json_t *v = json_loads(b.data, 0, &e);
	cr_assert(v, "%s", b.data);
	cr_assert_str_eq(json_string_value(json_object_get(v, "object")), "text_completion");
	cr_assert_str_eq(json_string_value(json_object_get(v, "conversation")), "c1");
	json_t *c = json_array_get(json_object_get(v, "choices"), 0);
	cr_assert_str_eq(json_string_value(json_object_get(c, "text")), "Once");
	cr_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "stop");
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(v, "usage"),
						       "total_tokens")), 5);
	json_decref(v);
	gw_buf_free(&j.content);
	gw_buf_free(&b);
}

Test(http_api, conversation_ids)
{
	cr_assert(gw_conv_id_valid("a"));
	cr_assert(gw_conv_id_valid("user-42:chat_1.x"));
	cr_assert(!gw_conv_id_valid(""));
	cr_assert(!gw_conv_id_valid("a/b"));
	cr_assert(!gw_conv_id_valid("é"));
	char long_id[GW_CONV_ID_MAX + 2];
	memset(long_id, 'a', sizeof(long_id) - 1);
	long_id[sizeof(long_id) - 1] = '\0';
	cr_assert(!gw_conv_id_valid(long_id));
	long_id[GW_CONV_ID_MAX] = '\0';
	cr_assert(gw_conv_id_valid(long_id));
}
