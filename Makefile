# Everyday commands. `make run` and `make test` set everything up first on a fresh machine.
UV ?= uv
PY := .venv/bin/python

.PHONY: setup run test test-faults proto openapi lint bench test-deps

setup:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --quiet

run: setup  ## the gateway on the embedded default: SQLite + in-process pub/sub, loopback
	$(UV) run --frozen prism serve $(ARGS)

# The suite runs in TEST_WORKERS processes (pytest-xdist), a whole test module at a time, with
# tests/faults alone at the end (tests/conftest.py); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup
	$(UV) run --frozen pytest -n $(TEST_WORKERS) $(ARGS)

test-faults: setup  ## tests/faults: stops and restarts the local PostgreSQL and Redis (opt-in; CI runs them)
	PRISM_FAULT_TESTS=1 $(UV) run --frozen pytest tests/faults $(ARGS)

proto: setup  ## regenerate the committed Python code after editing proto/
	$(PY) proto/generate.py
	$(PY) openapi/generate.py

openapi: setup  ## regenerate the committed OpenAPI document
	$(PY) openapi/generate.py

lint: setup
	$(UV) run --frozen ruff check app adapters tests

test-deps:  ## Debian chromium + playwright-core (tests/test_browser.py), nginx (tests/test_mtls_e2e.py), Connect-ES + grpc-js (tests/test_js_clients.py)
	@(test -x /usr/bin/chromium && test -x /usr/sbin/nginx) || \
		(apt-get update -qq && apt-get install -y -qq chromium nginx-light >/dev/null)
	cd frontend-examples/browser-test && npm ci --silent --no-audit --no-fund
	cd frontend-examples/node-clients && npm ci --silent --no-audit --no-fund

bench: setup  ## benchmark sections side by side → benchmarks/results/latest.md (benchmarks/README.md); ARGS="--quick" or "--label before"
	$(UV) run --frozen python -m benchmarks.run $(ARGS)
