#!/usr/bin/env bash
# Static security scan of the Bicep in infra/ with checkov.
#
# checkov pins many packages of its own, so it gets its own virtual environment (.venv-checkov,
# git-ignored by the .venv-* rule), created on first use and reused afterwards. Every failed check
# fails this script; a check that does not apply is skipped IN the Bicep file next to the resource,
# with `#checkov:skip=CKV_...: reason`, so the reason is reviewed with the code.
#
# Usage: bash .ci/checkov.sh            (from the repository root)
# Env:   CHECKOV_VENV (default .venv-checkov), PYTHON (default python3)
set -euo pipefail

CHECKOV_VERSION="3.3.30"
cd "$(dirname "$0")/.."
VENV="${CHECKOV_VENV:-.venv-checkov}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/checkov" ] || ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "[checkov] installing checkov==$CHECKOV_VERSION into $VENV (first run takes a few minutes)"
  "$PY" -m venv "$VENV"
  # hash-checked, like make setup: requirements-checkov.txt (make lock) pins checkov==$CHECKOV_VERSION
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-checkov.txt
fi

echo "[checkov] $("$VENV/bin/checkov" --version) scanning infra/ (framework bicep)"
# --compact: no code blocks in the report; --quiet: list only failed checks.
# checkov tries to download its guidelines and an update notice; offline that fails harmlessly.
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
"$VENV/bin/checkov" --framework bicep -d infra --compact --quiet --skip-download
