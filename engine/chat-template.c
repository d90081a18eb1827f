/* Chat templates (see chat-template.h): one table row per format, the pieces around each
 * message. An assistant message's closing marker is written lazily, at the start of the next
 * message, so that a continuing stream's text is the suffix of the full rendering. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "chat-template.h"

struct skv_chat_template {
	const char *name;
	const char *system_open, *system_close;
	const char *user_open, *user_close;
	const char *user_open_after_system; /* Llama 2: the system block opened the [INST] */
	const char *assistant_open;
	const char *assistant_close;        /* written before the message after an assistant's */
	const char *reopen_after_assistant; /* before a system or user opener that follows one */
	const char *generation_prompt;
	int special, trims;
};

static const struct skv_chat_template template_table[] = {
	{ .name = "story",
	  .system_open = "", .system_close = "\n",
	  .user_open = "Tom said, \"", .user_close = "\"\nMom said,",
	  .assistant_open = " ", .assistant_close = "",
	  .generation_prompt = "", .trims = 1 },
	{ .name = "raw",
	  .system_open = "", .system_close = "\n",
	  .user_open = "", .user_close = "\n",
	  .assistant_open = "", .assistant_close = "\n",
	  .generation_prompt = "" },
	{ .name = "llama2",
	  .system_open = "[INST] <<SYS>>\n", .system_close = "\n<</SYS>>\n\n",
	  .user_open = "[INST] ", .user_close = " [/INST]", .user_open_after_system = "",
	  .assistant_open = " ", .assistant_close = " </s>", .reopen_after_assistant = "<s>",
	  .generation_prompt = "", .special = 1, .trims = 1 },
	{ .name = "llama3",
	  .system_open = "<|start_header_id|>system<|end_header_id|>\n\n",
	  .system_close = "<|eot_id|>",
	  .user_open = "<|start_header_id|>user<|end_header_id|>\n\n", .user_close = "<|eot_id|>",
	  .assistant_open = "<|start_header_id|>assistant<|end_header_id|>\n\n",
	  .assistant_close = "<|eot_id|>",
	  .generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n",
	  .special = 1 },
	{ .name = "chatml",
	  .system_open = "<|im_start|>system\n", .system_close = "<|im_end|>\n",
	  .user_open = "<|im_start|>user\n", .user_close = "<|im_end|>\n",
	  .assistant_open = "<|im_start|>assistant\n", .assistant_close = "<|im_end|>\n",
	  .generation_prompt = "<|im_start|>assistant\n", .special = 1 },
	{ .name = "vicuna",
	  .system_open = "", .system_close = "\n\n",
	  .user_open = "USER: ", .user_close = "\n",
	  .assistant_open = "ASSISTANT: ", .assistant_close = "</s>\n",
	  .generation_prompt = "ASSISTANT:", .special = 1, .trims = 1 },
};

#define TEMPLATE_COUNT (sizeof(template_table) / sizeof(template_table[0]))

enum template_role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

static enum template_role template_role(const char *role)
{
	if (role && !strcmp(role, "user"))
		return ROLE_USER;
	if (role && !strcmp(role, "assistant"))
		return ROLE_ASSISTANT;
	return ROLE_SYSTEM;
}

const struct skv_chat_template *skv_chat_template_find(const char *name)
{
	if (!name)
		return NULL;
	if (!strcmp(name, "qwen") || !strcmp(name, "qwen2"))
		name = "chatml";
	for (size_t i = 0; i < TEMPLATE_COUNT; i++)
		if (!strcmp(template_table[i].name, name))
			return &template_table[i];
	return NULL;
}

const char *skv_chat_template_names(void)
{
	return "story, raw, llama2, llama3, chatml, vicuna";
}

static int template_contains(const char *text, size_t len, const char *marker)
{
	size_t m = strlen(marker);
	for (size_t i = 0; i + m <= len; i++)
		if (text[i] == marker[0] && !memcmp(text + i, marker, m))
			return 1;
	return 0;
}

int skv_chat_template_recognize(const char *jinja, size_t len,
				const struct skv_chat_template **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!jinja)
		return -EINVAL;
	/* Most distinctive first: a ChatML or Llama 3 template may mention other markers in its
	 * text, none of them writes <|im_start|> or the header ids without being that format. */
	const char *name = NULL;
	if (template_contains(jinja, len, "<|im_start|>"))
		name = "chatml";
	else if (template_contains(jinja, len, "<|start_header_id|>") &&
		 template_contains(jinja, len, "<|end_header_id|>"))
		name = "llama3";
	else if (template_contains(jinja, len, "[INST]") && template_contains(jinja, len, "<<SYS>>"))
		name = "llama2";
	else if (template_contains(jinja, len, "USER:") && template_contains(jinja, len, "ASSISTANT:"))
		name = "vicuna";
	if (!name)
		return -ENOENT;
	*out = skv_chat_template_find(name);
	return 0;
}

const char *skv_chat_template_name(const struct skv_chat_template *t)
{
	return t->name;
}

int skv_chat_template_special(const struct skv_chat_template *t)
{
	return t->special;
}

int skv_chat_template_trims(const struct skv_chat_template *t)
{
	return t->trims;
}

/* A growing text; once out of memory it stays failed and the caller sees it at the end. */
struct template_text {
	char *data;
	size_t len, cap;
	int failed;
};

static void template_put(struct template_text *b, const char *s, size_t n)
{
	if (b->failed || !n)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *data = realloc(b->data, cap);
		if (!data) {
			b->failed = 1;
			return;
		}
		b->data = data;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
}

static void template_puts(struct template_text *b, const char *s)
{
	if (s)
		template_put(b, s, strlen(s));
}

int skv_chat_template_render(const struct skv_chat_template *t,
			     const struct skv_chat_message *messages, size_t n, size_t from,
			     int generation_prompt, char **text, size_t *len)
{
	if (!t || !text || !len || from > n || (n && !messages))
		return -EINVAL;
	*text = NULL;
	*len = 0;
	struct template_text b = { 0 };
	for (size_t i = from; i < n; i++) {
		const struct skv_chat_message *m = &messages[i];
		enum template_role role = template_role(m->role);
		enum template_role prev = i ? template_role(messages[i - 1].role) : ROLE_SYSTEM;
		int after_assistant = i && prev == ROLE_ASSISTANT;
		if (after_assistant)
			template_puts(&b, t->assistant_close);
		if (role == ROLE_ASSISTANT) {
			template_puts(&b, t->assistant_open);
		} else {
			if (after_assistant)
				template_puts(&b, t->reopen_after_assistant);
			if (role == ROLE_SYSTEM)
				template_puts(&b, t->system_open);
			else if (i && prev == ROLE_SYSTEM && t->user_open_after_system)
				template_puts(&b, t->user_open_after_system);
			else
				template_puts(&b, t->user_open);
		}
		if (m->content_len && !m->content) {
			free(b.data);
			return -EINVAL;
		}
		template_put(&b, m->content, m->content_len);
		if (role == ROLE_SYSTEM)
			template_puts(&b, t->system_close);
		else if (role == ROLE_USER)
			template_puts(&b, t->user_close);
	}
	if (generation_prompt)
		template_puts(&b, t->generation_prompt);
	if (!b.failed && !b.data) {
		b.data = malloc(1);
		b.failed = !b.data;
	}
	if (b.failed) {
		free(b.data);
		return -ENOMEM;
	}
	b.data[b.len] = '\0';
	*text = b.data;
	*len = b.len;
	return 0;
}
