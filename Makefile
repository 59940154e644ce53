# freqexp: `make run` and `make test` do all set-up themselves (virtualenv, pinned packages, data).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORE  ?= sqlite:///outputs/mlflow.db
PORT   ?= 5000
ARGS   ?=
SWEEP  ?= model=ae,cae,cvae loss=mse,mse+ssim
PYTEST_ARGS ?=

.PHONY: help install data run test sweep report zoo benchmark ui bench clean
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'
	@echo "  variables: ARGS='model=cvae loss=mse+ssim' (run), SWEEP='...' (sweep), PYTEST_ARGS, PORT (ui)"

# torch is pinned in the same pip command as everything else: alone, a resolver would pull
# the multi-GB CUDA build. constraints.txt pins every transitive package.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# conf/ and sweeps/ are mapped into the package (freqexp.conf, freqexp.sweeps), so setuptools
	# installs through a meta-path finder and says so in a notice; nothing to act on, so it is hushed.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e ".[dev]"
	# hydra-optuna-sweeper 1.3.0 pins optuna<3, whose sqlite storage breaks on the SQLAlchemy 2
	# that mlflow needs; it works with optuna 5 (pinned above), so it goes in without its deps.
	$(PY) -m pip install -q --no-deps hydra-optuna-sweeper==1.3.0
	# freqexp's own bytecode, compiled once: where PYTHONDONTWRITEBYTECODE is set (some CI images),
	# every process would otherwise compile it from source (~0.1 s each; an edited file is recompiled)
	$(PY) -m compileall -q -j 0 freqexp
	touch $(STAMP)

install: $(STAMP) data  ## create .venv with pinned dependencies and fetch Fashion-MNIST

data:  ## make sure Fashion-MNIST is installed (apt package dataset-fashion-mnist)
	@bash scripts/ensure-data.sh

run: install  ## run the default experiment (FMNIST class 0, CAE, mse+ssim); ARGS=... to override
	$(PY) -m freqexp $(ARGS)

test: install  ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

sweep: install  ## a sweep: SWEEP=<preset in sweeps/> (e.g. loss_model_grid, optuna) or SWEEP='model=... loss=...'
	$(PY) -m freqexp --multirun $(if $(findstring =,$(SWEEP)),$(SWEEP),+sweep=$(SWEEP)) $(ARGS)

report: install  ## leaderboard from MLflow (ARGS='--experiment freqexp --sweep-id ... model.name=cae')
	$(PY) -m freqexp.report --uri $(STORE) $(ARGS)

ZOO_STORE  ?= sqlite:///outputs/zoo.db
ZOO_README ?= README.md
ZOO_BANK_ARGS ?=  # extra overrides for the memory-bank sweep only, e.g. ++model.backbone.arch=resnet18
# The memory banks keep the native 28 px (a 4x4 patch grid; no centre crop): the coreset over a
# whole class at PatchCore's 224 px (784 patches an image) takes hours on 2 CPU cores; banks of
# 10 % and 1 % (the papers' settings; a full bank of 1024-2048-dim features is minutes of
# search per test pass on a CPU). `++` because the sweep's base config (cae) has no input_size.
ZOO_SWEEP   = $(PY) -m freqexp --multirun +sweep=model_zoo tracking.uri=$(ZOO_STORE)
zoo: install  ## every model on FMNIST class 0 at one budget, then the README's model table from MLflow
	$(ZOO_SWEEP) $(ARGS)
	$(ZOO_SWEEP) model=draem augment=cutpaste,freq_cutpaste $(ARGS)
	$(ZOO_SWEEP) model=patchcore,wedge,patchcore_dwt model.sampling_ratio=0.1,0.01 ++model.input_size=null ++model.center_crop=null $(ARGS) $(ZOO_BANK_ARGS)
	$(PY) -m freqexp.zoo --uri $(ZOO_STORE) --experiment model_zoo --readme $(ZOO_README)

# The one-class benchmark in the README: every Fashion-MNIST class as the normal class x
# BENCH_MODELS x BENCH_SEEDS, each trained model under both selection protocols (the last epoch of a
# fixed budget: no labels; the best val AUROC epoch: labelled validation anomalies), the raw-pixel
# baselines once per class and seed; then the table and the critical-difference diagram from MLflow.
# The defaults take about 45 minutes on 2 CPU cores; on a GPU e.g. ARGS=hardware=gpu BENCH_EPOCHS=20.
# A rerun skips what already finished (sweep.resume). BENCH_ARGS: more overrides for both sweeps.
BENCH_STORE     ?= sqlite:///outputs/benchmark.db
BENCH_README    ?= README.md
BENCH_DIAGRAM   ?= docs/img/benchmark_cd.png
BENCH_CLASSES   ?= 0,1,2,3,4,5,6,7,8,9
BENCH_SEEDS     ?= 0,1,2
BENCH_MODELS    ?= ae,vae,cae
BENCH_BASELINES ?= knn,pca
BENCH_EPOCHS    ?= 4
BENCH_SELECTION ?= false,true  # trainer.restore_best of the trained models: false = no labels, true = labelled val
BENCH_ARGS      ?=
BENCH_SWEEP = $(PY) -m freqexp --multirun +sweep=one_class_benchmark tracking.uri=$(BENCH_STORE) \
	dataset.normal_class=$(BENCH_CLASSES) seed=$(BENCH_SEEDS) trainer.max_epochs=$(BENCH_EPOCHS)
benchmark: install  ## every FMNIST class x models x seeds, two selection protocols; README table + CD diagram
	$(if $(BENCH_MODELS),$(BENCH_SWEEP) model=$(BENCH_MODELS) trainer.restore_best=$(BENCH_SELECTION) $(ARGS) $(BENCH_ARGS))
	$(if $(BENCH_BASELINES),$(BENCH_SWEEP) model=$(BENCH_BASELINES) trainer.restore_best=false $(ARGS) $(BENCH_ARGS))
	$(PY) -m freqexp.benchmark --uri $(BENCH_STORE) --experiment one_class_benchmark --readme $(BENCH_README) \
		--diagram $(BENCH_DIAGRAM)

bench: install  ## training step vs a plain PyTorch loop, a run's time by phase, batched filters, a sweep job's fixed cost
	$(PY) benchmarks/throughput.py $(ARGS)
	$(PY) benchmarks/throughput.py --proxy
	$(PY) benchmarks/run_breakdown.py $(ARGS)
	$(PY) benchmarks/filters.py
	$(PY) benchmarks/sweep_overhead.py

ui: install  ## MLflow UI on http://127.0.0.1:$(PORT) over the default store; prints each experiment's runs-table link
	-@$(PY) -m freqexp.ui --uri $(STORE) --port $(PORT)
	$(VENV)/bin/mlflow server --backend-store-uri $(STORE) --host 127.0.0.1 --port $(PORT) --workers 1

clean:  ## remove run outputs, caches and the virtualenv
	rm -rf outputs/runs outputs/multiruns outputs/mlflow.db outputs/artifacts .pytest_cache build *.egg-info $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
