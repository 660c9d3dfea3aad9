"""Events/s learned by 1, 2, ... worker replicas on one stream (issue 10).

    .venv/bin/python load_tests/bench_replicas.py [--replicas 1 2] [--events 150000]

Per run: a fresh topic of ``--partitions`` partitions on the embedded broker, filled with
``--events`` JSON events before any worker starts; then K ``streamlearn worker``
processes (one consumer group, merging every ``merge_interval_s``). The rate is taken
from the replicas' own ``telemetry.learned`` counters in their local checkpoints, between
10% and 90% of the stream (start-up and the tail excluded). On a machine with fewer cores
than replicas the replicas share cores: read the ratio against K = 1 of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlearn import snapshots
from streamlearn.broker import EmbeddedBroker
from streamlearn.synthetic import FraudStream

CONFIG = """
[kafka]
partitions = {partitions}
[worker]
snapshot_interval_s = 0.1
merge_interval_s = 1.0
emit_predictions = {emit}
[[model]]
name = "{model}"
topic = "{topic}"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
"""


async def fill(bootstrap: str, topic: str, partitions: int, n: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        for i, event in enumerate(FraudStream(seed=5).take(n)):
            await producer.send(topic, orjson.dumps(event), partition=i % partitions)
        await producer.flush()
    finally:
        await producer.stop()


def learned(folder: Path) -> int:
    total = 0
    for path in folder.glob("snap-*/*.snap"):
        try:
            total += int(snapshots.load(path).get("telemetry", {}).get("learned", 0))
        except (OSError, ValueError):
            pass
    return total


def run(bootstrap: str, k: int, n: int, partitions: int, emit: bool, timeout: float) -> float:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-replicas-{k}-"))
    model, topic = f"bench{k}x{int(time.time())}", f"bench.{k}.{int(time.time())}"
    (tmp / "streamlearn.toml").write_text(CONFIG.format(
        partitions=partitions, model=model, topic=topic, emit=str(emit).lower()))
    asyncio.run(fill(bootstrap, topic, partitions, n))
    env = {**os.environ, "STREAMLEARN_CONFIG": str(tmp / "streamlearn.toml"),
           "STREAMLEARN_KAFKA__BOOTSTRAP": bootstrap, "STREAMLEARN_KAFKA__FAST_JOIN": "true",
           "STREAMLEARN_KAFKA__MODELS_TOPIC": f"{model}.models",
           "STREAMLEARN_WORKER__APP_ID": f"{model}-group"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "streamlearn", "worker"],
        env=env | {"STREAMLEARN_WORKER__SNAPSHOT_DIR": str(tmp / f"snap-{i}")},
        stdout=(tmp / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT) for i in range(k)]
    marks: dict[float, float] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = learned(tmp)
            now = time.monotonic()
            for frac in (0.1, 0.9):
                if frac not in marks and got >= frac * n:
                    marks[frac] = now
            if 0.9 in marks:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    if 0.9 not in marks or 0.1 not in marks:
        raise RuntimeError(f"K={k}: the replicas did not learn 90% of the stream; logs in {tmp}")
    return 0.8 * n / (marks[0.9] - marks[0.1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--emit-predictions", action="store_true")
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}, events: {args.events}, partitions: {args.partitions}")
    with EmbeddedBroker() as broker:
        base = None
        for k in args.replicas:
            rate = run(broker.bootstrap, k, args.events, args.partitions,
                       args.emit_predictions, args.timeout)
            base = base or rate
            print(f"replicas {k}: {rate:,.0f} events/s learned ({rate / base:.2f}x of "
                  f"{args.replicas[0]} replica(s))", flush=True)


if __name__ == "__main__":
    main()
