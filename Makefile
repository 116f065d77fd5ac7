# voltgate: make setup | test | demo | bench | firmware | lock | clean
# Works from a fresh clone on Debian with Python 3.11: everything it needs it
# installs itself (a virtualenv with the pinned requirements.txt, Mosquitto
# from apt when it is missing).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
BUILD ?= build
STAMP := $(VENV)/.installed
# pytest arguments, e.g. make test PYTEST_ARGS='-k permit -x'
PYTEST_ARGS ?=

.PHONY: setup test demo bench firmware lock clean mosquitto

setup: $(STAMP) mosquitto

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Mosquitto is a system package: the MQTT tests start private brokers from it.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	else \
	  echo "installing mosquitto from apt"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends mosquitto >/dev/null; \
	fi

# .mpy files for the board (firmware/ + protocol codec modules + third-party
# MicroPython libraries fetched from PyPI, pinned in firmware/mplibs.json)
firmware: $(STAMP)
	$(BIN)/voltgate build --out $(BUILD)/firmware

test: setup firmware
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup firmware
	$(BIN)/voltgate demo --firmware $(BUILD)/firmware

bench: setup firmware
	$(PY) bench/run.py --out bench/RESULTS.md

# Re-pin requirements.txt from requirements.in in a scratch virtualenv.
lock:
	rm -rf $(BUILD)/lockenv
	$(PYTHON) -m venv $(BUILD)/lockenv
	$(BUILD)/lockenv/bin/pip install --quiet -r requirements.in
	{ echo "# Pinned from requirements.in (make lock). Installed by 'make setup' into .venv."; \
	  $(BUILD)/lockenv/bin/pip freeze --all | grep -v '^pip=='; } > requirements.txt
	rm -rf $(BUILD)/lockenv

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
