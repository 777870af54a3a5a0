"""A tiny OpenAI-compatible upstream with a fixed latency, shared by the chat benchmarks.

    .venv/bin/python bench/openai_mock.py PORT [--latency 20ms] [--words 12] [--chunk-delay 0ms]

``POST /v1/chat/completions`` (and ``/chat/completions``) answers, after ``--latency``,
a fixed ``chat.completion`` of ``--words`` words with ``usage``; with ``"stream": true``
it sends the role chunk after ``--latency``, then one chunk per word (``--chunk-delay``
apart), the finish chunk, the usage chunk when ``stream_options.include_usage`` is
set, and ``data: [DONE]``. ``GET /v1/models`` lists the model asked about last
(and ``bench-gpt``). No state, no checks: every contender calls the very same server.
Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def duration(text: str) -> float:
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


def build_app(latency: float, words: int, chunk_delay: float) -> web.Application:
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    tokens = [("" if i == 0 else " ") + vocab[i % len(vocab)] for i in range(words)]
    content = "".join(tokens)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model") or "bench-gpt")
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or ()) // 4 + 8
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": words,
            "total_tokens": prompt + words,
        }
        created = int(time.time())
        if not body.get("stream"):
            if latency:
                await asyncio.sleep(latency)
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": usage,
                }
            )
        if latency:
            await asyncio.sleep(latency)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        def event(delta: dict, finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        await response.write(event({"role": "assistant", "content": ""}))
        for token in tokens:
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
            await response.write(event({"content": token}))
        await response.write(event({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            data = {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "bench-gpt", "object": "model", "created": 0, "owned_by": "mock"}],
            }
        )

    app = web.Application()
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_get(f"{prefix}/models", models)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--latency", default="20ms", help="before the answer / first chunk")
    ap.add_argument("--words", type=int, default=12, help="words (= chunks) in the answer")
    ap.add_argument("--chunk-delay", default="0ms", help="between stream chunks")
    args = ap.parse_args()
    app = build_app(duration(args.latency), args.words, duration(args.chunk_delay))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
