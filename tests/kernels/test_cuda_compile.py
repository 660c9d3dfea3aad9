"""Compile every CUDA kernel to PTX for the real target, without a GPU.

The simulator runs kernels as Python, so it accepts code that the CUDA target rejects (for
example ``max(x, 0.0)`` in a device function fails to type there). Where NVVM is installed but
no GPU or simulator is active, this test lowers each kernel with the argument types the host
launchers pass, for compute capability 9.0, so such errors fail CPU-only CI too.
"""

from __future__ import annotations

import types

import pytest
from numba import config

if config.ENABLE_CUDASIM:
    pytest.skip("the simulator cannot compile PTX", allow_module_level=True)

from numba import cuda  # noqa: E402
from numba import types as nt  # noqa: E402

pytestmark = pytest.mark.cudasim


def _nvvm_available() -> bool:
    try:
        from numba.cuda.cudadrv import nvvm

        return bool(nvvm.is_available())
    except Exception:
        return False


F32, F32_2 = nt.float32[::1], nt.float32[:, ::1]
F64, F64_2 = nt.float64[::1], nt.float64[:, ::1]
I64, I32 = nt.int64[::1], nt.int32[::1]
INT, FLT = nt.int64, nt.float64
OPT_ARGS = (INT, FLT, FLT, FLT, FLT, FLT, FLT)  # opt, lr, l1, l2, beta, cap, eta_sgd
SLOT_ARGS = (FLT, FLT, INT)  # slot_lr, slot_eta_sgd, first_slot

SIGNATURES = {
    "linear_predict_dense_kernel": (F32_2, F32, F32),
    "linear_predict_csr_kernel": (I64, I32, F32, F32, F32),
    "linear_rows_dense_kernel": (F32_2, F32, F32, INT, F64, F64),
    "linear_grad_dense_kernel": (F32_2, F64, INT, F64),
    "linear_update_dense_kernel": (F64, INT, F32, F32, F32, *OPT_ARGS),
    "linear_rows_csr_kernel": (I64, I32, F32, F32, F32, INT, FLT, F64, F32),
    "linear_update_csr_kernel": (I64, F32, F32, F32, F32, *OPT_ARGS, *SLOT_ARGS),
    "fm_predict_csr_kernel": (I64, I32, F32, F32, F32_2, F32),
    "fm_rows_csr_kernel": (I64, I32, F32, F32, F32, F32_2, INT, FLT, F64, F32, F32_2),
    "fm_update_csr_kernel": (I64, F32, F32_2, F32, F32_2, F32, F32, F32_2, F32_2, *OPT_ARGS,
                             *SLOT_ARGS),
    "scaler_update_kernel": (F64_2, F64, F64, F64),
    "average_update_kernel": (I64, F32, F64, FLT, F32),
}


@pytest.mark.skipif(cuda.is_available(), reason="a device is present: test_cuda.py runs them")
@pytest.mark.skipif(not _nvvm_available(), reason="NVVM (CUDA toolkit) not installed")
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_ptx(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import numba.cuda.dispatcher as dispatcher

    from streamlearn.kernels import cuda as kcuda

    # Device functions ask the (absent) driver for the compute capability; answer for it.
    # Skipped when a device exists, so no kernel compiled this way is ever launched.
    fake_device = types.SimpleNamespace(compute_capability=(9, 0))
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: fake_device)
    kernel = getattr(kcuda, name)
    ptx, _ = cuda.compile_ptx(kernel.py_func, SIGNATURES[name], cc=(9, 0))
    assert ".entry" in ptx
    if name in {"linear_rows_csr_kernel", "fm_rows_csr_kernel"}:
        assert "atom." in ptx or "red." in ptx  # gradient accumulation really is atomic


def test_every_kernel_is_listed() -> None:
    from streamlearn.kernels import cuda as kcuda

    assert {n for n in dir(kcuda) if n.endswith("_kernel")} == set(SIGNATURES)
