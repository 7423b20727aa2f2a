"""The docs stay true to the code: every config key is documented and every key
the docs name exists, the generated reference parts are up to date, every admin
operation is documented, and every relative link (and anchor) leads somewhere.

Regenerate the reference parts with ``python -m zdproxy.docgen``.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from support_docs import anchors, code_spans, links, resolve_key

from zdproxy import docgen
from zdproxy.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
API = DOCS / "api.md"

#: dotted names in the docs that look like config keys but are not: audit event
#: actions, a Python module
NOT_CONFIG_KEYS = frozenset({"shadow.set", "shadow.clear", "http.client"})

_KEY_LIKE = re.compile(r"([a-z_]+)((?:\.[A-Za-z0-9_\-]+|\[\])+)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def documented_keys() -> list[str]:
    """The keys the configuration reference's tables list (first column)."""
    block = docgen.generated_block(CONFIGURATION.read_text(), "config")
    return re.findall(r"^\| `([^`]+)` \|", block, flags=re.MULTILINE)


# ---- configuration ------------------------------------------------------------------


def test_every_schema_key_is_documented_once() -> None:
    schema_keys = [key.path for key in docgen.config_keys()]
    documented = documented_keys()
    assert sorted(documented) == sorted(schema_keys)
    assert len(set(documented)) == len(documented)
    # the reference really has the nested keys, not only the sections
    for key in ("pools.NAME.backends[].address", "http.request_id.header", "state.etcd.prefix"):
        assert key in documented


def test_every_schema_key_has_a_description() -> None:
    missing = [key.path for key in docgen.config_keys() if not key.description]
    assert missing == [], "add a docstring under these fields in zdproxy/config/schema.py"


def test_every_key_the_docs_name_exists_in_the_schema() -> None:
    tops = set(Config.model_fields)
    unknown = []
    for path in markdown_files():
        for line, span in code_spans(path.read_text()):
            match = _KEY_LIKE.fullmatch(span)
            named = match is not None and match.group(1) in tops and span not in NOT_CONFIG_KEYS
            if named and not resolve_key(span):
                unknown.append(f"{path.relative_to(ROOT)}:{line}: {span}")
    assert unknown == []
    assert resolve_key("pools.blue.backends.0.address")
    assert not resolve_key("pools.blue.backends.0.adress")
    assert not resolve_key("health_check.intervall")


def test_the_reference_shows_types_and_defaults_from_the_schema() -> None:
    rows = {key.path: key for key in docgen.config_keys()}
    assert rows["listen"].default == "**required**"
    assert rows["admin.listen"].default == "`127.0.0.1:9901`"
    assert rows["routing.cookie.name"].default == "`zd_pool`"  # the parent's default
    assert rows["routing.header.name"].default == "`X-Zdproxy-Pool`"
    assert rows["sticky.max_age"].default == "`1h`"
    assert rows["health_check.expected_statuses"].default == "`[200, 204]`"
    assert rows["pools.NAME.weight"].type == "integer 0-100"
    assert rows["health_check.interval"].type == "duration > 0"
    assert rows["state.path"].type == "string or null"
    assert rows["log.level"].type == "`debug`, `info`, `warning`, `error`"
    # aliases checked by a validator say what they hold; a union says each member
    assert rows["listen[].tls.cert"].type == "file path or null"
    assert rows["pools.NAME.tls.ca"].type == "file path or null"
    assert rows["http.request_id.header"].type == "header name"
    assert rows["listen[].redirect_https"].type == "bool or port 1-65535"
    assert rows["listen"].type == "address or mapping, or a list of them"
    # a listener is written with address, not host and port
    assert rows["listen[].address"].type == "address"
    assert "listen[].host" not in rows
    # a model met again deeper is named, not repeated with defaults that do not apply
    assert rows["services.NAME.sticky"].type == "mapping or null (keys of `sticky`)"
    assert rows["pools.NAME.backends[].tls"].type == "mapping or null (keys of `pools.NAME.tls`)"
    assert "services.NAME.sticky.mode" not in rows
    assert "pools.NAME.backends[].tls.ca" not in rows


@pytest.mark.parametrize("name", sorted(docgen.TARGETS))
def test_generated_parts_are_up_to_date(name: str) -> None:
    relative, generate = docgen.TARGETS[name]
    text = (ROOT / relative).read_text()
    assert docgen.replace_block(text, name, generate()) == text, (
        f"{relative} is out of date: run python -m zdproxy.docgen"
    )


def test_docgen_check_reports_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    for relative, _generate in docgen.TARGETS.values():
        (tmp_path / relative).write_text((ROOT / relative).read_text())
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    stale = tmp_path / "docs" / "configuration.md"
    stale.write_text(stale.read_text().replace("| `shadow.percent` |", "| `shadow.pct` |"))
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert docgen.main(["--root", str(tmp_path)]) == 0  # regenerates
    assert stale.read_text() == CONFIGURATION.read_text()


# ---- admin API ----------------------------------------------------------------------


def test_every_api_operation_is_documented() -> None:
    text = API.read_text()
    operations = {(method, path) for method, path, _ in docgen.api_operations()}
    assert len(operations) > 20
    for method, path in sorted(operations):
        assert f"`{method} {path}`" in text, f"{method} {path} is not in docs/api.md"


def operation_exists(named: str) -> bool:
    """``POST /api/v1/backends/blue-1/drain``, ``GET /api/v1/events?limit=N`` and
    ``POST /api/v1/rolling/{next,abort}`` name operations of the description."""
    method, _, path = named.partition(" ")
    path = path.split("?", 1)[0]
    alternatives = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if alternatives:
        return all(
            operation_exists(f"{method} {path.replace(alternatives.group(0), choice)}")
            for choice in alternatives.group(1).split(",")
        )
    for known_method, template, _ in docgen.api_operations():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if known_method == method and re.fullmatch(pattern, path):
            return True
    return False


def test_every_operation_the_docs_name_exists() -> None:
    named = [
        f"{path.relative_to(ROOT)}:{line}: {span}"
        for path in markdown_files()
        for line, span in code_spans(path.read_text())
        if re.fullmatch(r"(GET|PUT|POST|DELETE|PATCH) /(api/\S*|healthz|metrics)", span)
    ]
    assert len(named) > 20, "the docs name hardly any operation: is the pattern right?"
    assert [item for item in named if not operation_exists(item.rpartition(": ")[2])] == []
    assert operation_exists("POST /api/v1/backends/blue-1/drain")
    assert not operation_exists("POST /api/v1/backends/blue-1/drian")
    assert not operation_exists("PUT /api/v1/flip")


# ---- links --------------------------------------------------------------------------


def test_every_relative_link_leads_to_a_file_and_anchor() -> None:
    broken = []
    for page in markdown_files():
        for line, target in links(page.read_text()):
            problem = link_problem(page, target)
            if problem:
                broken.append(f"{page.relative_to(ROOT)}:{line}: {target}: {problem}")
    assert broken == []


def link_problem(page: Path, target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None  # http:, https:, mailto:
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / unquote(file_part)).resolve() if file_part else page
    relative = destination.relative_to(ROOT).as_posix() if destination.is_relative_to(ROOT) else ""
    if not destination.exists():
        return "no such file"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination.read_text()):
        return f"no heading #{anchor} in {relative}"
    return None


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Title\n\n## A section\n")
    page = tmp_path / "a.md"
    page.write_text("x")
    assert link_problem(page, "b.md#a-section") is None
    assert link_problem(page, "b.md#title") is None
    assert link_problem(page, "b.md#nowhere") is not None
    assert link_problem(page, "c.md") == "no such file"
    assert link_problem(page, "https://example.com/x") is None
    assert links("[a](x.md) `[b](y.md)` ![c](z.png)\n```\n[d](w.md)\n```\n") == [
        (1, "x.md"),
        (1, "z.png"),
    ]


def test_every_docs_page_is_linked_from_the_index_and_the_readme() -> None:
    index = (DOCS / "index.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, page.name
            assert f"](docs/{page.name})" in readme, page.name
