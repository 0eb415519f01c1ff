# ldmkit developer tasks. `make test` is the project's test command (and all that .ci/run runs).
#
# The virtual environment lives in .venv and gets an editable install of ldmkit with the extras in
# EXTRAS; a stamp file makes re-runs fast and re-installs when pyproject.toml or this Makefile change.
#   make test EXTRAS=dev,engine,export    # also install torch (CPU build, pinned) and the ONNX stack

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test coverage lint golden clean venv

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

coverage: $(STAMP)
	$(PY) -m pytest -q --cov=reference --cov-report=term-missing

lint: $(STAMP)
	$(VENV)/bin/ruff check .

golden: $(STAMP)
	$(VENV)/bin/ldmkit golden regen --dir golden

# ---------------------------------------------------------------------------------------------------
# demo: reserved for the end-to-end demo (train on the built-in MNIST subset, sample, export to ONNX)
# that comes with the engine and export work. Add the `demo` target here.
# ---------------------------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .coverage .ruff_cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
