# One set-up command, one test command, one main job (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup test demo prepare prepare-demo bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,onnx]"

test:
	$(PY) -m pytest -q -x tests

prepare:
	$(PY) -m svlib.data.prepare manifest --manifest ../shared/data/sv-bench/manifest.csv --out data/sv-bench

# the larger speaker-disjoint split with speechocean762, ESC-10 noise lists and simulated RIRs (README "Data")
prepare-demo:
	$(PY) -m svlib.data.prepare demo --sv-bench ../shared/data/sv-bench/manifest.csv \
	    --so762 ../shared/data/speechocean762-train --esc10 ../shared/data/esc10-noise/manifest.csv --out data/demo

demo: prepare
	$(PY) -m experiments.pipeline --config experiments/configs/demo/pipeline.yaml
