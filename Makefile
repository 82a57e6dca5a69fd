# refine-control: `make run` (default profile), `make smoke` (smoke profile, own workspace), `make test`.
# `make run` runs the stages with no path between them side by side within JOBS CPU threads (default: the
# CPU count, or flows.jobs in params.yaml) and records each with `dvc commit`: dvc.lock ends as `dvc repro`
# (the sequential equivalent, `make run-sequential`) leaves it. WALL_TIME=FILE writes the run's wall time
# and each stage's threads and seconds (default reports/run_time.json, committed: the next run starts the
# stages with the longest remaining path first by these times). PROCESSES=N / MACHINES=M run each model
# stage on N processes per machine x M machines (params launch, pipeline/launch.py; the same as
# REFINE_LAUNCH_PROCESSES / REFINE_LAUNCH_MACHINES in the environment, which is how Make passes them).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOKE  ?= .smoke
SMOKE_SD3 ?= .smoke-sd3
JOBS   ?=
WALL_TIME ?= reports/run_time.json
STUDIES_WALL_TIME ?= reports/studies_run_time.json
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
ifdef PROCESSES
export REFINE_LAUNCH_PROCESSES := $(PROCESSES)
endif
ifdef MACHINES
export REFINE_LAUNCH_MACHINES := $(MACHINES)
endif

.PHONY: install run run-sequential studies smoke smoke-sd3 test test-fast dag clean-smoke

install: $(STAMP)

# CPU torch first: torch==2.13.0 is the CPU wheel on local disk; the project's range accepts it, so the
# second install pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install              ## the default profile: the whole DAG, independent stages side by side (JOBS threads)
	$(PY) -m pipeline.flows run full $(if $(JOBS),--jobs $(JOBS)) $(if $(WALL_TIME),--wall-time $(WALL_TIME))

run-sequential: install   ## the same, one stage at a time (plain dvc repro)
	dvc repro

studies: install          ## the studies outside make run (studies/dvc.yaml: frontier, prompt quality, edges), side by side
	$(PY) -m pipeline.flows run full --target 'studies/dvc.yaml:*' $(if $(JOBS),--jobs $(JOBS)) --wall-time $(STUDIES_WALL_TIME)

smoke: install            ## the whole DAG on the smoke profile, in $(SMOKE)/ (default outputs untouched)
	$(PY) -m pipeline.profile workspace smoke $(SMOKE)
	cd $(SMOKE) && python -m pipeline.flows run full $(if $(JOBS),--jobs $(JOBS)) --wall-time reports/run_time.json

# The sd3 profile's pretrained code path on CPU: configs/sd3_local.yaml, whose small stand-in models (real
# classes, hub layouts) pipeline.models.standins writes into the workspace; resolve, check, link, T5, Qwen
# captions, distillation, evaluation, report.
smoke-sd3: install        ## the DAG on the sd3_local profile (stand-in models, CPU), in $(SMOKE_SD3)/
	$(PY) -m pipeline.profile workspace sd3_local $(SMOKE_SD3)
	$(PY) -m pipeline.models.standins $(SMOKE_SD3)/standins
	cd $(SMOKE_SD3) && dvc repro

test: install             ## the test suite, including the end-to-end smoke runs (marked slow)
	$(PY) -m pytest

test-fast: install        ## unit tests only
	$(PY) -m pytest -m "not slow"

dag:
	dvc dag

clean-smoke:
	rm -rf $(SMOKE) $(SMOKE_SD3)
