"""Reading the Markdown docs: links, anchors (as GitHub makes them), and config
keys named in the text, resolved against the schema."""

from __future__ import annotations

import re
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from zdproxy.config.schema import Address, Config
from zdproxy.docgen import _optional, _unwrap

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6}) (.*)$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> -."""
    text = re.sub(r"<[^>]+>", "", title).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _number, line in prose_lines(text):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code blocks and spans."""
    out = []
    for number, line in prose_lines(text):
        without_code = _CODE_SPAN.sub("", line)
        for match in _LINK.finditer(without_code):
            out.append((number, match.group(1) or match.group(2)))
    return out


def code_spans(text: str) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(text):
        out.extend((number, span) for span in _CODE_SPAN.findall(line))
    return out


def resolve_key(path: str) -> bool:
    """Whether a dotted config key (``pools.NAME.backends[].id``, ``listen.0``,
    ``pools.blue.backends.0.address``) names a key of the schema."""
    tp: Any = Config
    for part in re.split(r"\.|(?=\[\])", path):
        tp = _item(tp) if part == "[]" else _child(tp, part)
        if tp is None:
            return False
    return True


def _bare(tp: Any) -> Any:
    tp, _ = _unwrap(tp)
    tp = _optional(tp) or tp
    return _unwrap(tp)[0]


def _item(tp: Any) -> Any:
    tp = _bare(tp)
    return get_args(tp)[0] if get_origin(tp) is tuple else None


def _child(tp: Any, part: str) -> Any:
    tp = _bare(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and tp is not Address:
        field = tp.model_fields.get(part)
        if field is None and part in getattr(tp, "FILE_KEYS", ()):
            return Address  # a listener's address: its host and port as one key
        return None if field is None else field.annotation
    if get_origin(tp) is tuple and part.isdigit():
        return get_args(tp)[0]
    if get_origin(tp) is dict and re.fullmatch(r"[A-Za-z0-9_.-]+", part):
        return get_args(tp)[1]
    return None
