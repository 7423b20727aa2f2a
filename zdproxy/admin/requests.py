"""Request bodies of the admin API as pydantic models: each mutating endpoint
validates its JSON object with one of these before anything changes, and a bad
body is a 400 with the API's JSON error shape (``{"error": "..."}``), one
readable sentence naming the key.

The models check shape and types; the runtime checks what needs its state
(pool names, sums, addresses in use) when the command is applied.

``PUT /split`` takes two forms (``SplitBody.parse``):

* ``{"weights": {"blue": 90, "green": 10}, "force": true}``: the pools and the
  flag apart, for any pool names (a pool may be named ``force`` or ``weights``);
* ``{"blue": 90, "green": 10, "force": true}``: the original flat form, kept.
  ``force`` is the flag there unless the service has a pool named ``force`` and
  the value is an integer (then it is that pool's weight: a boolean never is).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from zdproxy.errors import ControlError

#: weights are percents; a backend's weight is at most this
_MAX_BACKEND_WEIGHT = 1000


class RequestError(ControlError):
    """A request body that does not fit its model (400)."""


class Body(BaseModel):
    """Base: unknown keys are refused, no type coercion (``"100"`` is not 100)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: field -> message for a value of the wrong type or range; ``{name}`` is the
    #: key inside a mapping field, ``{value!r}`` the value sent
    messages: ClassVar[dict[str, str]] = {}
    #: the message for a missing field (default: "missing key 'FIELD'")
    missing: ClassVar[dict[str, str]] = {}

    @classmethod
    def expected(cls) -> str:
        return ", ".join(sorted(cls.model_fields)) or "none"


_B = TypeVar("_B", bound=Body)


def parse(model: type[_B], data: Mapping[str, Any]) -> _B:
    """``data`` as ``model``, or ``RequestError`` describing the first problem."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise RequestError(_describe(model, exc)) from None


def _describe(model: type[Body], exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = error["loc"]
    field = str(loc[0]) if loc else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {field!r} (expected: {model.expected()})"
    if kind == "missing":
        return model.missing.get(field, f"missing key {field!r}")
    template = model.messages.get(field)
    if template is None:
        return f"{field}: {error['msg']}"
    name = str(loc[1]) if len(loc) > 1 else field
    return template.format(name=name, value=error.get("input"))


class NoBody(Body):
    """Endpoints that take no body (drain, enable, remove...): ``{}`` or nothing."""


class SplitBody(Body):
    """``PUT /split``: every pool's percent of new traffic."""

    weights: dict[StrictStr, Annotated[StrictInt, Field(ge=0, le=100)]]
    force: StrictBool = False

    messages: ClassVar[dict[str, str]] = {
        "weights": "weight of pool {name!r} must be an integer 0-100, got {value!r}",
        "force": "force must be true or false",
    }

    @classmethod
    def parse(cls, data: Mapping[str, Any], pools: Collection[str]) -> SplitBody:
        """Either form (see the module's docstring); ``pools``: the service's pool
        names, which decide what a flat ``force`` key is."""
        if isinstance(data.get("weights"), dict) and set(data) <= {"weights", "force"}:
            # nested (an object is never a weight, even for a pool named "weights")
            body = parse(cls, data)
        else:
            flat = dict(data)
            force: Any = False
            if "force" in flat and not ("force" in pools and type(flat["force"]) is int):
                force = flat.pop("force")
            body = parse(cls, {"weights": flat, "force": force})
        if not body.weights:
            raise RequestError('expected pool weights, e.g. {"blue": 90, "green": 10}')
        return body


class FlipBody(Body):
    """``POST /flip``: all new traffic to pool ``to``."""

    to: StrictStr = Field(min_length=1)
    force: StrictBool = False

    messages: ClassVar[dict[str, str]] = {
        "to": "expected the name of the pool to flip to",
        "force": "force must be true or false",
    }
    missing: ClassVar[dict[str, str]] = {"to": 'expected {"to": "POOL"}'}


class AddBackendBody(Body):
    """``POST /backends``: a new backend in ``pool`` (address checked by the runtime)."""

    pool: StrictStr
    address: StrictStr
    #: left out: POOL-N; ``null`` is refused (as OpenAPI says: a string)
    id: StrictStr | None = None
    weight: StrictInt = Field(default=1, ge=0, le=_MAX_BACKEND_WEIGHT)

    @field_validator("id", mode="before")
    @classmethod
    def _id_not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("id must be a string")
        return value

    messages: ClassVar[dict[str, str]] = {
        "pool": "pool must be a pool name",
        "address": "address must be a string host:port",
        "id": "id must be a string (leave it out for the default POOL-N)",
        "weight": f"weight must be an integer 0-{_MAX_BACKEND_WEIGHT}, got {{value!r}}",
    }


class RollingPoolBody(Body):
    """``POST /rolling/next|abort`` without a pool in the path."""

    pool: StrictStr | None = None

    messages: ClassVar[dict[str, str]] = {"pool": "pool must be a pool name"}
