"""The fast predict path (services/api/fast.py) answers exactly as the FastAPI route does.

Two apps serve the same store: one with the fast path (the default), one without
(``api.fast_predict = false``).  Every body, valid or hostile, must get the same status,
content type and JSON from both (``snapshot_age_s`` aside: it is read at a different
instant); valid bodies must be answered by the fast path, and anything it is unsure of
must fall through to the route.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
    categorical=("merchant_category", "country", "channel"), hash_bits=10,
)
MAX_INSTANCES = 5
PATH = "/models/fraud/predict"
KNOWN = [*SPEC.numeric, *SPEC.categorical, SPEC.label, SPEC.id_field]


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    max_instances: int = MAX_INSTANCES
    max_body_bytes: int = 64 * 1024
    fast_predict: bool = True


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


@pytest.fixture(scope="module")
def store() -> ModelStore:
    model = OnlineModel(SPEC, device="cpu")
    events = FraudStream(seed=3).take(3000)
    for start in range(0, len(events), 256):
        batch, _ = model.vectorizer.transform_many(events[start:start + 256])
        model.process(batch)
    s = ModelStore()
    assert s.offer("fraud/r1", snapshots.encode(model.to_state() | {"replica": "r1"}))
    return s


@pytest.fixture(scope="module")
def clients(store: ModelStore) -> Iterator[tuple[TestClient, TestClient]]:
    fast = TestClient(create_app(Cfg(), store))
    slow = TestClient(create_app(Cfg(api=ApiCfg(fast_predict=False)), store))
    with fast, slow:
        yield fast, slow


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    out = FraudStream(seed=4).take(20)
    for e in out:
        e.pop("is_fraud")
    return out


def post(client: TestClient, body: bytes, content_type: str | None = "application/json") -> Any:
    headers = {} if content_type is None else {"content-type": content_type}
    return client.post(PATH, content=body, headers=headers)


def same_answer(clients: tuple[TestClient, TestClient], body: bytes,
                content_type: str | None = "application/json") -> tuple[int, Any]:
    """Post to both apps; assert equal answers; return (status, JSON)."""
    fast, slow = clients
    a, b = post(fast, body, content_type), post(slow, body, content_type)
    assert a.status_code == b.status_code, (body[:300], a.text[:300], b.text[:300])
    assert a.headers["content-type"] == b.headers["content-type"]
    ja, jb = a.json(), b.json()
    if a.status_code == 200:
        assert abs(ja.pop("snapshot_age_s") - jb.pop("snapshot_age_s")) < 5.0
        assert list(ja) == list(jb)  # same keys in the same order
    assert ja == jb, body[:300]
    return a.status_code, ja


def fast_stats(clients: tuple[TestClient, TestClient]) -> Any:
    return clients[0].app.state.fast_predict  # type: ignore[attr-defined]


def test_valid_bodies_take_the_fast_path_with_the_same_scores(
        clients: tuple[TestClient, TestClient], events: list[dict[str, Any]],
        store: ModelStore) -> None:
    stats = fast_stats(clients)
    answered, declined = stats.answered, stats.declined
    status, single = same_answer(clients, orjson.dumps({"features": events[0]}))
    assert status == 200 and single["score"] == single["predictions"][0]
    status, batch = same_answer(clients, orjson.dumps({"instances": events[:MAX_INSTANCES]}))
    assert status == 200 and "score" not in batch and len(batch["predictions"]) == MAX_INSTANCES
    # Sparse events (missing and null fields), ints for floats, a charset parameter.
    sparse = {"amount": 3, "country": None, "extra": [], "channel": 7}
    sparse.pop("extra")
    status, _ = same_answer(clients, orjson.dumps({"features": sparse}),
                            "application/json; charset=utf-8")
    assert status == 200
    assert (stats.answered, stats.declined) == (answered + 3, declined)
    model = store.get("fraud").model  # type: ignore[union-attr]
    expected = model.predict_events(events[:MAX_INSTANCES]).tolist()
    assert batch["predictions"] == expected


@pytest.mark.parametrize("body", [
    b'{"features": {"amount": 1, "note": {"a": 1}}}',       # nested, in a field not read
    b'{"features": {"amount": 1, "note": [1, 2]}}',
    b'{"features": {"amount": 1, "note": 1e400}}',           # past double range, not read
    b'{"features": {"amount": 1, "note": -1E+309}}',
    b'{"features": {"amount": 1, "note": ' + b'9' * 320 + b'}}',
    b'{"features": {"amount": 1, "note": NaN}}',
    b'{"features": {"amount": 1, "note": "\\ud800"}}',       # lone surrogate
    b'{"features": {"amount": 1, "note": "\xff"}}',          # not UTF-8
    b'{"features": {"amount": 1, "note": "a\nb"}}',          # raw control character
    b'{"features": {"amount": 1e16}}',                        # past MAX_ABS_VALUE
    b'{"features": {"amount": 1, "is_fraud": 2}}',           # a label neither 0 nor 1
    b'{"features": {"amount": true}}',
    b'{"features": {"country": 1.5}}',
    b'{"features": {"country": 99999999999999999999}}',
    b'{"features": {"event_id": 1.5}}',
    b'{"features": {"event_id": true, "amount": 2}}',
    b'{"features": null}', b'{"instances": null}', b'{"instances": []}', b'{}', b'[]',
    b'{"features": {}, "instances": [{}]}', b'{"features": {}, "extra": 1}',
    b'{"features": []}', b'{"instances": {}}', b'{"instances": [1]}',
    b'{"instances": [{}, {}, {}, {}, {}, {}]}',              # over max_instances
    b'{"features": {"amount": 1}', b'', b'null', b'{"features": {"amount": 1}} x',
    b'{"features": {"amount": 1, "amount": "x"}}',           # duplicate key: the last wins
    b'{"features": {"amount": "x", "amount": 1}}',
    b'{"features": {"x{": 1}}', b'{"features": {"x": "]"}}',
])
def test_odd_bodies_get_the_routes_answer(clients: tuple[TestClient, TestClient],
                                          body: bytes) -> None:
    same_answer(clients, body)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/vnd.api+json"])
def test_other_content_types_get_the_routes_answer(clients: tuple[TestClient, TestClient],
                                                   content_type: str | None) -> None:
    stats = fast_stats(clients)
    answered = stats.answered
    same_answer(clients, b'{"features": {"amount": 1}}', content_type)
    assert stats.answered == answered


def test_unknown_model_and_bodies_over_the_limit_get_the_routes_answer(
        clients: tuple[TestClient, TestClient]) -> None:
    fast, slow = clients
    for client in clients:
        r = client.post("/models/nope/predict", json={"features": {"amount": 1}})
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]
    big = orjson.dumps({"features": {"amount": 1, "pad": "x" * 70_000}})
    a, b = post(fast, big), post(slow, big)
    assert a.status_code == b.status_code == 413 and a.json() == b.json()


def test_metrics_count_fast_answers(clients: tuple[TestClient, TestClient],
                                    events: list[dict[str, Any]]) -> None:
    fast = clients[0]

    def count() -> float:
        for line in fast.get("/metrics").text.splitlines():
            if line.startswith('streamlearn_predictions_total{model="fraud"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    assert post(fast, orjson.dumps({"instances": events[:3]})).status_code == 200
    assert count() == before + 3


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
    st.sampled_from(["1e400", "-1e309", "NaN", "Infinity", "1E5", "1e-400", "0.5e3"]).map(
        lambda t: _Raw(t)),
)


class _Raw:
    """A literal JSON token (possibly one only a lenient parser takes)."""

    def __init__(self, text: str) -> None:
        self.text = text


_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=2), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=4)


def _dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: "
                               f"{_dump(v, ascii_only)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dump(v, ascii_only) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if value == value else "NaN"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def _bodies(draw: Any) -> bytes:
    base = FraudStream(seed=draw(st.integers(0, 3))).take(MAX_INSTANCES + 1)
    n = draw(st.integers(0, MAX_INSTANCES + 1))
    rows = []
    for event in base[: max(n, 1)]:
        event = dict(event)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(KNOWN) | st.text(max_size=4))
            if draw(st.booleans()) and key in event:
                del event[key]
            else:
                event[key] = draw(_VALUES)
        rows.append(event)
    envelope: dict[str, Any] = ({"features": rows[0]} if n == 0 else {"instances": rows})
    if draw(st.integers(0, 9)) == 0:
        envelope[draw(st.sampled_from(["features", "instances", "x"]))] = draw(_VALUES)
    return _dump(envelope, draw(st.booleans())).encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies())
def test_any_body_gets_the_same_answer_from_both_paths(
        clients: tuple[TestClient, TestClient], body: bytes) -> None:
    same_answer(clients, body)


_NUM = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False),
                 st.sampled_from([1e15, -1e15, 1e15 + 1, 0.0, 1.0]))


@settings(max_examples=200, deadline=None)
@given(nums=st.lists(_NUM, min_size=5, max_size=5), label=_NUM,
       cats=st.lists(st.one_of(st.none(), st.text(max_size=4), st.integers(-5, 5)),
                     min_size=3, max_size=3),
       ident=st.one_of(st.none(), st.text(max_size=3), st.integers()))
def test_one_row_assembly_equals_the_vectorizers(store: ModelStore, nums: list[Any],
                                                 label: Any, cats: list[Any],
                                                 ident: Any) -> None:
    from streamlearn.services.api import fast

    model = store.get("fraud").model  # type: ignore[union-attr]
    row = (*nums, label, *cats, ident)
    batch, bad = model.vectorizer.assemble([row])
    if bad is not None:
        with pytest.raises(fast._Unsure):
            fast._one_row(model.vectorizer, model.spec, row)
        return
    one = fast._one_row(model.vectorizer, model.spec, row)
    for name in ("numeric", "hashed", "labels"):
        a, b = getattr(one, name), getattr(batch, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name
    assert one.ids == batch.ids
    assert model.predict_many(one).tolist() == model.predict_many(batch).tolist()
