# The project's interface: `make demo` and `make test` are all the set-up a fresh machine needs.
PY ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

# Two pytest processes, a test file each at a time (pytest-xdist): one process leaves the cores
# idle while it waits for Ray and the commands it starts; two keep two cores busy (three were
# slower here). TEST_WORKERS=0 runs one process.
TEST_WORKERS ?= 2

# A test process that dies (a test still running after pyproject.toml's timeout is ended so)
# ends the run: pytest-xdist would give the test's file, that test first, to a new process.
test: install
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0 \
		--doctest-modules raymerge tests

bench: install
	$(BIN)/python bench/bench.py --reps 3 --scale2 --machine-note 'a disk shared with other machines'

docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info
