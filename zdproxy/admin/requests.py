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
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from zdproxy.config.schema import parse_duration
from zdproxy.control.rolling import DEFAULT_HEALTHY_TIMEOUT
from zdproxy.errors import ControlError

#: weights are percents; a backend's weight is at most this
_MAX_BACKEND_WEIGHT = 1000


_STEPS = (
    'steps: expected a list of 1-100 steps, e.g. [{"weight": 10, "pause": "30s"}, {"weight": 100}]'
)


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
        return ", ".join(sorted(cls.field_by_key())) or "none"

    @classmethod
    def field_by_key(cls) -> dict[str, str]:
        """Key in the body (a field's alias, else its name) -> field name."""
        return {info.alias or name: name for name, info in cls.model_fields.items()}


_B = TypeVar("_B", bound=Body)


def parse(model: type[_B], data: Mapping[str, Any]) -> _B:
    """``data`` as ``model``, or ``RequestError`` describing the first problem."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise RequestError(_describe(model, exc)) from None


def _describe(model: type[Body], exc: ValidationError) -> str:
    """The first problem as one sentence naming the key by its path in the body
    (``steps[1].pause``, ``analysis.interval``); the message templates of the
    model that holds the key apply."""
    error = exc.errors()[0]
    loc = error["loc"]
    kind = error["type"]
    if kind == "extra_forbidden":
        inner = _locate(model, loc[:-1])[3]
        where = _path(loc[:-1])
        unknown = f"unknown key {str(loc[-1])!r} (expected: {inner.expected()})"
        return f"{where}: {unknown}" if where else unknown
    owner, field, at, _ = _locate(model, loc)
    path = _path(loc[: at + 1])
    if kind == "missing":
        message = owner.missing.get(field)
        if message is not None:
            return message
        where = _path(loc[:at])
        return f"{where}: missing key {field!r}" if where else f"missing key {field!r}"
    detail = str(error.get("ctx", {}).get("error", "")) if kind == "value_error" else ""
    template = owner.messages.get(field)
    if template is None:
        return f"{path}: {detail or error['msg']}"
    name = str(loc[at + 1]) if len(loc) > at + 1 else field
    return template.format(name=name, value=error.get("input"), path=path, error=detail)


def _locate(
    model: type[Body], loc: tuple[int | str, ...]
) -> tuple[type[Body], str, int, type[Body]]:
    """The innermost model on ``loc`` that holds a key of it, that key (as sent:
    its alias if it has one), the key's index in ``loc``, and the model ``loc``
    ends in (``model`` itself for an empty ``loc``). List indices and mapping
    keys stay inside the field they belong to."""
    owner, field, at = model, "", -1
    current: type[Body] | None = model
    for index, key in enumerate(loc):
        if current is None or not isinstance(key, str):
            continue
        name = current.field_by_key().get(key)
        if name is None:
            break
        owner, field, at = current, key, index
        current = _body_in(current.model_fields[name].annotation)
    return owner, field, at, current or owner


def _body_in(annotation: Any) -> type[Body] | None:
    """The request model a field holds (itself, in a list or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, Body):
        return annotation
    for arg in get_args(annotation):
        found = _body_in(arg)
        if found is not None:
            return found
    return None


def _path(loc: tuple[int | str, ...]) -> str:
    """``("steps", 1, "pause")`` -> ``steps[1].pause``."""
    text = ""
    for key in loc:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else key
    return text


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


# ---- rollouts and rolling updates -------------------------------------------------


def _seconds(value: Any) -> float:
    """A duration (``"30s"``, ``"500ms"`` or a number of seconds) above 0."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be above 0")
    return seconds


def _seconds_or_zero(value: Any) -> float:
    return parse_duration(value)


def _http_url(value: Any) -> Any:
    if value is not None and (
        not isinstance(value, str) or not value.startswith(("http://", "https://"))
    ):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


#: a duration above 0, in seconds once validated
Seconds = Annotated[float, BeforeValidator(_seconds)]
#: a duration, 0 included
SecondsOrZero = Annotated[float, BeforeValidator(_seconds_or_zero)]
#: a webhook address (or null: none)
HookUrl = Annotated[StrictStr | None, BeforeValidator(_http_url)]
#: a number (an integer is one too, a boolean never)
Number = Annotated[float, Field(allow_inf_nan=False)]

_NUMBER = "{path}: expected a number {low}-{high}, got {value!r}"


def _number(low: str, high: str) -> str:
    return _NUMBER.replace("{low}", low).replace("{high}", high)


def _integer(low: str, high: str) -> str:
    return "{path}: expected an integer " + f"{low}-{high}" + ", got {value!r}"


class StepBody(Body):
    """One rollout step: the target pool's percent, held for ``pause`` (none:
    until ``promote``)."""

    weight: StrictInt = Field(ge=1, le=100)
    pause: Seconds | None = None

    messages: ClassVar[dict[str, str]] = {"weight": _integer("1", "100")}


class AnalysisBody(Body):
    """A rollout's analysis gates (the rollout controller's defaults when left out)."""

    enabled: StrictBool = True
    interval: Seconds = 5.0
    min_requests: StrictInt = Field(default=50, ge=1, le=10**9)
    max_error_rate: Number | None = Field(default=0.01, ge=0.0, le=1.0)
    max_p99_latency: Seconds | None = None
    max_error_rate_increase: Number | None = Field(default=0.01, ge=0.0, le=1.0)
    max_latency_ratio: Number | None = Field(default=1.5, ge=1.0, le=1000.0)
    latency_slack: SecondsOrZero = 0.02
    alpha: Number = Field(default=0.001, ge=1e-9, le=0.5)
    hold_alpha: Number = Field(default=0.05, ge=1e-9, le=1.0)
    max_inconclusive: StrictInt = Field(default=20, ge=1, le=10**6)
    on_inconclusive: Literal["pause", "rollback"] = "pause"

    messages: ClassVar[dict[str, str]] = {
        "enabled": "{path}: expected true or false, got {value!r}",
        "min_requests": _integer("1", "10**9"),
        "max_error_rate": _number("0", "1"),
        "max_error_rate_increase": _number("0", "1"),
        "max_latency_ratio": _number("1", "1000"),
        "alpha": _number("1e-09", "0.5"),
        "hold_alpha": _number("1e-09", "1"),
        "max_inconclusive": _integer("1", "1000000"),
        "on_inconclusive": "{path}: expected 'pause' or 'rollback'",
    }


class WebhooksBody(Body):
    """URLs called before each step, after success and on rollback."""

    pre_step: HookUrl = None
    post_rollout: HookUrl = None
    on_rollback: HookUrl = None
    timeout: Seconds = 5.0


class RolloutBody(Body):
    """``POST /rollouts``: a progressive rollout to pool ``to``. The model checks
    shape, types and ranges; the rollout controller checks what needs the
    service's state (the pools exist, the weights fit beside the other pools',
    they do not decrease)."""

    to: StrictStr = Field(min_length=1)
    baseline: StrictStr | None = Field(default=None, alias="from")
    steps: list[StepBody] = Field(min_length=1, max_length=100)
    analysis: AnalysisBody = Field(default_factory=AnalysisBody)
    min_ready: StrictInt | None = Field(default=None, ge=1, le=10**6)
    keep_warm: StrictBool = False
    enable_target: StrictBool = True
    webhooks: WebhooksBody = Field(default_factory=WebhooksBody)

    messages: ClassVar[dict[str, str]] = {
        "to": 'to: expected the target pool\'s name, e.g. {{"to": "green"}}',
        "from": "from: expected the baseline pool's name (or null: the pool serving most)",
        "steps": _STEPS.replace("{", "{{").replace("}", "}}"),
        "analysis": "analysis: expected an object",
        "min_ready": _integer("1", "1000000"),
        "keep_warm": "{path}: expected true or false, got {value!r}",
        "enable_target": "{path}: expected true or false, got {value!r}",
        "webhooks": "webhooks: expected an object",
    }
    missing: ClassVar[dict[str, str]] = {
        "to": 'to: expected the target pool\'s name, e.g. {"to": "green"}',
        "steps": _STEPS,
    }

    def plan_data(self) -> dict[str, Any]:
        """The body as the rollout controller takes it: the keys sent, validated."""
        return self.model_dump(by_alias=True, exclude_unset=True)


class RollingBody(Body):
    """``POST /pools/{pool}/rolling``: how a rolling update goes (all optional)."""

    batch: StrictInt = Field(default=1, ge=1, le=1000)
    min_in_rotation: StrictInt = Field(default=1, ge=0, le=1000)
    wait_replaced: StrictBool = True
    healthy_timeout: Seconds = DEFAULT_HEALTHY_TIMEOUT
    replace_timeout: Seconds | None = None

    messages: ClassVar[dict[str, str]] = {
        "batch": "batch must be an integer 1-1000, got {value!r}",
        "min_in_rotation": "min_in_rotation must be an integer 0-1000, got {value!r}",
        "wait_replaced": "wait_replaced must be true or false, got {value!r}",
    }

    def plan_data(self) -> dict[str, Any]:
        """The body as the rolling-update controller takes it: the keys sent, validated."""
        return self.model_dump(exclude_unset=True)
