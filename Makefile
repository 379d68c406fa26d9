# Two commands on a fresh machine: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= default
RUN_DIR ?= runs/$(CONFIG)-$(shell date +%Y%m%d-%H%M%S)
NPROC ?= 2
RETRIES ?= 0
ARGS ?=
# The benchmarks that fit in one session (about 46-51 minutes on 2 cores, estimated), each run as docs/benchmarks.md lists it and
# writing bench/results/NAME.{json,txt}; docs/benchmarks.md names the longer ones (compare_quant, comm_auc, ingest --scale,
# scale_run, gpu_fake_quant).
BENCHES ?= reader_headroom artifact_sizes checkpoint_memory comm inference serving_paths train_throughput serving_limits \
	row_alignment qat_overhead qat_profile parse_paths convert_stages scale_plans logging_overhead

.PHONY: train test bench env clean-env kaggle-sample

env: $(STAMP)

$(STAMP): pyproject.toml scripts/requirements.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$$($(PYTHON) scripts/requirements.py flavor),test]"
	$(PY) -m pip install --quiet --no-deps "$$($(PYTHON) scripts/requirements.py torchrec)"
	$(PY) -c "import torch, fbgemm_gpu, torchrec, torchx, pyarrow, tensorboard, dqrm.pipeline; print('environment ready: torch', torch.__version__)"
	touch $(STAMP)

## train: the default job (2 workers via `torchx run -s local_cwd`); CONFIG=, RUN_DIR=, NPROC=, RETRIES=, ARGS= override
train: $(STAMP)
	$(PY) -m dqrm.pipeline.launch --run-dir $(RUN_DIR) --nproc $(NPROC) --max-retries $(RETRIES) -- --config $(CONFIG) $(ARGS)

## kaggle-sample: the real 137k-row Criteo sample (../shared/data/criteo-real) -> data/kaggle_sample, for CONFIG=kaggle_sample
SAMPLE ?= ../shared/data/criteo-real/kaggle_random_sample_137k.tsv.gz
kaggle-sample: $(STAMP)
	$(PY) -m dqrm.datasets.convert $(SAMPLE) --split kaggle --vocab-min-count 1 --out data/kaggle_sample

## test: the whole test suite
test: $(STAMP)
	$(PY) -m pytest -q tests

## bench: the benchmarks that fit in one session, one after another; BENCHES="comm inference" runs some of them
bench: $(STAMP)
	@set -e; for b in $(BENCHES); do echo "== $(PY) -m bench.$$b"; $(PY) -m bench.$$b; done

clean-env:
	rm -rf $(VENV)
