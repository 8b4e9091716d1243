# wrapguard: the commands a newcomer needs.
#   make demo   a local WireGuard peer and a wrapped curl through it (no root)
#   make test   everything CI runs (installs what it needs; as root also wireguard-go & co.)
#   make bench  benchmark table, ratios measured side by side in one run
#   make lint   ruff + mypy --strict on the protocol cores
#   make dist   sdist + platform wheel (shim compiled in) in dist/

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORES := wrapguard/wire wrapguard/noise wrapguard/tunnel wrapguard/netstack wrapguard/routing.py

.PHONY: demo test bench lint install system-deps dist clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c) wrapguard/_fastpath_build.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

system-deps:
	@bash scripts/install-system-deps.sh

test: system-deps install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check wrapguard tests bench demo
	$(PY) -m mypy --strict $(CORES)

bench: system-deps install
	$(PY) bench/run.py

demo: install
	$(PY) -m demo

# An sdist and a platform wheel with the shim and the cffi helper compiled in (dist/).
dist: install
	rm -rf dist build
	$(PY) -m build --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info wrapguard/*.so .pytest_cache .mypy_cache .ruff_cache
