#!/usr/bin/env bash
# Make sure Debian's `wrk` (the load generator of bench/overhead) is on PATH for the overhead-bench
# smoke test (tests/test_bench_overhead.py). Idempotent: does nothing when `wrk` is already there.
# Installs the package otherwise, which needs root (CI runs as root; elsewhere run it with sudo or
# install wrk yourself: the test skips with a reason when wrk is absent).
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-wrk: wrk is not on PATH and this is not root;" \
       "install it (Debian: apt-get install wrk) or the overhead-bench smoke test will skip" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends wrk >/dev/null
command -v wrk >/dev/null
echo "ensure-wrk: installed wrk"
