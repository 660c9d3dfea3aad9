"""OnlineModel on the CUDA backend agrees with the CPU backend, weights stay on the device.

Runs on numba's simulator in CI (``NUMBA_ENABLE_CUDASIM=1``) and unchanged on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.synthetic import FraudStream

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning"),
    pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device and no simulator"),
]

SPECS = [
    ModelSpec(name="fraud", topic="t", label="is_fraud", numeric=("amount", "hour", "distance_km"),
              categorical=("merchant_category", "country"), hash_bits=8, optimizer=opt)
    for opt in ("adagrad", "ftrl")
] + [
    ModelSpec(name="dense", topic="t", label="is_fraud", numeric=("amount", "hour", "distance_km")),
    ModelSpec(name="rank", topic="t", task="ranking", label="is_fraud", numeric=("amount",),
              categorical=("merchant_category", "country"), hash_bits=6, fm_factors=3),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.optimizer}")
def test_cuda_model_matches_cpu_model(spec):
    events = FraudStream(seed=4).take(96)
    for e in events[::7]:
        del e["distance_km"]  # missing values: their weights, the CSR kernels for the dense
    on_cpu, on_gpu = OnlineModel(spec, device="cpu"), OnlineModel(spec, device="cuda")
    assert on_gpu.backend.name == "cuda"
    for start in range(0, len(events), 32):
        batch, _ = on_cpu.vectorizer.transform_many(events[start:start + 32])
        np.testing.assert_allclose(on_gpu.process(batch), on_cpu.process(batch),
                                   rtol=1e-4, atol=1e-6)
    assert not isinstance(on_gpu.w, np.ndarray)  # resident on the device between batches
    state = on_gpu.to_state()
    assert isinstance(state["weights"]["w"], np.ndarray)
    np.testing.assert_allclose(state["weights"]["w"], on_cpu.w, rtol=1e-4, atol=1e-6)
    restored = OnlineModel.from_state(state, device="cuda")
    probe = FraudStream(seed=5).take(8)
    del probe[0]["amount"]
    np.testing.assert_allclose(restored.predict_events(probe), on_gpu.predict_events(probe),
                               rtol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.optimizer}")
def test_cuda_process_many_matches_the_fused_cpu_call(spec):
    """The worker's entry point: a chunk loop on the device, one compiled call on the CPU."""
    events = FraudStream(seed=6).take(100)
    for e in events[::9]:
        del e["is_fraud"]  # partly labelled chunks
    for e in events[::7]:
        del e["distance_km"]
    on_cpu, on_gpu = OnlineModel(spec, device="cpu"), OnlineModel(spec, device="cuda")
    batch, _ = on_cpu.vectorizer.transform_many(events)
    cpu, gpu = on_cpu.process_many(batch, 32), on_gpu.process_many(batch, 32)
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-6)
    assert gpu.versions.tolist() == cpu.versions.tolist() == [0, 1, 2, 3]
    assert gpu.learned.tolist() == cpu.learned.tolist()
    np.testing.assert_allclose(on_gpu.to_state()["weights"]["w"], on_cpu.w, rtol=1e-4, atol=1e-6)
    assert on_gpu.n_learned == on_cpu.n_learned == int(cpu.learned.sum())
