"""Reading the Dockerfile without a container engine: its instructions, the final
stage's exec-form command lines, and the ``.dockerignore`` allowlist.

Only what the repository's Dockerfile uses is understood: line continuations,
comments, ``FROM ... AS name``, JSON exec forms, ``KEY=value`` ENV pairs and
``HEALTHCHECK [--option=value ...] CMD [...]``.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use KEY=value pairs"
                values[key] = value
        return values


def logical_lines(text: str) -> list[str]:
    """Instructions one per line: comments dropped, continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # a comment, even inside a continuation, is dropped by docker
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"
    return [line for line in lines if line]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=_expand(words[0], args), name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    for key, value in args.items():
        text = text.replace("${" + key + "}", value).replace("$" + key, value)
    return text


def exec_form(args: str) -> list[str]:
    """A JSON exec form (``["a", "b"]``); anything else is shell form, an error here."""
    assert args.startswith("["), f"not an exec form (a shell would sit in between): {args!r}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def healthcheck(args: str) -> tuple[dict[str, str], list[str]]:
    """``HEALTHCHECK --k=v ... CMD [...]`` -> (options, exec-form command)."""
    options: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    word, _, command = rest.partition(" ")
    assert word.upper() == "CMD", f"HEALTHCHECK without CMD: {args!r}"
    return options, exec_form(command.strip())


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether ``path`` reaches the build context (last matching pattern wins)."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        parts = path.split("/")
        # a pattern matching a parent directory covers everything below it
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes):
            allowed = negate
    return allowed


def dockerignore_patterns(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def console_script(name: str) -> str:
    """The installed console script ``name``: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"no {name} console script installed next to {sys.executable} or on PATH"
    return found
