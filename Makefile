# make demo   - the main job: replicas contribute, sync, resolve, verify equal checkpoint ids
# make test   - the test suite (creates its own environment first)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env test demo lint bench mergekit-env browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch lies on this disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

# mergekit in its own environment: the oracle of the parity tests (never imported by us)
mergekit-env:
	bash tests/oracle/setup_mergekit.sh

# the status page's browser test drives Debian's chromium through chromium-driver (selenium);
# a fresh machine (CI runs as root) gets them from apt
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

test: $(STAMP) mergekit-env browser-deps
	$(PY) -m ruff check crdt_merge crdt_merge_server tests
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

demo: $(STAMP)
	$(PY) -m crdt_merge.demo

lint: $(STAMP)
	$(PY) -m ruff check crdt_merge crdt_merge_server tests

clean:
	rm -rf $(VENV) .venv-mergekit demo-out
