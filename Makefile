# refine-control: `make run` (default profile), `make smoke` (smoke profile, own workspace), `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOKE  ?= .smoke
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: install run smoke test test-fast dag clean-smoke

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

test: install             ## the test suite, including the end-to-end smoke runs (marked slow)
	$(PY) -m pytest

test-fast: install        ## unit tests only
	$(PY) -m pytest -m "not slow"

dag:
	dvc dag

clean-smoke:
	rm -rf $(SMOKE)
