# VisualSearch: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= application.yaml
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install data demo test report bench bench-full bench-retrieval clean-generated

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

## Run the whole pipeline on the default dataset, then the notebook reports.
demo: $(STAMP) data
	$(VENV)/bin/visualsearch run -c $(CONFIG) --report

## Run the whole test suite.
test: $(STAMP) data
	$(PY) -m pytest -q

## Run the numbered notebooks with papermill into HTML reports under reports/.
report: $(STAMP)
	$(VENV)/bin/visualsearch report -c $(CONFIG)

## Run a grid of experiment runs into reports/runs/ (e.g. make experiment P='-p classifier.head=ensemble,linear').
.PHONY: experiment
experiment: $(STAMP)
	$(VENV)/bin/visualsearch experiment -c $(CONFIG) $(P)

## Quick benchmarks (extraction; search at 10k vectors).
bench: $(STAMP)
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/search.py --quick

## Retrieval benchmark: heads x modes over seeded splits (DATASETS=tuxpaint,fashion-mnist:1000,folder:/path ...).
bench-retrieval: $(STAMP) data
	$(PY) benchmarks/retrieval.py --datasets $(or $(DATASETS),tuxpaint,fashion-mnist:200) $(if $(BACKBONES),--backbones $(BACKBONES)) $(if $(SEEDS),--seeds $(SEEDS))

## Full search benchmark (10k, 100k, 1M vectors; takes a long while).
bench-full: $(STAMP)
	$(PY) benchmarks/search.py

## Delete generated data, models and reports (keeps the folders).
clean-generated:
	find data models reports -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
