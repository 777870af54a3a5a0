"""OpenAI chat-stream pieces shared by the proxy and the orchestrator.

* :class:`DeliveredText` collects the text a stream has handed on (content, refusals,
  reasoning, tool-call names and arguments): what the estimator counts when a
  stream ends early;
* :func:`stream_error_chunk` is the one way a stream cut by a failure ends: a chunk
  whose choice has ``finish_reason: "error"``, with an ``error`` object (the
  ``openai`` package raises ``APIError`` on it) and the ``usage`` that was charged.
  It is never followed by ``data: [DONE]``, which marks only a normal end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeliveredText", "stream_error_chunk"]


@dataclass
class DeliveredText:
    parts: list[str] = field(default_factory=list)

    def observe(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            for key in ("content", "refusal", "reasoning_content"):
                value = delta.get(key)
                if isinstance(value, str):
                    self.parts.append(value)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    for key in ("name", "arguments"):
                        if isinstance(function.get(key), str):
                            self.parts.append(function[key])

    @property
    def text(self) -> str:
        return "".join(self.parts)


def stream_error_chunk(
    base: dict[str, Any],
    message: str,
    usage: dict[str, Any] | None,
    code: str = "stream_interrupted",
) -> dict[str, Any]:
    """The chunk that ends a stream cut by a failure (never followed by ``[DONE]``)."""
    chunk = {
        **base,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "error"}],
        "error": {
            "message": message or "the provider failed mid-stream",
            "type": "provider_error",
            "param": None,
            "code": code,
        },
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk
