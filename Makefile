# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# pip (not uv) so torch 2.14.1 / torchvision 0.29.1 come from the wheels on this machine
	$(BIN)/pip install --quiet -e '.[dev,peers,distributed]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/releq-tvm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/releq-tvm bench kernels

# everything the project writes inside the checkout (runs/ and out/ hold your results: kept)
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ci-tmp
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
