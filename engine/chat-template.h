/* Chat templates: a list of (role, content) messages to the text a model is fed.
 *
 * The few formats the supported families were trained on, written out by hand rather than run
 * from the GGUF's Jinja source (no Jinja interpreter here): a model's tokenizer.chat_template
 * is only recognized by its distinctive markers, and one that is not recognized is refused, so
 * nothing guesses. Formats (name: what one user turn and its answer look like):
 *   story   the shipped story model's default (skv chat's since the start), which was never
 *           trained to chat: a user turn is a line of dialogue the story's mother answers,
 *           Tom said, "{user}"\nMom said,  then the answer " {assistant}"; a system (or
 *           developer) message is its text and "\n".
 *   raw     every message's text followed by "\n".
 *   llama2  Meta's Llama 2 chat: [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] then
 *           " {assistant}", a later turn " </s><s>[INST] {user} [/INST]".
 *   llama3  Llama 3 headers: <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>,
 *           the answer after <|start_header_id|>assistant<|end_header_id|>\n\n.
 *   chatml  ChatML (Qwen, Qwen2): <|im_start|>{role}\n{content}<|im_end|>\n, the answer after
 *           <|im_start|>assistant\n (no default system message is added).
 *   vicuna  Vicuna v1.1 (the StreamingLLM paper's demo model): {system}\n\nUSER: {user}\n
 *           then ASSISTANT: {assistant}</s>\n; the answer is asked for with "ASSISTANT:".
 * BOS is not written (<s>, <|begin_of_text|>): the tokenizer adds it to a stream's first prompt
 * where the vocabulary says so (skv_tokenizer_add_bos). Contents are written as given (not
 * stripped). Roles: "user", "assistant", anything else renders as a system message.
 *
 * Rendering is a concatenation of one piece per message plus the generation prompt (the
 * assistant's header). An assistant message's closing marker (</s>, <|eot_id|>, <|im_end|>)
 * is written at the start of the message that follows it, because a stream that generated the
 * answer holds the answer but not its end token (the sampled end is not fed back). So the text
 * a continuing stream needs for messages [from, n) is exactly the suffix of the full rendering,
 * and equals what the stream lacks whether the earlier answer was generated or fed.
 *
 * The llama2, llama3, chatml and vicuna renderings hold special tokens; they mean something
 * only when the prompt is encoded with skv_tokenizer_encode_special() (the engine does so for
 * a GENERATE with SKV_GEN_SPECIAL, libskv's SKV_CLIENT_SPECIAL). That encodes special tokens a
 * user typed into a message too, as llama.cpp's server does.
 *
 * Library code: no printing, no exit; immutable tables, safe from any thread. */
#ifndef SKV_CHAT_TEMPLATE_H
#define SKV_CHAT_TEMPLATE_H

#include <stddef.h>

struct skv_chat_template;

struct skv_chat_message {
	const char *role;
	const char *content;    /* content_len bytes, need not be NUL-terminated */
	size_t content_len;
};

/* The format named name ("story", "raw", "llama2", "llama3", "chatml", "vicuna"; also the
 * aliases "qwen", "qwen2" for chatml), or NULL. */
const struct skv_chat_template *skv_chat_template_find(const char *name);

/* "story, raw, llama2, llama3, chatml, vicuna" (for --help and error messages). */
const char *skv_chat_template_names(void);

/* Recognize a GGUF tokenizer.chat_template (Jinja source, len bytes) by its markers:
 * <|im_start|> chatml; <|start_header_id|> and <|end_header_id|> llama3; [INST] with <<SYS>>
 * llama2 (Mistral's [INST] without <<SYS>> is not Llama 2's format and is refused); USER: with
 * ASSISTANT: vicuna. Returns 0 with *out set, or -ENOENT for a template none of these match
 * (*out NULL), -EINVAL for NULL arguments. */
int skv_chat_template_recognize(const char *jinja, size_t len,
				const struct skv_chat_template **out);

const char *skv_chat_template_name(const struct skv_chat_template *t);

/* 1 if renderings hold special tokens, to be encoded with skv_tokenizer_encode_special(). */
int skv_chat_template_special(const struct skv_chat_template *t);

/* 1 if a printed answer's leading spaces are dropped (the answer follows a space's place). */
int skv_chat_template_trims(const struct skv_chat_template *t);

/* Render messages[from, n) of the conversation messages[0, n) (from == 0: all of it; the pieces
 * of messages[from] depend on messages[from - 1]'s role, which must be given), then, if
 * generation_prompt, the assistant's header. *text is malloc'ed and NUL-terminated (caller
 * frees), *len its length. Returns 0, -EINVAL (NULL arguments, from > n) or -ENOMEM. */
int skv_chat_template_render(const struct skv_chat_template *t,
			     const struct skv_chat_message *messages, size_t n, size_t from,
			     int generation_prompt, char **text, size_t *len);

#endif
