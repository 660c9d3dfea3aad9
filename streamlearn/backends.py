"""Kernel backends by name: ``cpu`` (Numba ``@njit``) and ``cuda`` (``numba.cuda``).

A backend owns where model arrays live.  The CUDA backend keeps weights and
optimizer state resident on the device, so only each mini-batch crosses the bus.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

#: Hashed-weight count above which ``device="auto"`` moves a model to the GPU.
#: ``None`` until ``load_tests/bench_kernels.py --cuda`` has measured the crossover
#: on real hardware; until then ``auto`` stays on the CPU rather than guess.
CUDA_CROSSOVER_WEIGHTS: int | None = None


class BackendUnavailable(RuntimeError):
    """The requested device cannot be used here."""


@dataclass(frozen=True)
class Backend:
    """A kernel module plus the array placement that goes with it."""

    name: str
    kernels: ModuleType

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> Any:
        """Allocate a zeroed model array where this backend computes."""
        return self.asarray(np.zeros(shape, dtype=dtype))

    def asarray(self, host: np.ndarray) -> Any:
        """Place a host array on this backend (a no-op on the CPU)."""
        if self.name == "cuda":
            from numba import cuda

            return cuda.to_device(np.ascontiguousarray(host))
        return np.ascontiguousarray(host)

    def to_host(self, arr: Any) -> np.ndarray:
        """Copy a backend array to a NumPy array."""
        if self.name == "cuda" and not isinstance(arr, np.ndarray):
            return np.asarray(arr.copy_to_host())
        return np.array(arr, copy=True)


def _load_cuda() -> Backend:
    try:
        module = importlib.import_module("streamlearn.kernels.cuda")
    except ImportError as exc:
        raise BackendUnavailable(
            f"device='cuda' needs numba's CUDA support ({exc}); install streamlearn[cuda] "
            "or set device = 'cpu'"
        ) from exc
    if not module.is_available():
        raise BackendUnavailable(
            "device='cuda' was requested but no CUDA GPU is visible to numba; "
            "set device = 'cpu' or 'auto' in the model spec"
        )
    return Backend("cuda", module)


def _load_cpu() -> Backend:
    return Backend("cpu", importlib.import_module("streamlearn.kernels.cpu"))


_LOADERS = {"cpu": _load_cpu, "cuda": _load_cuda}


def get_backend(device: str, n_weights: int = 0) -> Backend:
    """Resolve ``cpu`` | ``cuda`` | ``auto`` to a backend, failing fast and clearly.

    Examples
    --------
    >>> get_backend("cpu").name
    'cpu'
    >>> get_backend("auto", n_weights=10).name
    'cpu'
    >>> get_backend("tpu")
    Traceback (most recent call last):
    ...
    streamlearn.backends.BackendUnavailable: unknown device 'tpu'; choose auto, cpu or cuda
    """
    if device == "auto":
        if CUDA_CROSSOVER_WEIGHTS is not None and n_weights >= CUDA_CROSSOVER_WEIGHTS:
            try:
                return _load_cuda()
            except BackendUnavailable:
                pass
        return _load_cpu()
    loader = _LOADERS.get(device)
    if loader is None:
        raise BackendUnavailable(f"unknown device {device!r}; choose auto, cpu or cuda")
    return loader()
