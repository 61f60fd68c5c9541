# The two commands of README.md. Everything they need is installed here, from the package
# registries only, so a fresh machine with Python 3.11 is enough.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install install-test certs lint clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11+ is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

certs: $(STAMP)
	$(BIN)/gateway certs dev-init

# Dev certificates, the three provider emulators (mTLS) and the gateway; Ctrl-C stops all.
run: $(STAMP) certs
	@set -a; . config/dev.env; set +a; exec $(BIN)/gateway dev --config config/gateway.yaml

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data logs .pytest_cache .hypothesis
