"""YAML -> ``Config``, with every problem named as ``FILE:LINE: dotted.key: message``.

The YAML is composed into a node tree first, so that each key path keeps the line
it was written on; the plain data built from the nodes is then validated by the
schema. All problems are collected and reported together: YAML structure (duplicate
keys, unsupported tags), every pydantic error, and the cross-field checks of
``schema.check_listeners`` / ``schema.check_pools`` at their exact keys.

Scalars follow YAML 1.2 where YAML 1.1 surprises people: only ``true``/``false``
are booleans (``mode: off`` is the string ``"off"``; ``enabled: off`` still
validates as false) and dates stay strings.

Relative paths in the config (``state.path``, ``admin.token_file``, token files)
are used as written, so they are relative to the working directory of the process.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from zdproxy.config.schema import (
    CROSS_FIELD_ERROR,
    DEFAULT_SERVICE,
    AdminConfig,
    Config,
    Listener,
    Listeners,
    Loc,
    PoolConfig,
    RouteConfig,
    ServiceConfig,
    StickyConfig,
    check_listeners,
    check_pool_backends,
    check_pool_weights,
    check_redirects,
    check_services,
    check_shadow,
)
from zdproxy.errors import ZdproxyError
from zdproxy.http.routes import RouteSpec, shadowed

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "check_file",
    "load_config",
    "load_config_text",
    "summary",
]

ROOT_KEY = "(root)"  # the problem concerns the whole document
FILE_KEY = "(file)"  # the file cannot be read or decoded
YAML_KEY = "(yaml)"  # the text is not valid YAML


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file.

    ``line`` is 1-based, or None when no line applies (the file cannot be read);
    ``str()`` then reports line 1, so every problem parses as ``FILE:LINE:``.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line or 1}: {self.key}: {self.message}"


class ConfigError(ZdproxyError):
    """The config is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --- public API -----------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; raise ``ConfigError`` if invalid."""
    filename = os.fspath(path)
    return load_config_text(_read_text(filename), filename)


def load_config_text(text: str, filename: str) -> Config:
    """Validate config ``text``; problems name ``filename``. Raise ``ConfigError``."""
    return _load(text, filename)[0]


def _load(text: str, filename: str) -> tuple[Config, Mapping[Loc, int]]:
    """The config and the line of each key."""
    try:
        loader = _Loader(text)  # rejects characters YAML does not allow
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(filename, text, exc)]) from None
    builder = _Builder(loader, filename)
    try:
        data = builder.parse()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(filename, text, exc)]) from None
    finally:
        loader.dispose()
    problems = builder.problems
    if data is not None:
        config, schema_problems = _validate(data, builder.lines, filename)
        problems += schema_problems
        if config is not None and not problems:
            return config, builder.lines
    raise ConfigError(_in_file_order(problems))


def check_file(path: str | os.PathLike[str]) -> tuple[bool, list[str]]:
    """What ``zdproxy check`` prints: (True, [summary]) or (False, [one line per problem])."""
    filename = os.fspath(path)
    try:
        config, lines = _load(_read_text(filename), filename)
    except ConfigError as exc:
        return False, [str(problem) for problem in exc.problems]
    return True, [f"{filename}: OK: {summary(config)}", *warnings(config, lines, filename)]


def warnings(config: Config, lines: Mapping[Loc, int], filename: str) -> list[str]:
    """What is valid but surely not meant: a route an earlier one shadows."""
    specs = [
        RouteSpec(
            index=index,
            service=route.service,
            target=None,
            host=route.match.host,
            path_exact=route.match.path_exact,
            path_prefix=route.match.path_prefix,
            path_regex=route.match.path_regex,
            methods=None if route.match.methods is None else frozenset(route.match.methods),
            headers=tuple(route.match.headers.items()),
        )
        for index, route in enumerate(config.routes)
    ]
    out = []
    for later, earlier in shadowed(specs):
        path: Loc = ("routes", later)
        out.append(
            str(
                ConfigProblem(
                    filename,
                    _line_of(path, lines),
                    _dotted(path),
                    f"warning: never matches: routes.{earlier} (same host and path) "
                    "takes every request it would",
                )
            )
        )
    return out


def summary(config: Config) -> str:
    """``2 listeners, 2 pools (blue=100, green=0), 4 backends``."""
    if config.services:
        names = config.service_names()
        parts = [summary_of_pools(config.service_config(name).pools) for name in names]
        services = "; ".join(f"{name}: {part}" for name, part in zip(names, parts, strict=True))
        return (
            f"{_plural(len(config.listen), 'listener')}, "
            f"{_plural(len(names), 'service')} ({services}), "
            f"{_plural(len(config.routes), 'route')}"
        )
    return f"{_plural(len(config.listen), 'listener')}, {summary_of_pools(config.pools)}"


def summary_of_pools(pools: Mapping[str, PoolConfig]) -> str:
    """``2 pools (blue=100, green=0), 4 backends``."""
    split = ", ".join(f"{name}={pool.weight}" for name, pool in pools.items())
    backends = sum(len(pool.backends) for pool in pools.values())
    return f"{_plural(len(pools), 'pool')} ({split}), {_plural(backends, 'backend')}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --- reading --------------------------------------------------------------------------


def _read_text(filename: str) -> str:
    try:
        raw = Path(filename).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigProblem(filename, None, FILE_KEY, f"cannot read: {reason}")]
        ) from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})"
        raise ConfigError([ConfigProblem(filename, line, FILE_KEY, message)]) from None


# --- YAML with lines ------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and no timestamps."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Builder:
    """Builds plain data from YAML nodes, recording the line of every key path."""

    def __init__(self, loader: _Loader, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Loc, int] = {}
        self.problems: list[ConfigProblem] = []
        self._loader = loader
        self._active: set[int] = set()  # ids of the collection nodes being built (aliases)

    def parse(self) -> dict[str, Any] | None:
        """The top-level mapping, or None after recording why there is none.
        Raises ``yaml.YAMLError`` on invalid YAML."""
        node = self._loader.get_single_node()
        if node is None:
            self._problem((), 1, "the file is empty: a config needs at least listen and pools")
            return None
        self.lines[()] = node.start_mark.line + 1
        data = self._build(node, ())
        if not isinstance(data, dict):
            message = f"expected a mapping of keys at the top level, got {_describe(data)}"
            self._problem((), self.lines[()], message)
            return None
        return data

    def _problem(self, path: Loc, line: int, message: str) -> None:
        self.problems.append(ConfigProblem(self.filename, line, _dotted(path), message))

    def _build(self, node: yaml.Node, path: Loc) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self._loader.construct_object(node)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            self._problem(path, node.start_mark.line + 1, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, skip=set())
        if self._recursive(node, path):
            return None
        items: list[Any] = []
        self._active.add(id(node))
        for index, item in enumerate(node.value):
            self.lines[(*path, index)] = item.start_mark.line + 1
            items.append(self._build(item, (*path, index)))
        self._active.discard(id(node))
        return items

    def _recursive(self, node: yaml.Node, path: Loc) -> bool:
        """An alias to a node that contains it (``&a [*a]``) would never end."""
        if id(node) in self._active:
            self._problem(path, node.start_mark.line + 1, "recursive YAML alias")
            return True
        return False

    def _mapping(self, node: yaml.MappingNode, path: Loc, skip: set[str]) -> dict[str, Any]:
        """Keys are taken as written (``1:`` is the key "1"). Duplicate keys are
        problems; merge keys (``<<: *defaults``) give way to explicit keys."""
        if self._recursive(node, path):
            return {}
        self._active.add(id(node))
        try:
            return self._mapping_items(node, path, skip)
        finally:
            self._active.discard(id(node))

    def _mapping_items(self, node: yaml.MappingNode, path: Loc, skip: set[str]) -> dict[str, Any]:
        explicit: dict[str, int] = {}
        merges: list[yaml.Node] = []
        pairs: list[tuple[str, int, yaml.Node]] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
            elif not isinstance(key_node, yaml.ScalarNode):
                self._problem(path, line, "a key must be a plain name, not a list or mapping")
            elif key_node.value in explicit:
                first = explicit[key_node.value]
                message = f"duplicate key {key_node.value!r} (first on line {first})"
                self._problem((*path, key_node.value), line, message)
            else:
                explicit[key_node.value] = line
                pairs.append((key_node.value, line, value_node))

        result: dict[str, Any] = {}
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    line = source.start_mark.line + 1
                    self._problem(path, line, "a merge key (<<) takes a mapping or a list of them")
                    continue
                taken = skip | explicit.keys() | result.keys()
                result.update(self._mapping(source, path, skip=taken))
        for key, line, value_node in pairs:
            if key in skip:
                continue
            self.lines[(*path, key)] = line
            result[key] = self._build(value_node, (*path, key))
        return result


_INDENTATION_HINTS = ("<block end>", "mapping values are not allowed here")


def _yaml_problem(filename: str, text: str, exc: yaml.YAMLError) -> ConfigProblem:
    if not isinstance(exc, yaml.MarkedYAMLError):  # ReaderError: a forbidden character
        position = getattr(exc, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else 1
        character = getattr(exc, "character", None)
        what = f"character #x{character:04x}" if isinstance(character, int) else "input"
        return ConfigProblem(filename, line, YAML_KEY, f"invalid YAML: unacceptable {what}")
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = f"invalid YAML: {exc.problem or 'syntax error'}"
    if any(hint in message for hint in _INDENTATION_HINTS):
        message += "; check the indentation"
    if exc.context:
        context = exc.context
        if exc.context_mark is not None and exc.context_mark.line + 1 != line:
            context += f" started on line {exc.context_mark.line + 1}"
        message += f" ({context})"
    return ConfigProblem(filename, line, YAML_KEY, message)


# --- validation -----------------------------------------------------------------------

_LISTENERS: TypeAdapter[tuple[Listener, ...]] = TypeAdapter(Listeners)
_T = TypeVar("_T")


def _validate(
    data: dict[str, Any], lines: Mapping[Loc, int], filename: str
) -> tuple[Config | None, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def add(path: Loc, message: str) -> None:
        problems.append(ConfigProblem(filename, _line_of(path, lines), _dotted(path), message))

    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["type"] != CROSS_FIELD_ERROR]  # see below
        for path, message in _messages(errors):
            add(path, message)
    for path, message in _cross_field_problems(data):
        add(path, message)
    return config, problems


def _cross_field_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """``Config``'s cross-field checks, run on the parts that validate on their own, so
    that each is reported at its exact key, even when other parts are invalid."""
    problems: list[tuple[Loc, str]] = []
    listen = _valid_or_none(_LISTENERS.validate_python, data.get("listen"))
    admin = _valid_or_none(AdminConfig.model_validate, data.get("admin", {}))
    if listen is not None:
        problems += check_listeners(listen, admin) + check_redirects(listen)
    problems += _service_problems(data)
    raw_pools = data.get("pools")
    if not isinstance(raw_pools, dict) or not raw_pools:
        if "pools" not in data and not data.get("services"):
            problems.append((("pools",), "missing required key (or set services)"))
        elif "pools" not in data and isinstance(data.get("shadow"), dict):
            problems += check_shadow(data["shadow"].get("pool"), {})
        return problems
    shadow = data.get("shadow")
    if isinstance(shadow, dict):
        problems += check_shadow(shadow.get("pool"), raw_pools)
    weights: dict[str, int] = {}
    pools: dict[str, PoolConfig] = {}
    for name, raw in raw_pools.items():
        pool = _valid_or_none(PoolConfig.model_validate, raw)
        if pool is not None:
            pools[name] = pool
        elif isinstance(raw, dict):  # invalid elsewhere: its weight may still count
            pool = _valid_or_none(PoolConfig.model_validate, {"weight": raw.get("weight", 0)})
        if pool is not None:
            weights[name] = pool.weight
    if len(weights) == len(raw_pools):
        problems += check_pool_weights(weights)
    return problems + check_pool_backends(pools)


def _service_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """``check_services`` on the parts of services and routes that validate."""
    raw_services = data.get("services")
    raw_routes = data.get("routes")
    if not raw_services and not raw_routes and data.get("default_service") is None:
        return []
    services: dict[str, ServiceConfig] = {}
    if isinstance(raw_services, dict):
        for name, raw in raw_services.items():
            service = _valid_or_none(ServiceConfig.model_validate, raw)
            if service is not None:
                services[name] = service
            elif isinstance(raw, dict) and name != DEFAULT_SERVICE:
                # invalid elsewhere: routes naming it are not reported as unknown
                services[name] = ServiceConfig.model_construct(pools={})
    routes = [
        route
        for raw in (raw_routes if isinstance(raw_routes, list) else [])
        if (route := _valid_or_none(RouteConfig.model_validate, raw)) is not None
    ]
    raw_pools = data.get("pools")
    pools = {
        name: _valid_or_none(PoolConfig.model_validate, raw) or PoolConfig()
        for name, raw in (raw_pools.items() if isinstance(raw_pools, dict) else ())
    }
    sticky = _valid_or_none(StickyConfig.model_validate, data.get("sticky", {})) or StickyConfig()
    default = data.get("default_service")
    return check_services(
        pools, services, routes, default if isinstance(default, str) else None, sticky
    )


def _valid_or_none(validate: Callable[[Any], _T], value: Any) -> _T | None:
    try:
        return validate(value)
    except ValidationError:
        return None


def _line_of(path: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of the deepest part of ``path`` written in the file."""
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def _dotted(path: Loc) -> str:
    return ".".join(str(part) for part in path) or ROOT_KEY


# --- pydantic errors -> short messages ---------------------------------------------------

_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
}
_PATTERNS = {
    r"^[A-Za-z0-9_.:-]+$": "use letters, digits, _ . : -",
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$": "use letters, digits and !#$%&'*+.^_`|~-",
}


def _messages(errors: Sequence[ErrorDetails]) -> list[tuple[Loc, str]]:
    """(path, message) for each error; a missing key that an unknown sibling key is a
    typo of is left out, since "unknown key, did you mean X?" says it all."""
    out = [(_path(error), error) for error in errors]
    typos = {(*path[:-1], _suggestion(path)) for path, error in out if _is_unknown(error)}
    return [
        (path, _message(error, path))
        for path, error in out
        if not (error["type"] == "missing" and path in typos)
    ]


def _path(error: ErrorDetails) -> Loc:
    return tuple(part for part in error["loc"] if part != "[key]")


def _is_unknown(error: ErrorDetails) -> bool:
    return error["type"] == "extra_forbidden"


def _message(error: ErrorDetails, path: Loc) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(path)
    if kind == "missing":
        return "missing required key"
    if kind in _EXPECTED:
        return f"{_EXPECTED[kind]}, got {_describe(value)}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_describe(value)}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} entries, got {ctx.get('actual_length')}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        return (
            f"invalid value {_describe(value)}: {_PATTERNS.get(pattern, 'must match ' + pattern)}"
        )
    message = error["msg"]
    if message.startswith("Input should be "):
        return f"must be {message.removeprefix('Input should be ')}, got {_describe(value)}"
    return message


def _unknown_key(path: Loc) -> str:
    suggestion = _suggestion(path)
    if suggestion is not None:
        return f"unknown key, did you mean {suggestion}?"
    known = _known_keys(path[:-1])
    if known:
        return f"unknown key (expected one of: {', '.join(known)})"
    return "unknown key"


def _suggestion(path: Loc) -> str | None:
    """The known key that the unknown last key of ``path`` is probably a typo of."""
    if not path:
        return None
    close = difflib.get_close_matches(str(path[-1]), _known_keys(path[:-1]), n=1)
    return close[0] if close else None


def _known_keys(path: Loc) -> list[str]:
    """The keys allowed in the mapping at ``path``, by walking the schema's types."""
    tp: Any = Config
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) in (tuple, list) and get_args(tp):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and get_args(tp):
            tp = get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        # a model written in the file with other keys than its fields says which
        return list(getattr(tp, "FILE_KEYS", tp.model_fields))
    return []


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_file_order(problems: Iterable[ConfigProblem]) -> list[ConfigProblem]:
    unique = dict.fromkeys(problems)
    return sorted(unique, key=lambda problem: problem.line or 0)
