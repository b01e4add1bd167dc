# `make test` and `make demo` do all the set-up on a fresh machine: they create .venv, install the
# package with its pinned development dependencies, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=

.PHONY: install test test-wheel test-newest demo clean bench bench-quick bench-gpu mutants

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The package as users install it, not the source tree: build the wheel, install it into a fresh
# venv (the pinned CPU torch, no editable install, run from a folder without the sources), then
# run commands from it: its version, and save + generate + evaluate a tiny model.
WHEEL_DIR := build/wheel-test
test-wheel: $(STAMP)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)/run
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(WHEEL_DIR)/venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt $(WHEEL_DIR)/tokenformer-*.whl
	cd $(WHEEL_DIR)/run && ../venv/bin/tokenformer --version
	cd $(WHEEL_DIR)/run && ../venv/bin/python -c "import tokenformer as tf; \
		assert 'site-packages' in tf.__file__, tf.__file__; \
		tf.TokenFormer(tf.Config.from_name('tiny')).save_pretrained('tiny', tokenizer=tf.ByteTokenizer())"
	cd $(WHEEL_DIR)/run && printf 'def add(a, b):\n    return a + b\n' > code.txt && \
		../venv/bin/tokenformer generate --checkpoint tiny --prompt "def " --max-new-tokens 8 && \
		../venv/bin/tokenformer evaluate --checkpoint tiny --data code.txt

# The second lane: the integration tests (transformers, lm-eval, PEFT, Hugging Face datasets) against the
# newest releases of what they integrate with, in their own virtual environment, with no constraints
# file: what `pip install "tokenformer[hf,eval,datasets]"` gives a new user today. torch stays the
# pinned CPU build (an open range could pull a CUDA one). CI runs it after `make test`.
NEWEST_VENV ?= .venv-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python
NEWEST_PACKAGES := transformers accelerate peft lm-eval datasets tokenizers huggingface_hub
NEWEST_TESTS := tests/test_hf.py tests/test_hf_heads.py tests/test_evaluate.py tests/test_prepare.py

test-newest:
	test -x $(NEWEST_PY) || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(NEWEST_PY) -m pip install --quiet --disable-pip-version-check --upgrade --upgrade-strategy eager \
		torch==2.13.0 -e ".[dev]" $(NEWEST_PACKAGES)
	$(NEWEST_PY) -c "import importlib.metadata as m; print('newest lane:', ', '.join(f'{p} {m.version(p)}' for p in '$(NEWEST_PACKAGES) torch'.split()))"
	$(NEWEST_PY) -m pytest -q $(NEWEST_TESTS)

# The main job: prepare the Python standard library (embedded corpus, BPE 2048), train a small
# TokenFormer on it (validation loss before -> after, checkpoint + loss_curve.png in
# runs/demo/checkpoints), grow it to twice the parameter tokens in exact mode (the validation loss
# before and after growing is printed: the same), train the grown model 100 steps more at a fifth of
# the peak lr (5e-3 re-warmed raised the validation loss 4.4015 -> 4.4928; 1e-3 lowers it) (fresh
# optimizer, re-warmed schedule: the default of --init-from, the official recipe;
# runs/demo/grown-checkpoints), then generate from it.
# It installs only what it needs (the package and matplotlib), not the development extras.
DEMO := runs/demo
DEMO_STAMP := $(VENV)/.demo-stamp
# Threads: every command takes one for this tiny model (tokenformer.threads, docs/performance.md).
# The sample: a prompt that starts a class, sampled at temperature 0.6 among the 20 likeliest tokens,
# 100 tokens (the window slides past the model's 64-token context).
DEMO_PROMPT := class Stack:\n    def __init__(self

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[plot]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP) $(DEMO)/data/prepare.json
	rm -rf $(DEMO)/checkpoints $(DEMO)/grown $(DEMO)/grown-checkpoints
	$(VENV)/bin/tokenformer train configs/demo.yaml --data_path $(DEMO)/data --save $(DEMO)/checkpoints
	$(VENV)/bin/tokenformer grow --checkpoint $(DEMO)/checkpoints \
		--out $(DEMO)/grown --factor 2 --mode exact --data $(DEMO)/data
	$(VENV)/bin/tokenformer train configs/demo.yaml --data_path $(DEMO)/data --save $(DEMO)/grown-checkpoints \
		--init_from $(DEMO)/grown --train_iters 100 --eval_interval 50 --lr 1e-3 --min_lr 1e-4 --warmup_iters 10
	$(VENV)/bin/tokenformer generate --checkpoint $(DEMO)/grown-checkpoints \
		--prompt "$$(printf '$(DEMO_PROMPT)')" --max-new-tokens 100 --temperature 0.6 --top-k 20 --seed 0

$(DEMO)/data/prepare.json: | $(DEMO_STAMP)
	$(VENV)/bin/tokenformer prepare --out $(DEMO)/data --tokenizer bpe --vocab-size 2048

# The benchmark suite (bench/compare.py) needs the `bench` extra (Hugging Face transformers).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench.compare $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.compare --quick $(BENCH_ARGS)

# The GPU suite on one CUDA device (bench/gpu.sh, under 8 minutes): bench/results/gpu/gpu.json and
# gpu.log, or another folder as the first of BENCH_ARGS.
# `make bench-gpu BENCH_ARGS="--device cpu --tiny"` is the dry run anywhere.
bench-gpu: $(BENCH_STAMP)
	bench/gpu.sh $(BENCH_ARGS)

# Mutation testing of the core (reliability/mutants.py; not in CI: about an hour on 2 cores, one
# mutant at a time at low priority): reliability/results/mutants-all.json, report in docs/reliability.md.
# MUTANTS_ARGS="--modules generate.py --selection old" picks modules and the test selection.
MUTANTS_ARGS ?=
mutants: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 15 $(PY) -m reliability.mutants $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) $(NEWEST_VENV) runs .pytest_cache
