# kube-policy-manager: make demo | make test | make lab CASES=path | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables ipset conntrack iproute2
CASES ?= tests/cases

.PHONY: demo test unit lab bench deps venv clean

# System packages the dataplane and the lab need, installed only when missing.
deps:
	@missing=""; \
	for bin in iptables-nft-restore iptables-legacy-restore ipset conntrack ip; do \
	  command -v $$bin >/dev/null 2>&1 || missing=1; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	$(PY) -m tests.lab demo

test: deps venv
	$(PY) -m pytest tests

unit: venv
	$(PY) -m pytest tests/unit

lab: deps venv
	$(PY) -m tests.lab run $(CASES)

clean:
	rm -rf $(VENV) .pytest_cache
