# kube-policy-manager: make demo | make test | make lab CASES=path [DATAPLANE=iptables|nftables|both] | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables ipset conntrack iproute2 nftables time
CASES ?= tests/cases
DATAPLANE ?= both

.PHONY: demo test unit lab bench deps venv scanners clean

# System packages the dataplane and the lab need, installed only when missing.
deps:
	@missing=""; \
	for bin in iptables-nft-restore iptables-legacy-restore ipset conntrack ip nft; do \
	  command -v $$bin >/dev/null 2>&1 || missing=1; \
	done; \
	[ -x /usr/bin/time ] || missing=1; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Manifest and Dockerfile scanners (checkov, kubernetes-validate, hadolint) live apart:
# their dependencies must not constrain the program's.
.venv-scan/.installed: requirements-scan.txt
	$(PYTHON) -m venv .venv-scan
	.venv-scan/bin/pip install -q --disable-pip-version-check -r requirements-scan.txt
	touch $@

venv: $(VENV)/.installed

scanners: .venv-scan/.installed

demo: deps venv
	$(PY) -m tests.lab demo

test: deps venv scanners
	$(PY) -m pytest tests

unit: venv
	$(PY) -m pytest tests/unit

lab: deps venv
	$(PY) -m tests.lab run --dataplane $(DATAPLANE) $(CASES)

bench: deps venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-scan .pytest_cache
