# Two entry points for a fresh Debian machine (root, Python 3.11+):
#   make demo   installs everything and runs the workflow on the embedded example
#   make test   installs everything and runs the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where there is no NVIDIA GPU, pin the torch release whose CPU build the machine's pip mirror holds.
TORCH := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: demo test system venv image pin clean

demo: venv
	source $(BIN)/activate && snakemake --cores 1 --resources gpu=1

test: venv
	$(BIN)/pip install -q -e '.[test,slurm]'
	source $(BIN)/activate && pytest -q

# ImageMagick's MagickWand for wand, and venv support, from Debian when missing.
system:
	@$(PYTHON) -c 'import ctypes.util, ensurepip, sys; sys.exit(not ctypes.util.find_library("MagickWand-6.Q16"))' \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagickwand-6.q16-6 python3-venv >/dev/null)

venv: system $(BIN)/dreampipe

$(BIN)/dreampipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)' -e .
	touch $@

# The container of `snakemake --sdm apptainer` (Dockerfile), under the name the Snakefile gives it.
image:
	docker build -t dreampipe:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) .

# envs/dreampipe.linux-64.pin.txt, the exact packages of the conda environment (needs conda).
pin: venv
	$(BIN)/pip install -q snakedeploy && $(BIN)/snakedeploy pin-conda-envs envs/dreampipe.yaml

clean:
	rm -rf results .snakemake
