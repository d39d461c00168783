# mlfactory: `make run` starts the local lifecycle, `make test` runs the whole suite (`make test-fast`: all
# but the end-to-end runs under a real scheduler).
# Both create .venv from the pinned lock on first use and reuse it afterwards.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# What a target needs is installed side by side (the venv, Azurite, checkov's venv, Debian packages): minutes
# saved on a fresh clone.
MAKEFLAGS += --jobs=4
# The interpreter of .venv: the system's Python 3.11 where there is one (Debian's and Ubuntu's are built with
# profile-guided and link-time optimisation, as the image's is), else the first python3.11 on PATH. On the 2-core
# test machine the suite's processes spent ~18 % less CPU under Debian's than under a pyenv build without those
# optimisations. `make PYTHON=/path/to/python3.11 venv` picks another (for a .venv that does not exist yet).
# Debian's needs python3.11-venv (ensurepip) to make a venv: without it, the one on PATH.
PYTHON ?= $(shell /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null && echo /usr/bin/python3.11 || echo python3.11)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENTRY := $(VENV)/bin/mlfactory
# Packages torch's PyPI metadata lists for its CUDA build; the CPU build needs none of them.
CUDA_ONLY := cuda-bindings cuda-pathfinder cuda-toolkit triton nvidia-cublas nvidia-cuda-cupti \
  nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand \
  nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink \
  nvidia-nvshmem-cu13 nvidia-nvtx

# Azurite (Azure Blob and Queue over HTTP) for the azure tests: 3.35.0 is the last release that runs on Node 20
AZURITE := .azurite/node_modules/.bin/azurite
# checkov (the Terraform and Dockerfile policy scan) in a venv of its own: its pins are not the project's
CHECKOV := .tools/checkov/bin/checkov
# Debian packages the tests run for real: Redis (the Celery broker), docker-compose 1.29 (renders
# docker-compose.yaml), Chromium (the UI test). PostgreSQL 15's server and terraform are on these machines.
DEBIAN_PACKAGES := redis-server docker-compose chromium wrk

.PHONY: venv bytecode run init test test-fast bench lock clean compose-env compose-up system-packages

venv: $(STAMP) $(ENTRY)

# The project's own modules compiled to bytecode, as pip compiles what it installs: on a machine that sets
# PYTHONDONTWRITEBYTECODE every process (each Airflow task, torchrun worker, model server, test worker) would
# otherwise compile them again from source, ~0.5-1 CPU-s each. A module edited later is compiled afresh
# (Python checks the source's time), so this only ever saves.
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 include plugins dags tests benchmarks

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# some machines' pip.conf names local indexes that warn once per package: keep the log readable
	$(PY) -m pip install --quiet -r requirements.txt 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	$(PY) -m pip check
	@# include/ (the mlfactory library) and plugins/ are importable by every process of the venv:
	@# Airflow's components, tasks, torchrun workers and tests alike.
	printf '%s\n' "$(CURDIR)/include" "$(CURDIR)/plugins" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mlfactory.pth
	touch $(STAMP)

# make run DATA="files or folders" CONFIG=my.yaml: your data instead of the sample (make init writes CONFIG)
run: $(STAMP) $(ENTRY) bytecode
	$(if $(CONFIG),MLFACTORY_CONFIG="$(CONFIG)") MLFACTORY_DATA="$(DATA)" $(PY) -m mlfactory.backends.local.run

# make init DATA="files or folders" TARGET=column [CONFIG=pipeline.yaml]: a config inferred from your data
init: $(STAMP) $(ENTRY)
	@test -n "$(DATA)" -a -n "$(TARGET)" || { echo 'usage: make init DATA="<files or folders>" TARGET=<column> [CONFIG=<config to write>]'; exit 2; }
	$(ENTRY) init $(DATA) --target "$(TARGET)" --output "$(or $(CONFIG),pipeline.yaml)"

# the console entry point: .venv/bin/mlfactory init ...
$(ENTRY): $(STAMP)
	printf '#!/bin/sh\nexec "%s" -m mlfactory "$$@"\n' "$(CURDIR)/$(PY)" > $@
	chmod +x $@

$(AZURITE):
	npm install --prefix .azurite --no-audit --no-fund --loglevel=error azurite@3.35.0

$(CHECKOV):
	$(PYTHON) -m venv .tools/checkov
	.tools/checkov/bin/pip install --quiet checkov==3.3.30 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

# what is missing of DEBIAN_PACKAGES: installed with apt-get as root, else named with the command to run
system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing; run: sudo apt-get install$$missing"; exit 1; fi; \
	fi

# The suite's tests side by side in TEST_WORKERS processes (pytest-xdist; each its own Airflow home, servers and
# ports): most of its time is spent waiting on servers, schedulers and training subprocesses, not computing.
TEST_WORKERS ?= 2

test: $(STAMP) $(ENTRY) $(AZURITE) $(CHECKOV) system-packages bytecode
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# The inner loop: everything but the end-to-end runs under a real Airflow scheduler (marker `scheduler`).
test-fast: $(STAMP) $(AZURITE) $(CHECKOV) system-packages bytecode
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not scheduler"

bench: $(STAMP) bytecode
	$(PY) benchmarks/p3_etl_vs_pyarrow.py
	$(PY) benchmarks/p4_ddp_scaling.py
	$(PY) benchmarks/p5_event_latency.py
	$(PY) benchmarks/p1_serving_vs_mlflow.py
	$(PY) benchmarks/p2_drift_vs_evidently.py
	$(PY) benchmarks/p6_batch_scoring.py
	$(PY) benchmarks/p5_lifecycle.py
	$(PY) benchmarks/p7_model_quality.py

# docker-compose.yaml: .env with generated secrets (once), then the whole stack, images built from this checkout
compose-env:
	python3 docker/compose_env.py

compose-up: compose-env
	docker compose up -d --build

# Recompute requirements.txt from requirements.in (needs network access to PyPI).
lock: $(STAMP)
	$(PY) -m pip install --quiet uv==0.13.9
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 --quiet \
	  $(addprefix --no-emit-package ,$(CUDA_ONLY)) -o requirements.txt

clean:
	rm -rf $(VENV) .azurite .tools .airflow .mlfactory .mlflow .test-artifacts
