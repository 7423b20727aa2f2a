"""Request bodies at the admin boundary (``zdproxy.admin.requests``) on a real
``zdproxy run``: the split's two forms, pools named ``force`` and ``weights``,
and bad bodies refused with nothing changed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port
from support_control import AdminClient, AdminProxy, admin_config


def pools(*names: str) -> dict[str, dict[str, Any]]:
    """Pools whose backends are never called; the first gets all the traffic."""
    return {
        name: {
            "weight": 100 if index == 0 else 0,
            "backends": [{"id": f"{name}-1", "address": f"127.0.0.1:{free_port()}"}],
        }
        for index, name in enumerate(names)
    }


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[AdminProxy]:
    config = admin_config(
        pools("blue", "force", "weights"), tmp_path / "state.json", health_check={"enabled": False}
    )
    process = AdminProxy(config, tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
async def admin(proxy: AdminProxy) -> AsyncIterator[AdminClient]:
    async with AdminClient(proxy.admin_url) as client:
        yield client


async def weights(admin: AdminClient) -> dict[str, int]:
    state = await admin.state()
    return {name: pool["weight"] for name, pool in state["pools"].items()}


async def test_a_pool_named_force_can_be_split_in_both_forms(admin: AdminClient) -> None:
    # flat: an integer "force" is the pool's weight when a pool has that name
    result = await admin.ok("PUT", "/api/v1/split", {"blue": 60, "force": 40})
    assert result["weights"] == {"blue": 60, "force": 40, "weights": 0}
    # nested: the pools apart from the flag, for any names
    body = {"weights": {"force": 70, "weights": 30}, "force": True}
    result = await admin.ok("PUT", "/api/v1/split", body)
    assert result["weights"] == {"blue": 0, "force": 70, "weights": 30}
    assert result["event"]["after"] == {"blue": 0, "force": 70, "weights": 30}
    # flat with a boolean "force": the flag, even with a pool of that name
    result = await admin.ok("PUT", "/api/v1/split", {"blue": 100, "force": True})
    assert result["weights"] == {"blue": 100, "force": 0, "weights": 0}
    assert await weights(admin) == {"blue": 100, "force": 0, "weights": 0}


async def test_a_pool_named_weights_is_a_flat_weight_when_its_value_is_a_number(
    admin: AdminClient,
) -> None:
    result = await admin.ok("PUT", "/api/v1/split", {"weights": 100})
    assert result["weights"] == {"blue": 0, "force": 0, "weights": 100}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"weights": {"blue": 100}, "force": "yes"}, "force must be true or false"),
        ({"weights": {"blue": 100}, "extra": 1}, "weight of pool 'weights'"),
        ({"weights": {}}, "expected pool weights"),
        ({"weights": {"blue": 101}}, "weight of pool 'blue' must be an integer 0-100, got 101"),
        ({"weights": {"blue": True}}, "weight of pool 'blue' must be an integer 0-100, got True"),
        ({"weights": {"blue": 50, "nope": 50}}, "no pool named 'nope'"),
        ({"weights": {"blue": 50}}, "must sum to 100, got 50"),
        ({"blue": 100, "force": "true"}, "force must be true or false"),
    ],
)
async def test_bad_split_bodies_are_refused_and_change_nothing(
    admin: AdminClient, body: dict[str, Any], message: str
) -> None:
    before = await admin.state()
    answer = await admin.call("PUT", "/api/v1/split", body)
    assert answer.status in (400, 404), answer.text
    assert set(answer.json()) == {"error"} and message in answer.json()["error"]
    after = await admin.state()
    assert after["pools"] == before["pools"]
    assert after["generation"] == before["generation"]
    assert await admin.events() == []


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/api/v1/flip", {"to": ""}, "expected the name of the pool to flip to"),
        ("POST", "/api/v1/flip", {"to": 3}, "expected the name of the pool to flip to"),
        ("POST", "/api/v1/flip", {"force": True}, 'expected {"to": "POOL"}'),
        ("POST", "/api/v1/flip", {"to": "blue", "x": 1}, "unknown key 'x' (expected: force, to)"),
        ("POST", "/api/v1/backends", {"pool": "blue"}, "missing key 'address'"),
        ("POST", "/api/v1/backends", {"pool": 1, "address": "a:1"}, "pool must be a pool name"),
        (
            "POST",
            "/api/v1/backends",
            {"pool": "blue", "address": "127.0.0.1:1", "weight": 1001},
            "weight must be an integer 0-1000, got 1001",
        ),
        (
            "POST",
            "/api/v1/backends",
            {"pool": "blue", "address": "127.0.0.1:1", "weight": "2"},
            "weight must be an integer 0-1000, got '2'",
        ),
        ("POST", "/api/v1/backends/blue-1/drain", {"now": True}, "unknown key 'now'"),
        ("POST", "/api/v1/rolling/next", {"pool": 5}, "pool must be a pool name"),
    ],
)
async def test_bad_bodies_of_other_mutations_are_refused(
    admin: AdminClient, method: str, path: str, body: dict[str, Any], message: str
) -> None:
    before = await admin.state()
    answer = await admin.call(method, path, body)
    assert answer.status == 400, answer.text
    assert answer.json() == {"error": answer.json()["error"]}
    assert message in answer.json()["error"]
    after = await admin.state()
    assert after["pools"] == before["pools"] and after["generation"] == before["generation"]
