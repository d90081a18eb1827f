/* Chat messages to the text the model is fed: a thin wrapper over the shared formats of
 * engine/chat-template.c (story, the default, for the shipped story model; raw; llama2,
 * llama3, chatml, vicuna), appending to the gateway's buffers. A conversation's new request
 * renders only the messages its stream has not seen, which the shared module makes the suffix
 * of the whole conversation's text (an answer's end marker comes with the next message). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "chat-template.h"
#include "http-gw.h"

const struct skv_chat_template *gw_template_find(const char *name)
{
	return skv_chat_template_find(name);
}

const char *gw_template_names(void)
{
	return skv_chat_template_names();
}

const char *gw_template_name(const struct skv_chat_template *t)
{
	return skv_chat_template_name(t);
}

int gw_template_render(const struct skv_chat_template *t, const struct gw_message *m, size_t n,
		       size_t from, struct gw_buf *b)
{
	struct skv_chat_message *msgs = n ? calloc(n, sizeof(*msgs)) : NULL;
	if (n && !msgs)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		msgs[i] = (struct skv_chat_message){ m[i].role, m[i].content, m[i].content_len };
	/* The assistant's header, unless the client wrote the answer's start itself. */
	int generation_prompt = !n || strcmp(m[n - 1].role, "assistant");
	char *text;
	size_t len;
	int err = skv_chat_template_render(t, msgs, n, from, generation_prompt, &text, &len);
	free(msgs);
	if (err < 0)
		return err;
	err = gw_buf_put(b, text, len) < 0 ? -ENOMEM : 0;
	free(text);
	return err;
}

int gw_template_trims(const struct skv_chat_template *t)
{
	return skv_chat_template_trims(t);
}

int gw_template_special(const struct skv_chat_template *t)
{
	return skv_chat_template_special(t);
}
