/* Chat templates (engine/chat-template.c): each format's exact text for one multi-turn
 * conversation with a system prompt, recognition of the real tokenizer.chat_template strings
 * the models ship (written here as fixtures), unknown templates refused, and the text of a
 * continuing stream (messages [from, n)) equal to the suffix of the full rendering. */
#include "chat-template.h"
#include "gguf.h"
#include "tokenizer.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MSG(r, c) { r, c, sizeof(c) - 1 }

/* system, user, assistant, user: the conversation every format renders. */
static const struct skv_chat_message conversation[] = {
	MSG("system", "Be brief."),
	MSG("user", "Hi!"),
	MSG("assistant", "Hello."),
	MSG("user", "Why is the sky blue?"),
};
#define N_CONVERSATION (sizeof(conversation) / sizeof(conversation[0]))

static char *render(const char *name, size_t from, int generation_prompt, size_t *len)
{
	const struct skv_chat_template *t = skv_chat_template_find(name);
	cr_assert_not_null(t, "template %s", name);
	char *text = NULL;
	int err = skv_chat_template_render(t, conversation, N_CONVERSATION, from,
					   generation_prompt, &text, len);
	cr_assert_eq(err, 0, "%s: %d", name, err);
	cr_assert_not_null(text);
	cr_assert_eq(strlen(text), *len);
	return text;
}

static void expect_rendering(const char *name, const char *expected)
{
	size_t len;
	char *text = render(name, 0, 1, &len);
	cr_assert_str_eq(text, expected, "%s renders\n%s", name, text);
	free(text);
}

Test(chat_template, story)
{
	expect_rendering("story", "Be brief.\n"
				  "Tom said, \"Hi!\"\nMom said, Hello."
				  "Tom said, \"Why is the sky blue?\"\nMom said,");
}

Test(chat_template, raw)
{
	expect_rendering("raw", "Be brief.\nHi!\nHello.\nWhy is the sky blue?\n");
}

Test(chat_template, llama2)
{
	expect_rendering("llama2", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
				   "<s>[INST] Why is the sky blue? [/INST]");
}

Test(chat_template, llama3)
{
	expect_rendering("llama3",
			 "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
			 "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
			 "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
			 "<|start_header_id|>user<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|>"
			 "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

Test(chat_template, chatml)
{
	expect_rendering("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n"
				   "<|im_start|>user\nHi!<|im_end|>\n"
				   "<|im_start|>assistant\nHello.<|im_end|>\n"
				   "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
				   "<|im_start|>assistant\n");
	cr_assert_eq(skv_chat_template_find("qwen2"), skv_chat_template_find("chatml"));
}

Test(chat_template, vicuna)
{
	expect_rendering("vicuna", "Be brief.\n\nUSER: Hi!\nASSISTANT: Hello.</s>\n"
				   "USER: Why is the sky blue?\nASSISTANT:");
}

/* The story default is what skv chat fed before templates were shared:
 * Tom said, "{turn}"\nMom said, for each turn. */
Test(chat_template, story_turn_is_the_old_default)
{
	const struct skv_chat_message turn = MSG("user", "Hello");
	char *text;
	size_t len;
	cr_assert_eq(skv_chat_template_render(skv_chat_template_find("story"), &turn, 1, 0, 1,
					      &text, &len), 0);
	cr_assert_str_eq(text, "Tom said, \"Hello\"\nMom said,");
	free(text);
}

Test(chat_template, special_and_trims)
{
	cr_assert_eq(skv_chat_template_special(skv_chat_template_find("story")), 0);
	cr_assert_eq(skv_chat_template_special(skv_chat_template_find("raw")), 0);
	const char *special[] = { "llama2", "llama3", "chatml", "vicuna" };
	for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
		cr_assert_eq(skv_chat_template_special(skv_chat_template_find(special[i])), 1,
			     "%s", special[i]);
	cr_assert_eq(skv_chat_template_trims(skv_chat_template_find("story")), 1);
	cr_assert_eq(skv_chat_template_trims(skv_chat_template_find("raw")), 0);
}

Test(chat_template, unknown_name)
{
	cr_assert_null(skv_chat_template_find("klingon"));
	cr_assert_null(skv_chat_template_find(""));
	cr_assert_null(skv_chat_template_find(NULL));
	cr_assert_str_eq(skv_chat_template_names(), "story, raw, llama2, llama3, chatml, vicuna");
}

/* Every suffix of the conversation renders as the full rendering's suffix. */
Test(chat_template, continuation_is_the_suffix)
{
	const char *names[] = { "story", "raw", "llama2", "llama3", "chatml", "vicuna" };
	for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
		for (int gp = 0; gp <= 1; gp++) {
			size_t full_len;
			char *full = render(names[k], 0, gp, &full_len);
			size_t prev_len = full_len + 1;
			for (size_t from = 0; from <= N_CONVERSATION; from++) {
				size_t len;
				char *tail = render(names[k], from, gp, &len);
				cr_assert_leq(len, full_len);
				cr_assert_lt(len, prev_len, "%s from %zu", names[k], from);
				cr_assert_eq(memcmp(full + full_len - len, tail, len), 0,
					     "%s from %zu: '%s' is not the end of '%s'", names[k],
					     from, tail, full);
				prev_len = len;
				free(tail);
			}
			free(full);
		}
	}
}

/* The new turn of a stream that generated "Hello." after the first turn: the answer's end
 * marker, then the turn; the assistant's content is not needed (the stream holds it). */
Test(chat_template, new_turn_after_a_generated_answer)
{
	const struct skv_chat_message turns[] = {
		MSG("user", "Hi!"),
		MSG("assistant", ""),
		MSG("user", "More."),
	};
	char *text;
	size_t len;
	cr_assert_eq(skv_chat_template_render(skv_chat_template_find("chatml"), turns, 3, 2, 1,
					      &text, &len), 0);
	cr_assert_str_eq(text, "<|im_end|>\n<|im_start|>user\nMore.<|im_end|>\n"
			       "<|im_start|>assistant\n");
	free(text);
	cr_assert_eq(skv_chat_template_render(skv_chat_template_find("llama2"), turns, 3, 2, 1,
					      &text, &len), 0);
	cr_assert_str_eq(text, " </s><s>[INST] More. [/INST]");
	free(text);
}

Test(chat_template, bad_arguments)
{
	char *text = (char *)1;
	size_t len;
	const struct skv_chat_template *t = skv_chat_template_find("raw");
	cr_assert_eq(skv_chat_template_render(t, conversation, N_CONVERSATION,
					      N_CONVERSATION + 1, 1, &text, &len), -EINVAL);
	cr_assert_eq(skv_chat_template_render(NULL, conversation, 1, 0, 1, &text, &len), -EINVAL);
	cr_assert_eq(skv_chat_template_render(t, NULL, 0, 0, 1, &text, &len), 0);
	cr_assert_str_eq(text, "");
	cr_assert_eq(len, 0);
	free(text);
}

/* The tokenizer.chat_template strings of the models (Jinja, as their GGUFs carry them). */
static const char llama2_jinja[] =
	"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
	"{% set system_message = messages[0]['content'] %}{% else %}"
	"{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
	"{% for message in loop_messages %}"
	"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
	"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
	"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
	"{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
	"{% else %}{% set content = message['content'] %}{% endif %}"
	"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
	"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
	"{% endif %}{% endfor %}";

static const char llama3_jinja[] =
	"{% set loop_messages = messages %}{% for message in loop_messages %}"
	"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
	"+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
	"{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
	"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
	"{% endif %}";

static const char qwen2_jinja[] =
	"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
	"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
	"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
	"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

static const char vicuna_jinja[] =
	"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
	"{% set system_message = messages[0]['content'] %}{% else %}"
	"{% set loop_messages = messages %}"
	"{% set system_message = 'A chat between a curious user and an artificial intelligence "
	"assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s "
	"questions.' %}{% endif %}{{ system_message + ' ' }}{% for message in loop_messages %}"
	"{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'].strip() + ' ' }}"
	"{% elif message['role'] == 'assistant' %}"
	"{{ 'ASSISTANT: ' + message['content'].strip() + eos_token + ' ' }}{% endif %}{% endfor %}"
	"{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/* Mistral Instruct v0.1: [INST] without Llama 2's <<SYS>> block, another format. */
static const char mistral_jinja[] =
	"{{ bos_token }}{% for message in messages %}"
	"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
	"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
	"{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
	"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}"
	"{% endfor %}";

/* Zephyr (TinyLlama chat) and Gemma: formats this module does not write. */
static const char zephyr_jinja[] =
	"{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
	"{{ '<|user|>\n' + message['content'] + eos_token }}\n"
	"{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
	"{% elif message['role'] == 'assistant' %}\n"
	"{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
	"{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
	"{% endfor %}";
static const char gemma_jinja[] =
	"{{ bos_token }}{% for message in messages %}"
	"{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + "
	"'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
	"{{'<start_of_turn>model\n'}}{% endif %}";

static void expect_recognized(const char *jinja, const char *name)
{
	const struct skv_chat_template *t = NULL;
	cr_assert_eq(skv_chat_template_recognize(jinja, strlen(jinja), &t), 0, "%s", name);
	cr_assert_not_null(t);
	cr_assert_str_eq(skv_chat_template_name(t), name);
}

static void expect_refused(const char *jinja)
{
	const struct skv_chat_template *t = (const struct skv_chat_template *)1;
	cr_assert_eq(skv_chat_template_recognize(jinja, strlen(jinja), &t), -ENOENT, "%s", jinja);
	cr_assert_null(t);
}

Test(chat_template, recognizes_real_templates)
{
	expect_recognized(llama2_jinja, "llama2");
	expect_recognized(llama3_jinja, "llama3");
	expect_recognized(qwen2_jinja, "chatml");
	expect_recognized(vicuna_jinja, "vicuna");
}

Test(chat_template, refuses_unknown_templates)
{
	expect_refused(mistral_jinja);
	expect_refused(zephyr_jinja);
	expect_refused(gemma_jinja);
	expect_refused("");
	const struct skv_chat_template *t;
	cr_assert_eq(skv_chat_template_recognize(NULL, 0, &t), -EINVAL);
	cr_assert_eq(skv_chat_template_recognize("x", 1, NULL), -EINVAL);
}

/* Only len bytes are looked at: a marker past the end does not count. */
Test(chat_template, recognition_honours_len)
{
	const struct skv_chat_template *t;
	cr_assert_eq(skv_chat_template_recognize(qwen2_jinja, 20, &t), -ENOENT);
}

/* The special tokens of a rendering are their ids with skv_tokenizer_encode_special() and
 * plain text without it: Llama 2's </s><s> between turns on the Llama 2 vocabulary
 * (models/vocab/ggml-vocab-llama-spm.gguf). */
Test(chat_template, special_tokens_encode_as_ids)
{
	const char *dir = getenv("SKV_VOCAB_DIR");
	cr_assert_not_null(dir, "SKV_VOCAB_DIR is not set (run the suite with meson test)");
	char path[4096];
	snprintf(path, sizeof(path), "%s/ggml-vocab-llama-spm.gguf", dir);
	struct skv_gguf *g = NULL;
	struct skv_tokenizer *tok = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_gguf_str *tokens;
	uint64_t n_tokens;
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &n_tokens), 0);
	free(tokens);
	cr_assert_eq(skv_tokenizer_from_gguf(g, (int32_t)n_tokens, &tok, msg, sizeof(msg)), 0,
		     "%s", msg);
	skv_gguf_close(g);

	size_t len;
	char *text = render("llama2", 0, 1, &len);
	int32_t *ids, *plain;
	size_t n_ids, n_plain;
	cr_assert_eq(skv_tokenizer_encode_special(tok, text, len, 1, 0, &ids, &n_ids), 0);
	cr_assert_eq(skv_tokenizer_encode(tok, text, len, 1, 0, &plain, &n_plain), 0);
	int32_t bos = skv_tokenizer_bos(tok), eos = skv_tokenizer_eos(tok);
	cr_assert(bos >= 0 && eos >= 0 && bos != eos);
	size_t n_bos = 0, n_eos = 0, at_eos = 0;
	for (size_t i = 0; i < n_ids; i++) {
		n_bos += ids[i] == bos;
		if (ids[i] == eos) {
			n_eos++;
			at_eos = i;
		}
	}
	cr_assert_eq(ids[0], bos);
	cr_assert_eq(n_bos, 2u, "the prompt's BOS and the second turn's <s>");
	cr_assert_eq(n_eos, 1u, "the first answer's </s>");
	cr_assert_lt(at_eos + 1, n_ids);
	cr_assert_eq(ids[at_eos + 1], bos);
	for (size_t i = 1; i < n_plain; i++)
		cr_assert(plain[i] != bos && plain[i] != eos, "plain text: no special ids");
	cr_assert_gt(n_plain, n_ids);
	free(ids);
	free(plain);
	free(text);
	skv_tokenizer_free(tok);
}
