# Two entry points for a newcomer: `make train` (demo, CPU, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= runs/demo-data
DEMO_CLIP_DATA ?= runs/demo-clip-data
DEMO_HELDOUT ?= runs/demo-heldout
DEMO_CLIP ?= runs/demo-clip
DEMO_RUN ?= runs/demo
DEMO_SKETCH ?= runs/demo-sketch
DEMO_SKETCH_HELDOUT ?= runs/demo-sketch-heldout
DEMO_ADAPTED ?= runs/demo-clip-sketch
# Nothing downloads at run time; Triton runs in its interpreter on CPU hosts.
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install train test test-slow test-all lint typecheck format ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(DEMO_DATA)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_DATA)

# The demo CLIP trains on captioned images whose attributes vary independently and reports its
# zero-shot accuracy on held-out images of the 8 classes. Trained once, kept while present.
$(DEMO_CLIP_DATA)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_CLIP_DATA) --split attributes --n-images 4000 --seed 1

$(DEMO_HELDOUT)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_HELDOUT) --n-images 400 --seed 2

$(DEMO_CLIP)/demo_clip.safetensors: | $(DEMO_CLIP_DATA)/classes.json $(DEMO_HELDOUT)/classes.json
	$(BIN)/patchsae make-demo-clip --data $(DEMO_CLIP_DATA) --heldout $(DEMO_HELDOUT) --out $(DEMO_CLIP)

# The adapted demo CLIP: the demo CLIP fine-tuned briefly on greyscale sketches of the classes,
# a domain the base model names poorly.
$(DEMO_SKETCH)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_SKETCH) --style sketch --n-images 1000 --seed 3

$(DEMO_SKETCH_HELDOUT)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_SKETCH_HELDOUT) --style sketch --n-images 400 --seed 4

$(DEMO_ADAPTED)/demo_clip.safetensors: $(DEMO_CLIP)/demo_clip.safetensors | $(DEMO_SKETCH)/classes.json $(DEMO_SKETCH_HELDOUT)/classes.json
	$(BIN)/patchsae make-demo-clip --init $(DEMO_CLIP)/demo_clip.safetensors --data $(DEMO_SKETCH) \
		--heldout $(DEMO_SKETCH_HELDOUT) --out $(DEMO_ADAPTED)

# Train the demo SAE, then analyse its latents on the demo images and write the latent report
# (DEMO_RUN/analysis/report.html), and compare the base and the adapted CLIP under the SAE on
# the sketches (DEMO_RUN/compare); all of it also logged to the run's MLflow run.
train: $(STAMP) $(DEMO_DATA)/classes.json $(DEMO_CLIP)/demo_clip.safetensors $(DEMO_ADAPTED)/demo_clip.safetensors
	$(BIN)/patchsae train --config configs/demo.yaml --set data.urls=$(DEMO_DATA) \
		--set model.pretrained=$(DEMO_CLIP)/demo_clip.safetensors --set eval.data=$(DEMO_HELDOUT) \
		--set train.out_dir=$(DEMO_RUN) $(ARGS)
	$(BIN)/patchsae analyze $(DEMO_RUN) --data $(DEMO_DATA)
	$(BIN)/patchsae report $(DEMO_RUN)
	$(BIN)/patchsae analyze $(DEMO_RUN) --data $(DEMO_SKETCH) --out $(DEMO_RUN)/analysis-sketch
	$(BIN)/patchsae analyze $(DEMO_RUN) --data $(DEMO_SKETCH) \
		--pretrained $(DEMO_ADAPTED)/demo_clip.safetensors --out $(DEMO_RUN)/analysis-sketch-adapted
	$(BIN)/patchsae compare $(DEMO_RUN) --base $(DEMO_RUN)/analysis-sketch \
		--adapted $(DEMO_RUN)/analysis-sketch-adapted --data $(DEMO_SKETCH_HELDOUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy on the package as it is imported (patchsae.<subpackage>), through a folder of links.
typecheck: $(STAMP)
	rm -rf build/typecheck/patchsae && mkdir -p build/typecheck/patchsae
	for d in data kernels trainer launchers analysis; do ln -s ../../../$$d build/typecheck/patchsae/$$d; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p patchsae

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

PYTEST := TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=15

# The inner loop: everything but the tests marked slow (the demo recipe end to end, the Slurm
# jobs, ZeRO offload and resume, ...). `make test-slow` runs those; CI runs both.
test: $(STAMP) lint
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PYTEST) -m slow $(PYTEST_ARGS)

test-all: $(STAMP) lint
	$(PYTEST) $(PYTEST_ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(or $(RUN_DIR),runs/demo)/mlflow.db --host 127.0.0.1 --port $(or $(PORT),5000)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache
