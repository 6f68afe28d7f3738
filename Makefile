# metald-rs — run `make help` for the targets.
SHELL := /bin/bash
CARGO ?= cargo

# `make run` defaults: a local data dir, and billing in mock mode — no billaged runs here, so
# samples go to the debug log and nothing is sent (/health: checks.billing.mode "mock", status
# ok). BILLING=on sends usage to UNKEY_METALD_BILLING_ENDPOINT (default http://localhost:8081);
# /health then says "degraded" while no billaged answers there (usage waits in the spool).
export UNKEY_METALD_DATA_DIR ?= $(CURDIR)/.data
BILLING ?= mock
RUN_ENV ?=
ifeq ($(BILLING),mock)
RUN_BILLING := UNKEY_METALD_BILLING_MOCK_MODE=true
else
RUN_BILLING :=
endif

.DEFAULT_GOAL := help
include mk/dev.mk

.PHONY: help build run test test-prereqs test-unit test-it test-interop test-image lint fmt bench clean-vms

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

build: ## build metald and metald-cli (release)
	$(CARGO) build --release --bins

run: build ## run metald on :8080 against the local Docker Engine (BILLING=on: to a billaged)
	mkdir -p "$(UNKEY_METALD_DATA_DIR)"
	@if [ "$(BILLING)" = mock ]; then echo "make run: billing in mock mode (no billaged here: samples go to the debug log, nothing is sent; BILLING=on sends them)"; \
	  else echo "make run: billing on, to $${UNKEY_METALD_BILLING_ENDPOINT:-http://localhost:8081} (/health is degraded while nothing answers there)"; fi
	$(RUN_BILLING) $(RUN_ENV) ./target/release/metald

test-prereqs: ## install what the tests need (Debian packages, as root; else says what is missing)
	bash scripts/prereqs.sh test

test-image: test-prereqs ## build the local busybox image the tests use
	bash scripts/build-test-image.sh

test: test-prereqs test-image test-unit test-it test-interop ## all tests: unit, Docker integration, interop

test-unit: ## unit tests (no Docker)
	$(CARGO) test --lib --bins

test-it: ## integration tests against the real Docker Engine
	$(CARGO) test --test it

test-interop: ## interop with buf curl and the Python connectrpc client
	$(CARGO) build --bin metald
	bash tests/interop/run.sh

lint: ## rustfmt check, clippy with warnings as errors, shellcheck
	bash scripts/prereqs.sh lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	shellcheck scripts/*.sh tests/interop/run.sh .ci/run

fmt: ## format the code
	$(CARGO) fmt --all

bench: ## latency next to raw Docker, read throughput with 100 VMs
	$(CARGO) build --release --bins
	$(CARGO) bench --bench rpc --bench billing

clean-vms: ## remove every container of a scope: make clean-vms SCOPE=name
	@test -n "$(SCOPE)" || { echo "usage: make clean-vms SCOPE=<scope>"; exit 2; }
	ids=$$(docker ps -aq --filter label=unkey.vm.scope=$(SCOPE)); [ -z "$$ids" ] || docker rm -f $$ids
