"""Event validation: one set of rules, the same answer on every input path.

The fast paths (msgspec structs and packed float rows for dicts, the compiled scanner of
``streamlearn.json_columns`` for JSON) must accept exactly what the per-field Python rules
(``Vectorizer.row``) accept, with the same values, and reject the rest with the Python
rules' reasons.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import orjson
import pytest

from streamlearn.batch_format import BatchFormatError, FeatureDecoder, encode_batch
from streamlearn.config import ModelSpec
from streamlearn.features import _MISSING, MAX_ABS_VALUE, InvalidEvent, Vectorizer
from streamlearn.json_columns import JsonColumns
from streamlearn.pipeline import JsonDecoder, _decode_slow

SPEC = ModelSpec(name="m", topic="t", numeric=("a", "b", "c"), categorical=("k", "j"),
                 label="y", hash_bits=10)
REG = ModelSpec(name="r", topic="t", numeric=("a",), categorical=("k",), label="y",
                task="regression", hash_bits=6)

# -- the reference: the per-field Python rules, event by event ------------------------------


def reference(vec: Vectorizer, events: list[Any]) -> tuple[list[tuple], list[tuple[int, str]]]:
    """Accepted rows and ``(index, reason)`` rejects, one event at a time."""
    rows, rejects = [], []
    for i, e in enumerate(events):
        try:
            rows.append(vec.row(e))
        except InvalidEvent as exc:
            rejects.append((i, str(exc)))
    return rows, rejects


def assert_batch_is(vec: Vectorizer, batch: Any, rows: list[tuple]) -> None:
    spec = vec.spec
    d, k = spec.n_numeric, len(spec.categorical)
    want_num = np.array([r[:d] for r in rows], dtype=np.float64).reshape(len(rows), d)
    np.testing.assert_array_equal(batch.numeric, want_num)  # NaN == NaN here
    np.testing.assert_array_equal(batch.labels, np.array([r[d] for r in rows], np.float32))
    want_hash = [[vec.slot(name, _MISSING if v is None else v)
                  for name, v in zip(spec.categorical, r[d + 1 : d + 1 + k], strict=True)]
                 for r in rows]
    assert batch.hashed.tolist() == want_hash
    assert list(batch.ids) == [r[-1] for r in rows]
    assert batch.numeric.flags.c_contiguous and batch.numeric.dtype == np.float64


def _concat(pieces: list[Any]) -> Any:
    from streamlearn.features import FeatureBatch
    return FeatureBatch(np.concatenate([p.numeric for p in pieces]),
                        np.concatenate([p.hashed for p in pieces]),
                        np.concatenate([p.labels for p in pieces]),
                        [i for p in pieces for i in p.ids])


# -- random events, mostly good, with every kind of bad value -------------------------------

NUMBERS = [1.5, -2, 0, -0.0, 7, 10**15, -(10**15), 1e15, 1.0000000000000002e15, 2**53, 10**16,
           2**63, 2**64, 10**20, 1e308, -1e300, 5e-324, None, True, False, "1.5", "x", [1],
           {"a": 1}]
PY_ONLY_NUMBERS = [math.nan, math.inf, -math.inf, 10**400, np.float64(2.5), np.int64(3)]
CATEGORIES = ["FR", "", "é", "a\x00b", 0, 7, -3, 2**63 - 1, 2**63, 2**70, None, True, 1.5,
              ["x"], {"y": 1}, _MISSING]
LABELS = [0, 1, 0.0, 1.0, None, 2, 0.5, -1, True, "1", 1e308, 1e16, 1.0000000001, 5e-324]
IDS = [1, "a", None, 1.5, [1, 2], {"k": "v"}, 2**63, 2**64, 10**20, True, "", -5]
JUNK = [None, 1, "s", [1, [2, {"z": None}]], {"q": [True, 1e300]}, 2**70, -0.5]


def random_event(rng: random.Random, spec: ModelSpec, *, python: bool) -> dict[str, Any]:
    """An event whose every field is usually good; ~4% of fields are drawn from the
    pools of edge cases (``python`` adds values JSON cannot carry)."""
    numbers = NUMBERS + PY_ONLY_NUMBERS if python else NUMBERS
    e: dict[str, Any] = {}
    if rng.random() < 0.9:
        e[spec.id_field] = rng.choice(IDS) if rng.random() < 0.1 else rng.randrange(10**6)
    for name in spec.numeric:
        r = rng.random()
        if r < 0.05:
            continue
        e[name] = rng.choice(numbers) if r < 0.09 else rng.gauss(0.0, 100.0)
    for name in spec.categorical:
        r = rng.random()
        if r < 0.05:
            continue
        e[name] = rng.choice(CATEGORIES) if r < 0.09 else rng.choice(["x", "y", "z", 1, 2])
    r = rng.random()
    if r < 0.04:
        e[spec.label] = rng.choice(LABELS)
    elif r < 0.5:
        e[spec.label] = rng.choice([0, 1]) if spec.task != "regression" else rng.gauss(5, 2)
    if rng.random() < 0.3:
        e["extra"] = rng.choice(JUNK)
    return e


@pytest.mark.parametrize("spec", [SPEC, REG], ids=["binary", "regression"])
@pytest.mark.parametrize("bad_share", [0.0, 1.0], ids=["clean-chunks", "mixed"])
def test_dict_fast_path_equals_the_python_rules(spec: ModelSpec, bad_share: float) -> None:
    rng = random.Random(7)
    events: list[Any] = []
    for _ in range(3000):
        e = random_event(rng, spec, python=True)
        if bad_share == 0.0:  # keep only events the rules accept: the all-fast path
            try:
                Vectorizer(spec).row(e)
            except InvalidEvent:
                continue
        events.append(e)
    if bad_share:
        events[5:5] = [["not", "a", "dict"], 3, None, {1: 2}]
    vec = Vectorizer(spec)
    rows, want_rejects = reference(vec, events)
    batch, rejects = vec.transform_many(events)
    assert rejects == want_rejects
    assert_batch_is(vec, batch, rows)
    if bad_share:
        assert len(rejects) > 100  # the pools did reach the rules


def json_messages(rng: random.Random, spec: ModelSpec, n: int) -> list[bytes | None]:
    """Messages as producers send them, plus the raw-bytes cases orjson and msgspec
    could disagree on."""
    raw = [
        b"", None, b"null", b"[1]", b"{bad", b'{"a": NaN}', b'{"a": 1e400}', b'{"a": -1e999}',
        b'{"a": 1, "a": "x"}', b'{"a": "x", "a": 1}', b'{"\\u0061": 2.5, "k": "\\u00e9"}',
        b' {"a": 1}\n', b'{"k": "\\ud800"}', b'{"extra": "\\ud83d\\ude00", "a": 1}',
        b'{"extra": "\xc3"}', b'{"k": "\xff"}', b'{"extra": "\xc3\xa9", "a": 3}',
        b'\xef\xbb\xbf{"a": 1}', b'{"a": 1}\x00', b'{"a": 01}',
        b'{"extra": ' + b"[" * 1000 + b"]" * 1000 + b', "a": 2}',
        b'{"extra": ' + b"[" * 1100 + b"]" * 1100 + b"}",
        b'{"event_id": ' + b"[" * 300 + b"]" * 300 + b', "a": 2}',
        b'{"event_id": 123456789012345678901234567890, "a": 1}',
        b'{"k": 18446744073709551615}', b'{"a": 100000000000000000000000}',
        b'{"y": 1.0, "a": 1.0000000000000002220446}', b'{"a": 2.2250738585072011e-308}',
    ]
    # json, not orjson: it writes integers past 64 bits, as other producers do
    out: list[bytes | None] = [
        json.dumps(random_event(rng, spec, python=False), ensure_ascii=rng.random() < 0.5)
        .encode() for _ in range(n)]
    for m in raw:
        out.insert(rng.randrange(len(out)), m)
    return out


@pytest.mark.parametrize("spec", [SPEC, REG], ids=["binary", "regression"])
def test_json_fast_path_equals_orjson_then_the_python_rules(spec: ModelSpec) -> None:
    rng = random.Random(11)
    values = json_messages(rng, spec, 3000)
    vec = Vectorizer(spec)
    events, index, want_rejects = _decode_slow(values)  # orjson, message by message
    rows, bad = reference(vec, events)
    want_rejects += [(index[i], reason) for i, reason in bad]
    batch, rejects = JsonDecoder(spec, Vectorizer(spec)).decode(values)
    assert sorted(rejects) == sorted(want_rejects)
    assert_batch_is(vec, batch, rows)
    # One message at a time: the same verdicts, and most go the compiled way.
    dec, fast = JsonDecoder(spec, Vectorizer(spec)), 0
    columns = JsonColumns(vec)
    pieces, one_rejects = [], []
    for i, v in enumerate(values):
        b, r = dec.decode([v])
        one_rejects += [(i, reason) for _, reason in r]
        pieces.append(b)
        fast += columns.read([v]).careful.size == 0
    assert one_rejects == sorted(want_rejects)
    assert_batch_is(vec, _concat(pieces), rows)
    assert fast > 0.8 * len(values)  # most messages did take the fast path


MUTATION_BYTES = b'{}[]",:\\ 0123456789.eE-+tfnul\x00\x1f\xc3\xa9\xff'


def mutated(rng: random.Random, message: bytes) -> bytes:
    """``message`` with one to three random edits: JSON's own characters and bytes that
    break UTF-8, inserted, replaced, deleted, repeated or cut off."""
    m = bytearray(message)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(m) + 1)
        op = rng.randrange(5)
        if op == 0:
            m[i:i] = bytes([rng.choice(MUTATION_BYTES)])
        elif op == 1 and i < len(m):
            m[i] = rng.choice(MUTATION_BYTES)
        elif op == 2:
            del m[i : i + rng.randint(1, 4)]
        elif op == 3:
            m[i:i] = m[max(0, i - 6) : i]
        else:
            del m[i:]
    return bytes(m)


@pytest.mark.parametrize("spec", [SPEC, REG], ids=["binary", "regression"])
def test_mutated_messages_get_the_verdicts_of_orjson_and_the_rules(spec: ModelSpec) -> None:
    rng = random.Random(23)
    values: list[bytes | None] = []
    for v in json_messages(rng, spec, 1500):
        values.append(v)
        if v:
            values += [mutated(rng, v) for _ in range(3)]
    vec = Vectorizer(spec)
    events, index, want_rejects = _decode_slow(values)
    rows, bad = reference(vec, events)
    want_rejects += [(index[i], reason) for i, reason in bad]
    batch, rejects = JsonDecoder(spec, Vectorizer(spec)).decode(values)
    assert rejects == sorted(want_rejects)
    assert_batch_is(vec, batch, rows)
    assert 0.2 * len(values) < len(want_rejects) < 0.8 * len(values)  # both verdicts drawn
    assert JsonColumns(vec).read(values).sure.size > 0.2 * len(values)  # and both paths


def test_clean_json_takes_the_fast_path_and_matches_dicts() -> None:
    rng = random.Random(3)
    events = []
    for i in range(600):  # what producers send: numbers, nulls, gaps, small vocabularies
        e: dict[str, Any] = {"event_id": i if i % 2 else f"e{i}", "extra": [1, {"x": None}]}
        for name in SPEC.numeric:
            if rng.random() < 0.9:
                e[name] = rng.choice([None, rng.randrange(-99, 99), rng.gauss(0, 1e6)])
        for name in SPEC.categorical:
            if rng.random() < 0.9:
                e[name] = rng.choice([None, "x", "é", 3, -(2**63)])
        e["y"] = rng.choice([None, 0, 1])
        events.append(e)
    vec = Vectorizer(SPEC)
    assert JsonColumns(vec).read([orjson.dumps(e) for e in events]).careful.size == 0
    got, rejects = JsonDecoder(SPEC, vec).decode([orjson.dumps(e) for e in events])
    want, _ = Vectorizer(SPEC).transform_many(events)
    assert rejects == []
    for name in ("numeric", "hashed", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.ids == want.ids


def test_field_names_that_are_not_identifiers_and_colliding_names() -> None:
    spec = ModelSpec(name="m", topic="t", numeric=("amount-usd", "class", "0"),
                     categorical=("__init__",), label="y", hash_bits=4)
    event = {"amount-usd": 2.0, "class": 3, "0": None, "__init__": "x", "y": 1, "event_id": 9}
    batch, rejects = Vectorizer(spec).transform_many([event])
    jb, jr = JsonDecoder(spec, Vectorizer(spec)).decode([orjson.dumps(event)])
    assert rejects == jr == [] and batch.ids == jb.ids == [9]
    np.testing.assert_array_equal(batch.numeric, jb.numeric)
    assert batch.numeric[0, :2].tolist() == [2.0, 3.0] and math.isnan(batch.numeric[0, 2])
    # a label that is also a feature: no struct can hold it, the Python rules still work
    odd = ModelSpec(name="m", topic="t", numeric=("y",), label="y", hash_bits=4)
    batch, rejects = Vectorizer(odd).transform_many([{"y": 1}, {"y": 2}])
    assert batch.numeric.tolist() == [[1.0]] and rejects[0][0] == 1


# -- every rule, the same verdict on every input path --------------------------------------

GOOD = {"event_id": 1, "a": 1.0, "b": 2.0, "c": 3.0, "k": "x", "j": 1, "y": 1}
RULES = [  # (spec, field, value, reason, also over HTTP)
    (SPEC, "a", "12", "field 'a': expected a number, got str", True),
    (SPEC, "b", True, "field 'b': expected a number, got bool", True),
    (SPEC, "c", [1], "field 'c': expected a number, got list", False),  # the API says "array"
    (SPEC, "a", 1e308, "field 'a': magnitude must be at most 1e+15, got 1e+308", True),
    (SPEC, "a", -1e300, "field 'a': magnitude must be at most 1e+15, got -1e+300", True),
    (SPEC, "b", 10**16, "field 'b': magnitude must be at most 1e+15, got 1e+16", True),
    (SPEC, "c", 1.5e15, "field 'c': magnitude must be at most 1e+15, got 1.5e+15", True),
    (SPEC, "k", 1.5, "field 'k': expected a string or integer, got float", True),
    (SPEC, "j", False, "field 'j': expected a string or integer, got bool", True),
    (SPEC, "k", {"x": 1}, "field 'k': expected a string or integer, got dict", False),
    (SPEC, "y", 2, "field 'y': label must be 0 or 1, got 2.0", True),
    (SPEC, "y", 1.0000000001, "field 'y': label must be 0 or 1, got 1.0000000001", True),
    (SPEC, "y", "1", "field 'y': expected a number, got str", True),
    (REG, "y", 1e20, "field 'y': magnitude must be at most 1e+15, got 1e+20", True),
    (REG, "y", True, "field 'y': expected a number, got bool", True),
]
RULE_IDS = [f"{spec.task}-{field}={value!r}"[:40] for spec, field, value, _, _ in RULES]


@pytest.fixture(scope="module")
def client() -> Any:
    """The HTTP API serving SPEC's and REG's models (no Kafka)."""
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry
    from pydantic import BaseModel

    from streamlearn import snapshots
    from streamlearn.models import OnlineModel
    from streamlearn.services.api.main import create_app
    from streamlearn.serving import ModelStore

    class Kafka(BaseModel):
        bootstrap: str = ""

    class Api(BaseModel):
        host: str = "127.0.0.1"
        port: int = 0
        max_instances: int = 10
        snapshot_dir: str = ""
        max_body_bytes: int = 1 << 20

    class Cfg(BaseModel):
        kafka: Kafka = Kafka()
        api: Api = Api()

    store = ModelStore()
    for spec in (SPEC, REG):
        model = OnlineModel(spec, device="cpu")
        batch, _ = model.vectorizer.transform_many(
            [{"a": float(i), "b": 1.0, "c": -1.0, "k": "x", "y": i % 2} for i in range(64)])
        model.process(batch)
        state = model.to_state() | {"replica": "r1", "telemetry": {}}
        assert store.offer(f"{spec.name}/r1", snapshots.encode(state))
    with TestClient(create_app(Cfg(), store, CollectorRegistry())) as c:
        yield c


@pytest.mark.parametrize(("spec", "field", "value", "reason", "http"), RULES, ids=RULE_IDS)
def test_each_rule_gives_one_verdict_on_dicts_json_and_http(
    client: Any, spec: ModelSpec, field: str, value: Any, reason: str, http: bool
) -> None:
    bad = {**GOOD, field: value}
    events = [GOOD, bad, GOOD]
    batch, rejects = Vectorizer(spec).transform_many(events)
    assert rejects == [(1, reason)] and batch.ids == [1, 1]
    batch, rejects = JsonDecoder(spec, Vectorizer(spec)).decode([orjson.dumps(e) for e in events])
    assert rejects == [(1, reason)] and batch.ids == [1, 1]
    if not http:
        return
    good = {k: v for k, v in GOOD.items() if k != "event_id"}
    r = client.post(f"/models/{spec.name}/predict",
                    json={"instances": [good, {**good, field: value}]})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "instances", 1] and err["msg"] == reason
    r = client.post(f"/models/{spec.name}/predict", json={"features": {**good, field: value}})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == reason


def test_the_bound_is_inclusive_everywhere(client: Any) -> None:
    edge = {**GOOD, "a": MAX_ABS_VALUE, "b": -(10**15)}
    batch, rejects = Vectorizer(SPEC).transform_many([edge])
    assert rejects == [] and batch.numeric[0, :2].tolist() == [1e15, -1e15]
    batch, rejects = JsonDecoder(SPEC, Vectorizer(SPEC)).decode([orjson.dumps(edge)])
    assert rejects == [] and batch.numeric[0, :2].tolist() == [1e15, -1e15]
    assert len(FeatureDecoder(SPEC).decode(encode_batch([edge], SPEC))) == 1
    r = client.post("/models/m/predict", json={"features": {"a": 1e15, "b": -1e15}})
    assert r.status_code == 200, r.text


def test_huge_python_ints_are_refused_not_raised() -> None:
    _, rejects = Vectorizer(SPEC).transform_many([{"a": 10**400}])
    assert rejects == [(0, "field 'a': magnitude must be at most 1e+15, "
                           "got an integer of about 401 digits")]


def test_bound_on_batch_records() -> None:
    from streamlearn.batch_format import Categorical, encode_columns

    dec = FeatureDecoder(SPEC)
    cols = {"a": np.array([1.0, 1e308, 2.0]), "b": np.zeros(3), "c": np.array([0, 0, -2e15]),
            "k": ["x", "y", "z"], "j": ["p", "q", "r"]}
    raw = encode_columns({k: v if isinstance(v, np.ndarray) else Categorical(np.arange(3), v)
                          for k, v in cols.items()})
    with pytest.raises(BatchFormatError,
                       match=r"numeric columns \['a', 'c'\] hold values of magnitude above 1e\+15"):
        dec.decode(raw)
    with pytest.raises(ValueError, match="'a': magnitude must be at most 1e\\+15"):
        encode_batch([{**GOOD, "a": 1e16}], SPEC)  # the encoder refuses it up front
    reg = encode_columns({"a": np.zeros(2), "k": Categorical(np.zeros(2, np.int64), ["x"]),
                          "y": np.array([1.0, 1e20], dtype=np.float32)})
    with pytest.raises(BatchFormatError, match="label column 'y' holds values of magnitude"):
        FeatureDecoder(REG).decode(reg)


# -- issue 9, item 8: one extreme but finite number must not disable a feature --------------


def _arrays(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    if isinstance(tree, list | tuple):
        return [a for v in tree for a in _arrays(v)]
    return [tree] if isinstance(tree, np.ndarray) and tree.dtype.kind == "f" else []


def test_replay_with_one_1e308_amount_keeps_the_model_and_its_state(fraud_spec) -> None:
    from streamlearn.batch_format import Categorical, encode_columns
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import Block, ModelRunner
    from streamlearn.prequential import roc_auc
    from streamlearn.synthetic import FraudStream

    events = FraudStream(seed=21, fraud_rate=0.05).take(6000)
    poisoned = [dict(e) for e in events]
    poisoned[1000]["amount"] = 1e308
    poisoned[3700]["amount"] = -1e300
    cols = {name: np.ones(4) for name in fraud_spec.numeric}
    cols["amount"] = np.array([1.0, 1e300, 2.0, 3.0])  # a batch record with one, too
    cols |= {name: Categorical(np.zeros(4, np.int64), ["x"]) for name in fraud_spec.categorical}
    bad_batch = encode_columns(cols)

    def replay(skip: tuple[int, ...] = ()) -> tuple[ModelRunner, list[str]]:
        runner, dead = ModelRunner(OnlineModel(fraud_spec, device="cpu")), []
        for start in range(0, len(poisoned), 500):
            values = [orjson.dumps(e) for i, e in enumerate(poisoned[start : start + 500], start)
                      if i not in skip]
            if start == 2000 and not skip:
                values.insert(0, bad_batch)
            out = runner.handle_blocks([Block("t", 0, list(range(len(values))), values)])
            dead += [d.reason for d in out.dead]
        return runner, dead

    hit, dead = replay()
    assert dead == [
        "field 'amount': magnitude must be at most 1e+15, got 1e+308",
        "bad batch record: numeric columns ['amount'] hold values of magnitude above 1e+15",
        "field 'amount': magnitude must be at most 1e+15, got -1e+300",
    ]
    # The same slices without the bad messages: the poisoned run learned exactly that.
    clean, dead = replay(skip=(1000, 3700))
    assert dead == []
    np.testing.assert_array_equal(hit.model.w, clean.model.w)
    np.testing.assert_array_equal(hit.model.scaler.m2, clean.model.scaler.m2)
    assert hit.model.scaler.finite
    for arr in _arrays(hit.model.to_state()):
        assert not np.isinf(arr).any()
    test = FraudStream(seed=22, fraud_rate=0.05).take(3000)
    batch, _ = hit.model.vectorizer.transform_many(test)
    assert roc_auc(batch.labels, hit.model.predict_many(batch)) > 0.9
    # the amount feature still carries signal: its standardized spread is ordinary
    assert 0.5 < hit.model.scaler.std[0] / np.nanstd([e.get("amount") or np.nan
                                                      for e in events]) < 2.0
