"""schemathesis against the API's own OpenAPI schema, before and after a model is loaded.

Properties, for a bounded number of generated examples per operation: no 5xx other
than the documented ``/readyz`` 503, every 4xx carries a JSON ``detail`` message,
and every 2xx body conforms to the schema (numbers are numbers, never ``null``).
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from schemathesis import checks

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                 numeric=("amount", "hour", "distance_km"), categorical=("country", "channel"),
                 hash_bits=8)


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    max_instances: int = 50
    max_body_bytes: int = 64 * 1024


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


def _trained_store() -> ModelStore:
    model = OnlineModel(SPEC, device="cpu")
    events = FraudStream(seed=5).take(2048)
    for start in range(0, len(events), 256):
        batch, _ = model.vectorizer.transform_many(events[start : start + 256])
        model.process(batch)
    store = ModelStore()
    assert store.offer("fraud/r1", snapshots.encode(model.to_state() | {"replica": "r1"}))
    return store


def _validate(case: Any) -> None:
    response = case.call()
    status = response.status_code
    path = case.operation.path
    if status >= 500:
        assert path == "/readyz" and status == 503, (path, status, response.text)
    if 400 <= status < 500:
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), (path, status, response.text)
    if status < 400 or path == "/readyz":
        case.validate_response(response, checks=[
            checks.response_schema_conformance, checks.content_type_conformance])


_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# Built at collection (schemathesis parametrizes then); the small model trains in ~0.2 s.
before = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Cfg(), ModelStore(), CollectorRegistry()))
after = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Cfg(), _trained_store(), CollectorRegistry()))


@before.parametrize()
@_SETTINGS
def test_schema_before_a_model_is_loaded(case: Any) -> None:
    _validate(case)


@after.parametrize()
@_SETTINGS
def test_schema_with_a_model_loaded(case: Any) -> None:
    if case.path_parameters and "name" in case.path_parameters and hash(str(case.body)) % 2:
        case.path_parameters["name"] = "fraud"  # half the cases reach the served model
    _validate(case)
