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


# ---- rollout and rolling-update bodies -------------------------------------------------


@pytest.fixture
def deploy_proxy(tmp_path: Path) -> Iterator[AdminProxy]:
    """blue serves (two backends, never called), green waits at 0 %."""
    blue = {
        "weight": 100,
        "backends": [{"id": f"blue-{n}", "address": f"127.0.0.1:{free_port()}"} for n in (1, 2)],
    }
    green = {"weight": 0, "backends": [{"id": "green-1", "address": f"127.0.0.1:{free_port()}"}]}
    config = admin_config(
        {"blue": blue, "green": green}, tmp_path / "state.json", health_check={"enabled": False}
    )
    process = AdminProxy(config, tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
async def deploy_admin(deploy_proxy: AdminProxy) -> AsyncIterator[AdminClient]:
    async with AdminClient(deploy_proxy.admin_url) as client:
        yield client


async def refused_unchanged(
    client: AdminClient, path: str, body: dict[str, Any], message: str
) -> None:
    """POST ``body`` to ``path``: a 400 JSON error naming ``message``, and the
    state and the audit events exactly as before."""
    before = await client.state()
    answer = await client.call("POST", path, body)
    assert answer.status == 400, answer.text
    assert set(answer.json()) == {"error"}, answer.text
    assert message in answer.json()["error"], answer.json()["error"]
    assert await client.state() == before
    assert await client.events() == []


def rollout(**keys: Any) -> dict[str, Any]:
    """A valid rollout body with ``keys`` changed (a value None: the key left out)."""
    body: dict[str, Any] = {
        "to": "green",
        "steps": [{"weight": 10, "pause": "30s"}, {"weight": 100}],
    }
    body.update(keys)
    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (rollout(to=None), 'to: expected the target pool\'s name, e.g. {"to": "green"}'),
        (rollout(to=""), "to: expected the target pool's name"),
        (rollout(to=["green"]), "to: expected the target pool's name"),
        (rollout(**{"from": 3}), "from: expected the baseline pool's name"),
        (rollout(steps=None), "steps: expected a list of 1-100 steps"),
        (rollout(steps=[]), "steps: expected a list of 1-100 steps"),
        (rollout(steps={"weight": 10}), "steps: expected a list of 1-100 steps"),
        (rollout(steps=[{"weight": 10}] * 101), "steps: expected a list of 1-100 steps"),
        (rollout(steps=[10, 100]), "steps: expected a list of 1-100 steps"),
        (rollout(steps=[{"weight": 0}]), "steps[0].weight: expected an integer 1-100, got 0"),
        (
            rollout(steps=[{"weight": 10}, {"weight": "100"}]),
            "steps[1].weight: expected an integer 1-100, got '100'",
        ),
        (rollout(steps=[{"pause": "30s"}]), "steps[0]: missing key 'weight'"),
        (
            rollout(steps=[{"weight": 10, "wait": "30s"}]),
            "steps[0]: unknown key 'wait' (expected: pause, weight)",
        ),
        (
            rollout(steps=[{"weight": 10, "pause": "soon"}]),
            "steps[0].pause: invalid duration 'soon'",
        ),
        (rollout(steps=[{"weight": 10, "pause": "0s"}]), "steps[0].pause: must be above 0"),
        (rollout(steps=[{"weight": 10, "pause": -1}]), "steps[0].pause: a duration cannot be"),
        (rollout(typo=1), "unknown key 'typo' (expected: analysis, enable_target, from, "),
        (rollout(analysis=[]), "analysis: expected an object"),
        (rollout(analysis={"interval": "x"}), "analysis.interval: invalid duration 'x'"),
        (rollout(analysis={"interval": True}), "analysis.interval: expected a duration"),
        (rollout(analysis={"window": "5s"}), "analysis: unknown key 'window' (expected: alpha,"),
        (
            rollout(analysis={"max_error_rate": 2}),
            "analysis.max_error_rate: expected a number 0-1, got 2",
        ),
        (
            rollout(analysis={"min_requests": 1.5}),
            "analysis.min_requests: expected an integer 1-10**9, got 1.5",
        ),
        (
            rollout(analysis={"max_p99_latency": "fast"}),
            "analysis.max_p99_latency: invalid duration 'fast'",
        ),
        (
            rollout(analysis={"on_inconclusive": "retry"}),
            "analysis.on_inconclusive: expected 'pause' or 'rollback'",
        ),
        (rollout(keep_warm="yes"), "keep_warm: expected true or false, got 'yes'"),
        (rollout(min_ready=0), "min_ready: expected an integer 1-1000000, got 0"),
        (
            rollout(webhooks={"pre_step": "ftp://x"}),
            "webhooks.pre_step: expected an http:// or https:// URL, got 'ftp://x'",
        ),
        (rollout(webhooks={"timeout": "0ms"}), "webhooks.timeout: must be above 0"),
    ],
)
async def test_bad_rollout_bodies_are_refused_and_change_nothing(
    deploy_admin: AdminClient, body: dict[str, Any], message: str
) -> None:
    await refused_unchanged(deploy_admin, "/api/v1/rollouts", body, message)
    assert (await deploy_admin.call("GET", "/api/v1/rollouts/current")).status == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"batch": 0}, "batch must be an integer 1-1000, got 0"),
        ({"batch": "2"}, "batch must be an integer 1-1000, got '2'"),
        ({"min_in_rotation": -1}, "min_in_rotation must be an integer 0-1000, got -1"),
        ({"wait_replaced": "no"}, "wait_replaced must be true or false, got 'no'"),
        ({"healthy_timeout": "soon"}, "healthy_timeout: invalid duration 'soon'"),
        ({"healthy_timeout": 0}, "healthy_timeout: must be above 0"),
        ({"replace_timeout": []}, "replace_timeout: invalid duration []"),
        ({"batches": 2}, "unknown key 'batches' (expected: batch, healthy_timeout, "),
    ],
)
async def test_bad_rolling_bodies_are_refused_and_change_nothing(
    deploy_admin: AdminClient, body: dict[str, Any], message: str
) -> None:
    await refused_unchanged(deploy_admin, "/api/v1/pools/blue/rolling", body, message)


async def test_good_rollout_and_rolling_bodies_start_them(deploy_admin: AdminClient) -> None:
    """The models pass what the controllers take: the plan as sent, defaults filled in."""
    body = rollout(
        **{"from": "blue"},
        analysis={"interval": "2s", "max_error_rate": None, "min_requests": 5},
        webhooks={"timeout": 2},
        keep_warm=True,
    )
    started = (await deploy_admin.ok("POST", "/api/v1/rollouts", body, status=201))["rollout"]
    assert started["to"] == "green" and started["from"] == "blue"
    plan = started["plan"]
    assert plan["steps"] == [{"weight": 10, "pause": 30.0}, {"weight": 100}]
    assert plan["analysis"]["interval"] == 2.0 and plan["analysis"]["max_error_rate"] is None
    assert plan["analysis"]["min_requests"] == 5 and plan["analysis"]["alpha"] == 0.001
    assert plan["keep_warm"] is True and plan["webhooks"]["timeout"] == 2.0
    await deploy_admin.ok("POST", "/api/v1/rollouts/current/abort")
    update = await deploy_admin.ok(
        "POST", "/api/v1/pools/blue/rolling", {"healthy_timeout": "10s"}, status=201
    )
    assert update["rolling"]["plan"] == {
        "batch": 1,
        "min_in_rotation": 1,
        "wait_replaced": True,
        "healthy_timeout": 10.0,
        "replace_timeout": None,
    }
