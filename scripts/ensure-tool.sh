#!/usr/bin/env bash
# Make sure a command that some tests need is on PATH, from Debian packages:
#   scripts/ensure-tool.sh COMMAND "WHAT NEEDS IT" PACKAGE...
# `make test` uses it for `chromium` (the status page test, tests/test_page.py), and for `wrk`
# and `valgrind` (the overhead-bench smoke tests, tests/test_bench_overhead.py). Idempotent:
# does nothing when COMMAND is already there. Installing needs root (CI runs as root; elsewhere
# run it with sudo or install the packages yourself: those tests skip with a reason when the
# command is absent).
set -euo pipefail

command_name=$1
needed_by=$2
shift 2

if command -v "$command_name" >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-tool: $command_name is not on PATH and this is not root;" \
       "install it (Debian: apt-get install $*) or $needed_by will skip" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
command -v "$command_name" >/dev/null
echo "ensure-tool: installed $command_name for $needed_by"
