"""Reference docs generated from the code: the config keys from the schema
(``docs/configuration.md``) and the admin endpoints from the OpenAPI description
(``docs/api.md``).

Each generated part sits between two HTML comment markers in its file; the prose
around it is written by hand and kept as it is::

    python -m zdproxy.docgen            # rewrite both generated parts
    python -m zdproxy.docgen --check    # exit 1 if either is out of date

A key's description is the string under its field in ``config/schema.py``, read
from the source here (pydantic's ``use_attribute_docstrings`` would do the same at
every import of the schema, for nothing at run time).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ForwardRef, Literal, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from zdproxy.config.schema import (
    Address,
    Config,
    HealthCheckOverride,
    _check_header_name,
    _check_pool_name,
    _one_or_many,
    parse_duration,
)
from zdproxy.config.tlsfiles import check_ca_file, check_cert_file, check_key_file

BEGIN = "<!-- BEGIN GENERATED: {name} (python -m zdproxy.docgen; do not edit by hand) -->"
END = "<!-- END GENERATED: {name} -->"

#: models whose keys are documented once, elsewhere: a row names that place instead
_SAME_KEYS_AS: dict[type[BaseModel], str] = {HealthCheckOverride: "health_check"}
#: the header-token pattern several keys share
_TOKEN_PATTERNS = ("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_PLURALS = {"address": "addresses", "status": "statuses"}
#: what a string checked by one of these validators is
_STRING_KINDS: dict[Any, str] = {
    _check_header_name: "header name",
    _check_pool_name: "name",
    check_cert_file: "file path",
    check_key_file: "file path",
    check_ca_file: "file path",
}
#: integers whose bounds say what they are
_INT_KINDS = {" 100-599": "status", " 1-65535": "port"}


@dataclass(frozen=True)
class Key:
    """One config key as the reference shows it."""

    path: str  # dotted, with NAME for a mapping's keys and [] for a list's items
    type: str
    default: str
    description: str


# ---- config keys ----------------------------------------------------------------


def config_keys() -> list[Key]:
    """Every key of the schema, depth first in declaration order."""
    return list(_model_keys(Config, "", None))


def _model_keys(model: type[BaseModel], prefix: str, instance: Any) -> Iterator[Key]:
    # a model written in the file with other keys than its fields (a listener's
    # ``address``) lists those: they are the keys a user can write
    for name in getattr(model, "FILE_KEYS", model.model_fields):
        path = f"{prefix}{name}"
        info = model.model_fields.get(name)
        if info is None:
            yield _address_key(model, path)
            continue
        annotation = _annotation(model, name, info)
        value = _default_value(info, instance, name)
        default = (
            "**required**"
            if value is PydanticUndefined
            else _value_text(value, _is_duration(info.metadata))
        )
        description = _field_docs(model).get(name, "")
        type_text = _type_text(annotation, info.metadata)
        child = _child_model(annotation, path)
        if child is not None and not _listed_at(*child):
            type_text += f" (keys of `{_homes()[child[0]][1]}`)"
        yield Key(path, type_text, default, description)
        nested = None if value is PydanticUndefined else value
        yield from _nested_keys(annotation, path, nested)


def _address_key(model: type[BaseModel], path: str) -> Key:
    """The one key an ``Address`` subclass's ``host`` and ``port`` are written as."""
    if not issubclass(model, Address):
        raise TypeError(f"{model.__name__}: a file key that is no field must be its address")
    description = " ".join((Address.__doc__ or "").split()).replace("``", "`").rstrip(".")
    return Key(path, "address", "**required**", description)


def _annotation(model: type[BaseModel], name: str, info: FieldInfo) -> Any:
    """The field's type; one written before its alias was defined is left as a
    ``ForwardRef`` by pydantic and resolved here."""
    if isinstance(info.annotation, ForwardRef):
        return get_type_hints(model, include_extras=True)[name]
    return info.annotation


def _default_value(info: FieldInfo, instance: Any, name: str) -> Any:
    """The default; a nested model's comes from its parent's default
    (``routing.cookie.name`` is ``zd_pool``, not the class's)."""
    if instance is not None:
        return getattr(instance, name)
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def _nested_keys(annotation: Any, path: str, instance: Any) -> Iterator[Key]:
    child = _child_model(annotation, path)
    if child is None or not _listed_at(*child):
        return  # no keys below, or listed at the model's home
    model, where = child
    yield from _model_keys(model, f"{where}.", instance if where == path else None)


def _child_model(annotation: Any, path: str) -> tuple[type[BaseModel], str] | None:
    """The model whose keys sit below ``path``, and the path they hang from
    (``path``, ``path[]`` for a list's items, ``path.NAME`` for a mapping's values);
    None for a scalar, an ``Address`` or a model documented elsewhere by name."""
    tp, _meta = _unwrap(annotation)
    tp = _optional(tp) or tp
    origin, args = get_origin(tp), get_args(tp)
    where = path
    if origin is tuple and args:
        tp, where = _unwrap(args[0])[0], f"{path}[]"
    elif origin is dict and args:
        tp, where = _unwrap(args[1])[0], f"{path}.NAME"
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return None
    if tp is Address or tp in _SAME_KEYS_AS:
        return None
    return tp, where


def _depth(where: str) -> int:
    return where.count(".") + where.count("[]")


def _listed_at(model: type[BaseModel], where: str) -> bool:
    """Whether ``model``'s keys are listed under ``where``: where it sits least deep
    (``routing.header`` and ``routing.cookie`` both: same keys, other defaults).
    Deeper (a service's pools, its overrides of top-level sections, a backend's
    ``tls``) its row names the home instead of repeating the keys, whose defaults
    would be wrong there anyway (an unset override key is inherited)."""
    return _depth(where) == _homes()[model][0]


@functools.cache
def _homes() -> dict[type[BaseModel], tuple[int, str]]:
    """Model -> (its least depth, the first path at that depth)."""
    found: dict[type[BaseModel], tuple[int, str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            child = _child_model(_annotation(model, name, info), f"{prefix}{name}")
            if child is None:
                continue
            sub, where = child
            depth = _depth(where)
            if sub not in found or depth < found[sub][0]:
                found[sub] = (depth, where)
            walk(sub, f"{where}.")

    walk(Config, "")
    return found


@functools.cache
def _field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the string literal right under it in the class body (and in its
    bases'), whitespace collapsed, ready for a table cell."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        body = ast.parse(inspect.getsource(cls)).body[0]
        assert isinstance(body, ast.ClassDef)
        for field, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                text = " ".join(after.value.value.split())
                docs[field.target.id] = text.replace("|", "\\|")
    return docs


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, ...]`` -> (X, its metadata, FieldInfo constraints flattened)."""
    metadata: list[Any] = []
    while get_origin(tp) is Annotated:
        base, *extra = get_args(tp)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        tp = base
    return tp, metadata


def _optional(tp: Any) -> Any | None:
    """``X | None`` -> X; anything else -> None."""
    if get_origin(tp) in (Union, types.UnionType):
        rest = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(rest) == 1 and len(rest) < len(get_args(tp)):
            return rest[0]
    return None


def _type_text(annotation: Any, metadata: Sequence[Any]) -> str:
    tp, inner = _unwrap(annotation)
    metadata = [*metadata, *inner]
    inner_tp = _optional(tp)
    if inner_tp is not None:
        text = _type_text(inner_tp, metadata)
        return f"{text}, or null" if "," in text else f"{text} or null"
    if any(getattr(m, "func", None) is _one_or_many for m in metadata):
        item = _type_text(get_args(tp)[0], [])
        if " or " in item:
            return f"{item}, or a list of them"
        return f"{item} or list of {_plural(item)}"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        # e.g. workers: a number or `auto`
        return " or ".join(_type_text(arg, []) for arg in args)
    if origin is tuple:
        text = f"list of {_plural(_type_text(args[0], []))}"
        return f"{text}, not empty" if _bound(metadata, annotated_types.MinLen) else text
    if origin is dict:
        value, _ = _unwrap(args[1])
        if isinstance(value, type) and issubclass(value, BaseModel):
            value_text = value.__name__.removesuffix("Config").lower()
        else:
            value_text = _type_text(args[1], [])
        return f"mapping: {_type_text(args[0], [])} -> {value_text}"
    if origin is Literal:
        return " or ".join(f"`{arg}`" for arg in args) if len(args) < 3 else _words(args)
    return _scalar_text(tp, metadata)


def _words(args: Sequence[Any]) -> str:
    return ", ".join(f"`{arg}`" for arg in args)


def _plural(text: str) -> str:
    head, _, tail = text.partition(" ")
    return " ".join(filter(None, (_PLURALS.get(head, f"{head}s"), tail)))


def _scalar_text(tp: Any, metadata: Sequence[Any]) -> str:
    if tp is bool:
        return "bool"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp is Address:
            return "address"
        if issubclass(tp, Address):
            return "address or mapping"  # ``host:port``, or a mapping with more keys
        if tp in _SAME_KEYS_AS:
            return f"mapping: any key of `{_SAME_KEYS_AS[tp]}`"
        return "mapping"
    if tp is int:
        name = _INT_KINDS.get(_bounds(metadata), "integer")
        return f"{name}{_bounds(metadata)}"
    if tp is float:
        return f"{'duration' if _is_duration(metadata) else 'number'}{_bounds(metadata)}"
    if tp is str:
        if any(getattr(m, "pattern", None) in _TOKEN_PATTERNS for m in metadata):
            return "HTTP token"
        for item in metadata:
            kind = _STRING_KINDS.get(getattr(item, "func", None))
            if kind is not None:
                return kind
        return "string"
    return getattr(tp, "__name__", str(tp))


def _bound(metadata: Sequence[Any], kind: type[Any]) -> Any:
    for item in metadata:
        if isinstance(item, kind):
            return item
    return None


def _bounds(metadata: Sequence[Any]) -> str:
    low = _bound(metadata, annotated_types.Ge)
    high = _bound(metadata, annotated_types.Le)
    above = _bound(metadata, annotated_types.Gt)
    if low is not None and high is not None:
        return f" {_number(low.ge)}-{_number(high.le)}"
    if low is not None:
        return f" >= {_number(low.ge)}"
    if above is not None:
        return f" > {_number(above.gt)}"
    return ""


def _is_duration(metadata: Sequence[Any]) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in metadata)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{_number(seconds / 3600)}h"
    if seconds < 1:
        return f"{_number(round(seconds * 1000, 3))}ms"
    return f"{_number(seconds)}s"


def _value_text(value: Any, duration: bool) -> str:
    if isinstance(value, BaseModel) and not isinstance(value, Address):
        return "see below"  # a section: its keys follow
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if duration and isinstance(value, int | float):
        return f"`{_duration(float(value))}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, tuple | list):
        items = [str(item) if isinstance(item, Address) else item for item in value]
        return f"`{json.dumps(items)}`" if items else "`[]`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value}`"


def config_reference() -> str:
    """The generated part of docs/configuration.md: a table per section."""
    keys = config_keys()
    sections: dict[str, list[Key]] = {"Top level": []}
    for key in keys:
        top = key.path.split(".", 1)[0].split("[", 1)[0]
        if "." not in key.path:
            sections["Top level"].append(key)
        else:
            sections.setdefault(f"`{top}`", []).append(key)
    out: list[str] = []
    for title, rows in sections.items():
        out += [
            f"### {title}",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for key in rows:
            out.append(f"| `{key.path}` | {key.type} | {key.default} | {key.description} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---- admin API --------------------------------------------------------------------

_METHODS = ("get", "put", "post", "delete", "patch")


def api_operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of the OpenAPI description."""
    from zdproxy import __version__
    from zdproxy.admin.openapi import build_spec

    spec = build_spec(__version__)
    found: list[tuple[str, str, dict[str, Any]]] = []
    for path, item in spec["paths"].items():
        for method in _METHODS:
            if method in item:
                found.append((method.upper(), path, item[method]))
    return found


def api_reference() -> str:
    """The generated part of docs/api.md: one row per operation."""
    out = ["| method and path | what | token | answers |", "| --- | --- | --- | --- |"]
    for method, path, operation in api_operations():
        summary = " ".join(str(operation.get("summary", "")).split()).replace("|", "\\|")
        token = "none" if operation.get("security") == [] else _role(method)
        answers = ", ".join(sorted(operation.get("responses", {})))
        out.append(f"| `{method} {path}` | {summary} | {token} | {answers} |")
    return "\n".join(out) + "\n"


def _role(method: str) -> str:
    return "read" if method == "GET" else "write"


# ---- files ------------------------------------------------------------------------

#: generated part -> (file under the repository root, generator)
TARGETS = {
    "config": ("docs/configuration.md", config_reference),
    "api": ("docs/api.md", api_reference),
}


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``name``'s markers replaced by ``body``."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no {begin!r} ... {end!r} markers")
    return f"{text[: start + len(begin)]}\n\n{body}\n{text[stop:]}"


def generated_block(text: str, name: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no {begin!r} ... {end!r} markers")
    return text[start + len(begin) : stop]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zdproxy.docgen", description=__doc__)
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument(
        "--root",
        default=str(Path(__file__).resolve().parent.parent),
        help="the repository root (default: the checkout this module is in)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if out of date")
    args = parser.parse_args(argv)
    unknown = [name for name in args.parts if name not in TARGETS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {', '.join(TARGETS)}")
    stale = []
    for name in args.parts or list(TARGETS):
        relative, generate = TARGETS[name]
        path = Path(args.root) / relative
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, name, generate())
        if updated == text:
            continue
        if args.check:
            stale.append(relative)
        else:
            path.write_text(updated, encoding="utf-8")
            print(f"rewrote the generated part of {relative}")
    for relative in stale:
        print(f"{relative} is out of date: run python -m zdproxy.docgen", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
