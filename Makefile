# VisualSearch: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= application.yaml
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install data browser demo test report lab bench bench-full bench-retrieval bench-scale clean-generated

## Print this help.
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-zA-Z_-]+:/{if(doc){split($$1,t,":"); printf "  make %-16s %s\n", t[1], doc}; doc=""}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Create .venv (if missing) and install the project with its dev tools.
install: $(STAMP)

## Install the Debian dataset packages (Tux Paint stamps, Fashion-MNIST) when missing; needs root.
data: $(STAMP)
	$(VENV)/bin/visualsearch data install

## Install Debian's chromium for the browser tests when missing (needs root; else prints the command).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "the browser tests need chromium: sudo apt-get install -y chromium chromium-driver (they are skipped without it)"; fi

## Run the whole pipeline on the default dataset, then the notebook reports.
demo: $(STAMP) data
	$(VENV)/bin/visualsearch run -c $(CONFIG) --report

## Run the whole test suite.
test: $(STAMP) data browser
	$(PY) -m pytest -q

## Run the numbered notebooks with papermill into HTML reports under reports/.
report: $(STAMP)
	$(VENV)/bin/visualsearch report -c $(CONFIG)

## Run a grid of experiment runs into reports/runs/ (e.g. make experiment P='-p classifier.head=ensemble,linear').
.PHONY: experiment
experiment: $(STAMP)
	$(VENV)/bin/visualsearch experiment -c $(CONFIG) $(P)

## Open JupyterLab on the notebooks (with --allow-root when run as root).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)

## Quick benchmarks (extraction; search at 10k vectors).
bench: $(STAMP)
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/search.py --quick

## Retrieval benchmark: heads x modes over seeded splits (DATASETS=tuxpaint,fashion-mnist:1000,folder:/path ...; PRECISIONS=float32,int8).
bench-retrieval: $(STAMP) data
	$(PY) benchmarks/retrieval.py --datasets $(or $(DATASETS),tuxpaint,fashion-mnist:200) $(if $(BACKBONES),--backbones $(BACKBONES)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(PRECISIONS),--precisions $(PRECISIONS))

## Full search benchmark (10k, 100k, 1M vectors; takes a long while).
bench-full: $(STAMP)
	$(PY) benchmarks/search.py

## Client memory against collection size: extract and index 5k and 60k Fashion-MNIST images on Dask (~40 min).
bench-scale: $(STAMP) data
	$(PY) benchmarks/scale_memory.py

## Delete generated data, models and reports (keeps the folders).
clean-generated:
	find data models reports -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
