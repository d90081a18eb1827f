/* Chat messages to the text the model is fed. Kept in this one file so that it can move to a
 * shared module when the real chat templates (Llama 2 [INST], Llama 3, ChatML, Vicuna) come.
 *
 * "story" (the default) is skv chat's template for the shipped story model, which was never
 * trained to chat: a user turn is a line of dialogue the story's mother answers,
 *     Tom said, "{content}"\nMom said,
 * a system (or developer) message is its text and a newline, and an assistant message (only
 * fed when the client sends one the stream has not seen) is a space and its text, as the model
 * writes it after "Mom said,". The answer's leading spaces are dropped, as skv chat drops them.
 * "raw" feeds every message's text as it is, followed by a newline. */
#include <string.h>

#include "http-gw.h"

struct gw_template {
	const char *name;
	const char *system_before, *system_after;
	const char *user_before, *user_after;
	const char *assistant_before, *assistant_after;
	int trims;
};

static const struct gw_template template_table[] = {
	{ "story", "", "\n", "Tom said, \"", "\"\nMom said,", " ", "", 1 },
	{ "raw", "", "\n", "", "\n", "", "\n", 0 },
};

const struct gw_template *gw_template_find(const char *name)
{
	for (size_t i = 0; i < sizeof(template_table) / sizeof(template_table[0]); i++)
		if (!strcmp(template_table[i].name, name))
			return &template_table[i];
	return NULL;
}

const char *gw_template_names(void)
{
	return "story, raw";
}

const char *gw_template_name(const struct gw_template *t)
{
	return t->name;
}

int gw_template_render(const struct gw_template *t, const struct gw_message *m,
		       struct gw_buf *b)
{
	const char *before = t->system_before, *after = t->system_after;
	if (!strcmp(m->role, "user")) {
		before = t->user_before;
		after = t->user_after;
	} else if (!strcmp(m->role, "assistant")) {
		before = t->assistant_before;
		after = t->assistant_after;
	}
	if (gw_buf_puts(b, before) < 0 || gw_buf_put(b, m->content, m->content_len) < 0 ||
	    gw_buf_puts(b, after) < 0)
		return -1;
	return 0;
}

int gw_template_trims(const struct gw_template *t)
{
	return t->trims;
}
