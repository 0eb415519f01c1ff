# ldmkit developer tasks. `make test` is the project's test command (and all that .ci/run runs).
#
# The virtual environment lives in .venv and gets an editable install of ldmkit with the extras in
# EXTRAS; a stamp file makes re-runs fast and re-installs when pyproject.toml or this Makefile change.
#   make test EXTRAS=dev                  # the reference alone (torch/ONNX tests are then skipped)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,engine,export,images
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test coverage lint typecheck golden demo clean venv browser fuzz

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP) browser
	$(PY) -m pytest -q

# The browser test (tests/test_web_example.py) drives Debian's Chromium. Run as root (as CI is) where chromium
# is missing, this installs it with apt-get; otherwise, or if that fails, the test skips and says why.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { echo "make: installing Debian's chromium for the browser test"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "make: could not install chromium; the browser test will skip"; }

coverage: $(STAMP)
	$(PY) -m pytest -q --cov=reference --cov-report=term-missing

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The static check (also part of `make test`): pyright resolves every import in the repository and in a
# script outside it. `$(VENV)/bin/pyright` alone lists pyright's full type report, which is not a gate.
typecheck: $(STAMP)
	$(PY) -m pytest -q tests/test_static.py

# The full fuzz suite of hostile checkpoints, export folders and arguments (tests/fuzz.py; the fast subset runs
# in `make test`): prints the count of each outcome; exit 1 unless every case passed.
fuzz: $(STAMP)
	$(PY) tests/fuzz.py --cases 1200

golden: $(STAMP)
	$(VENV)/bin/ldmkit golden regen --dir golden

# The main job: train the demo preset on the built-in digits (VAE, then the class-conditional latent
# U-Net), then sample a grid with 8 images of every class with the default sampler (DPM-Solver++(2M),
# 10 steps, guidance 1.15). Starts afresh in runs/demo each time.
demo: $(STAMP)
	rm -rf runs/demo
	@start=$$(date +%s); \
	$(VENV)/bin/ldmkit train --preset demo --out runs/demo && \
	$(VENV)/bin/ldmkit sample runs/demo/checkpoint.pt -n 80 -o runs/demo/grid.png && \
	echo "demo: trained and sampled in $$(( $$(date +%s) - start )) s; grid: runs/demo/grid.png"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .coverage .ruff_cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
