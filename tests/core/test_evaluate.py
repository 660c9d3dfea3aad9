"""``streamlearn evaluate`` on small offline files: the worker's path, the metrics, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm

from streamlearn import prequential
from streamlearn.batch_format import encode_batch
from streamlearn.cli import main
from streamlearn.config import AggregateSpec, ModelSpec
from streamlearn.evaluate import (
    ArrowDecoder,
    EvaluateError,
    MessageDecoder,
    Replay,
    TableFile,
    Variant,
    _coerce,
    needed_columns,
    spec_with,
    split_assignments,
)
from streamlearn.features import Vectorizer
from streamlearn.models import OnlineModel
from streamlearn.pipeline import JsonDecoder
from streamlearn.synthetic import FraudStream

NUMERIC = ("amount", "hour", "distance_km", "card_age_days", "tx_last_hour")
CATEGORICAL = ("merchant_category", "country", "channel")
N_ROWS = 6000
FLAGS = ["--numeric", ",".join(NUMERIC), "--categorical", ",".join(CATEGORICAL),
         "--label", "is_fraud", "--set", "hash_bits=10", "--set", "batch_size=64", "-q"]


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    # 10% unlabelled, 0.5% missing distance_km: both paths must agree on those too.
    return FraudStream(seed=11, fraud_rate=0.03, label_fraction=0.9).take(N_ROWS)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(name="fraud", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=10, batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def files(events: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    keys = list(dict.fromkeys(k for e in events for k in e))  # from_pylist reads row 0 only
    table = pa.table({k: [e.get(k) for e in events] for k in keys})
    pacsv.write_csv(table, tmp / "fraud.csv")
    pq.write_table(table, tmp / "fraud.parquet", row_group_size=1000)
    return {"csv": tmp / "fraud.csv", "parquet": tmp / "fraud.parquet"}


def _replay(path: Path, spec: ModelSpec, window: int = 1000, **kw: Any) -> Any:
    table = TableFile(path, needed_columns([spec]), batch_rows=700, csv_block_bytes=16_384)
    replay = Replay([Variant(spec.name, spec, ArrowDecoder(spec, source=str(path)))],
                    window=window, **kw)
    for chunk in table:
        replay.feed(chunk)
        if replay.done:
            break
    return replay.finish()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- the worker's path ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_replay_scores_are_the_json_workers(fmt: str, files: dict[str, Path],
                                                 events: list[dict[str, Any]],
                                                 spec: ModelSpec) -> None:
    """Same rows as JSON events through the worker's decoder and step: identical scores."""
    report = _replay(files[fmt], spec)
    model = OnlineModel(spec, device="cpu")
    batch, rejects = JsonDecoder(spec, model.vectorizer).decode(
        [orjson.dumps(e) for e in events])
    assert rejects == []
    expected = model.process_many(batch, spec.batch_size).scores
    got = report.variants[0]
    assert got.rows == N_ROWS and got.labelled == int(batch.has_label.sum())
    np.testing.assert_array_equal(got.scores, expected)
    np.testing.assert_array_equal(got.labels, batch.labels)


def test_metrics_match_sklearn_overall_and_per_window(files: dict[str, Path],
                                                     spec: ModelSpec) -> None:
    v = _replay(files["parquet"], spec, window=1500).variants[0]
    y, p = v.labels, v.scores
    mask = ~np.isnan(y)
    yl, pl = y[mask], p[mask].astype(np.float64)
    assert v.overall["n"] == mask.sum()
    assert v.overall["auc"] == pytest.approx(skm.roc_auc_score(yl, pl), abs=1e-12)
    assert v.overall["pr_auc"] == pytest.approx(skm.average_precision_score(yl, pl), abs=1e-12)
    clipped = np.clip(pl, 1e-7, 1 - 1e-7)
    assert v.overall["log_loss"] == pytest.approx(skm.log_loss(yl, clipped), rel=1e-9)
    fpr, tpr, _ = skm.roc_curve(yl, pl)
    assert v.overall["recall_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max())
    assert v.overall["auc"] > 0.9  # the synthetic fraud is learnable
    assert [(w["start"], w["end"]) for w in v.windows] == [
        (0, 1500), (1500, 3000), (3000, 4500), (4500, 6000)]
    for w in v.windows:
        wy, wp = y[w["start"]:w["end"]], p[w["start"]:w["end"]]
        m = ~np.isnan(wy)
        assert w["n"] == m.sum()
        assert w["auc"] == pytest.approx(skm.roc_auc_score(wy[m], wp[m]), abs=1e-12)
        assert w["pr_auc"] == pytest.approx(skm.average_precision_score(wy[m], wp[m]),
                                            abs=1e-12)


def test_regression_metrics_match_sklearn(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n = 3000
    x = rng.normal(size=(n, 2))
    y = 40.0 + 3.0 * x[:, 0] - 2.0 * x[:, 1] + rng.normal(scale=0.5, size=n)
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": rng.integers(0, 5, n),
                             "y": y}), tmp_path / "r.parquet")
    spec = ModelSpec(name="r", topic="t", task="regression", numeric=("a", "b"),
                     categorical=("c",), label="y", hash_bits=6, device="cpu")
    v = _replay(tmp_path / "r.parquet", spec, window=1000).variants[0]
    np.testing.assert_array_equal(v.labels, y.astype(np.float32))
    p = v.scores.astype(np.float64)
    yl = v.labels.astype(np.float64)
    assert v.overall["mae"] == pytest.approx(skm.mean_absolute_error(yl, p), rel=1e-9)
    assert v.overall["rmse"] == pytest.approx(skm.root_mean_squared_error(yl, p), rel=1e-9)
    assert v.windows[2]["rmse"] == pytest.approx(
        skm.root_mean_squared_error(yl[2000:], p[2000:]), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_functions_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.1).astype(np.float64)
    p = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), 2)  # many tied scores
    assert prequential.average_precision(y, p) == pytest.approx(
        skm.average_precision_score(y, p), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, p)
    for limit in (0.0, 0.01, 0.1, 0.5):
        assert prequential.recall_at_fpr(y, p, limit) == pytest.approx(
            tpr[fpr <= limit].max(), abs=1e-12)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    assert prequential.log_loss(y, p) == pytest.approx(skm.log_loss(y, pc), rel=1e-9)
    assert prequential.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))
    assert prequential.rmse(y, p) == pytest.approx(skm.root_mean_squared_error(y, p))


def test_metric_functions_are_undefined_on_one_class() -> None:
    ones = np.ones(5)
    assert np.isnan(prequential.recall_at_fpr(ones, ones))
    assert np.isnan(prequential.average_precision(np.zeros(5), ones))
    assert prequential.average_precision(ones, np.linspace(0, 1, 5)) == 1.0


def test_limit_stops_early(files: dict[str, Path], spec: ModelSpec) -> None:
    report = _replay(files["csv"], spec, limit=1234)
    assert report.rows == 1234 and len(report.variants[0].scores) == 1234


def test_message_decoder_drops_what_the_worker_dead_letters(
        events: list[dict[str, Any]], spec: ModelSpec) -> None:
    dec = MessageDecoder(spec)
    values = [orjson.dumps(e) for e in events[:300]]
    nested_id = {**events[0], "event_id": {"a": [1]}}  # the worker dead-letters bad ids
    values += [b"not json", orjson.dumps({"amount": "lots", "is_fraud": 1}),
               orjson.dumps(nested_id), encode_batch(events[300:1000], spec),
               encode_batch([nested_id, *events[1000:1010]], spec), b"\xffSLB broken"]
    batch = dec.decode(values)
    assert len(batch) == 1000
    assert sum(dec.dropped.values()) == 5
    assert any("amount" in reason for reason in dec.dropped)
    assert any("event id" in reason and "bad batch" not in reason for reason in dec.dropped)
    assert any(reason.startswith("bad batch record: row 0: event id") for reason in dec.dropped)
    assert any(reason.startswith("bad batch record") for reason in dec.dropped)


# -- model specs from flags ----------------------------------------------------------------


def test_assignments_are_coerced_from_the_field_types() -> None:
    assert _coerce(bool, "false", "x") is False
    assert _coerce(float | None, "none", "x") is None
    assert _coerce(float | None, "0.25", "x") == 0.25
    assert _coerce(tuple[str, ...], "a, b,", "x") == ("a", "b")
    assert _coerce(int, "1e3", "x") == 1000
    assert _coerce(dict[str, Any], '{"k": 1}', "x") == {"k": 1}
    with pytest.raises(EvaluateError, match="expected one of 'a', 'b'"):
        _coerce(Literal["a", "b"], "c", "x=c")
    with pytest.raises(EvaluateError, match="expected an integer"):
        _coerce(int, "2.5", "x=2.5")
    spec = spec_with({"name": "m", "topic": "t"},
                     ["numeric=a,b", "hash_bits=9", "optimizer=sgd", "l1=0.001"])
    assert (spec.numeric, spec.hash_bits, spec.optimizer, spec.l1) == (("a", "b"), 9, "sgd",
                                                                       0.001)
    with pytest.raises(EvaluateError, match="not a model setting"):
        spec_with(spec.to_dict(), ["colour=red"])
    with pytest.raises(EvaluateError, match="invalid model spec"):
        spec_with(spec.to_dict(), ["hash_bits=40"])
    assert split_assignments("numeric=a,b,l2=0") == ["numeric=a,b", "l2=0"]


# -- the command ---------------------------------------------------------------------------


def test_cli_table_json_png_and_compare(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    rc, out, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--window", "2000",
                         "--json", str(out_json), "--plot", str(out_png),
                         "--compare", "l2=0.01", "--compare", "hash_bits=8,batch_size=32"],
                        capsys)
    assert rc == 0, err
    for text in ("ROC AUC", "PR AUC", "log loss", "recall @ 1% FPR", "learn rows/s",
                 "rows/s end to end", "l2=0.01", "hash_bits=8,batch_size=32"):
        assert text in out
    report = json.loads(out_json.read_text())
    assert report["rows"] == N_ROWS and report["window"] == 2000 and report["rows_per_s"] > 0
    names = [v["name"] for v in report["variants"]]
    assert names == ["model", "l2=0.01", "hash_bits=8,batch_size=32"]
    base, l2, small = report["variants"]
    assert (l2["spec"]["l2"], small["spec"]["hash_bits"], small["spec"]["batch_size"]) == (
        0.01, 8, 32)
    assert len(base["windows"]) == 3 and base["windows"][-1]["end"] == N_ROWS
    assert base["learn_rows_per_s"] > 0 and set(base["overall"]) >= {
        "auc", "pr_auc", "log_loss", "recall_at_1pct_fpr"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A compared variant is the same replay as that spec alone.
    alone = tmp_path / "alone.json"
    rc, _, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--window", "2000",
                       "--set", "l2=0.01", "--json", str(alone)], capsys)
    assert rc == 0, err
    assert json.loads(alone.read_text())["variants"][0]["overall"] == l2["overall"]
    assert l2["overall"] != base["overall"]


def test_cli_html_plot_is_self_contained(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "auc.html"
    rc, _, err = _run(["evaluate", str(files["parquet"]), *FLAGS, "--limit", "3000",
                       "--window", "500", "--plot", str(page)], capsys)
    assert rc == 0, err
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<svg" in text and "</svg>" in text
    assert "<script" not in text and "<link" not in text and "<img" not in text
    assert "3,000 rows" in text


def test_cli_spec_from_config(files: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "streamlearn.toml"
    cfg.write_text(
        '[[model]]\nname = "other"\ntopic = "x"\nnumeric = ["amount"]\n\n'
        '[[model]]\nname = "fraud"\ntopic = "transactions"\nlabel = "is_fraud"\n'
        f"numeric = {list(NUMERIC)!r}\ncategorical = {list(CATEGORICAL)!r}\n"
        "hash_bits = 10\n".replace("'", '"'))
    out_json = tmp_path / "o.json"
    rc, out, err = _run(["-c", str(cfg), "evaluate", str(files["parquet"]), "--model", "fraud",
                         "--set", "batch_size=128", "--json", str(out_json), "-q"], capsys)
    assert rc == 0, err
    v = json.loads(out_json.read_text())["variants"][0]
    assert (v["name"], v["spec"]["hash_bits"], v["spec"]["batch_size"]) == ("fraud", 10, 128)
    # The first model reads a column the file lacks: named, with the file's columns.
    rc, _, err = _run(["-c", str(cfg), "evaluate", str(files["parquet"]), "-q"], capsys)
    assert rc == 2 and "column 'label' (label in the model spec) is not in" in err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cli_star_takes_every_other_column_of_its_kind(fmt: str, files: dict[str, Path],
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """``*`` reads the file's types: the label, the spec's id field and ``--exclude`` are
    left out; the replay is the one the columns named one by one give."""
    star, named = tmp_path / "star.json", tmp_path / "named.json"
    rest = FLAGS[4:]  # --label, the --set flags, -q
    rc, _, err = _run(["evaluate", str(files[fmt]), "--numeric", "*", "--categorical", "*",
                       "--exclude", "card_id,merchant_id,ts", *rest, "--json", str(star)],
                      capsys)
    assert rc == 0, err
    rc, _, err = _run(["evaluate", str(files[fmt]), *FLAGS, "--json", str(named)], capsys)
    assert rc == 0, err
    got, want = (json.loads(p.read_text())["variants"][0] for p in (star, named))
    assert (got["spec"]["numeric"], got["spec"]["categorical"]) == (
        list(NUMERIC), list(CATEGORICAL))
    assert got["overall"] == want["overall"]
    # A '*' next to named columns takes the rest; ids and text never land in numeric.
    rc, _, err = _run(["evaluate", str(files[fmt]), "--numeric", "amount,hour",
                       "--categorical", "*", "--exclude", "card_id,merchant_id", *rest,
                       "--json", str(star)], capsys)
    assert rc == 0, err
    spec = json.loads(star.read_text())["variants"][0]["spec"]
    assert spec["numeric"] == ["amount", "hour"] and spec["categorical"] == list(CATEGORICAL)


@pytest.mark.parametrize(("args", "message"), [
    (["--numeric", "*", "--exclude", "nope"], "--exclude nope: no such column in"),
    (["--numeric", "amount", "--exclude", "ts"], "--exclude applies to --numeric '*'"),
])
def test_cli_star_errors(args: list[str], message: str, files: dict[str, Path],
                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["evaluate", str(files["csv"]), *args, "--label", "is_fraud", "-q"],
                      capsys)
    assert rc == 2 and message in err, err
    rc, _, err = _run(["evaluate", "--topic", "t", "--numeric", "*", "-q"], capsys)
    assert rc == 2 and "'*' takes the columns of a file" in err


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("name", "content", "args", "message"), [
    ("none.csv", None, [], "none.csv: no such file"),
    ("bin.csv", b"\x89PNG\r\n\x1a\n\0\0\0", [], "not a CSV or Parquet file"),
    ("bad.parquet", b"PAR1 not really", [], "not a readable Parquet file"),
    ("missing.csv", "amount,country,y\n1,FR,0\n", ["--numeric", "amount,speed"],
     "column 'speed' (numeric in the model spec) is not in the file"),
    ("text.csv", "amount,country,y\n1,FR,0\n2,DE,1\nlots,FR,1\n", [],
     "column 'amount' (numeric): 'lots' at data row 3 is not a number"),
    ("inf.csv", "amount,country,y\n1,FR,0\ninf,DE,1\n", [],
     "column 'amount' (numeric): inf at data row 2 has a magnitude above 1e+15"),
    ("big.csv", "amount,country,y\n1,FR,0\n2e16,DE,1\n", [],  # the worker dead-letters it
     "column 'amount' (numeric): 2e+16 at data row 2 has a magnitude above 1e+15"),
    ("label.csv", "amount,country,y\n1,FR,0\n2,DE,2\n", [],
     "column 'y' (label): 2.0 at data row 2 is not 0 or 1"),
    ("words.csv", "amount,country,y\n1,FR,no\n2,DE,yes\n", [],
     "label column 'y' holds text ('no', 'yes'); a binary label is 0/1 or true/false: "
     "pass --positive VALUE"),
    ("three.csv", "amount,country,y\n1,FR,no\n2,DE,yes\n3,DE,maybe\n", ["--positive", "yes"],
     "label column 'y' has more than two values"),
    ("rtext.csv", "amount,country,y\n1,FR,1.5\n2,DE,much\n", ["--task", "regression"],
     "column 'y' (label): 'much' at data row 2 is not a number"),
    ("ok.csv", "amount,country,y\n1,FR,0\n", ["--set", "optimizer=adam"],
     "optimizer=adam: expected one of 'sgd', 'adagrad', 'ftrl'"),
])
def test_cli_errors_name_the_problem(name: str, content: str | bytes | None, args: list[str],
                                     message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    argv = ["evaluate", str(path), "--numeric", "amount", "--categorical", "country",
            "--label", "y", "-q", *args]
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("labels", "args"), [
    (["true", "FALSE", "", "True"], []),
    (["yes", "no", "", "yes"], ["--positive", "yes"]),
    (["1", "0", "", "1"], []),
])
def test_cli_reads_binary_labels(labels: list[str], args: list[str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{i},{'ab'[i % 2]},{y}\n" for i, y in enumerate(labels * 50))
    path = _write(tmp_path / "l.csv", "amount,country,y\n" + rows)
    out_json = tmp_path / "l.json"
    rc, _, err = _run(["evaluate", str(path), "--numeric", "amount", "--categorical", "country",
                       "--label", "y", "--json", str(out_json), "-q", *args], capsys)
    assert rc == 0, err
    v = json.loads(out_json.read_text())["variants"][0]
    assert (v["rows"], v["labelled"]) == (200, 150)
    assert v["overall"]["positive_rate"] == pytest.approx(2 / 3)


def test_cli_parquet_bool_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 4.0], "y": [True, False, None, True]}),
                   tmp_path / "b.parquet")
    out_json = tmp_path / "b.json"
    rc, _, err = _run(["evaluate", str(tmp_path / "b.parquet"), "--numeric", "x", "--label", "y",
                       "--json", str(out_json), "-q"], capsys)
    assert rc == 0, err
    v = json.loads(out_json.read_text())["variants"][0]
    assert (v["labelled"], v["overall"]["positive_rate"]) == (3, pytest.approx(2 / 3))


def test_cli_topic_needs_a_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMLEARN_KAFKA__BOOTSTRAP", raising=False)
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    rc, _, err = _run(["evaluate", "--topic", "transactions", "--numeric", "amount", "-q"],
                      capsys)
    assert rc == 2 and "--topic needs a running broker: pass --bootstrap host:port" in err


def test_integer_and_missing_categoricals_hash_like_the_worker() -> None:
    spec = ModelSpec(name="m", topic="t", categorical=("c",), label="y", hash_bits=8)
    rb = pa.record_batch({"c": pa.array([5, None, 7, 5]), "y": pa.array([1, 0, None, 1])})
    batch = ArrowDecoder(spec).decode((rb, 0))
    json_batch, _ = JsonDecoder(spec, Vectorizer(spec)).decode(
        [b'{"c": 5, "y": 1}', b'{"y": 0}', b'{"c": 7}', b'{"c": "5", "y": 1}'])
    np.testing.assert_array_equal(batch.hashed, json_batch.hashed)
    np.testing.assert_array_equal(batch.labels, json_batch.labels)


# -- entity aggregates and delayed labels ----------------------------------------------------


@pytest.fixture(scope="module")
def agg_events() -> list[dict[str, Any]]:
    # The stream with card-testing bursts and far-from-home fraud (card_country entity).
    return FraudStream(seed=5, fraud_rate=0.03, label_fraction=0.9,
                       entity_fraud=0.4).take(N_ROWS)


@pytest.fixture(scope="module")
def agg_spec() -> ModelSpec:
    return ModelSpec(name="fraud", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=10, batch_size=64, device="cpu",
                     aggregates=(AggregateSpec("card_id", "amount", ("1m", "10m"),
                                               ("count", "sum", "mean")),
                                 AggregateSpec("card_country", "amount", ("10m",),
                                               ("count",))))


@pytest.fixture(scope="module")
def agg_files(agg_events: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate_agg")
    keys = list(dict.fromkeys(k for e in agg_events for k in e))
    table = pa.table({k: [e.get(k) for e in agg_events] for k in keys})
    pacsv.write_csv(table, tmp / "fraud.csv")
    pq.write_table(table, tmp / "fraud.parquet", row_group_size=1000)
    return {"csv": tmp / "fraud.csv", "parquet": tmp / "fraud.parquet", "table": table}


def _json_scores(spec: ModelSpec, events: list[dict[str, Any]]) -> tuple[np.ndarray, Any]:
    model = OnlineModel(spec, device="cpu")
    batch, rejects = JsonDecoder(spec, model.vectorizer).decode(
        [orjson.dumps(e) for e in events])
    assert rejects == [] and batch.aux is not None
    return model.process_many(batch, spec.batch_size).scores, model


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_replay_with_aggregates_is_the_json_workers(
        fmt: str, agg_files: dict[str, Any], agg_events: list[dict[str, Any]],
        agg_spec: ModelSpec) -> None:
    """A file read for a spec with aggregates gets the aggregate features the worker
    computes from the same events: identical scores, and the same entity state."""
    report = _replay(agg_files[fmt], agg_spec)
    expected, model = _json_scores(agg_spec, agg_events)
    got = report.variants[0]
    assert got.rows == N_ROWS
    np.testing.assert_array_equal(got.scores, expected)
    plain = _replay(agg_files[fmt], dataclasses.replace(agg_spec, aggregates=()))
    assert not np.array_equal(plain.variants[0].scores, got.scores)  # they do change scores
    assert model.aggregates is not None and model.aggregates.n_entities > 1000


def test_aggregates_need_their_columns(agg_files: dict[str, Any], agg_spec: ModelSpec,
                                       tmp_path: Path) -> None:
    table = agg_files["table"]
    for column, role in (("ts", "event time"), ("card_country", "aggregate entity")):
        path = tmp_path / f"no_{column}.parquet"
        pq.write_table(table.drop_columns([column]), path)
        with pytest.raises(EvaluateError, match=f"column '{column}' \\({role} in the model "
                                                "spec\\) is not in the file"):
            _replay(path, agg_spec)
    times = table.column("ts").to_pylist()
    times[1234] = None
    path = tmp_path / "gap.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("ts"), "ts",
                                    pa.array(times)), path)
    with pytest.raises(EvaluateError, match="'ts' \\(event time\\): missing at data row 1235"):
        _replay(path, agg_spec)


def test_label_delay_zero_is_the_immediate_replay(agg_files: dict[str, Any],
                                                  agg_spec: ModelSpec) -> None:
    """Labels learned before the next mini-batch through pending/learn_joined: the same
    model, step for step, as labels on the events learned one step per mini-batch (the
    same learning path; by default the worker learns one update per event)."""
    spec = dataclasses.replace(agg_spec, update_rows=agg_spec.batch_size)
    immediate = _replay(agg_files["parquet"], spec).variants[0]
    delayed = _replay(agg_files["parquet"], spec, label_delay=0.0).variants[0]
    np.testing.assert_allclose(delayed.scores, immediate.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(delayed.labels, immediate.labels)
    last = N_ROWS - N_ROWS % 64 or N_ROWS - 64  # the last mini-batch's labels are never due
    assert delayed.label_counts["joined"] == int((~np.isnan(delayed.labels[:last])).sum())
    assert delayed.label_counts["late"] == delayed.label_counts["unknown"] == 0


def test_label_delay_holds_labels_back_in_event_time(files: dict[str, Path],
                                                     events: list[dict[str, Any]],
                                                     spec: ModelSpec) -> None:
    """A spec without aggregates reads the time column for --label-delay; a label is
    learned only once the stream is ``delay`` seconds of event time past its row."""
    ts = np.array([e["ts"] for e in events])
    delay = float(ts[N_ROWS // 2] - ts[0])  # labels of the first rows arrive mid-stream
    table = TableFile(files["parquet"], needed_columns([spec], times=True), batch_rows=700)
    replay = Replay([Variant("m", spec, ArrowDecoder(spec, times=True))],
                    window=1000, label_delay=delay)
    for chunk in table:
        replay.feed(chunk)
    v = replay.finish().variants[0]
    immediate = _replay(files["parquet"], spec).variants[0]
    labelled = ~np.isnan(v.labels)
    # Nothing learned during the first half: every score there is the untrained model's.
    first = v.scores[: N_ROWS // 2 - 64]
    assert np.unique(first).size == 1
    assert v.label_counts["joined"] < labelled.sum() * 0.55
    assert v.label_counts["joined"] > labelled.sum() * 0.4
    assert v.overall["auc"] < immediate.overall["auc"]
    # The untrained scores count in the metrics: they are the arrival scores.
    assert v.overall["n"] == labelled.sum()
    # A delay past the pending TTL makes every label late.
    short = dataclasses.replace(spec, label_ttl_s=1.0)
    table = TableFile(files["parquet"], needed_columns([short], times=True), batch_rows=700)
    replay = Replay([Variant("m", short, ArrowDecoder(short, times=True))],
                    window=1000, label_delay=delay)
    for chunk in table:
        replay.feed(chunk)
    late = replay.finish().variants[0].label_counts
    assert late["joined"] == 0 and late["late"] > 0


def test_cli_label_delay(files: dict[str, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "delay.json"
    rc, out, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--label-delay", "5",
                         "--json", str(out_json)], capsys)
    assert rc == 0, err
    assert "labels learned 5 s of event time after their rows" in out
    assert "labels joined" in out
    report = json.loads(out_json.read_text())
    assert report["label_delay"] == 5.0 and report["variants"][0]["labels"]["joined"] > 0
    rc, _, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--label-delay", "-1"], capsys)
    assert rc == 2 and "--label-delay must be a number of seconds >= 0" in err


# -- --shuffles: seeded orders of a file's rows -----------------------------------------------


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
        files: dict[str, Path], events: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "orders.json"
    rc, out, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--shuffles", "3",
                         "--compare", "l2=0.01", "--json", str(out_json)], capsys)
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


def test_shuffles_take_the_first_rows_under_limit(files: dict[str, Path],
                                                  events: list[dict[str, Any]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "limited.json"
    rc, _, err = _run(["evaluate", str(files["csv"]), *FLAGS, "--shuffles", "2", "--limit",
                       "700", "--json", str(out_json)], capsys)
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    labelled = sum(e.get("is_fraud") is not None for e in events[:700])
    assert report["rows"] == 700 and report["variants"][0]["labelled"] == labelled
    assert [m["n"] for m in report["variants"][0]["per_order"]] == [labelled, labelled]


@pytest.mark.parametrize(("extra", "message"), [
    (["--shuffles", "1"], "--shuffles must be at least 2, got 1"),
    (["--shuffles", "4", "--plot", "x.png"], "cannot be used with --plot"),
    (["--shuffles", "4", "--label-delay", "60"], "cannot be used with --label-delay"),
    (["--shuffles", "4", "--window", "100"], "cannot be used with --window"),
])
def test_shuffles_refuse_what_needs_one_stream(extra: list[str], message: str,
                                               files: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["evaluate", str(files["csv"]), *FLAGS, *extra], capsys)
    assert rc == 2 and message in err


def test_shuffles_refuse_a_topic(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["evaluate", "--topic", "tx", *FLAGS, "--shuffles", "4"], capsys)
    assert rc == 2 and "cannot be used with --topic" in err


def test_shuffles_refuse_entity_aggregates(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "streamlearn.toml"
    cfg.write_text('[[model]]\nname = "fraud"\ntopic = "tx"\nlabel = "is_fraud"\n'
                   'numeric = ["amount"]\n\n[[model.aggregate]]\nentity = "country"\n'
                   'field = "amount"\nwindows = ["1h"]\nstats = ["count"]\n')
    rc, _, err = _run(["-c", str(cfg), "evaluate", str(files["csv"]), "--shuffles", "3", "-q"],
                      capsys)
    assert rc == 2 and "cannot replay entity aggregates" in err
    rc, _, err = _run(["-c", str(cfg), "evaluate", str(files["csv"]), "-q"], capsys)  # one order
    assert rc == 0, err
