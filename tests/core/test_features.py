import subprocess
import sys

import numpy as np

from streamlearn.config import ModelSpec
from streamlearn.features import Vectorizer, csr_rows, stable_hash

SPEC = ModelSpec(
    name="m", topic="t", numeric=("a", "b"), categorical=("c",), label="y", hash_bits=8
)


def test_hash_is_stable_across_processes():
    """Python's hash() is salted per process; ours must not be."""
    code = "from streamlearn.features import stable_hash; print(stable_hash('country', 'FR'))"
    outs = {
        subprocess.check_output([sys.executable, "-c", code], env={"PYTHONHASHSEED": s})
        for s in ("1", "2")
    }
    assert outs == {f"{stable_hash('country', 'FR')}\n".encode()}


def test_slots_fall_in_the_hashed_block_and_repeat():
    vec = Vectorizer(SPEC)
    slots = [vec.slot("c", f"v{i}") for i in range(1000)]
    assert min(slots) >= SPEC.n_numeric and max(slots) < SPEC.n_weights
    assert slots == [Vectorizer(SPEC).slot("c", f"v{i}") for i in range(1000)]


def test_missing_numeric_is_nan_and_bad_values_are_rejected_with_the_field():
    vec = Vectorizer(SPEC)
    batch, rejects = vec.transform_many(
        [
            {"event_id": "a", "a": 1.0, "c": "x", "y": 0},
            {"event_id": "b", "b": 2, "y": 1},
            {"event_id": "c", "a": True},
            {"event_id": "d", "a": 1.0, "y": 2},
            {"event_id": "e", "c": ["list"]},
            ["not", "an", "object"],
            {"event_id": "f", "a": float("inf")},
        ]
    )
    assert batch.ids == ["a", "b"]
    assert np.isnan(batch.numeric[0, 1]) and np.isnan(batch.numeric[1, 0])
    assert [i for i, _ in rejects] == [2, 3, 4, 5, 6]
    reasons = " | ".join(r for _, r in rejects)
    for expected in (
        "field 'a': expected a number, got bool",
        "label must be 0 or 1",
        "field 'c': expected a string or integer",
        "must be a JSON object",
        "must be finite",
    ):
        assert expected in reasons


def test_unlabelled_events_are_kept_with_nan_label():
    batch, _ = Vectorizer(SPEC).transform_many([{"a": 1.0}, {"a": 2.0, "y": 1}])
    assert batch.has_label.tolist() == [False, True]


def test_csr_rows_layout():
    z = np.array([[0.5, -1.0], [2.0, 0.0]], dtype=np.float32)
    hashed = np.array([[10], [11]])
    indptr, indices, values = csr_rows(z, hashed)
    assert indptr.tolist() == [0, 3, 6]
    assert indices.tolist() == [0, 1, 10, 0, 1, 11]
    assert values.tolist() == [0.5, -1.0, 1.0, 2.0, 0.0, 1.0]
    assert indices.dtype == np.int32 and values.dtype == np.float32


def test_slot_caches_do_not_keep_long_values():
    """Distinct 100 KB categories were all kept (up to 100,000 per field); a long value
    is hashed each time instead, to the same slot."""
    import gc
    import tracemalloc

    vec = Vectorizer(SPEC)
    tracemalloc.start()
    try:
        long = [f"{i}" + "x" * 100_000 for i in range(20)]
        batch, rejects = vec.transform_many([{"a": 1.0, "c": v} for v in long])
        slots = [vec.slot("c", v) for v in long]
        assert not rejects and batch.hashed[:, 0].tolist() == slots
        assert slots == [SPEC.first_slot + (stable_hash("c", v) & 0xFF) for v in long]
        del long
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1_000_000  # the 20 values, 2 MB, kept by both caches before
