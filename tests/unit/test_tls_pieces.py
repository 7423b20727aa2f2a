"""Pure pieces of TLS support: the listener schema, the SNI choice, the redirect's
Location, what a reload applies to listeners."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from support_tls import Pki

from zdproxy.config.diff import restart_needed
from zdproxy.config.schema import Config
from zdproxy.proxy.redirect import location
from zdproxy.proxy.upstream_tls import UpstreamTlsMap, tls_changed
from zdproxy.tls import ListenerTlsSet, _CertificateSet, redirect_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = Pki(tmp_path_factory.mktemp("unit-pki"))
    return {
        "ca": ca.ca,
        "a": ca.issue("a", "a.test", "a.test"),
        "b": ca.issue("b", "b.test", "b.test"),
        "cn_only": ca.issue("cn", "cn.test"),
    }


def config(listen: list[Any]) -> Config:
    return Config.model_validate(
        {"listen": listen, "pools": {"p": {"weight": 100, "backends": [{"address": "h:1"}]}}}
    )


def test_listener_entries_plain_and_mapping(pki: dict[str, Any]) -> None:
    a = pki["a"]
    listen = config(
        [
            "127.0.0.1:80",
            {"address": "[::1]:443", "tls": {"cert": str(a.cert), "key": str(a.key)}},
            {"address": "127.0.0.1:81", "redirect_https": 8443},
        ]
    ).listen
    assert [str(listener) for listener in listen] == ["127.0.0.1:80", "[::1]:443", "127.0.0.1:81"]
    assert listen[0].tls is None and listen[0].redirect_https is False
    assert listen[1].tls is not None and listen[1].tls.min_version == "1.2"
    assert redirect_port(listen[2], listen) == 8443
    assert redirect_port(listen[2].model_copy(update={"redirect_https": True}), listen) == 443


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"tls": {}}, "missing required key address"),
        ({"address": "nope"}, "address: invalid address 'nope'"),
        ({"address": "h:1", "redirect_https": 70000}, "expected true, false or a port 1-65535"),
        ({"address": "h:1", "redirect_https": 0}, "expected true, false or a port 1-65535"),
    ],
)
def test_listener_entry_errors(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as error:
        config([entry])
    assert message in str(error.value)


def test_tls_and_redirect_exclude_each_other(pki: dict[str, Any]) -> None:
    tls = {"cert": str(pki["a"].cert), "key": str(pki["a"].key)}
    with pytest.raises(ValidationError, match="cannot also redirect"):
        config([{"address": "h:1", "tls": tls, "redirect_https": True}])
    with pytest.raises(ValidationError, match="give either cert and key, or certificates"):
        config([{"address": "h:1", "tls": {**tls, "certificates": [tls]}}])
    with pytest.raises(ValidationError, match="no TLS listener to redirect to"):
        config(["h:2", {"address": "h:1", "redirect_https": True}])


def test_duplicate_listener_addresses_with_and_without_tls(pki: dict[str, Any]) -> None:
    tls = {"cert": str(pki["a"].cert), "key": str(pki["a"].key)}
    with pytest.raises(ValidationError, match=r"duplicate listen address 127\.0\.0\.1:1"):
        config(["127.0.0.1:1", {"address": "127.0.0.1:1", "tls": tls}])


def test_sni_choice() -> None:
    default, exact, wild = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(3))
    chosen = _CertificateSet(default, {"a.test": exact}, {"w.test": wild})
    assert chosen.select(None) is default
    assert chosen.select("a.test") is exact
    assert chosen.select("A.Test.") is exact
    assert chosen.select("x.w.test") is wild
    assert chosen.select("w.test") is default
    assert chosen.select("y.x.w.test") is default
    assert chosen.select("other") is default


def test_certificate_names_and_the_default(pki: dict[str, Any]) -> None:
    pairs = [{"cert": str(p.cert), "key": str(p.key)} for p in (pki["b"], pki["a"], pki["cn_only"])]
    listen = config([{"address": "h:1", "tls": {"certificates": pairs}}]).listen
    tls_set = ListenerTlsSet(listen)
    chosen = tls_set.servers[("h", 1)]._set
    assert set(chosen.exact) == {"a.test", "b.test", "cn.test"}  # CN when no SAN
    assert chosen.select(None) is chosen.exact["b.test"]  # the first listed


@pytest.mark.parametrize(
    ("host", "target", "port", "expected"),
    [
        (b"example.com", b"/a?b=c", 443, b"https://example.com/a?b=c"),
        (b"Example.COM:80", b"/", 8443, b"https://example.com:8443/"),
        (b"[::1]:8080", b"/x", 443, b"https://[::1]/x"),
        (b"ignored", b"http://other.test:80/p?q", 443, b"https://other.test/p?q"),
        (b"", b"/", 443, None),
        (b"bad host", b"/", 443, None),
        (b"a.test", b"*", 443, None),
        (b"user@a.test", b"/", 443, None),
    ],
)
def test_redirect_location(host: bytes, target: bytes, port: int, expected: bytes | None) -> None:
    assert location(host, target, port) == expected


def test_certificate_changes_apply_in_a_reload(pki: dict[str, Any], tmp_path: Path) -> None:
    a, b = ({"cert": str(p.cert), "key": str(p.key)} for p in (pki["a"], pki["b"]))
    old = config(["h:80", {"address": "h:443", "tls": a}])
    assert restart_needed(old, config(["h:80", {"address": "h:443", "tls": b}])) == []
    assert (
        restart_needed(
            old, config(["h:80", {"address": "h:443", "tls": {**a, "min_version": 1.3}}])
        )
        == []
    )
    # a plain listener turned into TLS, or a new address: a restart
    assert restart_needed(
        old, config([{"address": "h:80", "tls": a}, {"address": "h:443", "tls": a}])
    )
    assert restart_needed(old, config(["h:80", {"address": "h:444", "tls": a}]))
    tls_set = ListenerTlsSet(old.listen)
    merged = tls_set.merge(old.listen, config(["h:81", {"address": "h:443", "tls": b}]).listen)
    assert [str(listener) for listener in merged] == ["h:80", "h:443"]
    assert merged[1].tls is not None and merged[1].tls.cert == b["cert"]
    assert tls_set.reload(merged) == ["h:443"]
    assert (
        tls_set.servers[("h", 443)]._set.select(None)
        is tls_set.servers[("h", 443)]._set.exact["b.test"]
    )


def test_upstream_tls_per_backend_and_changes(pki: dict[str, Any]) -> None:
    def pools(blue_tls: Any, own: Any = None) -> Config:
        backend: dict[str, Any] = {"id": "b2", "address": "h:2"}
        if own is not None:
            backend["tls"] = own
        return Config.model_validate(
            {
                "listen": "h:80",
                "pools": {
                    "blue": {
                        "weight": 100,
                        "tls": blue_tls,
                        "backends": [{"id": "b1", "address": "h:1"}, backend],
                    },
                    "green": {"backends": [{"id": "g1", "address": "h:3"}]},
                },
            }
        )

    ca = {"ca": str(pki["ca"]), "server_name": "app.internal"}
    tls_map = UpstreamTlsMap(pools(ca, {"verify": False}))
    b1, b2 = tls_map.lookup("b1", "blue"), tls_map.lookup("b2", "blue")
    assert b1 is not None and b1.server_name == "app.internal"
    assert b1.context.verify_mode == ssl.CERT_REQUIRED and b1.context.check_hostname
    assert b2 is not None and b2.context.verify_mode == ssl.CERT_NONE
    assert tls_map.lookup("g1", "green") is None
    # a backend added through the API: its pool's settings
    assert tls_map.lookup("added-by-api", "blue") is b1
    backends = [("b1", "blue", "default"), ("b2", "blue", "default"), ("g1", "green", "default")]
    same = UpstreamTlsMap(pools(ca, {"verify": False}))
    assert tls_changed(tls_map, same, backends) == []
    plain = UpstreamTlsMap(pools(None))
    assert tls_changed(tls_map, plain, backends) == ["b1", "b2"]
    other_name = UpstreamTlsMap(pools({**ca, "server_name": "x"}, {"verify": False}))
    assert tls_changed(tls_map, other_name, backends) == ["b1"]


def test_upstream_tls_of_services_with_the_same_pool_names(pki: dict[str, Any]) -> None:
    """Two services both have a pool ``blue``; only one reaches it over TLS: an
    API-added backend of the other must not take TLS (nor the reverse)."""
    ca = {"ca": str(pki["ca"]), "server_name": "app.internal"}
    conf = Config.model_validate(
        {
            "listen": "h:80",
            "services": {
                "shop": {
                    "pools": {"blue": {"weight": 100, "tls": ca, "backends": [{"address": "h:1"}]}}
                },
                "api": {"pools": {"blue": {"weight": 100, "backends": [{"address": "h:2"}]}}},
            },
            "routes": [{"match": {"host": "shop.test"}, "service": "shop"}],
            "default_service": "api",
        }
    )
    tls_map = UpstreamTlsMap(conf)
    shop = tls_map.lookup("shop-blue-1", "blue", "shop")
    assert shop is not None and shop.server_name == "app.internal"
    assert tls_map.lookup("added", "blue", "shop") is shop
    assert tls_map.lookup("api-blue-1", "blue", "api") is None
    assert tls_map.lookup("added", "blue", "api") is None


def test_unknown_keys_of_a_listener_mapping() -> None:
    from zdproxy.config.loader import ConfigError, load_config_text

    text = (
        "listen:\n"
        "  - 127.0.0.1:80\n"
        "  - address: 127.0.0.1:81\n"
        "    redirect: true\n"
        "  - address: 127.0.0.1:82\n"
        "    port: 1\n"
        "    tsl: {}\n"
        "pools: {p: {weight: 100, backends: [{address: 'h:1'}]}}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config_text(text, "z.yaml")
    assert [str(problem) for problem in error.value.problems] == [
        "z.yaml:4: listen.1.redirect: unknown key, did you mean redirect_https?",
        "z.yaml:5: listen.2: unknown key port: the address is address: host:port",
    ]
