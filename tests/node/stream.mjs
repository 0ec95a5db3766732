// Streams one chat completion through the gateway with the official openai Node SDK and
// prints what arrived as one JSON line. Run by tests/test_node_sdk.py:
//   SLUICE_BASE_URL=http://127.0.0.1:PORT/v1 SLUICE_KEY=... node stream.mjs "<prompt>"
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.SLUICE_BASE_URL,
  apiKey: process.env.SLUICE_KEY,
  maxRetries: 0,
});

const result = { chunks: 0, text: "", usage: null, finish: null, error: null };
try {
  const stream = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: process.argv[2] }],
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    result.chunks += 1;
    const choice = chunk.choices[0];
    if (choice) {
      result.text += choice.delta?.content ?? "";
      result.finish = choice.finish_reason ?? result.finish;
    }
    if (chunk.usage) result.usage = chunk.usage;
  }
} catch (err) {
  result.error = { name: err.constructor.name, status: err.status ?? null, message: err.message };
}
console.log(JSON.stringify(result));
