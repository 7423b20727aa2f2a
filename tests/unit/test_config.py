"""Config loader: YAML -> Config, and every problem named as FILE:LINE: key: message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from zdproxy.config import (
    Config,
    ConfigError,
    ConfigProblem,
    check_file,
    load_config,
    load_config_text,
    parse_duration,
)
from zdproxy.errors import ZdproxyError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "zdproxy.yaml"

VALID = """\
listen: 127.0.0.1:8080
pools:
  blue:
    weight: 100
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
  green:
    weight: 0
    backends:
      - address: 127.0.0.1:9003
"""


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "test.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return [str(problem) for problem in info.value.problems]


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --- valid configs --------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert [str(address) for address in config.listen] == ["127.0.0.1:8080"]
    assert str(config.admin.listen) == "127.0.0.1:9901"
    assert {name: pool.weight for name, pool in config.pools.items()} == {"blue": 100, "green": 0}
    addresses = {pool: [str(b.address) for b in p.backends] for pool, p in config.pools.items()}
    assert addresses == {
        "blue": ["127.0.0.1:9001", "127.0.0.1:9002"],
        "green": ["127.0.0.1:9003", "127.0.0.1:9004"],
    }


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()

    def keys(model: type[object]) -> set[str]:
        fields = getattr(model, "model_fields", {})
        return set(fields) | {k for f in fields.values() for k in keys_of(f.annotation)}

    def keys_of(annotation: object) -> set[str]:
        found: set[str] = set()
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            found |= keys(annotation)
        for arg in getattr(annotation, "__args__", ()):
            found |= keys_of(arg)
        return found

    missing = sorted(key for key in keys(Config) if f"{key}:" not in text)
    # host/port are the parts of an address, written as host:port.
    assert [key for key in missing if key not in ("host", "port")] == []


def test_check_file_ok_summary() -> None:
    ok, lines = check_file(EXAMPLE)
    assert ok
    assert lines == [f"{EXAMPLE}: OK: 1 listener, 2 pools (blue=100, green=0), 4 backends"]


def test_minimal_config_gets_defaults() -> None:
    config = load(VALID)
    assert config.health_check.interval == 2.0
    assert config.admin.token_env == "ZDPROXY_ADMIN_TOKEN"
    assert config.sticky.mode == "off"


def test_default_backend_ids() -> None:
    config = load(
        """\
        listen: [127.0.0.1:8080]
        pools:
          blue:
            weight: 100
            backends:
              - address: 127.0.0.1:9001
              - id: special
                address: 127.0.0.1:9002
              - address: 127.0.0.1:9003
          green:
            backends:
              - address: 127.0.0.1:9004
        """
    )
    ids = [(pool, backend_id) for pool, backend_id, _ in config.backend_ids()]
    assert ids == [
        ("blue", "blue-1"),
        ("blue", "special"),
        ("blue", "blue-3"),
        ("green", "green-1"),
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), (1.5, 1.5), (0, 0.0), ("0", 0.0)],
)
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds
    config = load(VALID + f"timeouts:\n  connect: {value}\n")
    assert config.timeouts.connect == seconds


@pytest.mark.parametrize("value", ["2x", "-1s", "1.5.2s", "true", ".inf", "[1]"])
def test_bad_durations(value: str) -> None:
    found = only_problem(VALID + f"timeouts:\n  connect: {value}\n")
    assert found.startswith("test.yaml:13: timeouts.connect: ")


def test_yaml_11_words_are_not_booleans() -> None:
    config = load(VALID + "sticky:\n  mode: off\nlog:\n  access_log: yes\n")
    assert config.sticky.mode == "off"
    assert config.log.access_log == "combined"


def test_merge_keys_and_aliases() -> None:
    config = load(
        """\
        listen: 127.0.0.1:8080
        pools:
          blue:
            weight: 100
            health_check: &check {path: /ready, interval: 5s}
            backends:
              - address: 127.0.0.1:9001
                health_check:
                  <<: *check
                  interval: 1s
          green:
            health_check: *check
        """
    )
    backend_check = config.pools["blue"].backends[0].health_check
    assert backend_check is not None
    assert (backend_check.path, backend_check.interval) == ("/ready", 1.0)
    assert config.pools["green"].health_check == config.pools["blue"].health_check


# --- problems: one kind at a time -----------------------------------------------------


def test_unknown_key_with_suggestion() -> None:
    found = only_problem(VALID + "helth_check:\n  path: /healthz\n")
    assert found == "test.yaml:12: helth_check: unknown key, did you mean health_check?"


def test_unknown_nested_key_replaces_missing_required() -> None:
    found = only_problem(VALID.replace("- address: 127.0.0.1:9002", "- adress: 127.0.0.1:9002"))
    assert found == (
        "test.yaml:7: pools.blue.backends.1.adress: unknown key, did you mean address?"
    )


def test_unknown_key_without_close_match_lists_keys() -> None:
    found = only_problem(VALID + "draining:\n  zzz: 1\n")
    assert found == (
        "test.yaml:13: draining.zzz: unknown key (expected one of: timeout, sticky_until_timeout)"
    )


def test_wrong_type() -> None:
    found = only_problem(VALID + "health_check:\n  rise: lots\n")
    assert found == "test.yaml:13: health_check.rise: expected an integer, got 'lots'"


def test_wrong_choice() -> None:
    found = only_problem(VALID + "sticky:\n  mode: cookie\n")
    assert found == (
        "test.yaml:13: sticky.mode: must be one of 'off', 'pool', 'backend' or 'hash', got 'cookie'"
    )


def test_missing_required_key() -> None:
    found = only_problem(VALID.replace("listen: 127.0.0.1:8080\n", ""))
    assert found == "test.yaml:1: listen: missing required key"


def test_weights_must_sum_to_100() -> None:
    found = only_problem(VALID.replace("weight: 100", "weight: 90"))
    assert found == "test.yaml:2: pools: pool weights must sum to 100, got 90 (blue=90, green=0)"


def test_weights_checked_even_when_a_backend_is_invalid() -> None:
    text = VALID.replace("weight: 100", "weight: 90").replace(":9003", ":0")
    assert problems(text) == [
        "test.yaml:2: pools: pool weights must sum to 100, got 90 (blue=90, green=0)",
        "test.yaml:11: pools.green.backends.0.address: "
        "invalid port 0 in '127.0.0.1:0': must be 1-65535",
    ]


def test_duplicate_backend_ids() -> None:
    text = VALID.replace(
        "- address: 127.0.0.1:9003", "- id: blue-2\n        address: 127.0.0.1:9003"
    )
    found = only_problem(text)
    assert found == (
        "test.yaml:11: pools.green.backends.0.id: "
        "duplicate backend id 'blue-2' (also at pools.blue.backends.1)"
    )


def test_explicit_id_colliding_with_a_default_id() -> None:
    text = VALID.replace(
        "- address: 127.0.0.1:9001", "- id: blue-2\n        address: 127.0.0.1:9001"
    )
    found = only_problem(text)
    assert found == (
        "test.yaml:8: pools.blue.backends.1: "
        "default id 'blue-2' is already used by pools.blue.backends.0; set an id"
    )


def test_duplicate_address_in_a_pool() -> None:
    found = only_problem(VALID.replace(":9002", ":9001"))
    assert found == (
        "test.yaml:7: pools.blue.backends.1.address: "
        "duplicate address 127.0.0.1:9001 in pool 'blue' (also at pools.blue.backends.0)"
    )


def test_pool_with_weight_needs_backends() -> None:
    text = VALID.replace("weight: 100", "weight: 50").replace("weight: 0", "weight: 50")
    text = text.replace("    backends:\n      - address: 127.0.0.1:9003\n", "")
    found = only_problem(text)
    assert found == "test.yaml:9: pools.green.weight: pool 'green' has weight 50 but no backends"


def test_duplicate_listener_and_admin_on_a_data_listener() -> None:
    text = VALID.replace(
        "listen: 127.0.0.1:8080\n",
        "listen: [127.0.0.1:8080, 127.0.0.1:8080]\nadmin:\n  listen: 127.0.0.1:8080\n",
    )
    assert problems(text) == [
        "test.yaml:1: listen.1: duplicate listen address 127.0.0.1:8080 (also at listen.0)",
        "test.yaml:3: admin.listen: 127.0.0.1:8080 is also a data listener (at listen.0)",
    ]


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost", "invalid address 'localhost': expected host:port"),
        ("localhost:http", "invalid address 'localhost:http': expected host:port"),
        ("::1:8080", "invalid address '::1:8080': write IPv6 hosts in brackets, [::1]:8080"),
        ("a b:80", "invalid host in 'a b:80'"),
    ],
)
def test_bad_address(address: str, message: str) -> None:
    found = only_problem(VALID.replace("127.0.0.1:9002", f'"{address}"'))
    assert found == f"test.yaml:7: pools.blue.backends.1.address: {message}"


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_bad_port(port: str) -> None:
    found = only_problem(VALID.replace("listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{port}"))
    expected = f"invalid port {int(port)} in '127.0.0.1:{port}': must be 1-65535"
    assert found == f"test.yaml:1: listen.0: {expected}"


def test_bad_duration() -> None:
    found = only_problem(VALID + "health_check:\n  interval: 2 seconds\n")
    assert found == (
        "test.yaml:13: health_check.interval: invalid duration '2 seconds': "
        "use a number with a unit, like 500ms, 2s or 1m"
    )


def test_zero_health_interval() -> None:
    found = only_problem(VALID + "health_check:\n  interval: 0\n")
    assert found == "test.yaml:13: health_check.interval: must be greater than 0, got 0"


def test_bad_pool_name_on_its_key_line() -> None:
    found = only_problem(VALID.replace("  green:", "  gr een:"))
    assert found == (
        "test.yaml:8: pools.gr een: invalid pool name 'gr een': use letters, digits, _ . -"
    )


def test_yaml_syntax_error_has_its_line() -> None:
    found = only_problem("listen: 127.0.0.1:8080\npools:\n  blue:\n    weight: [100\n")
    assert found.startswith("test.yaml:5: (yaml): invalid YAML: ")
    assert "started on line 4" in found


def test_bad_indentation() -> None:
    found = only_problem("pools:\n  blue:\n    weight: 100\n   backends: []\n")
    assert found.startswith("test.yaml:4: (yaml): invalid YAML: ")
    assert "check the indentation" in found


def test_duplicate_yaml_key() -> None:
    found = only_problem(VALID + "timeouts:\n  connect: 1s\n  connect: 2s\n")
    assert found == "test.yaml:14: timeouts.connect: duplicate key 'connect' (first on line 13)"


def test_empty_file() -> None:
    for text in ("", "# only a comment\n"):
        found = only_problem(text)
        assert found == (
            "test.yaml:1: (root): the file is empty: a config needs at least listen and pools"
        )


def test_top_level_must_be_a_mapping() -> None:
    found = only_problem("- listen\n- pools\n")
    assert found == "test.yaml:1: (root): expected a mapping of keys at the top level, got a list"


def test_unsafe_yaml_tag_is_refused() -> None:
    found = only_problem(VALID + "log:\n  level: !!python/name:os.system info\n")
    assert found.startswith("test.yaml:13: (yaml): invalid YAML: ")


def test_forbidden_character_has_its_line() -> None:
    found = only_problem(VALID + "log:\n  level: \x07\n")
    assert found == "test.yaml:13: (yaml): invalid YAML: unacceptable character #x0007"


def test_recursive_alias_is_a_problem_not_a_hang() -> None:
    found = problems(VALID + "x-loop: &loop [1, *loop]\n")
    assert found[0] == "test.yaml:12: x-loop.1: recursive YAML alias"


def test_several_problems_reported_together_in_file_order() -> None:
    text = """\
    listen: 127.0.0.1:8080
    pools:
      blue:
        weight: 90
        backends:
          - address: 127.0.0.1:9001
      green:
        weigth: 10
        backends:
          - address: 127.0.0.1
    timeouts:
      connect: soon
    """
    assert problems(text) == [
        "test.yaml:2: pools: pool weights must sum to 100, got 90 (blue=90, green=0)",
        "test.yaml:8: pools.green.weigth: unknown key, did you mean weight?",
        "test.yaml:10: pools.green.backends.0.address: "
        "invalid address '127.0.0.1': expected host:port",
        "test.yaml:12: timeouts.connect: invalid duration 'soon': "
        "use a number with a unit, like 500ms, 2s or 1m",
    ]


def test_cross_field_problem_not_reported_twice() -> None:
    found = problems(VALID.replace("weight: 100", "weight: 90"))
    assert len(found) == 1


# --- files and check_file ---------------------------------------------------------------


def test_check_file_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(VALID.replace("weight: 100", "weight: 90") + "bogus: 1\n")
    ok, lines = check_file(path)
    assert not ok
    assert lines == [
        f"{path}:2: pools: pool weights must sum to 100, got 90 (blue=90, green=0)",
        f"{path}:12: bogus: unknown key (expected one of: listen, admin, state, pools, "
        "health_check, outlier_detection, slow_start, sticky, routing, draining, retries, "
        "timeouts, limits, http, log, shadow, shutdown_timeout, workers, services, routes, "
        "default_service)",
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        ConfigProblem(str(path), None, "(file)", "cannot read: No such file or directory")
    ]
    assert str(info.value) == f"{path}:1: (file): cannot read: No such file or directory"
    assert isinstance(info.value, ZdproxyError)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: 127.0.0.1:8080\n# caf\xe9\n")
    ok, lines = check_file(path)
    assert (ok, lines) == (False, [f"{path}:2: (file): not valid UTF-8 (byte 0xe9)"])


def test_problem_str_format() -> None:
    problem = ConfigProblem("c.yaml", 7, "pools.blue.weight", "must be 0-100")
    assert str(problem) == "c.yaml:7: pools.blue.weight: must be 0-100"
