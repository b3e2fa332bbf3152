#!/usr/bin/env bash
# System packages the test suite needs beyond the venv: headless Chromium renders the HTML report
# in tests/test_report.py (that test skips, saying so, when Chromium is absent). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
