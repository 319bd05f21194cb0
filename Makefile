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

# the main job: compress SmolLM2 into a 60 MiB GGUF budget (each tensor's llama.cpp block
# type chosen from measured sensitivities; GPTQ calibrated on text and on conversations the
# model writes itself), PV-tune it through its codes, write the GGUF file that llama.cpp and
# Ollama run, and ask it a few questions next to the uncompressed model
demo: $(STAMP)
	$(VENV)/bin/pvtune compress --target-size 60MiB --preset demo --chat-data 16 \
		--eval-windows 16 --output demo-60mib --overwrite --max-new-tokens 0
	$(VENV)/bin/pvtune finetune demo-60mib --preset demo \
		--output demo-60mib-pv --overwrite
	$(VENV)/bin/pvtune export demo-60mib-pv --to gguf --output demo-60mib-pv.gguf --overwrite
	$(VENV)/bin/pvtune ask demo-60mib-pv --limit 6

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
