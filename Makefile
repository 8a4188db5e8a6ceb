# Interactive segmentation that learns from corrections. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed
CKPT ?= runs/train_init/checkpoints/last.ckpt
BENCH_OUT ?= runs/benchmark
SHARED_DATA ?= ../shared/data
BSDS_CKPT ?= runs/train_bsds/checkpoints/last.ckpt
EVOLVE_INIT ?= configs/evolve/init.yaml
EVOLVE_CKPT ?= runs/evolve_init/checkpoints/last.ckpt
STAGES ?=
EVOLVE_STAGES := $(if $(STAGES),--stages [$(STAGES)])
export BSDS_ROOT ?= $(SHARED_DATA)/BSDS500
export GRABCUT_ROOT ?= $(SHARED_DATA)/GrabCut
export BERKELEY_ROOT ?= $(SHARED_DATA)/Berkeley
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help venv demo train-init benchmark adapt adapt-sequence tune train-bsds benchmark-real evolve-init evolve evolve-ablation test clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv and install the project (+ dev tools) when missing

demo: $(STAMP) ## train the initial model on the embedded source domain, then compare fixed/IA/SA/IA+SA on 20 objects per domain -> runs/demo/
	$(MAKE) --no-print-directory train-init
	$(PY) -m lightning_app benchmark --config configs/benchmark.yaml --config configs/demo.yaml --ckpt $(CKPT) $(ARGS)

train-init: $(STAMP) ## train (or resume) the initial model and its MAS importance -> runs/train_init/checkpoints/last.ckpt{,.mas.pt}
	$(PY) -m lightning_app fit --config configs/train_init.yaml --ckpt_path last $(ARGS)
	$(PY) -m lightning_app importance --ckpt $(CKPT)

benchmark: $(STAMP) ## fixed / IA / SA / IA+SA on 50 objects per domain -> runs/benchmark/{results.json,per_object_iou.csv,*.png}
	$(PY) -m lightning_app benchmark --config configs/benchmark.yaml --ckpt $(CKPT) --out_dir $(BENCH_OUT) $(ARGS)

adapt: $(STAMP) ## fixed vs IA / SA / IA+SA / decoder-only IA on source and targets -> runs/adapt/
	$(PY) -m lightning_app benchmark --config configs/benchmark_adapt.yaml --ckpt $(CKPT) $(ARGS)

adapt-sequence: $(STAMP) ## SA stability on a 500-image fundus sequence -> runs/benchmark_sequence/
	$(PY) -m lightning_app benchmark --config configs/benchmark_sequence.yaml --ckpt $(CKPT) $(ARGS)

tune: $(STAMP) ## choose adaptation hyperparameters on the tuning domain (cells) -> runs/tune/results.json
	$(PY) -m lightning_app benchmark --config configs/tune.yaml --ckpt $(CKPT) $(ARGS)

train-bsds: $(STAMP) ## train (or resume) the real-photo initial model on BSDS500 regions (~30 min) -> runs/train_bsds/
	$(PY) -m lightning_app fit --config configs/train_bsds.yaml --ckpt_path last $(ARGS)
	$(PY) -m lightning_app importance --ckpt $(BSDS_CKPT)

benchmark-real: $(STAMP) ## every variant of the BSDS model on GrabCut and Berkeley -> runs/benchmark_real/
	$(PY) -m lightning_app benchmark --config configs/benchmark_real.yaml --ckpt $(BSDS_CKPT) $(ARGS)

evolve-init: $(STAMP) ## train (or resume) paper B's initial model: three-click protocol, binary predictor, classifier -> runs/evolve_init/
	$(PY) -m lightning_app fit --config $(EVOLVE_INIT) --ckpt_path last $(ARGS)

evolve: evolve-init ## life-long evolution through STAGES (default fundus,rooftop) with clicks only -> runs/evolve/{results.json,table.csv,table.png}
	$(PY) -m lightning_app evolve --config configs/evolve.yaml --init_ckpt $(EVOLVE_CKPT) $(EVOLVE_STAGES) $(ARGS)

evolve-ablation: evolve-init ## Table 4: ST, ST+IPT, ST+FA, ST+IPT+FA, each one stage on fundus, 3-click mIoU only -> runs/evolve_ablation/
	for v in st st_ipt st_fa st_ipt_fa; do \
	  $(PY) -m lightning_app evolve --config configs/evolve.yaml --config configs/evolve/$$v.yaml --init_ckpt $(EVOLVE_CKPT) --stages [fundus] --max_clicks 3 $(ARGS) || exit 1; \
	done

test: $(STAMP) ## run the test suite (CPU, a few minutes)
	WANDB_MODE=disabled $(PY) -m pytest -q tests $(ARGS)

clean: ## remove runs/ and caches (keeps .venv)
	rm -rf runs wandb .pytest_cache
