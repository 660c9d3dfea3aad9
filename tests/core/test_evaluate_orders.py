"""``streamlearn evaluate --shuffles K``: seeded orders of a file's rows, mean and paired
differences, against the same rows replayed through the worker's step by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from streamlearn import prequential
from streamlearn.cli import main
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import JsonDecoder
from streamlearn.synthetic import FraudStream

NUMERIC = ("amount", "hour", "distance_km", "card_age_days", "tx_last_hour")
CATEGORICAL = ("merchant_category", "country", "channel")
N_ROWS = 2500
FLAGS = ["--numeric", ",".join(NUMERIC), "--categorical", ",".join(CATEGORICAL),
         "--label", "is_fraud", "--set", "hash_bits=10", "--set", "batch_size=64", "-q"]


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    # Some rows unlabelled: they are scored, not learned, and left out of the metrics.
    return FraudStream(seed=5, fraud_rate=0.05, label_fraction=0.9).take(N_ROWS)


@pytest.fixture(scope="module")
def csv_file(events: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("orders") / "fraud.csv"
    keys = list(dict.fromkeys(k for e in events for k in e))
    pacsv.write_csv(pa.table({k: [e.get(k) for e in events] for k in keys}), path)
    return path


def _aucs_by_hand(spec: ModelSpec, events: list[dict[str, Any]], seeds: range) -> list[float]:
    """The worker's decoder and step on each seeded order of the rows."""
    batch, rejects = JsonDecoder(spec, OnlineModel(spec).vectorizer).decode(
        [orjson.dumps(e) for e in events])
    assert rejects == []
    out = []
    for seed in seeds:
        rows = batch.take(np.random.default_rng(seed).permutation(len(batch)))
        scores = OnlineModel(spec).process_many(rows, spec.batch_size).scores
        known = rows.has_label
        out.append(prequential.roc_auc(rows.labels[known], scores[known]))
    return out


def test_shuffles_report_each_orders_metrics_their_mean_and_paired_differences(
        csv_file: Path, events: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "orders.json"
    rc = main(["evaluate", str(csv_file), *FLAGS, "--shuffles", "3", "--compare", "l2=0.01",
               "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "3 seeded shuffles" in out and "paired difference to model" in out
    report = json.loads(out_json.read_text())
    assert report["shuffles"] == 3 and report["seeds"] == [1, 2, 3]
    assert report["rows"] == N_ROWS
    base, l2 = report["variants"]
    spec = ModelSpec(name="m", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=10, batch_size=64)
    expected = _aucs_by_hand(spec, events, range(1, 4))
    got = [m["auc"] for m in base["per_order"]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert len(set(got)) == 3  # three different orders, three different streams
    assert base["mean"]["auc"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert base["se"]["auc"] == pytest.approx(np.std(expected, ddof=1) / np.sqrt(3), abs=1e-12)
    assert base["labelled"] == sum(e.get("is_fraud") is not None for e in events)
    # The compared spec saw the same orders: its difference is paired, order by order.
    expected_l2 = _aucs_by_hand(dataclasses.replace(spec, l2=0.01), events, range(1, 4))
    np.testing.assert_allclose([m["auc"] for m in l2["per_order"]], expected_l2, atol=1e-12)
    diffs = np.subtract(expected_l2, expected)
    assert l2["difference"]["auc"]["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert l2["difference"]["auc"]["se"] == pytest.approx(
        diffs.std(ddof=1) / np.sqrt(3), abs=1e-12)
    assert "difference" not in base
    assert f"{np.mean(expected):.4f} +- " in out


def test_shuffles_take_the_first_rows_under_limit(csv_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "limited.json"
    rc = main(["evaluate", str(csv_file), *FLAGS, "--shuffles", "2", "--limit", "700",
               "--json", str(out_json)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    assert report["rows"] == 700
    assert all(m["n"] <= 700 for m in report["variants"][0]["per_order"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--shuffles", "1"], "--shuffles must be at least 2, got 1"),
    (["--shuffles", "4", "--plot", "x.png"], "cannot be used with --plot"),
    (["--shuffles", "4", "--label-delay", "60"], "cannot be used with --label-delay"),
    (["--shuffles", "4", "--window", "100"], "cannot be used with --window"),
])
def test_shuffles_refuse_what_needs_one_stream(extra: list[str], message: str, csv_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", str(csv_file), *FLAGS, *extra])
    _, err = capsys.readouterr()
    assert rc == 2 and message in err


def test_shuffles_refuse_a_topic(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--topic", "tx", *FLAGS, "--shuffles", "4"])
    _, err = capsys.readouterr()
    assert rc == 2 and "cannot be used with --topic" in err


def test_shuffles_refuse_entity_aggregates(csv_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "streamlearn.toml"
    cfg.write_text('[[model]]\nname = "fraud"\ntopic = "tx"\nlabel = "is_fraud"\n'
                   'numeric = ["amount"]\n\n[[model.aggregate]]\nentity = "country"\n'
                   'field = "amount"\nwindows = ["1h"]\nstats = ["count"]\n')
    rc = main(["-c", str(cfg), "evaluate", str(csv_file), "--shuffles", "3", "-q"])
    _, err = capsys.readouterr()
    assert rc == 2 and "cannot replay entity aggregates" in err
    rc = main(["-c", str(cfg), "evaluate", str(csv_file), "-q"])  # one order: it replays
    _, err = capsys.readouterr()
    assert rc == 0, err
