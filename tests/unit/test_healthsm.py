"""The rise/fall state machine, with plain values."""

from __future__ import annotations

import pytest

from zdproxy.balancing.healthsm import TRANSITIONS, HealthMachine, Result
from zdproxy.balancing.model import Health

P, F = Result.PASS, Result.FAIL


def run(machine: HealthMachine, results: list[Result]) -> list[Health | None]:
    return [machine.record(r) for r in results]


def test_table_covers_every_state_and_result() -> None:
    assert set(TRANSITIONS) == {(s, r) for s in Health for r in Result}


def test_starting_rises_after_rise_passes() -> None:
    m = HealthMachine(rise=2, fall=3)
    assert run(m, [P]) == [None]
    assert m.state is Health.STARTING
    assert run(m, [P]) == [Health.UP]
    assert m.state is Health.UP


def test_one_failure_never_flips_an_up_backend() -> None:
    m = HealthMachine(rise=2, fall=3, state=Health.UP)
    assert run(m, [F, F, P, F, F, P]) == [None] * 6
    assert m.state is Health.UP


def test_up_goes_down_after_fall_failures_and_back_after_rise_passes() -> None:
    m = HealthMachine(rise=2, fall=3, state=Health.UP)
    assert run(m, [F, F, F]) == [None, None, Health.DOWN]
    assert run(m, [F, P, F, P]) == [None] * 4
    assert m.state is Health.DOWN
    assert run(m, [P]) == [Health.UP]


def test_streaks_are_counted() -> None:
    m = HealthMachine(rise=2, fall=3)
    m.record(P)
    assert (m.passes, m.fails) == (1, 0)
    m.record(F)
    m.record(F)
    assert (m.passes, m.fails) == (0, 2)


def test_starting_backend_that_never_comes_up_is_reported_down() -> None:
    m = HealthMachine(rise=2, fall=2)
    assert run(m, [F, F]) == [None, Health.DOWN]


def test_restart_goes_back_to_starting_and_must_rise_again() -> None:
    m = HealthMachine(rise=3, fall=1, state=Health.UP)
    m.record(P)
    m.restart()
    assert m.state is Health.STARTING
    assert run(m, [P, P, P]) == [None, None, Health.UP]


def test_rise_and_fall_of_one() -> None:
    m = HealthMachine(rise=1, fall=1)
    assert run(m, [P, F, P]) == [Health.UP, Health.DOWN, Health.UP]


def test_invalid_thresholds() -> None:
    with pytest.raises(ValueError):
        HealthMachine(rise=0, fall=1)
    m = HealthMachine(rise=1, fall=1)
    with pytest.raises(ValueError):
        m.reconfigure(1, 0)
    m.reconfigure(4, 5)
    assert (m.rise, m.fall) == (4, 5)


def test_settings_merge_nearest_level_wins_per_key() -> None:
    from zdproxy.config.schema import Config
    from zdproxy.health.checker import settings_for

    config = Config.model_validate(
        {
            "listen": "127.0.0.1:8080",
            "health_check": {"path": "/healthz", "interval": "2s", "rise": 3},
            "pools": {
                "blue": {
                    "weight": 100,
                    "health_check": {"path": "/ready", "interval": "1s"},
                    "backends": [
                        {"id": "b1", "address": "127.0.0.1:1", "health_check": {"interval": "5s"}},
                        {"id": "b2", "address": "127.0.0.1:2", "health_check": {"enabled": False}},
                    ],
                },
                "green": {"weight": 0, "backends": [{"id": "g1", "address": "127.0.0.1:3"}]},
            },
        }
    )
    b1 = settings_for(config, "blue", "b1")
    assert (b1.path, b1.interval, b1.rise, b1.enabled) == ("/ready", 5.0, 3, True)
    assert not settings_for(config, "blue", "b2").enabled
    g1 = settings_for(config, "green", "g1")
    assert (g1.path, g1.interval) == ("/healthz", 2.0)
    # a backend added at runtime: the pool's settings
    assert settings_for(config, "blue", "blue-9").interval == 1.0
