# nextbest — two commands: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install serve bench clean lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nextbest demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine training feature_store api benchmarks tests

test: lint
	$(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/nextbest serve

bench: $(STAMP)
	$(BIN)/nextbest bench latency

# Re-pin the exact versions a fresh machine installs (run after changing pyproject.toml).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e "^-e" -e "^pip==" > constraints.txt

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
