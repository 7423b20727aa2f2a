"""Shadow traffic settings on the control side, with plain values."""

from __future__ import annotations

from typing import Any

import pytest

from zdproxy.config.schema import Config, ShadowConfig
from zdproxy.control.runtime import Runtime
from zdproxy.control.shadow import ShadowControl
from zdproxy.errors import ControlError, NotFound


def make(shadow: dict[str, Any] | None = None) -> tuple[Runtime, ShadowControl]:
    data: dict[str, Any] = {
        "listen": ["127.0.0.1:8080"],
        "state": {"path": None},
        "pools": {
            "blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9001"}]},
            "green": {"weight": 0, "backends": [{"address": "127.0.0.1:9002"}]},
        },
    }
    if shadow is not None:
        data["shadow"] = shadow
    config = Config.model_validate(data)
    runtime = Runtime(config)
    return runtime, ShadowControl(runtime, config.shadow)


def test_set_takes_defaults_from_the_config_and_notifies() -> None:
    _, control = make({"max_body_bytes": 100, "timeout": "1s"})
    seen: list[ShadowConfig] = []
    control.subscribe(seen.append)
    assert seen[-1].pool is None and not control.active
    event = control.set({"pool": "green", "percent": 12.5}, "ops")
    assert event is not None and event.action == "shadow.set" and event.before is None
    assert seen[-1].pool == "green" and seen[-1].percent == 12.5
    assert seen[-1].max_body_bytes == 100 and seen[-1].timeout == 1.0
    assert control.set({"pool": "green", "percent": 12.5}, "ops") is None  # no change
    cleared = control.clear("ops")
    assert cleared is not None and cleared.after is None and not control.active
    assert control.clear("ops") is None


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"percent": 5}, ControlError, "missing key 'pool'"),
        ({"pool": "red", "percent": 5}, NotFound, "no pool named 'red'"),
        ({"pool": "green", "percent": True}, ControlError, "percent must be a number"),
        ({"pool": "green", "percent": -1}, ControlError, "percent: "),
        ({"pool": "green", "percent": 5, "header": "a b"}, ControlError, "header: "),
        ({"pool": "green", "percent": 5, "timeout": "0s"}, ControlError, "timeout: "),
        ({"pool": "green", "percent": 5, "extra": 1}, ControlError, "unknown key 'extra'"),
    ],
)
def test_bad_settings_change_nothing(
    body: dict[str, Any], error: type[Exception], message: str
) -> None:
    runtime, control = make()
    with pytest.raises(error, match=message):
        control.set(body, "ops")
    assert not control.active and runtime.events.list() == []


def test_saved_settings_come_back_unless_the_config_changed() -> None:
    runtime, control = make()
    control.set({"pool": "green", "percent": 30}, "ops")
    state = runtime.export_state()
    runtime2, control2 = make()
    runtime2.restore(state)
    assert control2.active and control2.settings.percent == 30
    runtime3, control3 = make({"pool": "green", "percent": 5})
    runtime3.restore(state)
    assert control3.settings.percent == 5  # the edited config wins
