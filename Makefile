# Two entry points: `make demo` (install + generate on the embedded toy model) and `make test`
# (install with the test, app and batch extras + run the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/xdreamer: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/xdreamer
	$(BIN)/pip install -q -e ".[test,app,batch]"
	touch $@

install: $(BIN)/xdreamer

demo: install
	$(BIN)/xdreamer generate "a red cube" --model toy --preset toy --out runs/demo --overwrite

test: $(VENV)/.test-extras
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

.PHONY: install demo test
