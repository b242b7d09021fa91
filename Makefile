# The two commands of the README. Both build what they need from nothing.
#   make serve   run the gateway on 127.0.0.1:8080 (embedded model, default policy)
#   make test    lint, type-check, policy tests and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments, e.g. PIP_ARGS="--index-url ..." for a mirror.
PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck policies serve model schema clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# CPU machines get the CPU torch pinned in constraints/cpu.txt. A GPU user installs
# their own torch into .venv first; it is kept.
$(STAMP): pyproject.toml constraints/cpu.txt | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the torch already in $(VENV)"; \
		$(BIN)/python -m pip install $(PIP_ARGS) -e '.[all,dev]'; \
	else \
		$(BIN)/python -m pip install $(PIP_ARGS) -c constraints/cpu.txt -e '.[all,dev]'; \
	fi
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

policies: $(STAMP)
	$(BIN)/guardrail policy validate policies/*.yaml
	$(BIN)/guardrail policy test policies/*.yaml

test: lint typecheck policies
	$(BIN)/pytest

model: $(STAMP)
	$(BIN)/guardrail model prepare

serve: model
	$(BIN)/guardrail serve --policy policies/default.yaml --backend local --host 127.0.0.1 --port 8080

schema: $(STAMP)
	$(BIN)/guardrail policy schema --out policies/schema.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
