# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic
DEMO_SHARDS := data/shards/synthetic

.PHONY: install demo demo-data test test-fast lint compare-demo bench clean

install: $(STAMP)

# constraints.txt pins every package (torch 2.14.1 among them) so the install is the same everywhere;
# `pip install -e .` without it still works inside a user's own CUDA environment.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.2
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) demo-data
	$(PY) launch/train.py --nproc-per-node 2 --config configs/demo.yaml --resume none

demo-data: $(STAMP)
	$(PY) shards/synthetic.py --out $(DEMO_DATA) --n 1600 --positive-rate 0.2 --size 160 --seed 0
	$(PY) shards/build.py --images $(DEMO_DATA)/0 --labels $(DEMO_DATA)/labels.csv --out $(DEMO_SHARDS) \
		--size 96 --shard-size 200 --val-fraction 0.25 --workers 2

# The v1, v2 and v3 recipes on the same synthetic set, then one table, one plot and one HTML report.
compare-demo: demo-data
	$(PY) launch/train.py --nproc-per-node 2 --config configs/demo_v1.yaml --resume none
	$(PY) launch/train.py --nproc-per-node 2 --config configs/demo_v2.yaml --resume none
	$(PY) launch/train.py --nproc-per-node 2 --config configs/demo.yaml --resume none
	$(PY) launch/compare.py runs/demo_v1 runs/demo_v2 runs/demo --markdown --plot runs/compare-demo.png
	$(PY) launch/report.py runs/demo_v1 runs/demo_v2 runs/demo --out runs/compare-demo.html

# Style, types (mypy, settings in pyproject.toml) and the package's layering (import-linter contracts).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The in-process lane (about 75 s here): units and the Trainer at world size 1, no subprocess-heavy suites.
FAST_TESTS := tests/data tests/model tests/train tests/evaluation/test_metrics.py tests/test_config.py \
	tests/test_tracking.py tests/test_preflight.py tests/test_compat.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not slurm" $(FAST_TESTS)

test: $(STAMP) lint
	bash tests/install_test_deps.sh
	bash tests/run_tests.sh

bench: $(STAMP)
	$(PY) bench/data_throughput.py
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf runs data .pytest_cache
