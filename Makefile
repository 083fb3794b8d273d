# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and `make test`
# (`make test-all` for every test, as CI runs them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-all demo bench ablation compare clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
	touch $@

# Two test processes (pytest-xdist), each test file in one of them: the tests wait on Ray and
# subprocesses as much as they compute, so a 2-core machine runs them in ~4/5 of the time.
# `make test` leaves out the tests marked slow (over a minute each on a 2-core CPU: whole jobs
# killed and resumed, Ray that fails to start, self-training's gain); `make test-all`, which CI
# runs, adds them. The longest files go first (tests/conftest.py's LONGEST_FIRST).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

test-all: install
	$(BIN)/ruff check .
	$(PYTEST)

demo: install
	$(BIN)/python -m jobs.demo

# Each benchmark runs its peer side by side and prints ratios (CPU here; a GPU where there is one).
bench: install
	$(BIN)/python -m benchmarks.model_inference
	$(BIN)/python -m benchmarks.label_pipeline
	$(BIN)/python -m benchmarks.train_step

# Build and test artefacts only: never runs/ or data/ (the README's examples put a user's labels and models there).
clean:
	rm -rf $(VENV) .pytest_cache build dist
	find . -path ./runs -prune -o -path ./data -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +

# The paper's Table 2 ablations at CPU scale (~18 min on the shared 2-core CPU): e.g. make ablation ABLATION_ARGS="--seeds 0,1 --steps 150"
ABLATION_ARGS ?=
ablation: install
	$(BIN)/python -m benchmarks.ablation $(ABLATION_ARGS)

# Speed against accuracy beside one-stage detectors, trained alike from scratch (11 min of one core; 20 on the busy shared 2-core CPU):
# writes docs/speed_accuracy.md and .png; e.g. make compare COMPARE_ARGS="--steps 100 --output runs/compare"
COMPARE_ARGS ?=
compare: install
	$(BIN)/python -m benchmarks.compare $(COMPARE_ARGS)
