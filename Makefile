# The two commands of README.md. Everything they need is installed here, from the package
# registries only, so a fresh machine with Python 3.11 is enough.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test install install-test certs services clean browser bench bench-tools bench-stages rehearse

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

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

certs: $(STAMP)
	$(BIN)/gateway certs dev-init

# Dev certificates, the three provider emulators (mTLS) and the gateway; Ctrl-C stops all.
run: $(STAMP) certs
	@set -a; . config/dev.env; set +a; exec $(BIN)/gateway dev --config config/gateway.yaml

# The console's browser test drives Debian's chromium with Selenium (a downloaded browser cannot
# run on these machines): installed from the Debian archive where missing, which needs root.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium chromium-driver >/dev/null; \
	else \
	  echo "error: the console's browser test needs Debian's chromium and chromium-driver;" \
	       "run make test as root, or: sudo apt-get install chromium chromium-driver" >&2; exit 1; \
	fi

# `make bench` loads with wrk and compares against nginx, both from the Debian archive, installed
# where missing (root). The bench runs its own nginx on free ports with a config in a temporary
# directory; a system nginx service that the install may start is stopped, so it holds no port.
# BENCH_QUICK=1 for a short run; BENCH_DURATION_S, BENCH_REPEAT, BENCH_CONCURRENCY, BENCH_TARGETS.
# The PostgreSQL row needs the server of `make services` (skipped with a note when it is down).
bench-tools:
	@if command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq wrk nginx >/dev/null; \
	  if command -v systemctl >/dev/null 2>&1; then systemctl stop nginx 2>/dev/null || true; fi; \
	  if [ -f /run/nginx.pid ]; then /usr/sbin/nginx -s quit 2>/dev/null || true; fi; \
	else \
	  echo "error: make bench needs Debian's wrk and nginx; run it as root, or: sudo apt-get install wrk nginx" >&2; exit 1; \
	fi

bench: $(STAMP) bench-tools
	$(BIN)/python bench/run_bench.py --readme README.md

# What each stage of a payment costs: py-spy (from PyPI, the `bench` extra) over the gateway under wrk.
bench-stages: $(BENCH_STAMP) bench-tools
	$(BIN)/python bench/bench_stages.py --readme README.md

# The sale before the sale: three minutes of a peak against the emulators with config/gateway.yaml
# (README, "Before the sale: `gateway rehearse`"); the run directory is under logs/rehearsals/.
rehearse: $(STAMP)
	$(BIN)/gateway rehearse --profile peak-sale --minutes 3 --config config/gateway.yaml

# PostgreSQL and Redis on 127.0.0.1 for the scale-out tests (see .ci/services).
services:
	@bash .ci/services

test: $(TEST_STAMP) browser services
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data logs .pytest_cache .hypothesis
