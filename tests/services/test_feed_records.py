"""The snapshot feed's record handling, without a broker: no record can stop it."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections import deque
from typing import Any

import orjson
import pytest

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.feed import SnapshotFeed
from streamlearn.serving import ModelStore, SnapshotPolicy
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                 numeric=("amount", "hour"), categorical=("country",), hash_bits=6)
KEY = "feed-test-key-0123456789abcdef!!"


@dataclasses.dataclass
class Msg:
    key: bytes | None
    value: bytes | None
    partition: int = 0
    offset: int = 0
    topic: str = "streamlearn.models"


def trained(n: int = 512, seed: int = 4) -> OnlineModel:
    model = OnlineModel(SPEC, device="cpu")
    events = FraudStream(seed=seed).take(n)
    for start in range(0, n, 128):
        batch, _ = model.vectorizer.transform_many(events[start : start + 128])
        model.process(batch)
    return model


def sign(state: dict[str, Any], key: str = "fraud/r1") -> bytes:
    return snapshots.sign(snapshots.encode(state), KEY, context=key)


def crafted(meta: bytes) -> bytes:
    body = zlib.compress(struct.pack("<I", len(meta)) + meta)
    return struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body


def hostile_records(model: OnlineModel) -> dict[str, Msg]:
    """One record of each kind an attacker (or a bug) can put on the models topic."""
    good = sign(model.to_state())
    zeros = zlib.compressobj(9)
    meta = orjson.dumps({"kind": "streamlearn.model", "spec": SPEC.to_dict()})
    body = zeros.compress(struct.pack("<I", len(meta)) + meta) + b"".join(
        zeros.compress(bytes(1 << 20)) for _ in range(64)) + zeros.flush()
    bomb = struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body
    other = dataclasses.replace(SPEC, hash_bits=3)
    return {
        "keyless": Msg(None, good),
        "tombstone": Msg(b"fraud/r1", None),
        "unsigned forgery": Msg(b"fraud/evil", snapshots.encode(
            model.to_state() | {"version": 10**12})),
        "wrong key": Msg(b"fraud/evil", snapshots.sign(good[38:], "y" * 32,
                                                       context="fraud/evil")),
        "replayed": Msg(b"fraud/r2", good),
        "58-byte KeyError": Msg(b"fraud/r1", snapshots.sign(
            crafted(orjson.dumps({"spec": SPEC.to_dict(), "w": {"__nd__": {}}})), KEY,
            context="fraud/r1")),
        "truncated": Msg(b"fraud/r1", good[: len(good) // 2]),
        "oversized": Msg(b"fraud/r1", good + bytes(300_000)),
        "bomb": Msg(b"fraud/r1", snapshots.sign(bomb, KEY, context="fraud/r1")),
        "other spec": Msg(b"fraud/r3", sign(OnlineModel(other, device="cpu").to_state()
                                             | {"version": 10**12}, "fraud/r3")),
        "bad key": Msg(b"\xff\xfe/r1", good),
        "non-finite": Msg(b"fraud/r1", sign(model.to_state() | {"updated_at": float("inf")})),
    }


@pytest.fixture
def store() -> ModelStore:
    limits = snapshots.Limits(max_payload_bytes=256 * 1024)
    return ModelStore(policy=SnapshotPolicy(key=KEY, specs={"fraud": SPEC}, limits=limits))


def test_every_hostile_record_is_rejected_counted_and_the_model_kept(store: ModelStore) -> None:
    model = trained()
    feed = SnapshotFeed("127.0.0.1:9", store)
    screened = feed._screen([Msg(b"fraud/r1", sign(model.to_state()))])
    feed._offer_all({k: deque([v]) for k, v in screened})
    served = store.get("fraud")
    assert served is not None and served.version == model.version
    for name, msg in hostile_records(model).items():
        before = store.stats.rejected
        screened = feed._screen([msg])
        feed._offer_all({k: deque([v]) for k, v in screened})
        assert store.stats.rejected == before + 1, name
        assert store.get("fraud") is served, name
    reasons = store.stats.rejected_by_reason
    assert reasons == {"no_key": 1, "tombstone": 1, "unsigned": 1,
                       "bad_signature": 3,  # wrong key, replayed, truncated
                       "bad_array": 1, "too_large": 2, "spec_mismatch": 1, "bad_key": 1,
                       "invalid_state": 1}
    assert feed.rejected == store.stats.rejected


def test_a_rejected_newest_value_falls_back_to_the_one_before(store: ModelStore) -> None:
    old, new = trained(256), trained(512)
    feed = SnapshotFeed("127.0.0.1:9", store)
    broken = sign(new.to_state() | {"weights": {"w": [1.0]}})  # authentic but invalid
    feed._offer_all({"fraud/r1": deque([sign(old.to_state()), broken])})
    served = store.get("fraud")
    assert served is not None and served.version == old.version
    assert store.stats.rejected_by_reason == {"invalid_state": 1}


def test_a_store_that_raises_does_not_stop_the_feed(store: ModelStore,
                                                    monkeypatch: Any) -> None:
    feed = SnapshotFeed("127.0.0.1:9", store)

    def explode(key: str, value: bytes | None) -> str:
        raise MemoryError("simulated")

    monkeypatch.setattr(store, "submit", explode)
    feed._offer_all({"fraud/r1": deque([b"x"])})
    assert store.stats.rejected_by_reason == {"internal_error": 1}
    monkeypatch.setattr(store, "screen", explode)
    assert feed._screen([Msg(b"fraud/r1", b"x")]) == []
    assert store.stats.rejected_by_reason == {"internal_error": 2}
