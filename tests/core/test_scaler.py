import numpy as np
import pytest

from streamlearn.scaler import Z_CLIP, RunningStandardScaler, _std


def test_matches_two_pass_numpy_over_many_batches(rng):
    X = rng.lognormal(3.0, 1.5, size=(5000, 4)) * np.array([1, 10, 1e3, 1e-3])
    s = RunningStandardScaler(4)
    for chunk in np.array_split(X, 37):
        s.learn_many(chunk)
    np.testing.assert_allclose(s.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.var, X.var(axis=0), rtol=1e-10)
    np.testing.assert_array_equal(s.count, 5000)


def test_merge_equals_sequential_updates(rng):
    X = rng.normal(100.0, 5.0, size=(3000, 3))
    seq = RunningStandardScaler(3)
    seq.learn_many(X)
    parts = [RunningStandardScaler(3) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(X, [100, 2500]), strict=True):
        part.learn_many(chunk)
    merged = RunningStandardScaler(3)
    for part in reversed(parts):
        merged.merge(part)
    np.testing.assert_allclose(merged.mean, seq.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, seq.m2, rtol=1e-9)


def test_nan_is_missing_and_stays_missing(rng):
    X = rng.normal(size=(200, 2))
    holes = X.copy()
    holes[::3, 0] = np.nan
    s = RunningStandardScaler(2)
    s.learn_many(holes)
    present = X[~np.isnan(holes[:, 0]), 0]
    assert s.count.tolist() == [len(present), 200]
    np.testing.assert_allclose(s.mean[0], present.mean())
    z = s.transform_many(holes)  # the model learns a weight for the missing value itself
    assert np.isnan(z[::3, 0]).all() and np.isfinite(np.delete(z, np.s_[::3], axis=0)).all()


def test_constant_feature_transforms_finite():
    s = RunningStandardScaler(1)
    s.learn_many(np.full((10, 1), 7.0))
    assert s.transform_many(np.array([[7.0], [8.0]])).tolist() == [[0.0], [1.0]]


def test_state_round_trip_and_shape_check(rng):
    s = RunningStandardScaler(3)
    s.learn_many(rng.normal(size=(50, 3)))
    r = RunningStandardScaler.from_state(s.to_state())
    np.testing.assert_array_equal(r.m2, s.m2)
    with pytest.raises(ValueError, match="cannot merge 2 features into 3"):
        s.merge(RunningStandardScaler(2))


def test_zscores_are_clipped_and_finite_unless_missing(rng):
    s = RunningStandardScaler(1)
    s.learn_many(rng.normal(size=(1000, 1)))
    z = s.transform_many(np.array([[1e14], [-1e15], [np.nan], [0.5]]))
    assert z[:2, 0].tolist() == [Z_CLIP, -Z_CLIP] and np.isnan(z[2, 0])
    assert abs(z[3, 0] - (0.5 - s.mean[0]) / s.std[0]) < 1e-6  # ordinary values untouched


def test_an_overflowed_variance_gives_a_usable_scale():
    std = _std(np.array([10.0, 10.0, 0.0, 4.0]), np.array([np.inf, np.nan, 0.0, 16.0]))
    assert std.tolist() == [1.0, 1.0, 1.0, 2.0]


def test_a_non_finite_state_starts_over_on_load(rng):
    s = RunningStandardScaler(2)
    s.learn_many(rng.normal(5.0, 2.0, size=(100, 2)))
    state = s.to_state()
    state["m2"][0] = np.inf  # what one 1e308 did before values were bounded
    r = RunningStandardScaler.from_state(state)
    assert r.finite and r.count.tolist() == [0.0, 100.0] and r.m2[1] == s.m2[1]
    r.learn_many(np.array([[3.0, 5.0], [5.0, 5.0]]))
    assert r.mean[0] == 4.0 and np.isfinite(r.transform_many(np.array([[1e15, 1.0]]))).all()
