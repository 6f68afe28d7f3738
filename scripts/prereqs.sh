#!/usr/bin/env bash
# The one list of what this repository's make targets need from the system, and its install.
#
#   scripts/prereqs.sh GROUP...      GROUP: test, lint, dev (several may be given)
#
#   test   make test: busybox-static (the tests' own image, no registry), curl (interop suite),
#          openssl (TLS test certificates), util-linux's prlimit (a metald under a file limit)
#   lint   make lint: shellcheck
#   dev    make lint-dev / docker-dev-e2e: systemd (systemd-analyze), docker-compose, jq,
#          debootstrap
#
# Missing packages are installed with apt-get when this runs as root on Debian; otherwise one
# line names the packages and the command, and the exit code is 1. Python packages are not
# here: the interop suite keeps its own in .venv (tests/interop/run.sh).
set -euo pipefail

declare -A packages=(
  [test]="busybox-static curl openssl util-linux"
  [lint]="shellcheck"
  [dev]="systemd docker-compose jq debootstrap"
)
[ "$#" -gt 0 ] || { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

wanted=()
for group in "$@"; do
  [ -n "${packages[$group]+x}" ] || { echo "prereqs: unknown group ${group} (test, lint, dev)" >&2; exit 2; }
  read -r -a list <<<"${packages[$group]}"
  wanted+=("${list[@]}")
done

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ "${#missing[@]}" -gt 0 ] || exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "prereqs: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v apt-get >/dev/null; then
  echo "prereqs: missing ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
  exit 1
else
  echo "prereqs: missing ${missing[*]} (Debian package names); install their equivalents" >&2
  exit 1
fi
