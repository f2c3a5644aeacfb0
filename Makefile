# shardrec: every command a developer needs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.shardrec-installed

# The CPU stack (docs/architecture.md, "The version lock"): FBGEMM 1.8 supports exactly torch 2.13. torchrec
# declares a dependency on the CUDA fbgemm-gpu (a 465 MB wheel that cannot load
# on a CPU torch), so it goes in with --no-deps; its real dependencies come from
# pyproject.toml.
TORCH    := torch==2.13.0
FBGEMM   := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0

.PHONY: help install train prepare test test-slow bench bench-serve compression-report sweep-report lint format clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-19s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the CPU stack (once)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet $(FBGEMM)
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python scripts/check_stack.py
	touch $(STAMP)

train: $(STAMP)  ## train the built-in default (synthetic data, planted model) and print a summary
	$(BIN)/python -m trainer $(ARGS)

prepare: $(STAMP)  ## raw data into shards once: make prepare ARGS="data=criteo 'data.raw=[day_0]' data.dir=DIR"
	$(BIN)/python -m trainer.prepare $(ARGS)

# Two pytest-xdist workers (TEST_WORKERS=0: one process): a test module stays on one
# worker, and the tests that time processes against each other share one worker
# (tests/conftest.py, SERIAL_MODULES). The 25 slowest tests are listed at the end.
# The slowest test takes ~100 s: one still running after 300 s has every thread's
# stack printed (faulthandler, also for a wait inside C++), and one blocked in Python
# after 600 s fails by name (pytest-timeout's signal method: the worker and its
# module's other tests go on; its thread method would end the worker, and xdist
# would run the hung test again on each replacement), so a hang says where.
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 600
test: $(STAMP)  ## unit + multi-process (gloo) tests (everything not marked slow)
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadscope --durations=25 \
	  -o faulthandler_timeout=300 --timeout=$(TEST_TIMEOUT) $(ARGS)

test-slow: $(STAMP)  ## the slow tier: e.g. the default job reaches the oracle AUC (minutes)
	$(BIN)/python -m pytest -m slow -s $(ARGS)

bench: $(STAMP)  ## shardrec vs plain PyTorch, torchrec's loop and the dense floor (ARGS="--quick")
	$(BIN)/python -m benchmarks.bench $(ARGS)

bench-serve: $(STAMP)  ## served-model latency on CPU: eager, bundle, compiled, AOTI, torchrec (ARGS="--quick")
	$(BIN)/python -m benchmarks.serve $(ARGS)

# The report is written even when a job failed (it shows the job's error line);
# make still exits with the sweep's status.
REPORT_DIR := outputs/compression-report
compression-report: $(STAMP)  ## sweep=precision_qat (fp32, bf16, int8/int4 PTQ and QAT): table + PNGs
	$(BIN)/python -m trainer -m +sweep=precision_qat hydra.sweep.dir=$(REPORT_DIR) $(ARGS); \
	  status=$$?; $(BIN)/python -m trainer.report.compression $(REPORT_DIR) && exit $$status

sweep-report: $(STAMP)  ## any multirun directory (DIR=multirun/...) as report.md, report.csv, pareto.png
	@test -n "$(DIR)" || { echo "usage: make sweep-report DIR=multirun/<sweep>/<date_time>"; exit 2; }
	$(BIN)/python -m trainer.report $(DIR)

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
