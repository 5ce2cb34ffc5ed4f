# The README's commands. Each sets up .venv itself, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LAKE   ?= $(CURDIR)/data_lake
LEAGUE ?= Sanctum
# The demo forecasts fifteen liquid currencies of every price level, cheap bulk ones included (every eligible one,
# 188 in Sanctum, takes a few minutes more: make demo DEMO_CURRENCIES=).
DEMO_CURRENCIES ?= Divine Orb,Exalted Orb,Mirror Shard,Orb of Annulment,Sacred Orb,Awakened Sextant,Stacked Deck,Gemcutter's Prism,Orb of Alteration,Chromatic Orb,Orb of Fusing,Regal Orb,Orb of Alchemy,Vaal Orb,Orb of Scouring
REPLAY_PORT ?= 8765
export DAGSTER_HOME ?= $(LAKE)/.dagster

.PHONY: demo test dev e2e bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/poe-pipeline run --history sample_data --league $(LEAGUE) --lake $(LAKE) \
	  $(if $(DEMO_CURRENCIES),--currencies "$(DEMO_CURRENCIES)")

test: $(VENV)/.installed-dev
	$(BIN)/ruff check poe_pipeline tests benchmarks
	$(BIN)/python -m pytest -q --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

# The Dagster UI on this project, with the replay server standing in for poe.watch (LIVE=1: the real API).
dev: $(VENV)/.installed
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	@if [ -z "$(LIVE)" ]; then \
	  $(BIN)/poe-pipeline serve-replay --history sample_data --league $(LEAGUE) --port $(REPLAY_PORT) & \
	  trap "kill $$! 2>/dev/null" EXIT INT TERM; \
	  POE_WATCH_URL=http://127.0.0.1:$(REPLAY_PORT) POE_LEAGUE=$(LEAGUE) POE_HISTORY_DIR=$(CURDIR)/sample_data \
	    POE_DATA_LAKE=$(LAKE) $(BIN)/dagster dev -w workspace.yaml; \
	else \
	  POE_HISTORY_DIR=$(CURDIR)/sample_data POE_DATA_LAKE=$(LAKE) $(BIN)/dagster dev -w workspace.yaml; \
	fi

# End to end: the real daemon and `dagster dev` in headless Chromium (apt-get install chromium chromium-driver
# postgresql; .ci/run installs them). `make test` runs these too.
e2e: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q tests/test_daemon.py tests/test_ui_e2e.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check poe_pipeline tests benchmarks
	$(BIN)/dagster definitions validate -w workspace.yaml

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed

# All benches, the issue's full setting (about 2 hours on 2 cores). A part: make bench BENCH_ARGS="--only history"
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
