#!/usr/bin/env bash
# Runs the metald interop suite (tests/interop) against a built metald binary.
#
#   bash tests/interop/run.sh [pytest args...]
#
# METALD_BIN: the server binary (default: target/debug/metald, relative to the repo root).
# Creates/uses <repo>/.venv and installs tests/interop/requirements.txt into it.
# Exit code: pytest's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
venv="${repo}/.venv"

export METALD_BIN="${METALD_BIN:-target/debug/metald}"
case "${METALD_BIN}" in
  /*) ;;
  *) METALD_BIN="${repo}/${METALD_BIN}" ;;
esac

if [ ! -x "${venv}/bin/python" ]; then
  python3 -m venv "${venv}"
fi
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check -r "${here}/requirements.txt"

cd "${repo}"
set +e
"${venv}/bin/python" -m pytest -q -p no:cacheprovider "${here}" "$@"
status=$?
set -e
exit "${status}"
