#!/usr/bin/env bash
# Make sure a headless-capable Chromium is on PATH for tests/test_page.py (the status page test).
# Idempotent: does nothing when `chromium` is already there. Installs Debian's package otherwise,
# which needs root (CI runs as root; elsewhere run it with sudo or install chromium yourself:
# the test skips with a reason when chromium is absent).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-chromium: chromium is not on PATH and this is not root;" \
       "install it (Debian: apt-get install chromium) or the status page test will skip" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts-liberation: readable text in screenshots on a bare image (a recommend we skip with the rest)
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
command -v chromium >/dev/null
echo "ensure-chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
