"""The reload plan (``config.diff``) and its application to the runtime."""

from __future__ import annotations

import copy
from typing import Any

from zdproxy.balancing.model import Admin
from zdproxy.config.diff import diff
from zdproxy.config.schema import Config
from zdproxy.control.runtime import Runtime

BASE: dict[str, Any] = {
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
        "green": {"weight": 0, "backends": [{"id": "green-1", "address": "127.0.0.1:9101"}]},
    },
}


def config(**changes: Any) -> Config:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return Config.model_validate(data)


def edited(edit: Any) -> Config:
    data = copy.deepcopy(BASE)
    edit(data)
    return Config.model_validate(data)


def test_same_file_is_an_empty_plan() -> None:
    plan = diff(config(), config())
    assert plan.empty and plan.lines() == [] and plan.restart_needed == ()


def test_backends_added_removed_replaced_reweighted() -> None:
    def edit(data: dict[str, Any]) -> None:
        blue = data["pools"]["blue"]["backends"]
        blue[0]["weight"] = 5
        blue[1]["address"] = "127.0.0.1:9003"
        data["pools"]["green"]["backends"] = [{"id": "green-2", "address": "127.0.0.1:9102"}]

    plan = diff(config(), edited(edit))
    assert plan.backends_reweighted == {"blue-1": 5}
    assert [b.id for b in plan.backends_replaced] == ["blue-2"]
    assert plan.backends_replaced[0].address == "127.0.0.1:9003"
    assert [b.id for b in plan.backends_added] == ["green-2"]
    assert plan.backends_removed == ("green-1",)
    assert not plan.weights_changed
    assert "backend blue-2 replaced: now pool blue at 127.0.0.1:9003" in plan.lines()


def test_default_ids_follow_the_position() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["pools"]["green"]["backends"] = [
            {"address": "127.0.0.1:9101"},
            {"address": "127.0.0.1:9102"},
        ]

    before = edited(lambda d: d["pools"]["green"].update(backends=[{"address": "127.0.0.1:9101"}]))
    plan = diff(before, edited(edit))
    assert [b.id for b in plan.backends_added] == ["green-2"]
    assert plan.backends_removed == () and plan.backends_replaced == ()


def test_pools_and_weights() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["pools"]["blue"]["weight"] = 50
        data["pools"]["red"] = {
            "weight": 50,
            "backends": [{"id": "red-1", "address": "127.0.0.1:9201"}],
        }
        del data["pools"]["green"]

    plan = diff(config(), edited(edit))
    assert plan.pools_added == ("red",) and plan.pools_removed == ("green",)
    assert plan.weights_changed and plan.weights == {"blue": 50, "red": 50}
    assert plan.backends_removed == ("green-1",)


def test_sections_log_level_and_what_needs_a_restart() -> None:
    new = config(
        timeouts={"connect": "1s"},
        log={"level": "debug", "access_log": "json"},
        listen=["127.0.0.1:8081"],
        state={"path": "/tmp/x.json"},
    )
    plan = diff(config(), new)
    assert plan.sections == ("timeouts",)
    assert plan.log_level == "debug"
    needed = " | ".join(plan.restart_needed)
    assert "listen changes need a restart" in needed
    assert "state changes" in needed and "access log" in needed
    assert "admin" not in needed


def test_health_override_changes_are_named() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["pools"]["blue"]["health_check"] = {"path": "/ready"}
        data["pools"]["green"]["backends"][0]["health_check"] = {"rise": 5}

    plan = diff(config(), edited(edit))
    assert plan.pool_health_changed == ("blue",)
    assert plan.backend_health_changed == ("green-1",)
    assert plan.backends_replaced == ()


# ---- Runtime.apply_config -------------------------------------------------------


def apply(runtime: Runtime, new: Config) -> None:
    runtime.apply_config(new, diff(runtime.config, new), "test", None, None)


def test_unchanged_backends_keep_their_objects() -> None:
    runtime = Runtime(config())
    blue1 = runtime.backends["blue-1"]
    blue1.codes[200] = 7
    apply(runtime, edited(lambda d: d["pools"]["blue"]["backends"][1].update(weight=3)))
    assert runtime.backends["blue-1"] is blue1 and blue1.codes[200] == 7
    assert runtime.backends["blue-2"].weight == 3
    assert runtime.events.last()["action"] == "config.reload"


def test_a_removed_backend_with_requests_in_flight_drains() -> None:
    clock = [100.0]
    runtime = Runtime(config(), clock=lambda: clock[0])
    runtime.backends["blue-2"].in_flight = 1
    apply(runtime, edited(lambda d: d["pools"]["blue"]["backends"].pop()))
    blue2 = runtime.backends["blue-2"]
    assert blue2.admin is Admin.DRAINING and "blue-2" in runtime.removing
    assert blue2 not in runtime.snapshot.pools["blue"].routable
    blue2.in_flight = 0
    runtime.tick(clock[0])
    assert "blue-2" not in runtime.backends


def test_api_weights_stay_until_the_file_changes_them() -> None:
    runtime = Runtime(config())
    runtime.split({"blue": 70, "green": 30}, "op")
    apply(runtime, edited(lambda d: d["pools"]["green"]["backends"][0].update(weight=2)))
    assert runtime.pool_weights == {"blue": 70, "green": 30}
    apply(runtime, config(pools={**BASE["pools"], "green": {**BASE["pools"]["green"]}}))
    assert runtime.pool_weights == {"blue": 70, "green": 30}  # same file weights as before
    flipped = copy.deepcopy(BASE["pools"])
    flipped["blue"]["weight"], flipped["green"]["weight"] = 0, 100
    apply(runtime, config(pools=flipped))
    assert runtime.pool_weights == {"blue": 0, "green": 100}


def test_the_config_wins_over_an_api_backend_at_its_address() -> None:
    runtime = Runtime(config())
    runtime.add_backend("green", "127.0.0.1:9102", "green-api", actor="op")

    def edit(data: dict[str, Any]) -> None:
        data["pools"]["green"]["backends"].append({"id": "green-2", "address": "127.0.0.1:9102"})

    apply(runtime, edited(edit))
    assert "green-api" not in runtime.backends and "green-api" not in runtime.added
    assert runtime.backends["green-2"].address == "127.0.0.1:9102"


def test_a_removed_pool_takes_its_api_backends_along() -> None:
    runtime = Runtime(config())
    runtime.add_backend("green", "127.0.0.1:9105", "green-api", actor="op")

    def edit(data: dict[str, Any]) -> None:
        del data["pools"]["green"]

    apply(runtime, edited(edit))
    assert set(runtime.pool_weights) == {"blue"}
    assert set(runtime.backends) == {"blue-1", "blue-2"}
    assert runtime.added == {}


def test_file_weights_winning_force_the_weights_guard() -> None:
    """A rollout in progress is asked to stop (forced) only when the file's weights win."""
    runtime = Runtime(config())
    calls: list[tuple[str, str, bool]] = []
    runtime.weights_guard = lambda action, actor, force: calls.append((action, actor, force))
    apply(runtime, edited(lambda d: d["pools"]["blue"]["backends"][0].update(weight=4)))
    assert calls == []
    flipped = copy.deepcopy(BASE["pools"])
    flipped["blue"]["weight"], flipped["green"]["weight"] = 0, 100
    apply(runtime, config(pools=flipped))
    assert calls == [("config.reload", "test", True)]
