"""Hypothesis fuzz of decode -> validate -> learn -> predict (issue 9).

Whatever a message holds, it ends in the model (scored, with a prediction record that
can be written) or in the dead-letter list (with a record under the producer's limit),
and the good events around it are learned as if it were not there.
"""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlearn.batch_format import encode_batch
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import ModelRunner, Outcome, Record
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(name="fuzz", topic="t", label="is_fraud", numeric=("amount", "hour"),
                 categorical=("country",), hash_bits=8, batch_size=16)
PRODUCER_LIMIT = 16 * 1024 * 1024
GOOD = [orjson.dumps({k: e[k] for k in ("event_id", "amount", "hour", "country", "is_fraud")
                      if k in e})
        for e in FraudStream(seed=3, label_fraction=1.0, missing_rate=0.0).take(40)]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]),
    st.text(max_size=40), st.text(min_size=300, max_size=2000))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


events = st.fixed_dictionaries(
    {}, optional={"event_id": values, "amount": values, "hour": values, "country": values,
                  "is_fraud": values})


@st.composite
def messages(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["event", "bytes", "json", "null", "nonfinite", "deep",
                                 "batch"]))
    if kind == "event":
        return orjson.dumps(draw(events))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return orjson.dumps(draw(values))
    if kind == "null":
        return None
    if kind == "deep":  # orjson reads 1,024 levels but writes only 254
        depth = draw(st.integers(250, 1100))
        field = draw(st.sampled_from([b"event_id", b"amount", b"country", b"extra"]))
        return b'{"%s": %s%s, "amount": 2.0, "is_fraud": 0}' % (field, b"[" * depth,
                                                                 b"]" * depth)
    if kind == "nonfinite":  # what orjson cannot write but other producers can
        field = draw(st.sampled_from(["amount", "hour", "is_fraud", "event_id"]))
        return b'{"%s": %s, "amount": 1}' % (field.encode(), draw(st.sampled_from(
            [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"[" * 1100])))
    rows = draw(st.lists(events, min_size=1, max_size=4))
    try:
        payload = encode_batch(rows, SPEC)
    except (ValueError, TypeError, OverflowError):  # the encoder refused: send raw bytes
        return repr(rows).encode()[:1000]
    cut = draw(st.integers(0, len(payload)))
    return payload if draw(st.booleans()) else payload[:cut]


def _accounted(runner: ModelRunner, recs: list[Record]) -> Outcome:
    out = runner.handle(recs)
    dead = {d.record.offset for d in out.dead}
    assert len(dead) == len(out.dead)
    for d in out.dead:
        assert len(d.encode(SPEC.name)) < PRODUCER_LIMIT
    for p in out.predictions:  # every record written, and its score a probability
        if p[:1] == b"{":
            score = orjson.loads(p)["score"]
            assert math.isnan(score) or 0.0 <= score <= 1.0
    return out


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=6), st.integers(0, 40))
def test_every_message_ends_in_the_model_or_the_dead_letters(bad, at):
    runner = ModelRunner(OnlineModel(SPEC, device="cpu"))
    mixed = GOOD[:at] + bad + GOOD[at:]
    recs = [Record(v, "t", 0, i) for i, v in enumerate(mixed)]
    out = _accounted(runner, recs)
    good_offsets = set(range(at)) | set(range(at + len(bad), len(mixed)))
    assert not good_offsets & {d.record.offset for d in out.dead}  # the good ones all learned
    assert runner.model.n_learned >= len(GOOD)
    # Nothing is lost: every event (a batch record's rows, or the record when rejected
    # whole) is scored or dead-lettered.
    t = runner.telemetry
    assert t.messages == len(mixed) and out.scored + len(out.dead) == t.consumed


@pytest.mark.parametrize("size", [12 * 1024 * 1024 + 1, 20 * 1024 * 1024])
def test_oversized_garbage_between_good_events(size):
    runner = ModelRunner(OnlineModel(SPEC, device="cpu"))
    recs = [Record(v, "t", 1, i) for i, v in enumerate(GOOD[:5] + [b"\x01" * size] + GOOD[5:])]
    out = _accounted(runner, recs)
    assert [d.record.offset for d in out.dead] == [5]
    assert out.learned == len(GOOD)
