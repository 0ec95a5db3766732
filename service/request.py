"""Validation of a chat-completion request body, before anything is sent upstream.

Pure: takes bytes, returns a ``ChatRequest`` or raises ``InvalidRequestError`` naming the
offending parameter, as OpenAI does. Unknown fields pass through untouched, so new
provider parameters work without a Sluice release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from .errors import InvalidRequestError, NotFoundError
from .jsonbytes import dumps_kept

# Arrays and objects within one another: orjson reads 1024 levels but writes 254, and the
# body is written again (to the provider, into the cache key); no real request comes near.
MAX_NESTING = 128
MAX_MODEL_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_T = TypeVar("_T")
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INTEGERS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")
# Other documented parameters whose JSON type is fixed: checked here, so a wrong type is a
# 400 naming it rather than whatever the provider (or the simulator) makes of it.
_TYPES: dict[str, tuple[type, ...]] = {
    "tools": (list,),
    "functions": (list,),
    "tool_choice": (str, dict),
    "function_call": (str, dict),
    "stop": (str, list),
    "user": (str,),
    "response_format": (dict,),
    "logit_bias": (dict,),
    "metadata": (dict,),
    "logprobs": (bool,),
    "parallel_tool_calls": (bool,),
    "store": (bool,),
}
_JSON_NAMES = {list: "an array", dict: "an object", str: "a string", bool: "a boolean"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    streaming: bool
    include_usage: bool
    size: int = 0  # the body's bytes as the client sent it: what reading it may cost

    def with_body(self, body: dict[str, Any]) -> ChatRequest:
        """This request with another body (half what ``dataclasses.replace`` costs)."""
        return ChatRequest(body, self.model, self.streaming, self.include_usage, self.size)

    def upstream_body(self) -> bytes:
        """The body sent to the provider: always asks for usage when streaming."""
        if not self.streaming:
            return dumps_kept(self.body)  # held for the whole provider call
        options = dict(self.body.get("stream_options") or {})
        options["include_usage"] = True
        return dumps_kept({**self.body, "stream_options": options})


def parse_chat_request(raw: bytes, served_models: frozenset[str] | None = None) -> ChatRequest:
    """Validate ``raw``; ``served_models`` (when known) limits which models may be asked for."""
    body = _json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if len(model) > MAX_MODEL_CHARS:  # it names breakers, metrics and a response header
        raise InvalidRequestError(
            f"'model' is too long: at most {MAX_MODEL_CHARS} characters.", param="model"
        )
    if _CONTROL.search(model):  # a header cannot carry it: the answer could not be sent
        raise InvalidRequestError("'model' must not contain control characters.", param="model")
    if served_models is not None and model not in served_models:
        raise NotFoundError(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    _check_messages(body.get("messages"))
    _check_scalars(body)
    _check_output_limits(body)
    _check_functions(body)
    streaming = _optional(body, "stream", bool) or False
    options = _optional(body, "stream_options", dict)
    if options is not None and not streaming:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    usage_option = (options or {}).get("include_usage")
    if usage_option is not None and not isinstance(usage_option, bool):
        raise InvalidRequestError(
            "Invalid type for 'stream_options.include_usage': expected a boolean.",
            param="stream_options.include_usage",
        )
    include_usage = bool(usage_option)
    return ChatRequest(
        body=body, model=model, streaming=streaming, include_usage=include_usage, size=len(raw)
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    _check_nesting(raw, body)
    return body


def too_deep() -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body nests arrays and objects more than {MAX_NESTING} deep."
    )


def _check_nesting(raw: bytes, parsed: Any) -> None:
    """``InvalidRequestError`` if ``parsed`` (read from ``raw``) nests arrays and objects
    more than ``MAX_NESTING`` deep. Looks only when ``raw`` has enough brackets to."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_NESTING:
        return
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise too_deep()
        children = value.values() if isinstance(value, dict) else value
        stack += [(child, depth + 1) for child in children if isinstance(child, dict | list)]


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequestError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{param} must be an object.", param=param)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequestError(
                f"Invalid value for '{param}.role': expected one of {', '.join(sorted(_ROLES))}.",
                param=f"{param}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"Invalid type for '{param}.content': expected a string or an array.",
                param=f"{param}.content",
            )
        if isinstance(content, list):
            _check_parts(content, f"{param}.content")


def _check_parts(parts: list[Any], param: str) -> None:
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequestError(
                f"Invalid value for '{param}[{index}]': expected an object with a 'type'.",
                param=f"{param}[{index}]",
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"Invalid type for '{param}[{index}].text': expected a string.",
                param=f"{param}[{index}].text",
            )


def _check_functions(body: dict[str, Any]) -> None:
    """``tools[i]`` and ``functions[i]`` are objects; a function's ``parameters``, an object."""
    for name in ("tools", "functions"):
        for index, item in enumerate(body.get(name) or ()):
            param = f"{name}[{index}]"
            function = item.get("function") if name == "tools" and isinstance(item, dict) else item
            if name == "tools" and isinstance(item, dict) and function is not None:
                param += ".function"
            if not isinstance(item, dict) or (
                function is not None and not isinstance(function, dict)
            ):
                raise InvalidRequestError(
                    f"Invalid type for '{param}': expected an object.", param=param
                )
            parameters = function.get("parameters") if function is not None else None
            if parameters is not None and not isinstance(parameters, dict):
                raise InvalidRequestError(
                    f"Invalid type for '{param}.parameters': expected an object.",
                    param=f"{param}.parameters",
                )


def _check_scalars(body: dict[str, Any]) -> None:
    for name in _NUMBERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidRequestError(f"Invalid type for '{name}': expected a number.", param=name)
    for name in _INTEGERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequestError(
                f"Invalid type for '{name}': expected an integer.", param=name
            )
        if name in ("max_tokens", "max_completion_tokens", "n") and value is not None and value < 1:
            raise InvalidRequestError(f"'{name}' must be at least 1.", param=name)
    for name, kinds in _TYPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kinds):
            expected = " or ".join(_JSON_NAMES[kind] for kind in kinds)
            message = f"Invalid type for '{name}': expected {expected}."
            raise InvalidRequestError(message, param=name)


def _check_output_limits(body: dict[str, Any]) -> None:
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        # OpenAI's answer; and only one of the two can be planned, capped and reserved for.
        raise InvalidRequestError(
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            param="max_tokens",
            code="invalid_parameter_combination",
        )


def _optional(body: dict[str, Any], name: str, kind: type[_T]) -> _T | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise InvalidRequestError(
            f"Invalid type for '{name}': expected {_JSON_NAMES[kind]}.", param=name
        )
    return value
