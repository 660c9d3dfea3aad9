"""One model's per-batch step, from raw Kafka values to output records, without I/O.

The worker feeds it mini-batches of ``Record`` and sends what it returns:
prediction records and dead letters.  Keeping this pure lets the whole
decode/validate/score/learn path be tested without a broker.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

from streamlearn.models import OnlineModel

#: Learn-latency histogram bounds in seconds, shared with the Prometheus metrics.
LEARN_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


class Record(NamedTuple):
    """One consumed Kafka message."""

    value: bytes | None
    topic: str
    partition: int
    offset: int


class DeadLetter(NamedTuple):
    """A rejected message and why."""

    record: Record
    reason: str

    def encode(self, model: str) -> bytes:
        """JSON envelope that keeps the original bytes exactly (base64)."""
        value = self.record.value or b""
        return orjson.dumps({
            "model": model,
            "reason": self.reason,
            "source": {"topic": self.record.topic, "partition": self.record.partition,
                       "offset": self.record.offset},
            "value_b64": base64.b64encode(value).decode(),
        })


@dataclass
class Outcome:
    """What one batch produced."""

    predictions: list[bytes] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    scored: int = 0
    learned: int = 0
    learn_seconds: float = 0.0


@dataclass
class Telemetry:
    """Cumulative worker counters shipped inside snapshots (the API exports them)."""

    consumed: int = 0
    scored: int = 0
    learned: int = 0
    deadlettered: int = 0
    learn_counts: list[int] = field(default_factory=lambda: [0] * len(LEARN_BUCKETS))
    learn_sum: float = 0.0
    learn_count: int = 0

    def observe_learn(self, seconds: float) -> None:
        """Add one batch learn latency to the cumulative histogram."""
        for i, le in enumerate(LEARN_BUCKETS):
            if seconds <= le:
                self.learn_counts[i] += 1
        self.learn_sum += seconds
        self.learn_count += 1

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's ``telemetry`` entry."""
        return {
            "consumed": self.consumed, "scored": self.scored, "learned": self.learned,
            "deadlettered": self.deadlettered,
            "learn_seconds": {"le": list(LEARN_BUCKETS), "counts": list(self.learn_counts),
                              "sum": self.learn_sum, "count": self.learn_count},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Telemetry:
        """Resume counters from a snapshot (defaults for missing fields)."""
        t = cls(**{k: int(d.get(k, 0)) for k in ("consumed", "scored", "learned", "deadlettered")})
        ls = d.get("learn_seconds") or {}
        if list(ls.get("le", [])) == list(LEARN_BUCKETS):
            t.learn_counts = [int(c) for c in ls["counts"]]
            t.learn_sum, t.learn_count = float(ls["sum"]), int(ls["count"])
        return t


def decode_events(records: Sequence[Record]) -> tuple[list[Any], list[Record], list[DeadLetter]]:
    """Parse JSON values; undecodable ones become dead letters."""
    events: list[Any] = []
    kept: list[Record] = []
    dead: list[DeadLetter] = []
    loads = orjson.loads
    for rec in records:
        if not rec.value:
            dead.append(DeadLetter(rec, "empty message"))
            continue
        try:
            events.append(loads(rec.value))
        except orjson.JSONDecodeError as exc:
            dead.append(DeadLetter(rec, f"not valid JSON: {exc}"))
            continue
        kept.append(rec)
    return events, kept, dead


class ModelRunner:
    """Prequential processing of raw records for one model.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", hash_bits=4)
    >>> runner = ModelRunner(OnlineModel(spec, device="cpu"))
    >>> recs = [Record(b'{"event_id": 1, "x": 2.0, "y": 1}', "t", 0, 10),
    ...         Record(b'{"event_id": 2, "x": "two"}', "t", 0, 11),
    ...         Record(b'not json', "t", 1, 5)]
    >>> out = runner.handle(recs)
    >>> out.scored, out.learned, [d.reason[:24] for d in out.dead]
    (1, 1, ['not valid JSON: invalid ', "field 'x': expected a nu"])
    >>> runner.model.offsets
    {'t:0': 12, 't:1': 6}
    >>> sorted(orjson.loads(out.predictions[0]))
    ['id', 'model', 'score', 'version']
    """

    def __init__(self, model: OnlineModel, telemetry: Telemetry | None = None,
                 emit_predictions: bool = True) -> None:
        self.model = model
        self.telemetry = telemetry or Telemetry()
        self.emit_predictions = emit_predictions

    def handle(self, records: Sequence[Record]) -> Outcome:
        """Decode, validate, score every valid event, learn from the labelled ones."""
        out = Outcome()
        events, kept, out.dead = decode_events(records)
        batch, rejects = self.model.vectorizer.transform_many(events)
        out.dead.extend(DeadLetter(kept[i], reason) for i, reason in rejects)
        if len(batch):
            version_before = self.model.version
            t0 = time.perf_counter()
            scores = self.model.process(batch)
            out.learn_seconds = time.perf_counter() - t0
            out.scored = len(batch)
            out.learned = int(batch.has_label.sum())
            if self.emit_predictions:
                out.predictions = _prediction_records(
                    batch.ids, scores, self.model.spec.name, version_before
                )
            if out.learned:
                self.telemetry.observe_learn(out.learn_seconds)
        self._advance_offsets(records)
        t = self.telemetry
        t.consumed += len(records)
        t.scored += out.scored
        t.learned += out.learned
        t.deadlettered += len(out.dead)
        return out

    def _advance_offsets(self, records: Sequence[Record]) -> None:
        offsets = self.model.offsets
        for rec in records:
            key = f"{rec.topic}:{rec.partition}"
            if rec.offset + 1 > offsets.get(key, -1):
                offsets[key] = rec.offset + 1

    def snapshot_state(self, replica: str) -> dict[str, Any]:
        """Model state plus replica id and telemetry, ready for ``snapshots.encode``."""
        state = self.model.to_state()
        state["replica"] = replica
        state["telemetry"] = self.telemetry.to_dict()
        return state


def _prediction_records(ids: list[Any], scores: np.ndarray, model: str, version: int) -> list[bytes]:
    dumps = orjson.dumps
    return [
        dumps({"id": i, "model": model, "version": version, "score": s})
        for i, s in zip(ids, scores.tolist(), strict=True)
    ]
