"""Background feed of model snapshots from Kafka into the :class:`ModelStore`.

The embedded broker never compacts, so ``streamlearn.models`` holds every
snapshot ever published.  The feed therefore keeps only the latest value per
key and decodes nothing until it has caught up with the log end (or a short
deadline passes), so start-up costs one decode per replica, not one per
historical snapshot.  Decoding and building a model run in a worker thread,
so the event loop keeps serving requests: their cost follows the model size
(about 9 ms for ``hash_bits=18``), not the payload size, since mostly-zero
weights travel sparse.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from streamlearn import snapshots
from streamlearn.serving import ModelStore

log = logging.getLogger(__name__)

MODELS_TOPIC = "streamlearn.models"


class SnapshotFeed:
    """Consume ``streamlearn.models`` from the beginning and offer snapshots to ``store``.

    No consumer group: every API process reads every replica's snapshots.
    Broker errors are logged and retried with capped exponential backoff.
    """

    def __init__(
        self,
        bootstrap: str,
        store: ModelStore,
        *,
        topic: str = MODELS_TOPIC,
        max_defer_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.5, 10.0),
        poll_timeout_ms: int = 500,
    ) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.topic = topic
        self.max_defer_s = max_defer_s
        self.backoff_s = backoff_s
        self.poll_timeout_ms = poll_timeout_ms
        self.state = "idle"
        self.messages = 0
        self.superseded = 0
        self.keyless = 0
        self.offered = 0
        self.errors = 0
        self.last_error = ""
        self.caught_up = False
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """JSON-ready counters for /readyz and /models/{name}."""
        return {
            "state": self.state, "bootstrap": self.bootstrap, "topic": self.topic,
            "caught_up": self.caught_up, "messages": self.messages,
            "superseded": self.superseded, "keyless": self.keyless, "offered": self.offered,
            "errors": self.errors, "last_error": self.last_error,
        }

    def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="snapshot-feed")

    async def stop(self) -> None:
        """Cancel the task and wait for the consumer to close."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.state = "stopped"

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        while True:
            consumer = self._consumer()
            try:
                self.state = "connecting"
                await consumer.start()
                self.state = "running"
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, KafkaError, OSError) as exc:
                self.errors += 1
                text = str(exc)
                name = type(exc).__name__
                self.last_error = text if text.startswith(name) else f"{name}: {text}"
                self.state = "retrying"
                log.warning("snapshot feed from %s failed (%s); retrying in %.1fs",
                            self.bootstrap, self.last_error, delay)
            finally:
                await _close(consumer)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_s[1])

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="streamlearn-api",
            max_partition_fetch_bytes=32 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            metadata_max_age_ms=5000,  # notice the topic soon after a worker creates it
        )

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        pending: dict[str, bytes | None] = {}
        pending_since = 0.0
        while True:
            batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
            for messages in batches.values():
                for msg in messages:
                    self.messages += 1
                    if msg.key is None:
                        self.keyless += 1
                        log.warning("skipping a snapshot message without a key at %s:%d@%d",
                                    msg.topic, msg.partition, msg.offset)
                        continue
                    key = msg.key.decode("utf-8", errors="replace")
                    if key in pending:
                        self.superseded += 1
                    elif not pending:
                        pending_since = time.monotonic()
                    pending[key] = msg.value
            if not pending:
                self.caught_up = self.caught_up or await _at_end(consumer)
                continue
            at_end = await _at_end(consumer)
            if at_end or time.monotonic() - pending_since > self.max_defer_s:
                self.caught_up = self.caught_up or at_end
                batch, pending = pending, {}
                await self._offer_all(batch)

    async def _offer_all(self, latest: dict[str, bytes | None]) -> None:
        for key, value in latest.items():
            if value is None:  # tombstone: the replica is gone
                await asyncio.to_thread(self.store.remove, key)
            else:
                await asyncio.to_thread(self.store.offer, key, value)
            self.offered += 1


async def _at_end(consumer: AIOKafkaConsumer) -> bool:
    """True when every assigned partition's position has reached its high watermark."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            return False
    return True


async def _close(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except Exception as exc:  # noqa: BLE001 - closing must not mask the original error
        log.debug("closing the snapshot consumer failed: %s", exc)


def load_snapshot_dir(path: str | Path, store: ModelStore) -> int:
    """Offer every snapshot file under ``path`` (a local checkpoint); return how many loaded.

    Files that do not decode are skipped with a warning.  Keys are built from the
    state (``<model>/<replica>``; the file stem when the state names no replica).
    """
    root = Path(path)
    if not root.is_dir():
        return 0
    loaded = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            payload = file.read_bytes()
            state = snapshots.decode(payload)
            name = state["spec"]["name"]
        except (OSError, snapshots.SnapshotError, KeyError, TypeError) as exc:
            log.warning("skipping snapshot file %s: %s", file, exc)
            continue
        replica = str(state.get("replica") or file.stem)
        key = f"{name}/{replica}"
        if store.offer_state(key, state, crc=zlib.crc32(payload), size=len(payload)):
            loaded += 1
    return loaded
