# cryptlayer: `make demo` and `make test` are the two entry points (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup demo test test-host test-vm lint bench clean

setup:
	scripts/install-deps

demo: setup
	scripts/in-vm scripts/demo

test: setup test-host test-vm

# Pure logic, CLI errors and linters (ruff, mypy --strict): no devices needed.
test-host:
	$(PYTEST) tests/unit

# Everything that touches devices: one VM boot (or this host, if it has dm-crypt) runs it all.
# Narrow it with VM_TESTS=tests/vm/test_x.py or PYTEST_ARGS='-k shred'.
VM_TESTS ?= tests/vm
test-vm:
	scripts/in-vm $(PYTEST) -m vm -v $(VM_TESTS) $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
