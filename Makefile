# refine-control: `make run` (default profile), `make smoke` (smoke profile, own workspace), `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOKE  ?= .smoke
SMOKE_SD3 ?= .smoke-sd3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: install run smoke smoke-sd3 test test-fast dag clean-smoke

install: $(STAMP)

# CPU torch first: torch==2.13.0 is the CPU wheel on local disk; the project's range accepts it, so the
# second install pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install              ## the default profile: the whole DAG (dvc repro)
	dvc repro

smoke: install            ## the whole DAG on the smoke profile, in $(SMOKE)/ (default outputs untouched)
	$(PY) -m pipeline.profile workspace smoke $(SMOKE)
	cd $(SMOKE) && dvc repro

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
