"""The pure parts of the etcd shared state: merging counters, the retry decision of
a compare-and-swap commit, applying a shared state to a runtime, following a
rollout, the settings check, and the client's wire format."""

from __future__ import annotations

import base64
import textwrap
from typing import Any

import pytest

from zdproxy.balancing.model import Admin, BackendState
from zdproxy.balancing.stats import FINE_BUCKETS, PoolStats
from zdproxy.config import ConfigError
from zdproxy.config.loader import load_config_text
from zdproxy.config.schema import Config
from zdproxy.control.etcd import EtcdCompacted, EtcdUnavailable, _watch_batch, prefix_end
from zdproxy.control.rollout import RolloutController
from zdproxy.control.runtime import Runtime
from zdproxy.control.shared import (
    MAX_ATTEMPTS,
    Outcome,
    converge,
    merge_totals,
    mirror_rollouts,
    retry_decision,
    shared_doc,
)


def make_runtime() -> Runtime:
    config = Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "health_check": {"enabled": False},
            "pools": {
                "blue": {
                    "weight": 100,
                    "backends": [
                        {"id": "blue-1", "address": "127.0.0.1:9001"},
                        {"id": "blue-2", "address": "127.0.0.1:9002"},
                    ],
                },
                "green": {
                    "weight": 0,
                    "backends": [{"id": "green-1", "address": "127.0.0.1:9003"}],
                },
            },
        }
    )
    return Runtime(config)


# ---- merging counters ---------------------------------------------------------------


def test_merge_totals_sums_pool_by_pool() -> None:
    a = {"blue": ((0, 0, 10, 0, 1, 2), (1, 2, 3)), "green": ((0, 0, 4, 0, 0, 0), (0, 4, 0))}
    b = {"blue": ((1, 0, 5, 0, 0, 3), (0, 0, 9))}
    merged = merge_totals([a, b])
    assert merged == {
        "blue": ((1, 0, 15, 0, 1, 5), (1, 2, 12)),
        "green": ((0, 0, 4, 0, 0, 0), (0, 4, 0)),
    }
    # the inputs are untouched (they are the instances' last published figures)
    assert a["blue"] == ((0, 0, 10, 0, 1, 2), (1, 2, 3))


def test_merge_totals_of_real_pool_stats_is_the_stats_of_all_requests() -> None:
    one, two, both = PoolStats(), PoolStats(), PoolStats()
    for status, seconds, stats in ((200, 0.01, one), (500, 0.2, two), (200, 3.0, two)):
        stats.record(status, seconds, 1.0)
        both.record(status, seconds, 1.0)
    merged = merge_totals([{"p": one.totals()}, {"p": two.totals()}])
    assert merged == {"p": both.totals()}
    assert len(merged["p"][1]) == FINE_BUCKETS


def test_merge_totals_of_nothing() -> None:
    assert merge_totals([]) == {}
    assert merge_totals([{}, {}]) == {}


# ---- the compare-and-swap retry decision ----------------------------------------------


def test_retry_decision() -> None:
    assert retry_decision(Outcome.COMMITTED, 0) == "done"
    assert retry_decision(Outcome.UNAVAILABLE, 0) == "unavailable"
    assert retry_decision(Outcome.CONFLICT, 0) == "retry"
    assert retry_decision(Outcome.CONFLICT, MAX_ATTEMPTS - 2) == "retry"
    assert retry_decision(Outcome.CONFLICT, MAX_ATTEMPTS - 1) == "give_up"
    assert retry_decision(Outcome.CONFLICT, 2, max_attempts=3) == "give_up"
    # a write that failed is never retried blindly: the caller says 503
    assert retry_decision(Outcome.UNAVAILABLE, MAX_ATTEMPTS - 1) == "unavailable"


# ---- applying a shared state ----------------------------------------------------------


def test_converge_makes_the_runtime_what_the_document_says() -> None:
    here, there = make_runtime(), make_runtime()
    there.split({"blue": 30, "green": 70}, "ops")
    there.drain("blue-1", "ops")
    there.disable("green-1", "ops")
    there.add_backend("green", "127.0.0.1:9010", "green-9", 3, actor="ops")
    there.remove_backend("blue-2", "ops")  # nothing in flight: gone at once
    doc = shared_doc(there.export_state())
    versions = here.version
    converge(here, doc)
    assert shared_doc(here.export_state()) == doc
    assert here.pool_weights == {"blue": 30, "green": 70}
    assert here.backends["blue-1"].admin is Admin.DRAINING
    assert "blue-1" in here.drain_started
    assert here.backends["green-1"].state is BackendState.DISABLED
    assert here.backends["green-9"].weight == 3
    assert "blue-2" not in here.backends
    # one snapshot swap, and no audit event: the events come from etcd
    assert here.version == versions + 1
    assert len(here.events) == 0


def test_converge_undoes_local_differences() -> None:
    here, there = make_runtime(), make_runtime()
    here.disable("blue-1", "ops")
    here.add_backend("blue", "127.0.0.1:9020", "blue-9", actor="ops")
    converge(here, shared_doc(there.export_state()))
    assert here.backends["blue-1"].admin is Admin.ENABLED
    assert "blue-9" not in here.backends and "blue-9" not in here.added
    assert shared_doc(here.export_state()) == shared_doc(there.export_state())


def test_converge_drains_a_removed_backend_with_requests_in_flight() -> None:
    here, there = make_runtime(), make_runtime()
    here.backends["blue-2"].in_flight = 2
    there.remove_backend("blue-2", "ops")
    converge(here, shared_doc(there.export_state()))
    assert here.backends["blue-2"].admin is Admin.DRAINING
    assert "blue-2" in here.removing
    here.backends["blue-2"].in_flight = 0
    here.tick()
    assert "blue-2" not in here.backends


def test_converge_keeps_weights_that_do_not_fit_the_pools() -> None:
    here = make_runtime()
    doc = shared_doc(here.export_state())
    doc["weights"] = {"blue": 50, "red": 50}
    converge(here, doc)
    assert here.pool_weights == {"blue": 100, "green": 0}


# ---- following a rollout ----------------------------------------------------------------


PLAN = {
    "to": "green",
    "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}, {"weight": 100}],
    "analysis": {"enabled": False},
}


def test_a_follower_shows_the_leaders_rollout_and_keeps_its_timers() -> None:
    leader_rt, follower_rt = make_runtime(), make_runtime()
    leader = RolloutController(leader_rt)
    follower = RolloutController(follower_rt)
    leader.start(PLAN, "ops")
    converge(follower_rt, shared_doc(leader_rt.export_state()))
    mirror_rollouts(follower, follower_rt.rollout_state)
    assert follower.current is not None
    assert follower.current.id == 1 and follower.current.step == 0 and follower.current.applied
    assert follower_rt.pool_weights == {"blue": 90, "green": 10}
    started = follower.current.step_started
    # an unrelated remote change (a pause) keeps the step's timer
    leader.pause("ops")
    follower_rt.clock = lambda: started + 30.0
    mirror_rollouts(follower, leader_rt.rollout_state)
    assert follower.current.phase.value == "paused"
    assert follower.current.step_started == started
    # the end, as the leader saw it
    leader.abort("ops")
    converge(follower_rt, shared_doc(leader_rt.export_state()))
    mirror_rollouts(follower, follower_rt.rollout_state)
    assert follower.current is not None and follower.current.phase.value == "aborted"
    assert follower_rt.pool_weights == {"blue": 100, "green": 0}


def test_a_passive_controller_does_not_tick() -> None:
    runtime = make_runtime()
    controller = RolloutController(runtime)
    controller.start(
        {**PLAN, "steps": [{"weight": 10, "pause": "1s"}, {"weight": 100, "pause": "1s"}]},
        "ops",
    )
    assert controller.current is not None
    leading = False
    controller.passive = lambda: not leading
    controller.tick(controller.current.step_started + 5)
    assert runtime.pool_weights["green"] == 10
    leading = True
    controller.tick(controller.current.step_started + 5)
    assert runtime.pool_weights["green"] == 100


# ---- settings ---------------------------------------------------------------------------


BASE = """\
listen: 127.0.0.1:8080
state:
  path: null
  etcd:
{etcd}
pools:
  blue:
    weight: 100
    backends:
      - address: 127.0.0.1:9001
"""


def etcd_problems(body: str) -> list[str]:
    text = BASE.format(etcd=textwrap.indent(textwrap.dedent(body), "    "))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "z.yaml")
    return [str(problem) for problem in info.value.problems]


def test_valid_etcd_settings() -> None:
    text = BASE.format(
        etcd=textwrap.indent(
            'endpoints: ["127.0.0.1:2379", "https://etcd-2.example:2379"]\n'
            "prefix: /zdproxy/shop/\nlease_ttl: 5\ntimeout: 500ms\n",
            "    ",
        )
    )
    config = load_config_text(text, "z.yaml")
    assert config.state.etcd is not None
    assert config.state.etcd.endpoints == ("127.0.0.1:2379", "https://etcd-2.example:2379")
    assert config.state.etcd.timeout == 0.5


@pytest.mark.parametrize(
    ("body", "where", "words"),
    [
        ('endpoints: ["127.0.0.1"]', "z.yaml:5: state.etcd.endpoints.0:", "invalid etcd endpoint"),
        ('endpoints: ["ftp://x:1"]', "z.yaml:5: state.etcd.endpoints.0:", "invalid etcd endpoint"),
        ("endpoints: []", "z.yaml:5: state.etcd.endpoints:", ""),
        ("prefix: zdproxy", "z.yaml:5: state.etcd.prefix:", "start and end with /"),
        ("prefix: /zd proxy/", "z.yaml:5: state.etcd.prefix:", "start and end with /"),
        ("lease_ttl: 1", "z.yaml:5: state.etcd.lease_ttl:", ""),
        ("auth: {password_env: X}", "z.yaml:5: state.etcd.auth.username:", ""),
        ("tls: {cert: /nonexistent.pem}", "z.yaml:5: state.etcd.tls.cert:", ""),
        ("endpoint: [x]", "z.yaml:5: state.etcd.endpoint:", ""),
    ],
)
def test_bad_etcd_settings_name_file_line_and_key(body: str, where: str, words: str) -> None:
    found = etcd_problems(body)
    assert len(found) == 1, found
    assert found[0].startswith(where), found
    assert words in found[0]


# ---- the wire format ---------------------------------------------------------------------


def test_prefix_end_selects_exactly_the_prefix() -> None:
    assert base64.b64decode(prefix_end("/zd/")) == b"/zd0"
    assert base64.b64decode(prefix_end("a\xff".encode("latin-1").decode("latin-1"))) == b"a\xc3\xc0"


def test_watch_messages() -> None:
    key = base64.b64encode(b"/zd/x").decode()
    message: dict[str, Any] = {
        "result": {
            "header": {"revision": "7"},
            "events": [
                {"kv": {"key": key, "value": base64.b64encode(b"v").decode(), "mod_revision": "7"}},
                {"type": "DELETE", "kv": {"key": key, "mod_revision": "8"}},
            ],
        }
    }
    batch = _watch_batch(message)
    assert [(e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for e in batch] == [
        ("PUT", "/zd/x", b"v", 7),
        ("DELETE", "/zd/x", b"", 8),
    ]
    with pytest.raises(EtcdCompacted) as compacted:
        _watch_batch({"result": {"canceled": True, "compact_revision": "4"}})
    assert compacted.value.compact_revision == 4
    with pytest.raises(EtcdUnavailable):
        _watch_batch({"error": {"message": "boom"}})


def test_the_leaders_totals_add_every_instance_and_keep_departed_ones() -> None:
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    runtime = make_runtime()
    runtime.pool_stats["blue"].record(200, 0.01, 1.0)
    cluster = Cluster(EtcdConfig())
    cluster.add_service("default", runtime, None)
    blue_other = ((0, 0, 5, 0, 0, 1), (0,) * FINE_BUCKETS)
    cluster.peers = {
        "b": {"default": {"blue": blue_other, "gone": blue_other}},
        # an instance whose key expired: still counted (the totals never go back)
        "c": {"default": {"blue": blue_other}},
        "d": {"other-service": {"blue": blue_other}},
    }
    merged = cluster.merged_totals("default", runtime)
    assert set(merged) == {"blue", "green"}  # pools this instance knows
    assert merged["blue"][0] == (0, 0, 11, 0, 0, 2)
    assert sum(merged["blue"][1]) == 1
    assert merged["green"] == runtime.pool_stats["green"].totals()
