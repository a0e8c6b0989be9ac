# cryptlayer: `make demo` and `make test` are the two entry points (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup demo test test-host test-vm test-power-loss test-full-sweep lint bench clean

setup:
	scripts/install-deps

demo: setup
	scripts/in-vm scripts/demo

test: setup test-host test-vm

# Pure logic, CLI errors and linters (ruff, mypy --strict): no devices needed.
test-host:
	$(PYTEST) tests/unit

# Everything that touches devices: two VM boots at once, one CPU each (the crash-point sweep with
# the tampering, registry, process, hostile-file and engine tests, and the rest), or this host if it has
# dm-crypt; and the
# power-cut test, which needs two boots of one disk, as soon as either VM has ended
# (scripts/vm-tier). Narrow the first with VM_TESTS=tests/vm/test_x.py or
# PYTEST_ARGS='-k shred' (one boot, then the power-cut test).
VM_TESTS ?= tests/vm
test-vm:
	scripts/vm-tier $(VM_TESTS) $(PYTEST_ARGS)

test-power-loss:
	scripts/power-loss

# The crash points of `run`'s teardown, which release the steps `stop`'s points already crash
# in (tests/vm/test_crash_points.py says how): not in `make test`; CI runs them after it.
test-full-sweep:
	scripts/in-vm $(PYTEST) -m full_sweep -v --durations=0 tests/vm/test_crash_points.py

# Benchmarks (not pass/fail): figures 1-7 in one VM boot; figure 8, and what needs no
# device-mapper, on this host; then the report in docs/benchmarks/.
# BENCH_ARGS='--sizes 64,256 --runs 2' makes a quicker run, and
# BENCH_ARGS='read concurrent' re-runs only those sections (bench/devices.py --help).
bench: setup
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	CRYPTLAYER_VM_DISK=$${CRYPTLAYER_VM_DISK:-24G} CRYPTLAYER_VM_MEMORY=$${CRYPTLAYER_VM_MEMORY:-4G} \
	  CRYPTLAYER_VM_TIMEOUT=$${CRYPTLAYER_VM_TIMEOUT:-240m} CRYPTLAYER_VM_RWDIR=docs/benchmarks \
	  scripts/in-vm $(PY) bench/devices.py $(BENCH_ARGS)
	$(PY) bench/host.py
	$(PY) bench/report.py

lint:
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
