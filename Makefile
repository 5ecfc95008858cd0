# One set-up command, one test command, one main job (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup test demo prepare prepare-demo bench mlflow-ui

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,onnx]"

test:
	$(PY) -m pytest -q -x tests

# the MLflow UI of svlib's store (mlruns/mlflow.db; plain `mlflow ui` opens an empty ./mlflow.db), with its links
mlflow-ui:
	$(PY) -m svlib.tracking ui --db mlruns/mlflow.db --port 5000

prepare:
	$(PY) -m svlib.corpora.prepare manifest --manifest ../shared/data/sv-bench/manifest.csv --out data/sv-bench

# the larger speaker-disjoint split with speechocean762, ESC-10 noise lists and simulated RIRs (README "Data"):
# from $(SHARED) when it has the three folders, else downloaded into data/downloads and rebuilt under data/public
# (set SVLIB_DOWNLOAD_MIRROR=URL to fetch the archives from URL/<file>)
SHARED ?= ../shared/data
prepare-demo:
	$(PY) -m svlib.corpora.demo_sources --shared $(SHARED) --downloads data/downloads --public data/public --out data/demo

demo: prepare-demo
	$(PY) -m experiments.pipeline --config experiments/configs/demo/pipeline.yaml
