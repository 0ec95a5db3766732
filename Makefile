# Sluice: every target installs what it needs first, so a fresh clone needs only
# `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench bench-redis clean k8s-validate services node-deps

$(STAMP): pyproject.toml constraints.txt
	bash scripts/ensure-python.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m service

lint: install
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy

test: lint k8s-validate services node-deps
	$(PY) -m pytest

# The Node SDK check (tests/test_node_sdk.py): the openai package from the committed lockfile.
node-deps: services
	@if command -v npm >/dev/null; then cd tests/node && npm ci --no-audit --no-fund --silent; \
	else echo "node-deps: npm is missing: the Node SDK check will skip (fail when CI=true)" >&2; fi

# Render k8s/ (base + overlays) offline and validate every object against the schemas.
k8s-validate: install
	$(PY) scripts/k8s_validate.py k8s

# Install redis-server/PostgreSQL when missing; the tests start private instances.
services:
	bash scripts/ensure-services.sh

# The benchmark, then its Redis mode (what shared state costs); bench-redis runs the latter.
bench: install services
	$(PY) -m bench
	$(PY) -m bench.shared

# Shared state's cost: the same gateway with in-process state and with Redis.
bench-redis: install services
	$(PY) -m bench.shared

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
