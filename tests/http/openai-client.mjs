// The official `openai` package for Node.js against skv-http: both endpoints, streaming and
// not, greedy, and the model list. Prints one JSON line for tests/mp/test-http.c to compare.
//   node openai-client.mjs BASE_URL MODEL   (the package is resolved from node_modules next to
//   this file: the test copies it into the directory it installed the package in)
import OpenAI from 'openai';

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: process.env.SKV_HTTP_API_KEY || 'none' });
const prompt = 'Once upon a time';
const messages = [{ role: 'user', content: 'I want to play in the park.' }];
const out = {};

const c = await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0 });
out.completion = c.choices[0].text;
out.completion_finish = c.choices[0].finish_reason;
out.completion_tokens = c.usage.completion_tokens;

let text = '';
let chunks = 0;
const cs = await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0,
					     stream: true });
for await (const chunk of cs) {
	text += chunk.choices[0]?.text ?? '';
	chunks++;
}
out.completion_stream = text;
out.completion_chunks = chunks;

const chat = await client.chat.completions.create({ model, messages, max_tokens: 40,
						    temperature: 0 });
out.chat = chat.choices[0].message.content;
out.chat_role = chat.choices[0].message.role;

text = '';
const chs = await client.chat.completions.create({ model, messages, max_tokens: 40,
						   temperature: 0, stream: true });
for await (const chunk of chs)
	text += chunk.choices[0]?.delta?.content ?? '';
out.chat_stream = text;

const models = await client.models.list();
out.models = models.data.map((m) => m.id);

try {
	await client.completions.create({ model: 'no-such-model', prompt, max_tokens: 4 });
	out.unknown_model = 'accepted';
} catch (e) {
	out.unknown_model = e.status;
}
console.log(JSON.stringify(out));
