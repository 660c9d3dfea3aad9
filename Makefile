# One command per chore. `make demo` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help demo test chromium test-fast test-cudasim test-gpu lint bench-kernels bench-worker bench-predict bench-serve load clean clean-numba

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## embedded broker + worker + API + producer, live status until Ctrl-C
	$(BIN)/streamlearn demo

test: $(STAMP) lint $(BIN)/promtool chromium  ## lint, all tests (real embedded broker), CUDA twins on the simulator
	$(BIN)/python -m pytest -m "not gpu and not slow"
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m "cudasim and not gpu and not slow" -p no:cacheprovider tests/kernels

# promtool (tests/deploy checks the Prometheus config) from Debian's prometheus package,
# unpacked into the venv: no service is installed or started. Skipped when one is on PATH;
# without apt the deploy test skips that check and says why.
$(BIN)/promtool: | $(STAMP)
	@if command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $@; \
	elif command -v apt-get >/dev/null; then \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download -q prometheus 2>/dev/null || { apt-get update -q && apt-get download -q prometheus; }; } && \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > $(CURDIR)/$@.part && \
	  chmod +x $(CURDIR)/$@.part && mv $(CURDIR)/$@.part $(CURDIR)/$@; rm -rf $$tmp; \
	else echo "promtool unavailable (no apt-get): tests/deploy skips the Prometheus check"; fi

# Debian's chromium for the dashboard's headless-browser test, installed only when absent;
# without it (no apt-get, not root) that test skips and says why.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	    || echo "chromium unavailable: the dashboard browser test skips"; }

test-fast: $(STAMP)  ## unit tests only (no broker)
	$(BIN)/python -m pytest -m "not kafka and not gpu and not slow"

test-cudasim: $(STAMP)  ## CUDA kernels on numba's simulator
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m "cudasim and not gpu" -p no:cacheprovider tests/kernels

test-gpu: $(STAMP)  ## CUDA kernels on a real GPU (needs streamlearn[cuda])
	$(BIN)/python -m pytest -m gpu tests/kernels

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check streamlearn kernels services tests load_tests

bench-kernels: $(STAMP)  ## kernel rows/s against a plain @njit baseline
	$(BIN)/python load_tests/bench_kernels.py

bench-worker: $(STAMP)  ## worker events/s (JSON and batch records) with baselines
	$(BIN)/python load_tests/bench_worker.py

bench-predict: $(STAMP)  ## /predict latency percentiles against /healthz
	$(BIN)/python load_tests/bench_predict.py

bench-serve: $(STAMP)  ## wrk: /predict vs a minimal FastAPI app, learn+serve, freshness (~6 min)
	@command -v wrk >/dev/null || apt-get install -y -q wrk
	$(BIN)/python load_tests/bench_serve.py

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .snapshots

clean-numba:  ## drop numba's compiled-kernel cache (after editing an inlined rule)
	find streamlearn kernels services -name '*.nbi' -delete -o -name '*.nbc' -delete
