# sd_lightning: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-fast slurm-deps demo demo-sdxl bench-data gpu-wheels gpu-suite lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

# torch (about 6 GB with its CUDA libraries) goes in alone first, so that its wheels are off the
# disk before the rest come down; no pip cache: a CI runner's disk holds one copy, not three.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	$(BIN)/pip install --no-cache-dir "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## make .venv and install the package with its dev extra

test: $(STAMP) slurm-deps ## run the whole test suite (installs first)
	$(BIN)/pytest tests

# The SLURM tests start a real slurmctld + two slurmd on this machine (tests/slurm_cluster.py).
slurm-deps: ## install SLURM and munge for the SLURM tests (apt, as root); they skip without
	@command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }; } && \
	  echo "installed slurm-wlm and munge for the SLURM tests"; } || \
	  echo "SLURM could not be installed here: the SLURM tests will skip"

test-fast: $(STAMP) ## run the tests not marked slow
	$(BIN)/pytest tests -m "not slow"

DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_PROMPTS := "prompts=['a red circle in the center','a green square at the top left',\
  'a blue triangle at the bottom right','a yellow circle at the top right',\
  'a purple square in the center','an orange triangle at the bottom left',\
  'a red square at the bottom left','a green circle at the bottom right',\
  'a blue circle at the top left','a yellow triangle in the center',\
  'a purple circle at the top right','an orange square in the center']"

demo: DEMO_LDM := demo_ldm ## the whole pipeline on the embedded demo data: VAE, latent diffusion, sampling
demo-sdxl: DEMO_LDM := demo_sdxl ## the demo with SDXL's shape: two random text towers, the vector condition, buckets
demo demo-sdxl: $(STAMP)
	$(BIN)/python -m sd_lightning experiment=demo_vae hydra.run.dir=$(DEMO_DIR)/vae
	$(BIN)/python -m sd_lightning experiment=$(DEMO_LDM) hydra.run.dir=$(DEMO_DIR)/ldm \
	  vae_ckpt=$(DEMO_DIR)/vae/checkpoints/last.ckpt
	$(BIN)/python -m sd_lightning stage=sample hydra.run.dir=$(DEMO_DIR)/samples \
	  ckpt=$(DEMO_DIR)/ldm/checkpoints/last.ckpt $(DEMO_PROMPTS) steps=25 guidance=5.0
	$(BIN)/python -m sd_lightning.data.score $(DEMO_DIR)/samples
	@echo "demo images: $(DEMO_DIR)/samples (grid.png); runs: $(DEMO_DIR)/{vae,ldm}"

bench-data: $(STAMP) ## data-loading and stage-2 step benchmark -> docs/benchmarks/data_loading.md
	$(BIN)/python benchmarks/data_loading.py

# The GPU machine (the device tool) has torch, lightning, torchvision, torchmetrics, transformers,
# peft, safetensors, pytest and pytest-xdist, and no registry: the rest travels as wheels in .whl/.
WHEEL_DIR  := .whl
GPU_PKGS   := hydra-core omegaconf lpips open_clip_torch ftfy wcwidth webdataset braceexpand diffusers torch-fidelity
GPU_PINNED := importlib_metadata==8.7.0
GPU_SITE   ?= /tmp/sd_lightning-site

gpu-wheels: $(STAMP) ## (CPU machine) the wheels the GPU machine lacks -> .whl/ (what .venv has)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d $(WHEEL_DIR) \
	  $$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_PKGS)'.split()))") \
	  $(GPU_PINNED)
	$(BIN)/pip wheel -q --no-deps -w $(WHEEL_DIR) antlr4-python3-runtime==4.9.3
	@du -sh $(WHEEL_DIR) && ls $(WHEEL_DIR)

gpu-suite: ## (GPU machine) install .whl/, then every GPU check and benchmark -> docs/benchmarks/gpu.md
	@[ -d $(WHEEL_DIR) ] || { echo "no $(WHEEL_DIR)/: run 'make gpu-wheels' on the CPU machine and carry $(WHEEL_DIR)"; exit 1; }
	$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	  --target $(GPU_SITE) $(WHEEL_DIR)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(PYTHON) benchmarks/gpu_suite.py $(SUITE_ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check sd_lightning tests benchmarks
	$(BIN)/ruff format --check sd_lightning tests benchmarks

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
