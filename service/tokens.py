"""Token counting with tiktoken, fully offline: the model's real encoding, chat overhead, tools.

tiktoken normally downloads its BPE files on first use, which fails in air-gapped clusters.
The ``bpe-openai`` wheel ships ``o200k_base`` and ``cl100k_base`` as gzipped ``.tiktoken``
files (``base64(token) rank`` per line); we read those through the installed distribution's
file list (``importlib.metadata``: importing ``bpe_openai`` itself would parse cl100k on
import and trips a DeprecationWarning), check the SHA-256 of the decompressed bytes against
the hash tiktoken itself expects, and build ``tiktoken.Encoding`` with the pattern strings
and special tokens copied from tiktoken's own registry (``tiktoken_ext/openai_public.py``).
Nothing here opens a socket.

Encodings load lazily, once per process, under a lock (about 0.3 s each): the app warms
them in a thread at startup (``warm``), so requests never pay the cost on the event loop.

Chat frontends send the whole conversation again every turn, so most of a prompt has been
counted before: prompt texts' counts are kept in a small LRU (``_Counts``) keyed by the
text's hash, not the text, so an entry costs the same for a line or a book.

Chat prompts are counted the way OpenAI's cookbook does ("How to count tokens with
tiktoken"): 3 tokens per message, +1 per ``name``, +3 to prime the reply. Tool definitions
follow the cookbook's ``num_tokens_for_tools`` approximation (see ``count_tools``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import tiktoken

O200K = "o200k_base"
CL100K = "cl100k_base"
DEFAULT_ENCODING = O200K
DATA_DISTRIBUTION = "bpe-openai"
DATA_PATH = "bpe_openai/data"

EXACT_CHARS = 256 * 1024  # a text counted exactly up to here (~64k tokens), estimated past
TOKENS_PER_MESSAGE = 3  # <|start|>{role/name}\n{content}<|end|>\n
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
IMAGE_PART_TOKENS = 85  # a low-detail image; a floor for high-detail ones
# The most one image can cost, in the model's input tokens, at high detail and the largest
# size OpenAI documents: 85 + 8 tiles x 170 for gpt-4o and the like; patch-priced models
# (gpt-4.1-nano: 1536 patches x 2.46) cost up to 3779; gpt-4o-mini prices images as
# 2833 + 8 x 5667 tokens (its tokens are that much cheaper). Budgets reserve with these.
IMAGE_MAX_TOKENS = 3_779
IMAGE_MAX_TOKENS_BY_PREFIX = {"gpt-4o-mini": 48_169}
COUNTS_KEPT = 8192  # prompt texts whose counts are remembered

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True, slots=True)
class _Spec:
    sha256: str  # of the decompressed .tiktoken file, as tiktoken_ext/openai_public.py expects
    pat_str: str
    special_tokens: Mapping[str, int]
    func_init: int  # cookbook's per-function overhead for the models using this encoding


# Copied from tiktoken_ext/openai_public.py (tiktoken 0.8+): cl100k_base() and o200k_base().
_SPECS: dict[str, _Spec] = {
    CL100K: _Spec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
        func_init=10,
    ),
    O200K: _Spec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
        func_init=7,
    ),
}

# Longest prefix wins; fine-tuned names (``ft:gpt-4o-mini:org::id``) are matched on the base.
_MODEL_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            "gpt-4o": O200K,
            "chatgpt-4o": O200K,
            "gpt-4.1": O200K,
            "gpt-4.5": O200K,
            "gpt-5": O200K,
            "gpt-oss": O200K,
            "o1": O200K,
            "o3": O200K,
            "o4": O200K,
            "gpt-4": CL100K,
            "gpt-3.5": CL100K,
            "gpt-35": CL100K,
            "text-embedding-": CL100K,
        }.items(),
        key=lambda item: -len(item[0]),
    )
)

_FUNC_PROP_INIT = 3
_FUNC_PROP_KEY = 3
_FUNC_ENUM_INIT = -3
_FUNC_ENUM_ITEM = 3
_FUNC_END = 12

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}
_by_model: dict[str, str] = {}  # model name -> encoding name, remembered
_MAX_REMEMBERED_MODELS = 4096  # model names come from clients: bound what we remember


class EncodingDataError(RuntimeError):
    """The packaged BPE file is missing or does not match tiktoken's expected hash."""


def encoding_name_for_model(model: str) -> str:
    """The encoding a model uses; o200k_base for anything unknown (every current model)."""
    encoding = _by_model.get(model)
    if encoding is None:
        name = model.removeprefix("ft:").lower()
        prefixes = (e for prefix, e in _MODEL_PREFIXES if name.startswith(prefix))
        encoding = next(prefixes, DEFAULT_ENCODING)
        if len(_by_model) < _MAX_REMEMBERED_MODELS:
            _by_model[model] = encoding
    return encoding


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, loaded from the packaged data on first use (thread-safe)."""
    encoding = _loaded.get(name)
    if encoding is not None:
        return encoding
    with _lock:
        encoding = _loaded.get(name)
        if encoding is None:
            encoding = _loaded[name] = _build(name)
    return encoding


def is_loaded(model: str) -> bool:
    return encoding_name_for_model(model) in _loaded


def warm(names: Iterable[str] = (O200K, CL100K)) -> None:
    """Load the encodings now (blocking; call it in a thread)."""
    for name in names:
        get_encoding(name)


def _build(name: str) -> tiktoken.Encoding:
    spec = _SPECS.get(name)
    if spec is None:
        raise EncodingDataError(f"no packaged data for encoding {name!r}")
    try:
        where = metadata.distribution(DATA_DISTRIBUTION).locate_file(DATA_PATH)
        packed = Path(str(where), f"{name}.tiktoken.gz").read_bytes()
    except (metadata.PackageNotFoundError, OSError) as exc:
        raise EncodingDataError(f"{DATA_DISTRIBUTION} does not ship {name}.tiktoken.gz") from exc
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise EncodingDataError(f"{name}.tiktoken.gz does not match tiktoken's expected hash")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=dict(spec.special_tokens)
    )


def count_text(model: str, text: str) -> int:
    """Tokens in ``text`` for ``model``; special-token strings count as plain text. Past
    ``EXACT_CHARS`` the rest is estimated at the rate of the part counted: a count runs on
    the loop, and tiktoken's time and memory grow with the text (faster than it, for text
    built to be slow), which a provider that never reports usage would choose."""
    if not text:
        return 0
    encoding = get_encoding(encoding_name_for_model(model))
    if len(text) <= EXACT_CHARS:
        return len(encoding.encode_ordinary(text))
    counted = len(encoding.encode_ordinary(text[:EXACT_CHARS]))
    return counted + math.ceil(counted * (len(text) - EXACT_CHARS) / EXACT_CHARS)


def count_chat(model: str, body: Mapping[str, Any]) -> int:
    """Prompt tokens of a chat-completion request: messages plus tool/function definitions,
    and a structured output's schema (the model reads it: counted as its JSON, an estimate)."""
    encoding = get_encoding(encoding_name_for_model(model))
    total = count_messages(encoding, body.get("messages") or ())
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
    functions = list(body.get("functions") or ())
    functions += [t["function"] for t in tools if isinstance(t.get("function"), dict)]
    if functions:
        total += count_tools(encoding, functions)
    others = [t for t in tools if not isinstance(t.get("function"), dict)]  # custom tools...
    if others:  # no formula for them: their JSON (a worst case must not miss their text)
        total += _len(encoding, orjson.dumps(others).decode())
    output = body.get("response_format")
    if isinstance(output, dict) and isinstance(output.get("json_schema"), dict):
        total += _len(encoding, orjson.dumps(output["json_schema"]).decode())
    return total


def count_body(body: Mapping[str, Any]) -> int:
    """``count_chat`` for the model the body names (the simulator's prompt counter)."""
    return count_chat(str(body.get("model") or ""), body)


def count_messages(encoding: tiktoken.Encoding, messages: Iterable[Any]) -> int:
    """The cookbook's ``num_tokens_from_messages`` for 3-token-overhead models."""
    total = REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _value_tokens(encoding, value, parts=key == "content")
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def _value_tokens(encoding: tiktoken.Encoding, value: Any, *, parts: bool = False) -> int:
    """A message field: text is encoded; ``content``'s parts by kind; anything else (an
    assistant's ``tool_calls`` with their arguments, ...) as its JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return _len(encoding, value)
    if (
        parts
        and isinstance(value, list)
        and all(isinstance(p, dict) and "type" in p for p in value)
    ):
        return sum(_part_tokens(encoding, part) for part in value)
    return _len(encoding, orjson.dumps(value).decode())


def _part_tokens(encoding: tiktoken.Encoding, part: dict[str, Any]) -> int:
    kind = part["type"]
    if kind in ("image_url", "input_image"):
        return IMAGE_PART_TOKENS
    # Other parts (audio, files) are not counted here: the provider's usage covers them.
    text = part.get("refusal" if kind == "refusal" else "text")
    return _len(encoding, text) if isinstance(text, str) else 0


def count_images(body: Mapping[str, Any]) -> int:
    """How many image parts the request's messages carry."""
    images = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            images += sum(
                1
                for part in content
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image")
            )
    return images


def image_max_tokens(model: str) -> int:
    """The most one image can cost ``model``, in input tokens (see ``IMAGE_MAX_TOKENS``)."""
    base = model.removeprefix("ft:")
    for prefix, tokens in IMAGE_MAX_TOKENS_BY_PREFIX.items():
        if base.startswith(prefix):
            return tokens
    return IMAGE_MAX_TOKENS


def count_tools(encoding: tiktoken.Encoding, functions: Iterable[Any]) -> int:
    """Function definitions, per the cookbook's ``num_tokens_for_tools`` approximation.

    Each function costs a fixed overhead plus ``name:description``; each top-level property
    ``name:type:description`` plus its enum values; nested schemas are not walked (their
    JSON is counted instead), so deep schemas are an estimate, not an exact count.
    """
    spec = _SPECS.get(encoding.name)
    func_init = spec.func_init if spec is not None else _SPECS[DEFAULT_ENCODING].func_init
    total = 0
    for function in functions:
        if not isinstance(function, dict):
            continue
        total += func_init + _len(encoding, f"{function.get('name', '')}:{_desc(function)}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict):  # the schema's own business: not counted
            properties = {}
        if isinstance(parameters, dict):
            total += _beyond(encoding, parameters, _PARAMETERS_COUNTED)  # $defs, say
        if properties:
            total += _FUNC_PROP_INIT
        for key, prop in properties.items():
            total += _FUNC_PROP_KEY + _property_tokens(encoding, key, prop)
    return total + _FUNC_END if total else 0


def _property_tokens(encoding: tiktoken.Encoding, key: str, prop: Any) -> int:
    if not isinstance(prop, dict):
        return _len(encoding, f"{key}:{orjson.dumps(prop).decode()}")
    total = 0
    enum = prop.get("enum")
    if isinstance(enum, list):
        total += _FUNC_ENUM_INIT
        total += sum(_FUNC_ENUM_ITEM + _len(encoding, str(item)) for item in enum)
    kind = prop.get("type", "")
    nested = {k: v for k, v in prop.items() if k in ("properties", "items", "anyOf", "oneOf")}
    line = f"{key}:{kind if isinstance(kind, str) else orjson.dumps(kind).decode()}:{_desc(prop)}"
    if nested:
        line += orjson.dumps(nested).decode()
    return total + _len(encoding, line) + _beyond(encoding, prop, _PROPERTY_COUNTED)


# What the cookbook's formula counts (or skips as too small to matter) of a function's
# parameters and of a property; anything else the model reads too (``$defs``, a default,
# examples, a pattern) is counted as its JSON: a budget's worst case must not miss a
# prompt hidden in a schema.
_PARAMETERS_COUNTED = frozenset({"type", "properties", "required", "additionalProperties"})
_PROPERTY_COUNTED = frozenset(
    {"type", "description", "enum", "properties", "items", "anyOf", "oneOf", "required"}
    | {"additionalProperties"}
)


def _beyond(encoding: tiktoken.Encoding, schema: dict[str, Any], counted: frozenset[str]) -> int:
    rest = {k: v for k, v in schema.items() if k not in counted}
    return _len(encoding, orjson.dumps(rest, default=str).decode()) if rest else 0


def _desc(item: dict[str, Any]) -> str:
    description = item.get("description")
    return description.removesuffix(".") if isinstance(description, str) else ""


class _Counts:
    """Token counts of the texts counted lately, least recently used dropped first.

    Keyed by the encoding, the text's length and its ``hash``: Python's string hash is keyed
    per process (SipHash), so two texts colliding by chance or by a client's design is not a
    practical concern, and the worst it could do is misestimate one prompt. Thread-safe:
    long prompts are counted in a worker thread (``admission.py``)."""

    __slots__ = ("_counts", "_kept", "_lock")

    def __init__(self, kept: int) -> None:
        self._counts: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._kept = kept
        self._lock = threading.Lock()

    def __call__(self, encoding: tiktoken.Encoding, text: str) -> int:
        key = (encoding.name, len(text), hash(text))
        with self._lock:
            count = self._counts.get(key)
            if count is not None:
                self._counts.move_to_end(key)
                return count
        count = len(encoding.encode_ordinary(text))  # outside the lock: it is the slow part
        with self._lock:
            self._counts[key] = count
            if len(self._counts) > self._kept:
                self._counts.popitem(last=False)
        return count


_len = _Counts(COUNTS_KEPT)
