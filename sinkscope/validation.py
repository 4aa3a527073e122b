"""Checks at the boundary: bounded JSON parsing, typed records (pydantic) whose failures become one message
naming the file, the field, the bad value and what was expected, and text checks shared by every reader."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sinkscope.errors import SinkscopeError

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in a JSON document (manifests, meta files, results); deeper input is refused before
it reaches Python's recursion limit."""


def decode_utf8(raw: bytes, where: str, error: type[SinkscopeError] = SinkscopeError) -> str:
    """UTF-8 text without a leading byte-order mark; any other encoding is refused with the byte's offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                    "save it as UTF-8") from exc


def _depth_ok(text: str, limit: int) -> bool:
    """Whether the brackets of a JSON text nest at most `limit` deep (strings skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, where: str, error: type[SinkscopeError] = SinkscopeError, depth: int = MAX_JSON_DEPTH):
    """`json.loads` bounded in depth, refusing NaN/Infinity literals; errors name `where`."""
    if text.count("[") + text.count("{") > depth and not _depth_ok(text, depth):
        raise error(f"{where}: JSON nested deeper than {depth} levels; refused")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from exc


def read_json_file(path: Path, what: str, error: type[SinkscopeError] = SinkscopeError, max_bytes: int = 64 << 20):
    """A JSON object from `path`: UTF-8, bounded in size and depth."""
    if not path.is_file():
        raise error(f"{path} is missing: {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes; {what} is never larger than {max_bytes} bytes")
    data = parse_json(decode_utf8(path.read_bytes(), str(path), error), str(path), error)
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object ({what}), not {type(data).__name__}")
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_record(model: type[M], data: Any, where: str, error: type[SinkscopeError] = SinkscopeError) -> M:
    """`model.model_validate(data)`; the first failure becomes `where: field 'a.b' is <value>: <expected>`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(the record)"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        if first["type"] == "missing":
            raise error(f"{where}: field '{field}' is missing{more}") from None
        value = _short(first.get("input"))
        raise error(f"{where}: field '{field}' is {value}: {first['msg'].lower()}{more}") from None


def clean_text(text: str, where: str, error: type[SinkscopeError] = SinkscopeError) -> str:
    """Transcript text: byte-order marks and zero-width characters dropped, whitespace collapsed, lower-cased;
    control characters (NUL, ...) and empty text refused."""
    text = text.replace("\ufeff", "").replace("\u200b", "")
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"), None)
    if bad is not None:
        raise error(f"{where}: transcript holds the control character U+{ord(bad):04X}; it must be plain text")
    text = " ".join(text.lower().split())
    if not text:
        raise error(f"{where}: transcript is empty")
    return text

