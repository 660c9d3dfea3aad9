"""HTTP boundary: request and response shapes, strict JSON parsing, orjson responses.

Request bodies are parsed with orjson, which follows RFC 8259 and refuses
``NaN``, ``Infinity`` and numbers that overflow a double.  When it refuses a
body that Python's lenient parser would accept, the body is re-read leniently
only to find where the non-finite number is, so the 422 names the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

# -- responses -----------------------------------------------------------------


class OrjsonResponse(JSONResponse):
    """JSON via orjson: NumPy arrays and scalars allowed, NaN rendered as ``null``."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


# -- strict JSON bodies --------------------------------------------------------


class NonFiniteNumber(json.JSONDecodeError):
    """A JSON body with ``NaN``/``Infinity`` or an overflowing number; ``path`` locates it."""

    def __init__(self, token: str, path: tuple[str | int, ...], doc: str, pos: int) -> None:
        where = ".".join(str(p) for p in path) or "body"
        super().__init__(f"{where}: {token} is not a valid JSON number (numbers must be finite)",
                         doc, pos)
        self.token = token
        self.path = path


class _Token:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_Path = tuple[str | int, ...]


def _find_token(value: Any, path: _Path) -> tuple[_Token, _Path] | None:
    if isinstance(value, _Token):
        return value, path
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _find_token(v, (*path, k))
        if found is not None:
            return found
    return None


def _float_or_token(text: str) -> float | _Token:
    x = float(text)
    return x if math.isfinite(x) else _Token(text)


def strict_loads(body: bytes) -> Any:
    """Parse RFC 8259 JSON; non-finite numbers raise :class:`NonFiniteNumber`.

    Examples
    --------
    >>> strict_loads(b'{"features": {"amount": 12.5}}')
    {'features': {'amount': 12.5}}
    >>> try:
    ...     strict_loads(b'{"features": {"amount": NaN}}')
    ... except NonFiniteNumber as exc:
    ...     print(exc.path, exc.token)
    ('features', 'amount') NaN
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict_error:
        try:
            lenient = json.loads(body, parse_constant=_Token, parse_float=_float_or_token)
        except (ValueError, RecursionError):
            raise strict_error from None
        found = _find_token(lenient, ())
        if found is None:  # pragma: no cover - orjson and json disagree otherwise
            raise strict_error from None
        token, path = found
        doc = body.decode("utf-8", errors="replace")
        raise NonFiniteNumber(token.text, path, doc, max(doc.find(token.text), 0)) from None


class StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`strict_loads` (cached)."""

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = strict_loads(await self.body())
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """Route class that parses bodies strictly and reports non-finite numbers by field."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            try:
                return await handler(StrictJSONRequest(request.scope, request.receive))
            except RequestValidationError as exc:
                cause = exc.__cause__
                if isinstance(cause, NonFiniteNumber):
                    raise RequestValidationError([{
                        "type": "finite_number", "loc": ("body", *cause.path),
                        "msg": f"{cause.token} is not a valid JSON number; numbers must be finite",
                        "input": cause.token,
                    }]) from cause
                raise

        return strict_handler


# -- requests ------------------------------------------------------------------

def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


def _scalar(value: Any) -> Any:
    """Accept one JSON scalar; refuse objects, arrays and non-finite numbers."""
    if value is None or isinstance(value, str | int):  # bool is an int
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"numbers must be finite, got {value!r}")
        return value
    raise ValueError(f"expected a string, number, boolean or null, got {_json_type(value)}")


#: One feature value: a JSON scalar; numbers must be finite.
FeatureValue = Annotated[
    Any, PlainValidator(_scalar, json_schema_input_type=str | float | bool | None)
]
Features = dict[str, FeatureValue]

_EXAMPLE = {"amount": 42.5, "hour": 3.2, "distance_km": 850.0, "card_age_days": 120.0,
            "tx_last_hour": 3, "merchant_category": "electronics", "country": "NG",
            "channel": "online"}


def _exactly_one_schema(schema: dict[str, Any]) -> None:
    """Make the JSON schema say what the validator enforces: exactly one key, never null."""
    props = schema.get("properties", {})
    for name in ("features", "instances"):
        prop = props.get(name)
        if prop is None or "anyOf" not in prop:
            continue
        branches = [b for b in prop.pop("anyOf") if b.get("type") != "null"]
        prop.pop("default", None)
        if len(branches) == 1:
            prop.update(branches[0])
        else:
            prop["anyOf"] = branches
    schema["oneOf"] = [{"required": ["features"]}, {"required": ["instances"]}]
    schema["examples"] = [{"features": _EXAMPLE}, {"instances": [_EXAMPLE]}]


class PredictRequest(BaseModel):
    """Exactly one of ``features`` (one event) or ``instances`` (a batch).

    Field values are then checked against the served model's spec (a number for a
    numeric field, 0/1 for a binary label...); a mismatch is a 422 naming the field.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_schema)

    features: Features | None = Field(None, description="One event's fields.")
    instances: list[Features] | None = Field(
        None, min_length=1, description="Several events (at most api.max_instances)."
    )

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            present = [k for k in ("features", "instances") if k in data]
            if len(present) > 1:
                raise ValueError("give exactly one of 'features' or 'instances'")
            if present and data[present[0]] is None:
                raise ValueError(f"'{present[0]}' must not be null")
        return data

    @model_validator(mode="after")
    def _one_given(self) -> PredictRequest:
        # Neither key: checked after the fields, so a misspelt key is named first.
        if self.features is None and self.instances is None:
            raise ValueError("give exactly one of 'features' or 'instances'")
        return self

    def events(self) -> list[dict[str, Any]]:
        """The events to score, in order."""
        if self.features is not None:
            return [self.features]
        return list(self.instances or [])


class ExplainRequest(BaseModel):
    """One event to explain."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"features": _EXAMPLE}]})

    features: Features


# -- responses (documented shapes; handlers return OrjsonResponse directly) ----


class _Served(BaseModel):
    model: str = Field(description="Model name.")
    version: int = Field(description="Served model version (max over replicas).")
    snapshot_age_s: float = Field(description="Seconds since the served model last learned.")
    merged_version: int = Field(0, description="The merged model (data-parallel replicas) "
                                "the served one builds on; 0 before the first merge.")


class Reason(BaseModel):
    """One reason code: a field and its additive contribution to the margin."""

    feature: str = Field(description="Field name (a categorical field's hashed value is "
                                     "summed back to its field).")
    contribution: float = Field(description="Contribution to the margin (target units for "
                                            "regression with the label prior).")


class PredictResponse(_Served):
    """Scores in request order: probabilities (binary, ranking) or values (regression)."""

    predictions: list[float]
    score: float | None = Field(None, description="Present when the body had 'features'.")
    decisions: list[Literal["block", "review", "allow"]] | None = Field(
        None, description="Per prediction, when the model has decision bands: 'block' "
        "(score >= decision_block), 'review' (score >= decision_review) or 'allow'.")
    decision: Literal["block", "review", "allow"] | None = Field(
        None, description="The decision, when the body had 'features' and bands are set.")
    reasons: list[list[Reason]] | None = Field(
        None, description="Per prediction with ?reasons=K: its top-K reason codes, "
        "largest contribution first.")


class ExplainResponse(_Served):
    """Additive explanation: ``bias + sum(contributions) == margin``."""

    bias: float
    contributions: dict[str, float]
    margin: float
    score: float


class ModelSummary(BaseModel):
    """``OnlineModel.info()`` plus serving metadata."""

    model_config = ConfigDict(extra="allow")

    name: str
    task: str
    version: int
    events_seen: int
    events_learned: int
    device: str
    features: dict[str, Any] = Field(description="numeric, categorical, hash_bits, and "
                                     "aggregates: the declared entity aggregates, their "
                                     "feature names and entity counts (null: none).")
    labels: dict[str, Any] | None = Field(None, description="Delayed labels: joined, late, "
                                          "duplicate, unknown, expired, evicted, pending.")
    imputed: dict[str, int]
    average_share: float | None = Field(None, description="Averaged scoring (binary models): "
                                        "the current weights' share of the score, the rest "
                                        "being their running average's; null: not averaged.")
    metrics: dict[str, Any]
    updated_at: float
    snapshot_age_s: float
    n_replicas: int
    loaded_at: float


class ModelDetail(ModelSummary):
    """A model summary plus each replica's latest snapshot and summed worker telemetry."""

    merged_version: int = Field(0, description="The newest merged model (data-parallel "
                                "replicas) the served one builds on; 0: none yet.")
    stale_replicas: list[str] = Field(default_factory=list, description="Replicas whose shard "
                                      "was not refreshed within worker.stale_after_s: left out "
                                      "of the served merge.")
    replicas: list[dict[str, Any]] = Field(description="Per replica: replica, partitions, "
                                           "version, events_learned, adopted_version, "
                                           "staleness_s, in_merge, stale, and more.")
    telemetry: dict[str, Any]


class DriftResponse(BaseModel):
    """Concept drift on the loss stream, data drift per feature (worst first), actions."""

    model: str
    version: int
    snapshot_age_s: float
    concept: dict[str, Any] = Field(description="The detector, its state, drift points "
                                                "(events seen) and times, rise or fall.")
    data: dict[str, Any] = Field(description="Per-feature PSI (worst first), mean shift or "
                                             "unseen rate, the drift level, the reference.")
    actions: dict[str, Any] = Field(description="Policy, cool-down, counts, history with "
                                                "offsets, checkpoints held.")


class Health(BaseModel):
    """Liveness or readiness: ``ok``, ``ready``, ``degraded`` or ``not ready``."""

    status: str
    models: list[str] = []
    reason: str | None = None
    degraded: bool = Field(False, description="Models are served but may be stale "
                                              "(broker unreachable).")
    feed: dict[str, Any] | None = None


class ErrorDetail(BaseModel):
    """404 body."""

    detail: str
