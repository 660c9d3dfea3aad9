"""Replicas that train as one model: the worker's side of :mod:`streamlearn.replicas`.

Every replica ships its shard (``<model>/<replica>``) on the models topic as before,
tagged with the merged model it is based on (:class:`Lineage`). :class:`ShardFeed` follows
that topic. The :class:`MergeLoop`

1. adopts the newest merged model (``<model>/@merged``) within ``ADOPT_POLL_S`` of its
   arrival when it is newer than its base, on the learner thread (the only thread that
   touches model state), rebasing its own un-merged learning onto it
   (:func:`streamlearn.replicas.rebase`);
2. every ``worker.merge_interval_s``, if this replica has the smallest id among the fresh
   shards (refreshed within ``worker.stale_after_s``), merges the fresh shards into the
   next merged model, publishes it and adopts it.

The merger is elected without a protocol: every replica sees the same shards on the
topic, and the smallest fresh id wins. While membership changes two replicas may both
merge once; merged ids name the merger, and shards based on the losing model wait until
their replica adopts the winner (nothing is counted twice).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import re
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka.errors import KafkaError

from streamlearn import replicas, snapshots
from streamlearn.logs import RateLimitedLog
from streamlearn.settings import Settings

if TYPE_CHECKING:
    from streamlearn.models import OnlineModel
    from streamlearn.services.worker.app import WorkerRuntime

log = logging.getLogger("streamlearn.worker")
limited = RateLimitedLog(log, interval_s=10.0)

REPLICA_ID_FILE = "replica-id"
#: Shipped states kept for an exact rebase (the merger counts one of the last few).
SHIPS_KEPT = 4
#: How often the merge loop looks for a newly arrived merged model to adopt.
ADOPT_POLL_S = 0.1
_ID = re.compile(r"^[\x21-\x2e\x30-\x7e]{1,200}$")  # printable, no '/' or spaces


def replica_id(settings: Settings) -> str:
    """``worker.replica_id``, else a persistent id claimed in the snapshot dir.

    Ids live in ``snapshot_dir/replica-id.<id>`` files. A process claims the first one it
    can lock (``flock``, held while it runs) or makes a new one, so replicas that share a
    snapshot volume (compose's ``--scale``) get distinct ids, and a restarted replica, on
    any host name, takes back a free id with its checkpoint.
    """
    if settings.worker.replica_id:
        return settings.worker.replica_id
    with _CLAIM_LOCK:
        if settings.worker.snapshot_dir in _CLAIMED:
            return _CLAIMED[settings.worker.snapshot_dir][0]
        folder = Path(settings.worker.snapshot_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob(REPLICA_ID_FILE + ".*")):
            rid = path.name[len(REPLICA_ID_FILE) + 1:]
            if not _ID.match(rid) or rid.startswith("@"):
                continue
            claimed = _claim(path, settings.worker.snapshot_dir, rid)
            if claimed:
                return rid
        rid = "r-" + uuid.uuid4().hex[:12]
        path = folder / f"{REPLICA_ID_FILE}.{rid}"
        path.write_text(rid + "\n")
        if not _claim(path, settings.worker.snapshot_dir, rid):  # pragma: no cover - racing
            raise RuntimeError(f"could not lock the new replica id file {path}")
        log.warning("this replica's id is %s (kept in %s)", rid, path)
        return rid


_CLAIM_LOCK = threading.Lock()
_CLAIMED: dict[str, tuple[str, int]] = {}  # snapshot dir -> (id, locked fd), per process


def _claim(path: Path, folder: str, rid: str) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMED[folder] = (rid, fd)  # the fd stays open: the lock lasts as long as the process
    return True


@dataclass
class Lineage:
    """The merged model a replica's learning is based on, and its recent shipped states.

    Touched only on the learner thread (except reading the ints for reports).
    """

    base_id: str = replicas.ROOT_ID
    base_version: int = 0
    base: dict[str, Any] | None = None  # the base's state; None when unknown (a restart)
    ship: int = 0
    shipped: collections.OrderedDict[int, dict[str, Any]] = field(
        default_factory=collections.OrderedDict)
    adoptions: int = 0

    @classmethod
    def restored(cls, state: dict[str, Any], replica: str, fresh: dict[str, Any]) -> Lineage:
        """The lineage of a restored state: its own checkpoint, the merged model, a
        sibling's shard (foreign: it waits to adopt), or nothing (the fresh model)."""
        m = replicas.meta(state)
        source = str(state.get("replica", replica))
        if source == replicas.MERGED:
            return cls(replicas.merged_id(state), replicas.merged_version(state), state)
        if not m:
            return cls(base=fresh)
        if source != replica:
            return cls("foreign:" + source, 0, None)
        lin = cls(str(m.get("base_id", "")), int(m.get("base_version", 0)), None,
                  int(m.get("ship", 0)))
        if lin.base_id == replicas.ROOT_ID:
            lin.base = fresh
        lin.shipped[lin.ship] = state  # the checkpoint is the state last shipped
        return lin

    def tag(self, state: dict[str, Any], partitions: list[int]) -> None:
        """On the learner thread: number a captured state and remember it."""
        self.ship += 1
        state["merge"] = {"base_id": self.base_id, "base_version": self.base_version,
                          "adopted_version": self.base_version, "ship": self.ship,
                          "partitions": partitions, "published_at": time.time(),
                          "adoptions": self.adoptions}
        self.shipped[self.ship] = state
        while len(self.shipped) > SHIPS_KEPT:
            self.shipped.popitem(last=False)

    def adopt(self, model: OnlineModel, replica: str, merged: dict[str, Any],
              found: dict[str, Any] | None = None,
              found_base: dict[str, Any] | None = None) -> str:
        """On the learner thread: rebase ``model`` onto ``merged``; how it rebased.
        ``found``/``found_base``: the counted ship or the base, read back from the models
        topic (after a restart)."""
        if found is not None and replicas.base_id(found) == self.base_id:
            self.shipped[int(replicas.meta(found).get("ship", -1))] = found
        if (self.base is None and found_base is not None
                and replicas.merged_id(found_base) == self.base_id):
            self.base = found_base
        local = model.to_state()
        local["merge"] = {"base_id": self.base_id, "base_version": self.base_version}
        new, how = replicas.rebase(local, merged, replica, self.shipped, self.base)
        load_into(model, new)
        self.base_id, self.base_version = replicas.merged_id(merged), replicas.merged_version(
            merged)
        self.base = merged
        self.shipped.clear()
        self.adoptions += 1
        return how


def load_into(model: OnlineModel, state: dict[str, Any]) -> None:
    """Put a rebased state's weights, statistics and counters into the live model."""
    from streamlearn.scaler import RunningStandardScaler

    bk = model.backend
    for name, arr in state["weights"].items():
        dtype = getattr(model, name).dtype  # float32, the running average float64
        setattr(model, name, bk.asarray(np.array(arr, dtype=dtype, copy=True)))
    model.scaler = RunningStandardScaler.from_state(state["scaler"])
    model.target = np.array(state["target"], dtype=np.float64, copy=True)
    if "mix" in state:
        model.mix = np.array(state["mix"], dtype=np.float64, copy=True)
    model.version = int(state["version"])
    model.step = int(state["step"])
    model.n_seen = int(state["n_seen"])
    model.n_learned = int(state["n_learned"])
    model.n_imputed = np.array(state["n_imputed"], dtype=np.int64, copy=True)


@dataclass
class Seen:
    """The newest record of one key on the models topic."""

    value: bytes
    received_at: float
    crc: int


class ShardFeed:
    """Follows the models topic: the newest record per ``<model>/<replica>`` key."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.records: dict[str, dict[str, Seen]] = {s.name: {} for s in runtime.settings.specs}
        # This replica's own recent shards: after a restart, the one a merge counted is
        # found here (Tansu keeps every record; Kafka keeps its active segment uncompacted).
        self.own: dict[str, collections.deque[tuple[str, bytes]]] = {
            s.name: collections.deque(maxlen=4 * SHIPS_KEPT) for s in runtime.settings.specs}
        self._decoded: dict[str, tuple[int, dict[str, Any]]] = {}
        self.caught_up = False

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        rt = self.runtime
        k = rt.settings.kafka
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=rt.bootstrap, enable_auto_commit=False,
                                        **k.client_kwargs())
            try:
                await consumer.start()
                parts = consumer.partitions_for_topic(k.models_topic)
                if not parts:
                    await consumer.stop()
                    await asyncio.sleep(1.0)
                    continue
                tps = [TopicPartition(k.models_topic, p) for p in sorted(parts)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                    if not self.caught_up:  # at the end once: the views are current
                        highs = [consumer.highwater(tp) for tp in tps]
                        pos = [await consumer.position(tp) for tp in tps]
                        self.caught_up = not batches or all(
                            h is not None and p >= h for h, p in zip(highs, pos, strict=True))
                    now = time.time()
                    for msgs in batches.values():
                        for m in msgs:
                            # The record's own time: an old shard read at start is old.
                            at = m.timestamp / 1000.0 if m.timestamp and m.timestamp > 0 else now
                            self._take(m.key, m.value, min(at, now))
            except (KafkaError, OSError) as exc:
                limited.warning("shard-feed", "models topic feed failed (%s: %s); retrying",
                                type(exc).__name__, exc)
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()

    def _take(self, key: bytes | None, value: bytes | None, now: float) -> None:
        if key is None or value is None:
            return
        name, _, replica = key.decode("utf-8", "replace").partition("/")
        shards = self.records.get(name)
        if shards is not None and replica:
            shards[replica] = Seen(value, now, zlib.crc32(value))
            if replica == self.runtime.replica or replica == replicas.MERGED:
                self.own[name].append((replica, value))

    async def recent(self, name: str, *, ship: tuple[str, int] | None = None,
                     merged: str | None = None) -> dict[str, Any] | None:
        """From the recent records of this replica and of the merged model on the topic:
        this replica's ship ``(base id, number)``, or the merged model of id ``merged``."""
        from streamlearn.services.worker.app import decode_snapshot

        spec = next(s for s in self.runtime.settings.specs if s.name == name)
        want = replicas.MERGED if merged is not None else self.runtime.replica
        for owner, value in reversed(list(self.own[name])):
            if owner != want:
                continue
            try:
                state = await asyncio.to_thread(decode_snapshot, self.runtime.settings, spec,
                                                value, f"{name}/{owner}")
            except (snapshots.SnapshotError, ValueError):
                continue
            m = replicas.meta(state)
            if ship is not None and (str(m.get("base_id", "")), int(m.get("ship", -1))) == ship:
                return state
            if merged is not None and replicas.merged_id(state) == merged:
                return state
        return None

    async def decoded(self, name: str, replica: str) -> dict[str, Any] | None:
        """The newest state under ``name/replica`` (cached per payload); None if bad."""
        seen = self.records.get(name, {}).get(replica)
        if seen is None:
            return None
        key = f"{name}/{replica}"
        hit = self._decoded.get(key)
        if hit is not None and hit[0] == seen.crc:
            return hit[1]
        from streamlearn.models import OnlineModel
        from streamlearn.models.online import upgraded
        from streamlearn.services.worker.app import decode_snapshot

        spec = next(s for s in self.runtime.settings.specs if s.name == name)
        try:
            state = await asyncio.to_thread(decode_snapshot, self.runtime.settings, spec,
                                            seen.value, key)
            # A state the model cannot use (NaN weights, statistics of another shape) is
            # refused here, before a merge or an adoption spreads it into the live model.
            await asyncio.to_thread(OnlineModel.from_state, state, serving=True)
        except (snapshots.SnapshotError, ValueError) as exc:
            limited.warning(("bad-shard", key), "ignoring shard %s: %s", key, exc)
            return None
        state = upgraded(state)  # a replica not yet upgraded: merged in this layout
        self._decoded[key] = (seen.crc, state)
        return state

    def fresh(self, name: str, stale_after_s: float, now: float) -> list[str]:
        """Replicas whose shard was received within ``stale_after_s`` (merged excluded)."""
        return sorted(r for r, s in self.records.get(name, {}).items()
                      if r != replicas.MERGED and now - s.received_at <= stale_after_s)


class MergeLoop:
    """Adopt the newest merged model, and merge when this replica is the elected merger."""

    def __init__(self, runtime: WorkerRuntime, feed: ShardFeed) -> None:
        self.runtime = runtime
        self.feed = feed
        self._fresh_state: dict[str, dict[str, Any]] = {}

    async def run(self) -> None:
        rt = self.runtime
        await rt.ready.wait()
        interval = rt.settings.worker.merge_interval_s
        next_merge = time.monotonic() + interval
        seen: dict[str, int] = {}
        while True:
            # Adopt a new merged model within ADOPT_POLL_S of its arrival (the served model
            # lacks what replicas learned after the merged shards until they ship on it);
            # merge every merge_interval_s.
            await asyncio.sleep(min(ADOPT_POLL_S, interval))
            merging_now = time.monotonic() >= next_merge
            if merging_now:
                next_merge = time.monotonic() + interval
            for spec in rt.settings.specs:
                record = self.feed.records[spec.name].get(replicas.MERGED)
                arrived = record is not None and seen.get(spec.name) != record.crc
                if not (merging_now or arrived):
                    continue
                try:
                    await self.tick(spec.name, merge=merging_now)
                    if record is not None and self.feed.caught_up:
                        seen[spec.name] = record.crc
                except Exception:  # noqa: BLE001 - a failed merge must not stop learning
                    log.exception("merging %s failed; retrying next interval", spec.name)

    async def tick(self, name: str, *, merge: bool = True) -> None:
        """Adopt the newest merged model; then merge, when elected and ``merge``."""
        rt = self.runtime
        if not self.feed.caught_up:
            return  # neither adopt nor merge from a partial view of the topic
        lineage = rt.lineages[name]
        merged = await self.feed.decoded(name, replicas.MERGED)
        if merged is not None and self._newer(merged, lineage):
            await self.adopt(name, merged)
        if not merge:
            return
        stale = rt.settings.worker.stale_after_s
        fresh = self.feed.fresh(name, stale, time.time())
        if not fresh or fresh[0] != rt.replica or (merged is None and len(fresh) < 2):
            return  # not the merger (or alone and nothing to keep consistent with)
        base = merged if merged is not None else self._fresh(name)
        shards = {}
        for r in fresh:
            state = await self.feed.decoded(name, r)
            if state is not None:
                shards[r] = state
        names = replicas.eligible(base, shards)
        if not any(replicas.moved(shards[r], base) for r in names):
            return
        t0 = time.perf_counter()
        new = await asyncio.to_thread(replicas.merge, base, shards, merged_by=rt.replica,
                                      now=time.time())
        payload = await asyncio.to_thread(snapshots.encode, new)
        key = f"{name}/{replicas.MERGED}".encode()
        signed = snapshots.sign(payload, rt.settings.kafka.snapshot_key, context=key)
        try:
            await rt.outputs.send(rt.settings.kafka.models_topic, key, signed)
        except KafkaError as exc:
            rt.output_failed(exc)
            return
        log.info("merged %s v%d from %s in %.0f ms", name, replicas.merged_version(new),
                 ",".join(names), (time.perf_counter() - t0) * 1000)
        # Our own record comes back through the feed; adopt now, not one interval later.
        self.feed._take(key, signed, time.time())
        self.feed._decoded[key.decode()] = (zlib.crc32(signed), new)
        await self.adopt(name, new)

    async def retire(self, timeout_s: float) -> None:
        """At a clean stop, after the last snapshot: wait (bounded) until a merge counts
        what this replica learned, merging it ourselves when we are the merger."""
        rt = self.runtime
        deadline = time.monotonic() + timeout_s
        for spec in rt.settings.specs:
            name, lineage = spec.name, rt.lineages[spec.name]
            while time.monotonic() < deadline and self.feed.caught_up:
                merged = await self.feed.decoded(name, replicas.MERGED)
                others = [r for r in self.feed.fresh(name, rt.settings.worker.stale_after_s,
                                                     time.time()) if r != rt.replica]
                if merged is None and not others:
                    break  # alone: nothing to hand over
                last = lineage.shipped.get(lineage.ship)
                if last is None or replicas.base_id(last) != lineage.base_id:
                    # Adopted a merge since the last ship (here or in run()): what is not
                    # counted yet must be shipped on the new base, or no merge can take it.
                    await rt.publish_snapshots(force=True)
                    last = lineage.shipped.get(lineage.ship)
                if last is not None and self._handed_over(merged, lineage, last, rt.replica):
                    log.info("last shard of %s handed over (merged v%d)", name,
                             replicas.merged_version(merged))
                    break
                await self.tick(name)
                await asyncio.sleep(0.2)
            else:
                if self.feed.caught_up:  # the deadline: what no merge counted is lost
                    log.warning("last shard of %s not counted by a merge within %.1f s (no "
                                "merger left?): its learning since the last merge is not in "
                                "the merged model; this replica's checkpoint keeps it for a "
                                "restart", name, timeout_s)

    @staticmethod
    def _handed_over(merged: dict[str, Any] | None, lineage: Lineage, last: dict[str, Any],
                     replica: str) -> bool:
        """Whether no learning of this replica is left uncounted: a merge counted its last
        ship, or nothing was learned since its base (whose own part a merge counted)."""
        inc = dict(replicas.meta(merged or {}).get("included", {})).get(replica)
        if inc is not None and str(inc.get("base_id")) == lineage.base_id and int(
                inc.get("ship", -1)) >= lineage.ship:
            return True
        return lineage.base is not None and not replicas.moved(last, lineage.base)

    @staticmethod
    def _newer(merged: dict[str, Any], lineage: Lineage) -> bool:
        v = replicas.merged_version(merged)
        return v > lineage.base_version or (
            v == lineage.base_version and replicas.merged_id(merged) != lineage.base_id
            and lineage.base_id.startswith("foreign:"))

    def _fresh(self, name: str) -> dict[str, Any]:
        if name not in self._fresh_state:
            from streamlearn.models import OnlineModel

            spec = next(s for s in self.runtime.settings.specs if s.name == name)
            self._fresh_state[name] = OnlineModel(spec, device="cpu").to_state()
        return self._fresh_state[name]

    async def adopt(self, name: str, merged: dict[str, Any]) -> None:
        """Rebase the live model onto ``merged`` on its learner thread."""
        rt = self.runtime
        feeder = rt.feeders[name]
        lineage = rt.lineages[name]
        loop = asyncio.get_running_loop()
        inc = dict(replicas.meta(merged).get("included", {})).get(rt.replica)
        found = found_base = None
        counted = inc is not None and str(inc.get("base_id")) == lineage.base_id
        if counted and int(inc.get("ship", -1)) not in lineage.shipped:
            found = await self.feed.recent(name, ship=(lineage.base_id, int(inc["ship"])))
        elif not counted and lineage.base is None and lineage.base_id.startswith(
                tuple("0123456789")):
            found_base = await self.feed.recent(name, merged=lineage.base_id)
        how = await loop.run_in_executor(
            feeder.executor, lineage.adopt, feeder.runner.model, rt.replica, merged, found,
            found_base)
        if how != "exact":
            limited.warning(("rebase", name), "adopted merged %s v%d with a %s rebase",
                            name, replicas.merged_version(merged), how)
