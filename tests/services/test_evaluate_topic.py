"""``streamlearn evaluate --topic`` on the embedded broker: the same figures as the file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer

from streamlearn.batch_format import encode_batch
from streamlearn.cli import main
from streamlearn.config import ModelSpec
from streamlearn.synthetic import FraudStream

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

NUMERIC = ("amount", "hour", "distance_km", "card_age_days", "tx_last_hour")
CATEGORICAL = ("merchant_category", "country", "channel")
FLAGS = ["--numeric", ",".join(NUMERIC), "--categorical", ",".join(CATEGORICAL),
         "--label", "is_fraud", "--set", "hash_bits=10", "--set", "batch_size=64",
         "--window", "1000", "-q"]


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def test_topic_replay_matches_the_file_and_counts_dead_letters(
        broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = FraudStream(seed=4, fraud_rate=0.03).take(4000)
    spec = ModelSpec(name="model", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=10)
    # offsets 0-1: what the worker dead-letters; 2-3001: JSON events; 3002: one batch record
    values = [b"not json", orjson.dumps({"amount": "lots", "is_fraud": 1})]
    values += [orjson.dumps(e) for e in events[:3000]] + [encode_batch(events[3000:], spec)]
    topic = "evaluate.replay"
    asyncio.run(_produce(broker, topic, values))

    keys = list(dict.fromkeys(k for e in events for k in e))
    pq.write_table(pa.table({k: [e.get(k) for e in events] for k in keys}),
                   tmp_path / "same.parquet")
    assert main(["evaluate", str(tmp_path / "same.parquet"), *FLAGS,
                 "--json", str(tmp_path / "file.json")]) == 0
    from_file = json.loads((tmp_path / "file.json").read_text())["variants"][0]

    assert main(["evaluate", "--topic", topic, "--bootstrap", broker, "--from-beginning",
                 *FLAGS, "--json", str(tmp_path / "topic.json")]) == 0
    out = capsys.readouterr().out
    assert "dropped messages" in out and "would dead-letter" in out
    got = json.loads((tmp_path / "topic.json").read_text())["variants"][0]
    assert got["rows"] == 4000 and sum(got["dropped"].values()) == 2
    assert got["overall"] == from_file["overall"]
    assert got["windows"] == from_file["windows"]

    # From given offsets: past the two bad messages, the last 1,000 rows only.
    assert main(["evaluate", "--topic", topic, "--bootstrap", broker, "--offsets", "0:3002",
                 *FLAGS, "--json", str(tmp_path / "tail.json")]) == 0
    tail = json.loads((tmp_path / "tail.json").read_text())["variants"][0]
    assert (tail["rows"], tail["dropped"]) == (1000, {})


def test_unknown_topic_is_a_clear_error(broker: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--topic", "evaluate.no-such-topic", "--bootstrap", broker, *FLAGS])
    err = capsys.readouterr().err
    assert rc == 2 and "topic 'evaluate.no-such-topic' does not exist" in err
