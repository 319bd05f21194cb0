# Two commands do all the set-up on a fresh machine (each builds .venv on first use):
#   make demo   pvtune's main job on the offline default model and text
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-reprs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# the main job: compress SmolLM2 to llama.cpp's 2-bit Q2_0 blocks (GPTQ), PV-tune it through
# its codes, and write a GGUF file that llama.cpp and Ollama run
demo: $(STAMP)
	$(VENV)/bin/pvtune compress --method gptq --format q2_0 --preset demo \
		--output demo-q2_0 --overwrite --max-new-tokens 0
	$(VENV)/bin/pvtune finetune demo-q2_0 --steps 20 --eval-windows 32 \
		--output demo-q2_0-pv --overwrite
	$(VENV)/bin/pvtune export demo-q2_0-pv --to gguf --output demo-q2_0-pv.gguf --overwrite

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
