# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Train a dense resnet18 on the embedded Fashion-MNIST subset, then prune it to 45% of its FLOPs.
DEMO := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/manidp train resnet18 --recipe recipes/dense-default.yaml --out $(DEMO)/dense
	$(BIN)/manidp prune resnet18 --target-flops 0.45 --weights $(DEMO)/dense/model.safetensors --out $(DEMO)/pruned

# ruff first (seconds; configuration in pyproject.toml), then the suite. The executor's tests run a
# second time on the AVX2 kernels of oneDNN and ATen: a machine with
# AVX-512/AMX picks other kernels by default, and the tests must pass on both (docs/portability.md).
EXECUTOR_TESTS := tests/test_execute.py tests/test_codebook.py tests/test_channels.py
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q $(EXECUTOR_TESTS)

clean:
	rm -rf $(VENV) build *.egg-info
