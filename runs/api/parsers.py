"""Request parsers: strict JSON that refuses what PostgreSQL cannot store, and raw YAML for templates."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, JSONParser

#: Deepest nesting accepted in a request body.
MAX_DEPTH = 64


def check_storable(value: Any, where: str = "body") -> None:
    """Raise ParseError when ``value`` holds a string PostgreSQL cannot store or nests too deeply.

    Refused: the NUL character (``\\u0000``: not allowed in text or jsonb) and lone UTF-16
    surrogates (not encodable as UTF-8), in keys and values; nesting deeper than MAX_DEPTH.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ParseError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(str(key), where)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_string(text: str, where: str) -> None:
    if "\x00" in text:
        raise ParseError(f"{where}: strings may not contain the NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParseError(f"{where}: strings must be valid Unicode (lone surrogate found)")


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, plus: too-deep documents are a 400 (not a RecursionError) and strings that
    the database cannot store are refused up front (see :func:`check_storable`)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels")
        check_storable(data)
        return data


class YAMLTextParser(BaseParser):
    """A raw workflow file (``Content-Type: application/yaml``): parsed as ``{"source": <text>}``."""

    media_type = "application/yaml"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"workflow file is not valid UTF-8 (byte {exc.start})")
        check_storable(text, "source")
        return {"source": text}


class TextYAMLParser(YAMLTextParser):
    media_type = "text/yaml"
