# `make test` and `make demo` do all the set-up on a fresh machine: they create .venv, install the
# package with its pinned development dependencies, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=

.PHONY: install test demo clean bench bench-quick

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -c "import tokenformer as tf, torch; torch.manual_seed(0); tf.TokenFormer(tf.Config.from_name('tiny')).save_pretrained('runs/demo-random', tokenizer=tf.ByteTokenizer())"
	$(VENV)/bin/tokenformer generate --checkpoint runs/demo-random --prompt "Hello" --max-new-tokens 40 --temperature 0.8 --seed 0

# The benchmark suite (bench/compare.py) needs the `bench` extra (Hugging Face transformers).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench.compare $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.compare --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
