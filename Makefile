# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVIDP_STAMP := devidp/node_modules/.installed

.PHONY: run test lint typecheck pytest bench clean devidp

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The dev identity provider's node modules (npm oidc-provider, see devidp/provider.mjs). Without
# npm it only says so (the tests that need it skip), except with CI=true.
$(DEVIDP_STAMP): devidp/package.json devidp/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix devidp --no-audit --no-fund && touch $(DEVIDP_STAMP); \
	elif [ "$$CI" = true ]; then \
		echo "npm is missing: apt-get install nodejs npm" >&2; exit 1; \
	else \
		echo "npm not found: devidp not installed, its tests will skip (apt-get install nodejs npm)" >&2; \
	fi

devidp: $(DEVIDP_STAMP)

run: $(STAMP) $(DEVIDP_STAMP)
	$(PY) -m examples.system_demo

test: lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) $(DEVIDP_STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) benchmarks/stream_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info tests/interop/.build devidp/node_modules
