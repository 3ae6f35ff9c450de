#!/usr/bin/env bash
# Headless Chromium for the audit-report rendering test (tests/test_report.py): Debian's
# `chromium` package. Idempotent: does nothing when a Chromium binary is already on PATH.
set -euo pipefail
for candidate in chromium chromium-browser google-chrome; do
  if command -v "$candidate" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "setup-browser: chromium is missing and there is neither root nor sudo to install it" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
