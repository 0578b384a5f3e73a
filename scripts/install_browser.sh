#!/usr/bin/env bash
# Install the headless browser the MLflow UI test drives (tests/test_mlflow_ui.py):
# Debian's chromium and its matching chromedriver. No browser download from anywhere else.
# Idempotent: does nothing when both are already present. Needs root (CI runs as root) or sudo.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: need root (or sudo) to apt-get install chromium" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver
echo "installed: $(chromium --version 2>/dev/null || true), $(chromedriver --version 2>/dev/null || true)"
