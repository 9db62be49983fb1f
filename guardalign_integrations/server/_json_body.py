"""Request bodies as JSON: one strict parser for every endpoint, and the serialiser of what the server re-writes.

What: :func:`parse_body` turns the bytes of a request into its JSON object, refusing what
two JSON parsers may read differently (repeated or case-folding keys, lone surrogates) and
bodies whose structure is too large to build cheaply; :func:`check_chat_fields` checks the
types of the chat-completions fields the server itself reads; :func:`dump_json` serialises
what the server re-writes.

Why: an unchanged body is forwarded as the bytes that came in, so the body the guard screens
must be the body every upstream reads (default deny: an ambiguity is refused, never
forwarded). Parsing is CPU work; its cost is bounded by :data:`DEFAULT_MAX_JSON_VALUES`
(counted on the bytes before anything is built), and large bodies are parsed off the event
loop by the caller (:data:`INLINE_PARSE_BYTES`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from ._errors import ServerError

INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed (and, text-only, screened) on the event loop: a thread hop costs more than they do."""

DEFAULT_MAX_JSON_VALUES = 250_000
"""The most JSON values (objects, arrays, strings, numbers, literals) in one body; see ``ServerConfig.max_json_values``."""

_WHITESPACE = b" \t\r\n"
_SURROGATE = re.compile("[\ud800-\udfff]")


class _DuplicateKey(ValueError):
    pass


class _FoldedKey(ValueError):
    pass


def folded_key(key: str) -> str:
    """A key as a case-insensitive JSON decoder may match it: NFKC, then case folded (``\u017f`` long s -> s, Kelvin sign -> k)."""
    return unicodedata.normalize("NFKC", key).casefold()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey()
    if len({folded_key(key) for key in out}) != len(out):
        raise _FoldedKey()
    return out


def count_json_values(raw: bytes, limit: int) -> int:
    """A count of the JSON values in ``raw`` that is over ``limit`` exactly when the body holds more values than that.

    At or under ``limit`` the number is an upper bound, not the exact count; an exact count is
    made only where the quick bounds cannot decide.

    Counted on the bytes, before anything is built: every value but the root follows a
    ``,`` or opens a non-empty container, so values = 1 + commas + containers - empty
    containers. The quick count on the raw bytes is an upper bound (commas and brackets in
    strings count too); only when it is over ``limit`` are the strings cut out and the count
    made exact. Bytes operations only (no regular expression: nothing to backtrack), linear in
    the size of the body; invalid JSON may be over-counted (and refused as too large, not invalid).
    """
    if len(raw) < 2 * limit:  # each value takes a byte of its own and all but one a separator: at most (len + 1) / 2 values
        return 0
    bound = 1 + raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if bound <= limit:
        return bound
    # escapes as JSON reads them, left to right: pairs of backslashes, then an escaped quote
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # every value has at most one key and a string takes two quotes: values >= strings / 2
    if unescaped.count(b'"') // 4 > limit:
        return unescaped.count(b'"') // 4
    return _count_outside_strings(unescaped)


def _count_outside_strings(unescaped: bytes) -> int:
    """The exact count of :func:`count_json_values` on a body whose escaped quotes and backslashes are removed."""
    # the text between strings, each string replaced by a one-byte scalar (so that ["x"] is not an empty array)
    outside = b"0".join(unescaped.split(b'"')[0::2]).translate(None, _WHITESPACE)
    containers = outside.count(b"{") + outside.count(b"[")
    return 1 + outside.count(b",") + containers - outside.count(b"{}") - outside.count(b"[]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds a UTF-16 surrogate code point."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):  # isascii: O(1), so a 1 MB base64 string costs nothing
                return True
        elif isinstance(item, dict):
            for key, child in item.items():
                if not key.isascii() and _SURROGATE.search(key):
                    return True
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _lone_surrogate() -> ServerError:
    return ServerError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), which "
                       "JSON decoders read differently; refused, not forwarded", "invalid_json")


def parse_body(raw: bytes, *, max_values: int = DEFAULT_MAX_JSON_VALUES) -> dict[str, Any]:
    """The JSON object of a request body; an object with a repeated key is refused.

    Why refuse duplicates: an unchanged body is forwarded as the bytes that came in, and JSON
    parsers disagree on which copy of a repeated key wins. ``{"messages": [image], "messages":
    [text]}`` would be screened as text here (Python keeps the last copy) and read with the
    image by an upstream that keeps the first. Default deny: what two parsers may read
    differently is not forwarded. The same holds for keys that differ only in letter case or
    Unicode compatibility form (``messages`` / ``Messages`` / ``me\u017f\u017fages``): Go's
    ``encoding/json`` (Ollama, many proxies) matches field names case-insensitively, the last
    match winning, so such a pair is refused in every object. And for lone UTF-16 surrogates
    (``"\\ud800"`` without its pair, or their raw CESU-8 bytes): Python keeps them as code
    points, Go replaces them with U+FFFD, and no UTF-8 encoder can write them back.

    Args:
        raw: the request body.
        max_values: the most JSON values the body may hold (counted before parsing).

    Raises:
        ServerError: 413 ``json_too_complex`` over ``max_values``; 400 ``invalid_json`` when it
            is not UTF-8 JSON, repeats a key in any object (also under case folding), holds a lone
            surrogate or nests too deeply to parse; 400 ``invalid_request`` when it is not an object.
    """
    try:
        # UTF-8 only (RFC 8259 §8.1): json.loads(bytes) would also detect UTF-16/32, which the byte-level
        # value count below does not read, and an upstream may not read either
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise ServerError(400, "the request body is not UTF-8 JSON; refused, not forwarded", "invalid_json") from None
        raise _lone_surrogate() from None
    if count_json_values(raw, max_values) > max_values:
        raise ServerError(413, f"the request body holds more than max_json_values={max_values} JSON values; refused",
                          "json_too_complex")
    try:
        body = json.loads(text, object_pairs_hook=_unique_keys)  # a str: no encoding detection, a BOM is an error
    except _DuplicateKey:
        raise ServerError(400, "the request body repeats a key in a JSON object; refused, not forwarded", "invalid_json") from None
    except _FoldedKey:
        raise ServerError(
            400,
            "the request body has two keys in one JSON object that differ only in letter case or Unicode form "
            "(case-insensitive decoders read them as one); refused, not forwarded",
            "invalid_json",
        ) from None
    except RecursionError:
        raise ServerError(400, "the request body nests too deeply to be checked; refused, not forwarded", "invalid_json") from None
    except ValueError:
        raise ServerError(400, "the request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise ServerError(400, "the request body must be a JSON object", "invalid_request")
    # a surrogate arrives escaped (a backslash) or as raw CESU-8 bytes (not ASCII): two single-byte scans rule both out
    if b"\\" in raw and _has_lone_surrogate(body):  # strict UTF-8 holds no raw surrogate: only an escape can make one
        raise _lone_surrogate()
    return body


def _field_error(name: str, expected: str) -> ServerError:
    return ServerError(400, f"{name}: expected {expected}", "invalid_request", param=name)


def check_chat_fields(body: dict[str, Any]) -> None:
    """Check the types of the chat-completions fields the server reads itself (``model``, ``stream``, ...).

    The rest of the body is the upstream's to judge (and screened for data by
    :func:`._openai_content.check_body_fields`).

    Raises:
        ServerError: 400 ``invalid_request`` naming the field.
    """
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _field_error("model", "a string")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _field_error("stream", "true or false")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _field_error("stream_options", "an object")
        if options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
            raise _field_error("stream_options.include_usage", "true or false")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise _field_error("n", "an integer")
    if body.get("messages") is not None and not isinstance(body["messages"], list):
        raise _field_error("messages", "a list")


def dump_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; strings no UTF-8 encoder can write (lone surrogates, e.g. in an upstream's answer) are escaped.

    Request bodies never hold one (:func:`parse_body` refuses them); an upstream's answer may,
    and is then relayed with ``\\uXXXX`` escapes, as the upstream sent it, instead of failing.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()
