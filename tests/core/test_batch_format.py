"""Batch records: round trip, schema checks, and malformed payloads (pure, no Kafka)."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from streamlearn.batch_format import (
    FORMAT_VERSION,
    MAGIC,
    BatchFormatError,
    Categorical,
    FeatureDecoder,
    decode_batch,
    encode_batch,
    encode_columns,
    is_batch,
)
from streamlearn.config import ModelSpec
from streamlearn.features import Vectorizer
from streamlearn.synthetic import FraudStream


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.numeric, b.numeric)
    np.testing.assert_array_equal(a.hashed, b.hashed)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert list(a.ids) == list(b.ids)


@pytest.fixture
def events() -> list[dict]:
    evs = FraudStream(seed=5, label_fraction=0.7, missing_rate=0.1).take(500)
    evs[3]["country"] = None  # explicit null: the vectorizer's "missing" slot
    del evs[4]["channel"]  # absent field: same slot
    evs[5]["merchant_category"] = 17  # integers are categorical values too
    return evs


@pytest.mark.parametrize("categorical", ["dict", "crc32"])
def test_round_trip_matches_the_json_vectorizer(fraud_spec, events, categorical):
    payload = encode_batch(events, fraud_spec, categorical=categorical, meta={"src": "t"})
    assert is_batch(payload) and not is_batch(orjson.dumps(events[0]))
    record = decode_batch(payload)
    assert record.n == len(events) and record.meta == {"src": "t"}
    got = FeatureDecoder(fraud_spec).features(record)
    want, rejects = Vectorizer(fraud_spec).transform_many(events)
    assert rejects == []
    _same(got, want)


def test_columns_with_categoricals_and_integer_ids(fraud_spec):
    codes = np.array([0, 1, -1, 1], dtype=np.int64)
    cols = {
        "event_id": np.arange(4, dtype=np.int64),
        "amount": np.array([1.0, np.nan, 3.0, 4.0]),
        "hour": np.arange(4, dtype=np.float32),
        "distance_km": np.zeros(4), "card_age_days": np.ones(4), "tx_last_hour": np.ones(4),
        "merchant_category": Categorical(codes, ["fuel", "hotel"]),
        "country": ["FR", "DE", None, "FR"],
        "channel": Categorical(np.zeros(4, dtype=np.int8), ["pos"]),
        "is_fraud": np.array([0, 1, np.nan, 0], dtype=np.float32),
    }
    batch = FeatureDecoder(fraud_spec).decode(encode_batch(cols, fraud_spec))
    assert batch.ids.dtype == np.int64 and batch.ids.tolist() == [0, 1, 2, 3]
    vec = Vectorizer(fraud_spec)
    j = fraud_spec.categorical.index("merchant_category")
    assert batch.hashed[:, j].tolist() == [vec.slot("merchant_category", "fuel"),
                                           vec.slot("merchant_category", "hotel"),
                                           vec.slot("merchant_category", "\x00missing"),
                                           vec.slot("merchant_category", "hotel")]
    assert np.isnan(batch.numeric[1, 0]) and np.isnan(batch.labels[2])


def test_spec_free_decoding_of_other_columns():
    payload = encode_columns({"id": ["a", "b"], "score": np.array([0.5, 0.25], np.float32)},
                             meta={"model": "m"})
    record = decode_batch(payload)
    assert record.columns["id"].values == ["a", "b"]
    assert record.columns["score"].data.tolist() == [0.5, 0.25]
    assert record.meta == {"model": "m"}


def test_empty_batch(fraud_spec):
    batch = FeatureDecoder(fraud_spec).decode(encode_batch([], fraud_spec))
    assert len(batch) == 0 and batch.numeric.shape == (0, fraud_spec.n_numeric)


def test_encoder_refuses_what_the_worker_would_reject(fraud_spec, events):
    events[0]["amount"] = "lots"
    with pytest.raises(ValueError, match="'amount': expected a number"):
        encode_batch(events, fraud_spec)
    events[0]["amount"] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        encode_batch(events, fraud_spec)


def _payload(spec: ModelSpec) -> bytes:
    return encode_batch(FraudStream(seed=1).take(64), spec)


def _rebuild(payload: bytes, edit) -> bytes:
    """Re-frame ``payload`` with its header edited by ``edit(header)``."""
    (header_len,) = struct.unpack_from("<I", payload, 8)
    header = orjson.loads(payload[12 : 12 + header_len])
    data_start = (12 + header_len + 7) // 8 * 8
    edit(header)
    new = orjson.dumps(header)
    prefix = payload[:8] + struct.pack("<I", len(new)) + new
    return prefix + b"\0" * ((8 - len(prefix) % 8) % 8) + payload[data_start:]


def _column(name: str):
    def find(header):
        return next(c for c in header["columns"] if c["name"] == name)
    return find


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda h: h["columns"].remove(_column("amount")(h)),
         "missing feature columns ['amount']"),
        (lambda h: _column("amount")(h).update(dtype="<i8"), "numeric column 'amount' has dtype"),
        (lambda h: _column("country")(h).pop("values"), "must be dictionary-encoded"),
        (lambda h: _column("is_fraud")(h).update(dtype="<i4", nbytes=256),
         "label column 'is_fraud' has dtype"),
        (lambda h: _column("amount")(h).update(dtype="<f9"), "unknown dtype"),
        (lambda h: _column("amount")(h).update(nbytes=8), "8 bytes for 64 rows of <f8"),
        (lambda h: h["columns"].append(dict(_column("amount")(h))), "appears twice"),
        (lambda h: _column("country")(h).update(values=["FR"]), "codes outside"),
        (lambda h: _column("country")(h).update(values=[1.5] * 14), "strings or integers"),
        (lambda h: h.update(n=-1), "non-negative integer"),
    ],
)
def test_schema_mismatch_is_rejected_with_its_reason(fraud_spec, edit, reason):
    payload = _rebuild(_payload(fraud_spec), edit)
    with pytest.raises(BatchFormatError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        FeatureDecoder(fraud_spec).decode(payload)


def test_bad_values_are_rejected(fraud_spec):
    cols = {name: np.zeros(3) for name in fraud_spec.numeric}
    cols |= {name: ["a", "b", "c"] for name in fraud_spec.categorical}
    cols["is_fraud"] = np.array([0.0, 2.0, 1.0], dtype=np.float32)
    with pytest.raises(BatchFormatError, match="labels must be 0, 1 or NaN"):
        FeatureDecoder(fraud_spec).decode(encode_columns(
            {k: v if isinstance(v, np.ndarray) else Categorical(np.arange(3), v)
             for k, v in cols.items()}))
    cols["is_fraud"] = np.zeros(3, dtype=np.float32)
    cols["amount"] = np.array([1.0, np.inf, 0.0])
    with pytest.raises(BatchFormatError, match=r"\['amount'\] hold infinite values"):
        FeatureDecoder(fraud_spec).decode(encode_columns(
            {k: v if isinstance(v, np.ndarray) else Categorical(np.arange(3), v)
             for k, v in cols.items()}))


def test_truncated_payloads_are_rejected_at_every_length(fraud_spec):
    payload = _payload(fraud_spec)
    decoder = FeatureDecoder(fraud_spec)
    for cut in [0, 3, 11, 12, 40, len(payload) // 2, len(payload) - 1]:
        with pytest.raises(BatchFormatError):
            decoder.decode(payload[:cut])


def test_wrong_magic_and_version(fraud_spec):
    payload = _payload(fraud_spec)
    with pytest.raises(BatchFormatError, match="bad magic"):
        decode_batch(b"\xffSLX" + payload[4:])
    newer = payload[:4] + struct.pack("<H", FORMAT_VERSION + 1) + payload[6:]
    with pytest.raises(BatchFormatError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        decode_batch(newer)
    with pytest.raises(BatchFormatError, match="not valid JSON"):
        decode_batch(MAGIC + struct.pack("<HHI", FORMAT_VERSION, 0, 3) + b"{x}")


def test_random_corruption_only_ever_raises_batch_format_error(fraud_spec):
    payload = bytearray(_payload(fraud_spec))
    rng = np.random.default_rng(0)
    decoder = FeatureDecoder(fraud_spec)
    for _ in range(300):
        bad = bytearray(payload)
        for pos in rng.integers(0, 400, size=3):  # mostly the prefix and header
            bad[pos] = rng.integers(0, 256)
        try:
            decoder.decode(bytes(bad))
        except BatchFormatError:
            pass


def test_synthetic_producer_columns_fit_the_fraud_spec(fraud_spec):
    from streamlearn.services.producer import synthetic_columns

    batch = FeatureDecoder(fraud_spec).decode(
        encode_columns(synthetic_columns(FraudStream(seed=2), 300)))
    assert len(batch) == 300 and batch.ids.tolist() == list(range(300))
    assert np.isnan(batch.numeric).any()  # ~0.5% of distances are missing, as in JSON
    assert set(np.unique(batch.labels[~np.isnan(batch.labels)])) <= {0.0, 1.0}


def test_batch_records_feed_aggregates_like_json_events() -> None:
    """A model with aggregates learns a batch record's events with the same aggregate
    values as the same events in JSON; a record without the time column is refused."""
    from streamlearn.batch_format import Categorical, FeatureDecoder, encode_columns
    from streamlearn.config import AggregateSpec
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import JsonDecoder

    spec = ModelSpec(name="agg", topic="t", numeric=("amount",), label="y", hash_bits=4,
                     aggregates=(AggregateSpec("card", "amount", ("1m", "1h")),))
    rng = np.random.default_rng(4)
    n = 300
    cards = rng.integers(0, 20, n)
    amount = rng.lognormal(3, 1, n).round(2)
    ts = 1_000.0 + np.cumsum(rng.exponential(5.0, n))
    names = [f"c{i}" for i in range(20)]
    record = encode_columns({"card": Categorical(cards, names), "amount": amount, "ts": ts,
                             "y": (amount > 30).astype(np.float32)})
    events = [orjson.dumps({"card": names[c], "amount": a, "ts": t, "y": int(a > 30)})
              for c, a, t in zip(cards.tolist(), amount.tolist(), ts.tolist(), strict=True)]
    by_record = OnlineModel(spec, device="cpu")
    by_json = OnlineModel(spec, device="cpu")
    a = FeatureDecoder(spec, by_record.vectorizer).decode(record)
    b, rejects = JsonDecoder(spec, by_json.vectorizer).decode(events)
    assert not rejects
    by_record.fill_aggregates(a, update=True)
    by_json.fill_aggregates(b, update=True)
    np.testing.assert_array_equal(a.numeric, b.numeric)
    assert a.numeric[:, 1:].max() > 1  # cards repeat within the windows
    with pytest.raises(BatchFormatError, match=r"need columns \['ts'\]"):
        FeatureDecoder(spec, by_record.vectorizer).decode(
            encode_columns({"card": Categorical(cards, names), "amount": amount}))


@pytest.mark.parametrize("column", ["country", "card"])
@pytest.mark.parametrize("value", [[1], {"a": 1}, True])
def test_dictionary_values_that_are_not_keys_dead_letter_the_record(column, value):
    """A list or object in a categorical's or an entity's dictionary used to escape the
    runner as a TypeError (which stops the worker); a bool passed as an entity key."""
    from streamlearn.config import AggregateSpec
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner, Record

    spec = ModelSpec(name="agg", topic="t", numeric=("amount",), categorical=("country",),
                     label="y", hash_bits=4,
                     aggregates=(AggregateSpec("card", "amount", ("1m", "1h")),))
    cols = {"country": Categorical(np.array([0, 1]), ["FR", "DE"]),
            "card": Categorical(np.array([0, 1]), ["c1", "c2"]),
            "amount": np.array([1.0, 2.0]), "ts": np.array([1.0, 2.0]),
            "y": np.array([1.0, 0.0], dtype=np.float32)}
    cols[column] = Categorical(np.array([0, 1]), ["x", value])
    good = orjson.dumps({"amount": 3.0, "country": "FR", "card": "c1", "ts": 3.0, "y": 1})
    runner = ModelRunner(OnlineModel(spec, device="cpu"))
    out = runner.handle([Record(v, "t", 0, i) for i, v in
                         enumerate([good, encode_columns(cols), good])])
    assert [d.record.offset for d in out.dead] == [1]
    assert "dictionary values must be strings or integers" in out.dead[0].reason
    assert out.learned == 2


def test_the_dictionary_cache_does_not_keep_long_values(fraud_spec):
    """Each record's dictionary was kept, 1,024 records' worth, whatever its size."""
    import gc
    import tracemalloc

    decoder = FeatureDecoder(fraud_spec)
    cols = {name: np.zeros(2) for name in fraud_spec.numeric}
    tracemalloc.start()
    try:
        for i in range(20):
            cats = {name: Categorical(np.array([0, 1]), ["a", f"{i}" + "x" * 100_000])
                    for name in fraud_spec.categorical}
            decoder.decode(encode_columns(cols | cats))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1_000_000  # 20 records of 3 x 100 KB values: 6 MB kept before
    for i in range(20):  # nor short values past _TABLE_VALUES in all (100,000 here)
        words = [f"{i}-{j}" for j in range(5000)]
        cats = {name: Categorical(np.array([0, 1]), words) for name in fraud_spec.categorical}
        decoder.decode(encode_columns(cols | cats))
    assert sum(len(values) for _, values in decoder._tables) <= 1 << 16
