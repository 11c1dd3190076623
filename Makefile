# Set-up and checks. `make test`, `make test-all` and `make demo` work from a fresh clone: they create .venv first.
# TORCH picks the PyTorch build; the default is the CPU build (`make test TORCH=torch` on a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_MODEL ?= sample_models/mlp_uneven.onnx
DEMO_OUT ?= build/demo

.PHONY: install test test-all demo samples bench bench-training fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# test: the fast set, for the edit-test loop; test-all: every test, the slow ones too (what CI runs)
test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

demo: install
	mkdir -p $(DEMO_OUT)
	$(BIN)/pathcond inspect $(DEMO_MODEL)
	$(BIN)/pathcond rescale $(DEMO_MODEL) $(DEMO_OUT)/rescaled.onnx --force

samples: install
	$(BIN)/python sample_models/make_samples.py

# bench_floor: rescale against the floor (load + float64 squared forward/backward + save), start-up and peak RSS
bench: install
	$(BIN)/python benchmarks/bench_floor.py --models resnet50 vgg16
	$(BIN)/python benchmarks/bench_solver.py
	$(BIN)/python benchmarks/bench_models.py

# Does rescaling help training? Baseline vs rescaled, plain SGD, several seeds and learning rates (~5-10 min
# on 2 cores); writes build/bench_training.png. Needs the bench extra (scikit-learn, matplotlib).
bench-training: install
	$(BIN)/pip install -q -e ".[bench]"
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_training.py --png build/bench_training.png

# Random ReLU DAGs through every exporter, checked end to end: `make fuzz N=500 SEED0=0 WORKERS=2`.
N ?= 100
SEED0 ?= 0
WORKERS ?= 2
fuzz: install
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.fuzz_main --n $(N) --seed0 $(SEED0) --workers $(WORKERS)

clean:
	rm -rf $(VENV) build .pytest_cache
