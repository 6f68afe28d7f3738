# Development environment targets (issue 5, spec §12). Included by the Makefile.
#
# The dev container: Dockerfile.dev (Fedora 42, systemd as PID 1, metald + metald-cli, the units
# of systemd/ installed by scripts/dev-install.sh), run by scripts/dev-run.sh with the host's
# Docker socket mounted, so VMs are sibling containers on the host engine.

DEV_IMAGE ?= metald-dev:latest
DEV_CONTAINER ?= metald-dev
# Where metald listens, in `docker run -p` form (the container shares the host's network, so
# metald sees real client addresses and refuses VMs); 8080:8080 is every interface.
DEV_PUBLISH ?= 127.0.0.1:8080:8080
# Mounted as /etc/default/unkey-deploy.local (overrides of /etc/default/unkey-deploy).
DEV_ENV_FILE ?= deploy/env/dev.env
DEV_HEALTH_TIMEOUT ?= 120
# Empty: --privileged where the engine allows it, else the minimal set (scripts/dev-run.sh).
DEV_RUN_FLAGS ?=
DEV_LOGS_ARGS ?= -n 100
# docker-dev-vm: metald-cli create-and-boot --template $(DEV_VM_TEMPLATE)
#   --docker-image $(DEV_VM_IMAGE) $(DEV_VM_ARGS). The default image is built locally (no
#   registry needed); e.g. DEV_VM_IMAGE=nginx:alpine DEV_VM_ARGS='--port 80/tcp'.
DEV_VM_TEMPLATE ?= minimal
DEV_VM_IMAGE ?= metald-test-busybox:latest
DEV_VM_ARGS ?= --env PORT=8080 --port 8080/tcp
# The build context: only what the image needs (target/ and .venv/ stay home).
DEV_CONTEXT := Dockerfile.dev Cargo.toml Cargo.lock build.rs proto benches src systemd scripts/dev-install.sh
# `make install`: root on the host.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)

DEV_TTY = $$([ -t 0 ] && [ -t 1 ] && echo -it || echo -i)

.PHONY: docker-dev-build docker-dev-up docker-dev-down docker-dev-logs docker-dev-shell docker-dev-vm \
        docker-dev-e2e install lint-dev

docker-dev-build: ## build the Fedora 42 dev image metald-dev:latest (systemd PID 1, metald, metald-cli)
	tar -c $(DEV_CONTEXT) | docker build -f Dockerfile.dev -t $(DEV_IMAGE) -
	@echo "built $(DEV_IMAGE); next: make docker-dev-up"

docker-dev-up: ## run the dev container (Docker socket mounted), wait until healthy, print metald's address
	DEV_PUBLISH='$(DEV_PUBLISH)' DEV_ENV_FILE='$(DEV_ENV_FILE)' DEV_RUN_FLAGS='$(DEV_RUN_FLAGS)' \
	  DEV_HEALTH_TIMEOUT='$(DEV_HEALTH_TIMEOUT)' bash scripts/dev-run.sh $(DEV_CONTAINER) $(DEV_IMAGE)

docker-dev-down: ## stop and remove the dev container (its VMs keep running: make clean-vms SCOPE=...)
	@if [ -n "$$(docker ps -aq --filter name='^/$(DEV_CONTAINER)$$')" ]; then \
	  docker stop -t 30 $(DEV_CONTAINER) >/dev/null && docker rm $(DEV_CONTAINER) >/dev/null; \
	  echo "removed $(DEV_CONTAINER)"; \
	else echo "$(DEV_CONTAINER) is not there"; fi

docker-dev-logs: ## the services' journal in the dev container (DEV_LOGS_ARGS=-f to follow)
	docker exec $(DEV_TTY) $(DEV_CONTAINER) journalctl --no-pager -u metald -u billaged -u assetmanagerd -u builderd $(DEV_LOGS_ARGS)

docker-dev-shell: ## a shell in the dev container (systemctl, journalctl, metald-cli, docker)
	docker exec $(DEV_TTY) $(DEV_CONTAINER) bash -l

docker-dev-vm: ## metald-cli create-and-boot in the dev container (DEV_VM_IMAGE, DEV_VM_TEMPLATE, DEV_VM_ARGS)
	@if [ "$(DEV_VM_IMAGE)" = metald-test-busybox:latest ]; then bash scripts/build-test-image.sh; fi
	docker exec $(DEV_TTY) -e UNKEY_METALD_SERVER_ADDRESS="http://127.0.0.1:$$(sed -n 's/^UNKEY_METALD_PORT=//p' .data/dev-run/$(DEV_CONTAINER).env 2>/dev/null | tail -n1 | grep . || echo 8080)" \
	  $(DEV_CONTAINER) metald-cli create-and-boot --template $(DEV_VM_TEMPLATE) \
	  --docker-image $(DEV_VM_IMAGE) $(DEV_VM_ARGS)

docker-dev-e2e: build ## end to end: Debian+systemd image with the same install, socket mounted (~2 min cold, ~40 s warm)
	bash scripts/build-test-image.sh
	bash scripts/dev-e2e.sh

install: build ## install metald, metald-cli and the units on this host (systemd; root), start metald
	$(SUDO) bash scripts/dev-install.sh --bin-dir target/release --now

lint-dev: ## systemd-analyze verify, hadolint, shellcheck, docker-compose config for the dev files
	bash scripts/dev-lint.sh
