# Two commands: `make run` (the whole platform on embedded defaults) and `make test`.
# Both create the virtual environment and install everything they need first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean install system-deps bench-deps apt-deps

# Debian packages the test suite drives for real: headless Chromium for the dashboard,
# promtool and a Prometheus server for the monitoring config, docker-compose to
# validate the compose file, wrk for the benchmarks. Installed only when missing.
SYSTEM_DEPS := chromium:chromium chromedriver:chromium-driver promtool:prometheus \
               docker-compose:docker-compose wrk:wrk

install: $(STAMP)

system-deps:
	@$(MAKE) --no-print-directory apt-deps DEPS="$(SYSTEM_DEPS)"

bench-deps:
	@$(MAKE) --no-print-directory apt-deps DEPS="$(SYSTEM_DEPS) nginx:nginx"

apt-deps:
	@missing=""; for pair in $(DEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python venv support missing: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv python3-pip; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m services.local

test: $(STAMP) system-deps
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP) bench-deps
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/gateway_proxy.py

clean:
	rm -rf $(VENV) var .pytest_cache
