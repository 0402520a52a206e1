# Developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package with its test extras, and run.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= demo_out

# torch + torchvision builds that import together on CPU-only machines (see README).
ifeq ($(shell uname -m),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/aloe demo --workdir $(DEMO_DIR) --report demo_report.json

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	for script in benchmarks/dedup.py benchmarks/perplexity.py benchmarks/score.py benchmarks/backends.py benchmarks/mix.py benchmarks/shard.py benchmarks/train.py; do \
		$(VENV)/bin/python $$script || exit 1; done

lint: install
	$(VENV)/bin/python -m ruff check aloe_cli tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) demo_report.json .pytest_cache
