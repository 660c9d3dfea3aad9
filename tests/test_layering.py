"""The core stays pure: importing it loads no I/O framework and no CUDA."""

import subprocess
import sys

CORE = ["streamlearn", "streamlearn.models", "streamlearn.pipeline", "streamlearn.serving",
        "streamlearn.kernels", "streamlearn.batch_format", "streamlearn.drift"]


def test_core_imports_no_io_frameworks_or_cuda():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "print(sorted(m for m in ('faust', 'fastapi', 'uvicorn', 'aiokafka', "
              "'numba.cuda') if m in sys.modules))")
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"


def test_no_top_level_kernels_or_services_package():
    code = ("import importlib.util as u; "
            "print(u.find_spec('kernels') is None and u.find_spec('services') is None)")
    out = subprocess.check_output([sys.executable, "-c", code], text=True, cwd="/")
    assert out.strip() == "True"


def test_worker_start_path_does_not_import_river():
    """river.drift (scipy, scikit-learn: seconds) loads in the background, not with these."""
    code = ("import sys, streamlearn.services.worker.app, streamlearn.models, "
            "streamlearn.pipeline; print(sorted(m for m in sys.modules if m == 'river' "
            "or m.startswith(('river.', 'sklearn', 'scipy.stats'))))")
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"
