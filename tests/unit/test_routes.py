"""The route table: host and path tables, wildcards, precedence, conditions, strip_prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zdproxy.config.loader import ConfigError, check_file, load_config_text
from zdproxy.http.routes import RouteSpec, RouteTable, forwarded, normalize_host, shadowed
from zdproxy.services import service_state_path


def spec(index: int, service: str, **match: Any) -> RouteSpec[str]:
    return RouteSpec(index=index, service=service, target=service, **match)


def no_headers(name: bytes) -> bytes | None:
    return None


def route(
    table: RouteTable[str],
    host: bytes | None,
    target: bytes,
    method: bytes = b"GET",
    headers: dict[bytes, bytes] | None = None,
) -> tuple[str, bytes] | None:
    found = table.match(host, target, method, (headers or {}).get)
    return None if found is None else (found.target, forwarded(target, found))


def test_host_is_case_insensitive_and_ignores_port_and_trailing_dot() -> None:
    table = RouteTable([spec(0, "shop", host="Shop.Example.com")])
    for host in (
        b"shop.example.com",
        b"SHOP.EXAMPLE.COM:8080",
        b"shop.example.com.",
        b" shop.example.com",
    ):
        assert route(table, host, b"/") == ("shop", b"/"), host
    assert route(table, b"shop.example.co", b"/") is None
    assert route(table, b"xshop.example.com", b"/") is None
    assert route(table, None, b"/") is None


def test_normalize_host_ipv6() -> None:
    assert normalize_host(b"[::1]:8080") == b"[::1]"
    assert normalize_host(b"[::1]") == b"[::1]"
    assert normalize_host(b"Example.COM:80") == b"example.com"


def test_wildcard_matches_subdomains_at_any_depth_not_the_bare_domain() -> None:
    table = RouteTable([spec(0, "wild", host="*.example.com")])
    assert route(table, b"a.example.com", b"/x") == ("wild", b"/x")
    assert route(table, b"a.b.example.com", b"/x") == ("wild", b"/x")
    assert route(table, b"example.com", b"/x") is None
    assert route(table, b"aexample.com", b"/x") is None


def test_host_precedence_exact_then_longest_wildcard_then_any() -> None:
    table = RouteTable(
        [
            spec(0, "any"),
            spec(1, "short", host="*.example.com"),
            spec(2, "long", host="*.b.example.com"),
            spec(3, "exact", host="x.b.example.com"),
        ]
    )
    assert route(table, b"x.b.example.com", b"/") == ("exact", b"/")
    assert route(table, b"y.b.example.com", b"/") == ("long", b"/")
    assert route(table, b"y.c.example.com", b"/") == ("short", b"/")
    assert route(table, b"other.org", b"/") == ("any", b"/")
    assert route(table, None, b"/") == ("any", b"/")


def test_a_less_specific_host_takes_what_the_specific_one_does_not_match() -> None:
    table = RouteTable(
        [
            spec(0, "admin", host="shop.example.com", path_prefix="/admin/"),
            spec(1, "api", host="*.example.com", path_prefix="/api/"),
            spec(2, "fallback"),
        ]
    )
    assert route(table, b"shop.example.com", b"/admin/x") == ("admin", b"/admin/x")
    assert route(table, b"shop.example.com", b"/api/x") == ("api", b"/api/x")
    assert route(table, b"shop.example.com", b"/other") == ("fallback", b"/other")


def test_path_precedence_exact_regex_longest_prefix_then_none() -> None:
    table = RouteTable(
        [
            spec(0, "none"),
            spec(1, "short", path_prefix="/a/"),
            spec(2, "long", path_prefix="/a/b/"),
            spec(3, "regex", path_regex=r"^/a/b/[0-9]+$"),
            spec(4, "exact", path_exact="/a/b/1"),
        ]
    )
    assert route(table, b"h", b"/a/b/1") == ("exact", b"/a/b/1")
    assert route(table, b"h", b"/a/b/2") == ("regex", b"/a/b/2")
    assert route(table, b"h", b"/a/b/x") == ("long", b"/a/b/x")
    assert route(table, b"h", b"/a/x") == ("short", b"/a/x")
    assert route(table, b"h", b"/b") == ("none", b"/b")


def test_regexes_in_file_order_and_the_query_is_not_part_of_the_path() -> None:
    table = RouteTable(
        [spec(0, "first", path_regex=r"\.png$"), spec(1, "second", path_regex=r"^/img/")]
    )
    assert route(table, b"h", b"/img/a.png") == ("first", b"/img/a.png")
    assert route(table, b"h", b"/img/a.jpg?x=.png") == ("second", b"/img/a.jpg?x=.png")
    exact = RouteTable([spec(0, "exact", path_exact="/status")])
    assert route(exact, b"h", b"/status?verbose=1") == ("exact", b"/status?verbose=1")
    assert route(exact, b"h", b"/status/") is None


def test_prefix_is_a_plain_byte_prefix_without_decoding() -> None:
    table = RouteTable([spec(0, "api", path_prefix="/api")])
    assert route(table, b"h", b"/apix") == ("api", b"/apix")
    assert route(table, b"h", b"/%61pi") is None
    assert route(table, b"h", b"/ap") is None


def test_methods_and_headers_fall_through_to_the_next_candidate() -> None:
    table = RouteTable(
        [
            spec(0, "writes", path_prefix="/api/", methods=frozenset({"POST", "PUT"})),
            spec(1, "tenant", path_prefix="/api/", headers=(("X-Tenant", "acme"),)),
            spec(2, "reads", path_prefix="/api/"),
            spec(3, "root", path_prefix="/"),
        ]
    )
    assert route(table, b"h", b"/api/x", b"POST") == ("writes", b"/api/x")
    assert route(table, b"h", b"/api/x", b"GET") == ("reads", b"/api/x")
    acme = {b"x-tenant": b"acme"}
    assert route(table, b"h", b"/api/x", b"GET", acme) == ("tenant", b"/api/x")
    other = {b"x-tenant": b"acme2"}
    assert route(table, b"h", b"/api/x", b"GET", other) == ("reads", b"/api/x")
    only_posts = RouteTable(
        [
            spec(0, "p", path_prefix="/api/", methods=frozenset({"POST"})),
            spec(1, "root", path_prefix="/"),
        ]
    )
    # a longer prefix whose method does not match gives way to a shorter one
    assert route(only_posts, b"h", b"/api/x", b"GET") == ("root", b"/api/x")


@pytest.mark.parametrize(
    ("prefix", "target", "forwarded"),
    [
        ("/api/", b"/api/users?x=1", b"/users?x=1"),
        ("/api/", b"/api/", b"/"),
        ("/api/", b"/api/?q", b"/?q"),
        ("/api", b"/api", b"/"),
        ("/api", b"/api?q=/a", b"/?q=/a"),
        ("/api", b"/api/users", b"/users"),
        ("/api", b"/apix", b"/x"),
        ("/", b"/a/b", b"/a/b"),
        ("/api/", b"/api//x", b"/x"),
    ],
)
def test_strip_prefix_forwarded_target(prefix: str, target: bytes, forwarded: bytes) -> None:
    table = RouteTable([spec(0, "api", path_prefix=prefix, strip_prefix=True)])
    assert route(table, b"h", target) == ("api", forwarded)


def test_without_strip_prefix_the_target_is_the_same_object() -> None:
    table = RouteTable([spec(0, "api", path_prefix="/api/")])
    target = b"/api/x"
    found = table.match(b"h", target, b"GET", no_headers)
    assert found is not None and forwarded(target, found) is target


def test_default_is_what_no_match_falls_back_to() -> None:
    table = RouteTable([spec(0, "a", host="a.example")], default="fallback")
    assert table.default == "fallback"
    assert table.match(b"b.example", b"/", b"GET", no_headers) is None


def test_many_hosts_each_with_their_own_prefixes() -> None:
    specs = []
    for h in range(200):
        for p in range(20):
            specs.append(
                spec(len(specs), f"s{h}-{p}", host=f"h{h}.example.com", path_prefix=f"/p{p}/")
            )
    table = RouteTable(specs)
    assert route(table, b"h137.example.com", b"/p19/x") == ("s137-19", b"/p19/x")
    assert route(table, b"h0.example.com", b"/p1/") == ("s0-1", b"/p1/")
    assert route(table, b"h0.example.com", b"/p20/") is None


def test_shadowed_routes() -> None:
    specs = [
        spec(0, "a", host="x.example", path_prefix="/api/"),
        spec(1, "b", host="X.example", path_prefix="/api/", methods=frozenset({"GET"})),
        spec(2, "c", host="x.example", path_prefix="/api/v2/"),
        spec(3, "d", path_exact="/s", methods=frozenset({"GET"})),
        spec(4, "e", path_exact="/s"),
        spec(5, "f", path_exact="/s", methods=frozenset({"GET"}), headers=(("X", "1"),)),
    ]
    assert shadowed(specs) == [(1, 0), (5, 3)]


SERVICES = """\
listen: 127.0.0.1:8080
services:
  shop:
    pools:
      blue: {weight: 100, backends: [{address: 127.0.0.1:9001}]}
  api:
    pools:
      blue: {weight: 100, backends: [{address: 127.0.0.1:9002}]}
routes:
  - match: {host: shop.example.com}
    service: shop
  - match: {host: "*.example.com", path_prefix: /api/}
    service: api
    strip_prefix: true
"""


def test_config_with_services_and_default_ids() -> None:
    config = load_config_text(SERVICES, "c.yaml")
    assert config.service_names() == ["shop", "api"]
    shop = config.service_config("shop")
    assert [b for _, b, _ in shop.backend_ids()] == ["shop-blue-1"]
    assert [b for _, b, _ in config.service_config("api").backend_ids()] == ["api-blue-1"]


def test_config_with_top_level_pools_and_services_has_a_default_service() -> None:
    text = SERVICES.replace(
        "services:",
        "pools:\n  main: {weight: 100, backends: [{address: 127.0.0.1:9003}]}\nservices:",
    )
    config = load_config_text(text, "c.yaml")
    assert config.service_names() == ["default", "shop", "api"]
    assert list(config.service_config("default").pools) == ["main"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("service: api", "service: nope"), "c.yaml:13: routes.1.service: no service named 'nope'"),
        (
            ("host: shop.example.com", "host: shop.example.com:80"),
            "c.yaml:10: routes.0.match.host: ",
        ),
        (("path_prefix: /api/", "path_prefix: api/"), "routes.1.match.path_prefix: "),
        (
            ("    service: shop", "    service: shop\n    strip_prefix: true"),
            "routes.0: strip_prefix needs",
        ),
        (
            (
                "blue: {weight: 100, backends: [{address: 127.0.0.1:9002}]}",
                "blue: {weight: 90, backends: [{address: 127.0.0.1:9002}]}",
            ),
            "services.api.pools: pool weights must sum to 100",
        ),
        (("routes:", "default_service: nope\nroutes:"), "default_service: no service named 'nope'"),
    ],
)
def test_config_problems_name_file_line_and_key(change: tuple[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(SERVICES.replace(*change), "c.yaml")
    lines = [str(p) for p in caught.value.problems]
    assert any(problem in line for line in lines), lines


def test_explicit_backend_ids_must_be_unique_across_services() -> None:
    text = SERVICES.replace(
        "{address: 127.0.0.1:9001}", "{id: x, address: 127.0.0.1:9001}"
    ).replace("{address: 127.0.0.1:9002}", "{id: x, address: 127.0.0.1:9002}")
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "c.yaml")
    assert any(
        "backend id 'x' is also used by services.shop.pools.blue" in str(p)
        for p in caught.value.problems
    )


def test_process_wide_sticky_keys_are_refused_per_service() -> None:
    text = SERVICES.replace("  api:\n", "    sticky: {mode: pool, cookie: other}\n  api:\n")
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "c.yaml")
    assert any(
        "services.shop.sticky.cookie: is the same for every service" in str(p)
        for p in caught.value.problems
    )


@pytest.mark.parametrize(
    ("path", "service"),
    [
        (b"/abd", "ab"),
        (b"/ac", "a"),
        (b"/abc/x", "abc/"),
        (b"/abc", "ab"),
        (b"/abb/zz", "ab"),
        (b"/b", "b"),
        (b"/ba?x", "b"),
        (b"/", None),
        (b"/0", None),
        (b"/z", None),
    ],
)
def test_longest_prefix_among_nested_ones(path: bytes, service: str | None) -> None:
    names = ["a", "ab", "abc/", "b", "aa", "abz"]
    table = RouteTable([spec(i, name, path_prefix="/" + name) for i, name in enumerate(names)])
    found = route(table, b"h", path)
    assert (found[0] if found else None) == service


def test_check_warns_about_a_shadowed_route(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        SERVICES
        + "  - match: {host: SHOP.example.com, methods: [GET]}\n    service: api\n"
        + "  - match: {host: shop.example.com, path_prefix: /x}\n    service: api\n"
    )
    ok, lines = check_file(path)
    assert ok
    assert lines == [
        f"{path}: OK: 1 listener, 2 services (shop: 1 pool (blue=100), 1 backend; "
        "api: 1 pool (blue=100), 1 backend), 4 routes",
        f"{path}:15: routes.2: warning: never matches: routes.0 (same host and path) "
        "takes every request it would",
    ]


def test_service_settings_override_the_top_level_key_by_key() -> None:
    text = (
        SERVICES.replace(
            "  api:\n",
            "    health_check: {path: /shop/health}\n"
            "    draining: {timeout: 3s}\n"
            "    sticky: {mode: backend}\n"
            "  api:\n",
        )
        + "health_check: {interval: 7s, path: /top}\ndraining: {timeout: 9s}\n"
    )
    config = load_config_text(text, "c.yaml")
    shop, api = config.service_config("shop"), config.service_config("api")
    assert (shop.health_check.path, shop.health_check.interval) == ("/shop/health", 7.0)
    assert (api.health_check.path, api.health_check.interval) == ("/top", 7.0)
    assert (shop.draining.timeout, api.draining.timeout) == (3.0, 9.0)
    assert (shop.sticky.mode, api.sticky.mode) == ("backend", "off")
    assert shop.sticky.cookie == api.sticky.cookie == config.sticky.cookie
    assert shop.services == {} and shop.routes == ()


@pytest.mark.parametrize(
    ("path", "name", "expected"),
    [
        ("/var/lib/zd/state.json", "shop", "/var/lib/zd/state.shop.json"),
        ("/var/lib/zd/state.json", "default", "/var/lib/zd/state.json"),
        ("./state", "api", "./state.api"),
        ("/a.b/state", "api", "/a.b/state.api"),
    ],
)
def test_service_state_path(path: str, name: str, expected: str) -> None:
    assert service_state_path(path, name) == expected
