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
SEEDS ?= 0,1,2
SPREAD_OUT ?= runs/spread
comma := ,
EVOLVE_STAGES := $(if $(STAGES),--stages [$(STAGES)])
IMAGES ?= runs/app/images
ANNOTATIONS ?= runs/app/annotations.json
export BSDS_ROOT ?= $(SHARED_DATA)/BSDS500
export GRABCUT_ROOT ?= $(SHARED_DATA)/GrabCut
export BERKELEY_ROOT ?= $(SHARED_DATA)/Berkeley
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help venv lock demo train-init train-paper benchmark seeds adapt-sequence tune train-bsds tune-real benchmark-real evolve-init evolve evolve-ablation app app-benchmark test test-slow clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv and install the project (+ dev tools) at the versions of constraints.txt when missing

lock: ## re-resolve the newest dependencies into .venv and pin them in constraints.txt (the README's numbers then need re-measuring)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	@touch $(STAMP)

demo: $(STAMP) ## train the initial model on the embedded source domain, then fixed / IA / SA / IA+SA (and fixed with zoom-in) on 20 objects per domain -> runs/demo/
	$(MAKE) --no-print-directory train-init
	$(PY) -m lightning_app benchmark --config configs/benchmark.yaml --config configs/demo.yaml --ckpt $(CKPT) $(ARGS)

train-init: $(STAMP) ## train (or resume) the initial model and its MAS importance -> runs/train_init/checkpoints/last.ckpt{,.mas.pt}
	$(PY) -m lightning_app fit --config configs/train_init.yaml --ckpt_path last $(ARGS)
	$(PY) -m lightning_app importance --ckpt $(CKPT)

train-paper: $(STAMP) ## paper A's 5-channel network with the same recipe (no previous mask, no click skip) -> runs/train_paper/
	$(PY) -m lightning_app fit --config configs/train_init.yaml --config configs/model/paper.yaml --trainer.default_root_dir runs/train_paper --trainer.logger.init_args.save_dir runs/train_paper --trainer.logger.init_args.name train_paper --ckpt_path last $(ARGS)
	$(PY) -m lightning_app importance --ckpt runs/train_paper/checkpoints/last.ckpt

benchmark: $(STAMP) ## the network alone and fixed / IA / SA / IA+SA with zoom-in on 100 objects per domain, with 95% intervals -> runs/benchmark/
	$(PY) -m lightning_app benchmark --config configs/benchmark.yaml --ckpt $(CKPT) --out_dir $(BENCH_OUT) $(ARGS)

seeds: $(STAMP) ## train-init and benchmark with each of SEEDS (default 0,1,2; seed 0 is train-init's), then the spread over the models -> SPREAD_OUT (runs/spread/)
	@set -e; runs=; for s in $(subst $(comma), ,$(SEEDS)); do \
	  suffix=$$( [ "$$s" = 0 ] || echo _seed$$s ); root=runs/train_init$$suffix; \
	  $(PY) -m lightning_app fit --config configs/train_init.yaml --seed_everything $$s --trainer.default_root_dir $$root \
	    --trainer.logger.init_args.save_dir $$root --trainer.logger.init_args.name train_init$$suffix --ckpt_path last; \
	  $(PY) -m lightning_app importance --ckpt $$root/checkpoints/last.ckpt; \
	  $(PY) -m lightning_app benchmark --config configs/benchmark.yaml --ckpt $$root/checkpoints/last.ckpt --out_dir $(BENCH_OUT)$$suffix $(ARGS); \
	  runs=$$runs,$(BENCH_OUT)$$suffix; \
	done; $(PY) -m lightning_app spread --runs "[$${runs#,}]" --out_dir $(SPREAD_OUT)

adapt-sequence: $(STAMP) ## SA (at its rate and at half, normalisation layers only, with zoom-in) along a 500-object fundus sequence (its learning curve) -> runs/benchmark_sequence/
	$(PY) -m lightning_app benchmark --config configs/benchmark_sequence.yaml --ckpt $(CKPT) $(ARGS)

tune: $(STAMP) ## choose the adaptation settings on the tuning domain (cells) -> runs/tune/
	$(PY) -m lightning_app benchmark --config configs/tune.yaml --ckpt $(CKPT) $(ARGS)

train-bsds: $(STAMP) ## train (or resume) the real-photo initial model on BSDS500 regions + MAS importance -> runs/train_bsds/
	$(PY) -m lightning_app fit --config configs/train_bsds.yaml --ckpt_path last $(ARGS)
	$(PY) -m lightning_app importance --ckpt $(BSDS_CKPT)

tune-real: $(STAMP) ## choose the adaptation settings for photos on BSDS500 val objects -> runs/tune_real/
	$(PY) -m lightning_app benchmark --config configs/tune_real.yaml --ckpt $(BSDS_CKPT) $(ARGS)

benchmark-real: $(STAMP) ## random walker, fixed and every adaptation variant on GrabCut and Berkeley -> runs/benchmark_real/
	$(PY) -m lightning_app benchmark --config configs/benchmark_real.yaml --ckpt $(BSDS_CKPT) $(ARGS)

evolve-init: $(STAMP) ## train (or resume) paper B's initial model: three-click protocol, binary predictor, classifier -> runs/evolve_init/
	$(PY) -m lightning_app fit --config $(EVOLVE_INIT) --ckpt_path last $(if $(filter evolve-init,$(MAKECMDGOALS)),$(ARGS))

evolve: evolve-init ## life-long evolution through STAGES (default fundus,rooftop) with clicks only -> runs/evolve/
	$(PY) -m lightning_app evolve --config configs/evolve.yaml --init_ckpt $(EVOLVE_CKPT) $(EVOLVE_STAGES) $(ARGS)

evolve-ablation: evolve-init ## paper B's Tables 3-5 and the upper bound, one stage on fundus each, 3-click mIoU (the tables' metric) -> runs/evolve_ablation/
	for v in st st_ipt st_fa st_ipt_fa upper table5_global_pixel table5_pixel; do \
	  $(PY) -m lightning_app evolve --config configs/evolve.yaml --config configs/evolve/$$v.yaml --init_ckpt $(EVOLVE_CKPT) --stages [fundus] --max_clicks 3 $(ARGS) || exit 1; \
	done

app: $(STAMP) ## annotate IMAGES (default: embedded target images) in the browser; the model learns as you click -> ANNOTATIONS
	@test -d $(IMAGES) || { $(PY) -m lightning_app images --data '{dataset: synthetic, domain: fundus, length: 20, seed: 7}' --out_dir $(IMAGES) && \
	  $(PY) -m lightning_app images --data '{dataset: synthetic, domain: rooftop, length: 20, seed: 7}' --out_dir $(IMAGES); }
	$(PY) -m lightning_app app --ckpt $(CKPT) --images $(IMAGES) --out $(ANNOTATIONS) $(ARGS)

app-benchmark: $(STAMP) ## the app's click -> mask latency per adaptation mode (p50/p95) -> runs/app_benchmark/latency.json
	$(PY) -m lightning_app app-benchmark --ckpt $(CKPT) $(ARGS)

test: $(STAMP) ## the fast test suite (every change; CPU, a few minutes)
	WANDB_MODE=disabled $(PY) -m pytest -q tests -m "not slow" $(ARGS)

test-slow: $(STAMP) ## the slow tier: DDP, kill-and-resume, the evolution sequence
	WANDB_MODE=disabled $(PY) -m pytest -q tests -m slow $(ARGS)

clean: ## remove runs/ and caches (keeps .venv)
	rm -rf runs wandb .pytest_cache
