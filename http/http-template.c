/* Chat messages to the text the model is fed: a thin wrapper over the shared formats of
 * engine/chat-template.c (story, the default, for the shipped story model; raw; llama2,
 * llama3, chatml, vicuna), appending to the gateway's buffers. A conversation's new request
 * renders only the messages its stream has not seen, which the shared module makes the suffix
 * of the whole conversation's text (an answer's end marker comes with the next message). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chat-template.h"
#include "gguf.h"
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

int gw_template_auto(const char *path, const struct skv_chat_template **out, char *msg,
		     size_t msg_len)
{
	*out = NULL;
	/* Only a GGUF can name a template; a llama2.c model keeps the story default. */
	char magic[4] = "";
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int err = -errno;
		snprintf(msg, msg_len, "--chat-template auto: cannot open the model %s: %s", path,
			 strerror(-err));
		return err;
	}
	ssize_t got = read(fd, magic, sizeof(magic));
	close(fd);
	if (got != (ssize_t)sizeof(magic) || memcmp(magic, "GGUF", 4)) {
		*out = skv_chat_template_find("story");
		return 1;
	}
	struct skv_gguf *g;
	char why[256];
	int err = skv_gguf_open(path, &g, why, sizeof(why));
	if (err < 0) {
		snprintf(msg, msg_len, "--chat-template auto: %s", why);
		return err;
	}
	struct skv_gguf_str jinja;
	if (skv_gguf_get_str(g, "tokenizer.chat_template", &jinja) < 0) {
		*out = skv_chat_template_find("story");
		err = 1;
	} else if (skv_chat_template_recognize(jinja.ptr, (size_t)jinja.len, out) < 0) {
		snprintf(msg, msg_len,
			 "--chat-template auto: the model's tokenizer.chat_template is none of the"
			 " formats known here; restart skv-http with --chat-template NAME (%s)",
			 skv_chat_template_names());
		err = -ENOENT;
	}
	skv_gguf_close(g);
	return err;
}
