# prep: `make install` then `make test` set up a fresh machine; `make shards` runs the main job.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo_out

.PHONY: install install-bench test test-fast lint docs shards bench clean

install:  ## torch first (pinned: a looser spec would pull a CUDA build), then prep with every extra + dev tools
	$(PIP) install "torch==$(TORCH_VERSION)"
	printf 'torch==%s\n' "$(TORCH_VERSION)" > .torch-constraint.txt
	$(PIP) install -c .torch-constraint.txt -e ".[all,dev]"

BENCH_VENV ?= .bench-venv

install-bench:  ## the benchmarks' peers in their own venv (they pin older numpy/transformers), torch kept pinned
	$(PYTHON) -m venv --system-site-packages $(BENCH_VENV)
	printf 'torch==%s\n' "$(TORCH_VERSION)" > .torch-constraint.txt
	$(BENCH_VENV)/bin/python -m pip install -c .torch-constraint.txt -e ".[all,bench]"
	# litdata and mosaicml-streaming pull in torchvision, but no torchvision on PyPI is built for this CPU
	# torch: a mismatched one breaks every import of transformers (the precache benchmark). Neither peer
	# needs it for what the benchmarks do (bench/loaders.py stands in for streaming's import of it).
	$(BENCH_VENV)/bin/python -m pip uninstall -y torchvision

test: lint  ## the lint checks, then every test, slow ones included (CI runs exactly this)
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:  ## ruff, the layer contract (import-linter, see [tool.importlinter]) and the type checker
	$(PYTHON) -m ruff check src tests bench
	lint-imports
	$(PYTHON) -m mypy

docs:  ## the documentation site into site/ (mkdocs + mkdocstrings); any warning fails the build
	$(PYTHON) -m mkdocs build --strict

shards:  ## the main job: all stages on the embedded offline demo (local HTTP images, tiny encoders)
	$(PYTHON) -m prep.demo --out $(DEMO_OUT)

.PHONY: train
train:  ## `make shards` if its output is missing, then the demo training pipeline (runs/demo: checkpoints, samples/)
	@test -f $(DEMO_OUT)/tarfiles_merged/manifest.json || $(MAKE) shards
	PREP_DEMO_OUT=$(DEMO_OUT) $(PYTHON) -m prep.cli pipeline run configs/pipelines/demo.yaml --checkpoint-dir runs/demo

bench:  ## every benchmark with its peers (run `make install-bench` once first)
	$(BENCH_VENV)/bin/python -m bench

clean:
	rm -rf $(DEMO_OUT) site .pytest_cache .ruff_cache .torch-constraint.txt
