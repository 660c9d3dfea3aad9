"""Where a worker's model resumes from: the local checkpoint or the models topic.

A lost local checkpoint (a new container, a wiped volume) used to reset the model: a
fresh replica with the same id replaced a model that had learned 900,500 events with
one that had learned 30,000.  At start the worker now also reads ``streamlearn.models``
to its end and resumes from the newest snapshot of each model there when the local
checkpoint is missing or older: this replica's own snapshot first, else the one that
has learned the most (a warm start from a sibling replica).

Snapshots on the topic are untrusted input: every candidate goes through
:func:`streamlearn.snapshots.decode` (size limits before allocation; the signature
when a key is configured) and must carry the same model spec, or it is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from streamlearn import snapshots

log = logging.getLogger("streamlearn.worker")

#: Longest the start-up read of the models topic may take before the worker goes on.
RESTORE_READ_TIMEOUT_S = 20.0


@dataclass
class Candidate:
    """One decoded snapshot a model could resume from."""

    source: str  # "local" or "topic <key>"
    replica: str
    state: dict[str, Any]

    @property
    def rank(self) -> tuple[int, int]:
        """Newer means more events learned, then a higher version."""
        return int(self.state.get("n_learned", 0)), int(self.state.get("version", 0))


async def read_latest(bootstrap: str, topic: str, models: Iterable[str],
                      client_kwargs: dict[str, Any] | None = None,
                      timeout_s: float = RESTORE_READ_TIMEOUT_S) -> dict[str, bytes]:
    """The last value of each ``<model>/<replica>`` key of ``models`` on ``topic``.

    Reads every partition from its beginning to its end (a compacted Kafka keeps
    little; Tansu keeps all), within ``timeout_s``; a tombstone removes its key.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    wanted = set(models)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                request_timeout_ms=int(timeout_s * 1000),
                                **(client_kwargs or {}))
    latest: dict[str, bytes] = {}
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return latest
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                           or ())]
        if not tps:
            return latest
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            batches = await consumer.getmany(*todo, timeout_ms=200, max_records=5000)
            for msgs in batches.values():
                for m in msgs:
                    if m.key is None:
                        continue
                    key = m.key.decode("utf-8", "replace")
                    if key.partition("/")[0] not in wanted:
                        continue
                    if m.value is None:
                        latest.pop(key, None)
                    else:
                        latest[key] = m.value
            for tp in list(todo):
                # Tansu 0.6 answers ListOffsets with too small an end (1 for a partition of
                # 10 records sent in one batch, measured); a fetch's high watermark is right.
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= max(end[tp], high):
                    todo.discard(tp)
        if todo:
            log.warning("read %s for %.0f s without reaching its end; restoring from what "
                        "was read", topic, timeout_s)
    finally:
        await consumer.stop()
    return latest


def topic_candidates(model: str, latest: dict[str, bytes],
                     decode: Callable[[bytes, str], dict[str, Any]]) -> list[Candidate]:
    """Decoded snapshots of ``model`` from :func:`read_latest` (bad ones logged, skipped).

    ``decode(payload, kafka_key)`` must validate (``streamlearn.snapshots.decode``).
    """
    out = []
    for key, payload in latest.items():
        name, _, replica = key.partition("/")
        if name != model:
            continue
        try:
            state = decode(payload, key)
        except (snapshots.SnapshotError, ValueError) as exc:
            log.warning("skipping snapshot %s on the models topic: %s", key, exc)
            continue
        out.append(Candidate(f"topic key {key}", replica, state))
    return out


def choose(local: Candidate | None, remote: list[Candidate], replica: str) -> Candidate | None:
    """The snapshot to resume from: this replica's newest, else the most learned overall.

    The local checkpoint wins ties (it is what this replica last saved).

    Examples
    --------
    >>> c = lambda src, rep, n: Candidate(src, rep, {"n_learned": n, "version": n})
    >>> choose(c("local", "r0", 10), [c("topic", "r0", 900)], "r0").source
    'topic'
    >>> choose(c("local", "r0", 900), [c("topic", "r0", 900)], "r0").source
    'local'
    >>> choose(None, [c("a", "r1", 5), c("b", "r2", 7)], "r0").source
    'b'
    >>> choose(None, [c("a", "r0", 5), c("b", "r2", 7)], "r0").source
    'a'
    """
    own = [c for c in remote if c.replica == replica]
    pool = own or remote
    best = max(pool, key=lambda c: c.rank, default=None)
    if local is None:
        return best
    if best is not None and best.rank > local.rank:
        return best
    return local


def read_latest_blocking(bootstrap: str, topic: str, models: Iterable[str],
                         client_kwargs: dict[str, Any] | None = None,
                         timeout_s: float = RESTORE_READ_TIMEOUT_S) -> dict[str, bytes]:
    """:func:`read_latest` from a thread without an event loop (the model-loading thread)."""
    try:
        return asyncio.run(read_latest(bootstrap, topic, models, client_kwargs, timeout_s))
    except Exception as exc:  # noqa: BLE001 - the local checkpoint still works
        log.warning("could not read %s for snapshots at start (%s: %s); using the local "
                    "checkpoint only", topic, type(exc).__name__, exc)
        return {}
