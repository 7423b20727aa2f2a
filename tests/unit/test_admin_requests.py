"""The admin API's request models (``zdproxy.admin.requests``), plain values."""

from __future__ import annotations

from typing import Any

import pytest

from zdproxy.admin.openapi import build_spec
from zdproxy.admin.requests import (
    AddBackendBody,
    FlipBody,
    NoBody,
    RequestError,
    SplitBody,
    parse,
)
from zdproxy.errors import ControlError

POOLS = ("blue", "green")


@pytest.mark.parametrize(
    ("data", "pools", "weights", "force"),
    [
        ({"blue": 90, "green": 10}, POOLS, {"blue": 90, "green": 10}, False),
        ({"blue": 100, "force": True}, POOLS, {"blue": 100}, True),
        ({"weights": {"blue": 100}, "force": True}, POOLS, {"blue": 100}, True),
        ({"weights": {"blue": 100}}, POOLS, {"blue": 100}, False),
        # a pool named force: an integer is its weight, a boolean the flag
        ({"blue": 60, "force": 40}, (*POOLS, "force"), {"blue": 60, "force": 40}, False),
        ({"blue": 100, "force": True}, (*POOLS, "force"), {"blue": 100}, True),
        ({"weights": {"force": 100}, "force": True}, ("force",), {"force": 100}, True),
        # a pool named weights: a number is its weight, an object the nested form
        ({"weights": 100}, ("weights", "blue"), {"weights": 100}, False),
        ({"weights": {"weights": 100}}, ("weights",), {"weights": 100}, False),
    ],
)
def test_split_forms(
    data: dict[str, Any], pools: tuple[str, ...], weights: dict[str, int], force: bool
) -> None:
    body = SplitBody.parse(data, pools)
    assert body.weights == weights and body.force is force


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected pool weights"),
        ({"force": True}, "expected pool weights"),
        ({"weights": {}}, "expected pool weights"),
        ({"blue": 90.5, "green": 9.5}, "weight of pool 'blue' must be an integer 0-100, got 90.5"),
        ({"blue": "100"}, "weight of pool 'blue' must be an integer 0-100, got '100'"),
        ({"blue": -1, "green": 101}, "weight of pool 'blue' must be an integer 0-100, got -1"),
        ({"blue": False}, "must be an integer 0-100, got False"),
        ({"blue": 100, "force": 1}, "force must be true or false"),
        ({"weights": {"blue": 100}, "force": None}, "force must be true or false"),
    ],
)
def test_bad_split_bodies(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        SplitBody.parse(data, POOLS)
    assert message in str(caught.value)
    assert isinstance(caught.value, ControlError) and caught.value.status == 400


def test_flip_add_and_empty_bodies() -> None:
    assert parse(FlipBody, {"to": "green"}) == FlipBody(to="green", force=False)
    body = parse(AddBackendBody, {"pool": "green", "address": "127.0.0.1:1"})
    assert (body.id, body.weight) == (None, 1)
    parse(NoBody, {})
    for model, data, message in [
        (FlipBody, {}, 'expected {"to": "POOL"}'),
        (FlipBody, {"to": "green", "force": "yes"}, "force must be true or false"),
        (AddBackendBody, {"pool": "g"}, "missing key 'address'"),
        (AddBackendBody, {"pool": "g", "address": "a:1", "id": 5}, "id must be a string"),
        (AddBackendBody, {"pool": "g", "address": "a:1", "id": None}, "id must be a string"),
        (AddBackendBody, {"pool": "g", "address": "a:1", "weight": -1}, "got -1"),
        (AddBackendBody, {"pool": "g", "address": "a:1", "x": 1}, "unknown key 'x' (expected: "),
        (NoBody, {"x": 1}, "unknown key 'x' (expected: none)"),
    ]:
        with pytest.raises(RequestError) as caught:
            parse(model, data)
        assert message in str(caught.value), (model, data)


def test_openapi_request_schemas_name_the_models_fields() -> None:
    """The hand-written OpenAPI bodies stay in step with the models."""
    paths = build_spec("0")["paths"]

    def schema(path: str, method: str) -> dict[str, Any]:
        body = paths[path][method]["requestBody"]["content"]["application/json"]
        result: dict[str, Any] = body["schema"]
        return result

    assert set(schema("/api/v1/flip", "post")["properties"]) == set(FlipBody.model_fields)
    assert set(schema("/api/v1/backends", "post")["properties"]) == set(AddBackendBody.model_fields)
    nested = schema("/api/v1/split", "put")["oneOf"][0]
    assert set(nested["properties"]) == set(SplitBody.model_fields)


def test_ctl_split_sends_the_nested_form_only_for_pools_named_like_its_keys() -> None:
    import argparse
    import io

    from zdproxy.ctl import cmd_split

    class Client:
        def __init__(self) -> None:
            self.bodies: list[Any] = []

        def call(self, method: str, path: str, body: Any = None) -> Any:
            self.bodies.append(body)
            return {"weights": {}, "changed": False}

    client = Client()
    for weights, force in ((["blue=90", "green=10"], True), (["force=60", "blue=40"], True)):
        args = argparse.Namespace(weights=weights, force=force, json=True)
        cmd_split(client, args, io.StringIO())  # type: ignore[arg-type]
    assert client.bodies == [
        {"blue": 90, "green": 10, "force": True},
        {"weights": {"force": 60, "blue": 40}, "force": True},
    ]
    # what ctl sends is what the server reads
    assert SplitBody.parse(client.bodies[1], ("force", "blue")).weights == {"force": 60, "blue": 40}
