"""Checking a chat request, and answering in OpenAI's error format.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` (plus our
``request_id``) with a precise status: 400 ``invalid_request_error`` naming the
parameter, 404 ``model_not_found``, 401 ``invalid_api_key``, 402
``insufficient_quota``, 502/503 ``api_error`` when no provider could answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.common.app import json_response
from services.common.inputs import json_kind
from services.providers.config import Catalog, ModelRoute

__all__ = ["ChatRequest", "OpenAIError", "parse_body", "validate_chat"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: the OpenAI chat parameters passed on to providers; anything else is refused
PASSTHROUGH = frozenset(
    {
        "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens",
        "metadata", "n", "parallel_tool_calls", "presence_penalty", "reasoning_effort",
        "response_format", "seed", "stop", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "service_tier", "store", "functions",
        "function_call",
    }
)
KNOWN = PASSTHROUGH | {"model", "messages", "stream", "stream_options"}
MAX_MESSAGES = 10_000


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def response(self, request_id: str | None = None) -> web.Response:
        return json_response(self.body(request_id), status=self.status, headers=self.headers)


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    return data


def _kind(value: Any) -> str:
    """``a string``, ``an array``, ``null``: the JSON type with its article."""
    kind = json_kind(value)
    if kind == "null":
        return kind
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _number(data: dict, name: str, low: float, high: float) -> None:
    if name not in data or data[name] is None:
        return
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{name}' must be a number, not {_kind(value)}.", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low:g} and {high:g}, got {value}.", name)


def _integer(data: dict, name: str, low: int, high: int) -> int | None:
    if name not in data or data[name] is None:
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, not {_kind(value)}.", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low} and {high}, got {value}.", name)
    return value


def _typed(data: dict, name: str, types: tuple[type, ...], what: str) -> None:
    if name in data and data[name] is not None:
        value = data[name]
        if isinstance(value, bool) and bool not in types:
            raise _bad(f"'{name}' must be {what}, not a boolean.", name, "invalid_type")
        if not isinstance(value, types):
            raise _bad(f"'{name}' must be {what}, not {_kind(value)}.", name, "invalid_type")


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise _bad("Missing required parameter: 'messages'.", "messages",
                   "missing_required_parameter")
    if not isinstance(value, list):
        raise _bad(f"'messages' must be an array, not {_kind(value)}.", "messages",
                   "invalid_type")
    if not value:
        raise _bad("'messages' must contain at least one message.", "messages", "empty_array")
    if len(value) > MAX_MESSAGES:
        raise _bad(f"'messages' may hold at most {MAX_MESSAGES} messages.", "messages")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object, not {_kind(message)}.", where,
                       "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(
                f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got {role!r}.",
                f"{where}.role",
            )
        content = message.get("content")
        if content is None:
            if role != "assistant" or not (message.get("tool_calls") or
                                           message.get("function_call")):
                raise _bad(f"Missing required parameter: '{where}.content'.",
                           f"{where}.content", "missing_required_parameter")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _bad(
                        f"'{where}.content[{j}]' must be an object with a 'type'.",
                        f"{where}.content[{j}]", "invalid_type",
                    )
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise _bad(f"'{where}.content[{j}].text' must be a string.",
                               f"{where}.content[{j}].text", "invalid_type")
        elif not isinstance(content, str):
            raise _bad(
                f"'{where}.content' must be a string or an array of content parts, "
                f"not {_kind(content)}.",
                f"{where}.content", "invalid_type",
            )
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _bad(f"'{where}.tool_call_id' is required for role 'tool'.",
                       f"{where}.tool_call_id", "missing_required_parameter")
        if "name" in message and not isinstance(message["name"], str):
            raise _bad(f"'{where}.name' must be a string.", f"{where}.name", "invalid_type")
    return value


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    routes: list[ModelRoute]
    #: what is sent on to the provider (known parameters only; no stream_options)
    body: dict[str, Any]


def validate_chat(data: dict[str, Any], catalog: Catalog) -> ChatRequest:
    """The checked request, or :class:`OpenAIError` (400 / 404) naming the parameter."""
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0],
                   "unknown_parameter")
    model = data.get("model")
    if model is None:
        raise _bad("You must provide a model parameter.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' must be a non-empty string.", "model", "invalid_type")
    messages = _messages(data.get("messages"))

    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, not {_kind(stream)}.", "stream", "invalid_type")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true.",
                       "stream_options")
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
        extra = sorted(set(options) - {"include_usage", "include_obfuscation"})
        if extra:
            raise _bad(f"Unrecognized stream option: {extra[0]}", f"stream_options.{extra[0]}",
                       "unknown_parameter")
        value = options.get("include_usage", False)
        if not isinstance(value, bool):
            raise _bad("'stream_options.include_usage' must be a boolean.",
                       "stream_options.include_usage", "invalid_type")
        include_usage = value

    if data.get("max_tokens") is not None and data.get("max_completion_tokens") is not None:
        raise _bad("Set either 'max_tokens' or 'max_completion_tokens', not both.",
                   "max_tokens")
    _number(data, "temperature", 0, 2)
    _number(data, "top_p", 0, 1)
    _number(data, "presence_penalty", -2, 2)
    _number(data, "frequency_penalty", -2, 2)
    n = _integer(data, "n", 1, 128)
    if n is not None and n != 1:
        raise _bad("Only n=1 is supported.", "n", "unsupported_value")
    _integer(data, "seed", -(2**63), 2**63 - 1)
    _integer(data, "top_logprobs", 0, 20)
    stop = data.get("stop")
    if stop is not None:
        if isinstance(stop, list):
            if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
                raise _bad("'stop' must be a string or an array of at most 4 strings.", "stop")
        elif not isinstance(stop, str):
            raise _bad("'stop' must be a string or an array of at most 4 strings.", "stop",
                       "invalid_type")
    _typed(data, "user", (str,), "a string")
    _typed(data, "logprobs", (bool,), "a boolean")
    _typed(data, "parallel_tool_calls", (bool,), "a boolean")
    _typed(data, "store", (bool,), "a boolean")
    _typed(data, "tools", (list,), "an array")
    _typed(data, "functions", (list,), "an array")
    _typed(data, "tool_choice", (str, dict), "a string or an object")
    _typed(data, "function_call", (str, dict), "a string or an object")
    _typed(data, "response_format", (dict,), "an object")
    _typed(data, "logit_bias", (dict,), "an object")
    _typed(data, "metadata", (dict,), "an object")
    _typed(data, "reasoning_effort", (str,), "a string")
    _typed(data, "service_tier", (str,), "a string")

    routes = catalog.routes(model)
    if not routes:
        raise OpenAIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    cap = max(r.max_output_tokens for r in routes)
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _integer(data, name, 1, 10**9)
        if value is not None:
            if value > cap:
                raise _bad(
                    f"'{name}' is too large: {value}. This model supports at most {cap} "
                    "completion tokens.",
                    name,
                )
            max_tokens = value

    body = {k: v for k, v in data.items() if k in PASSTHROUGH and v is not None}
    body["messages"] = messages
    body["stream"] = stream
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        routes=routes,
        body=body,
    )
