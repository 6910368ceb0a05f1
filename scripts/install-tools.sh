#!/usr/bin/env bash
# Install the system tools the tests use: the Prometheus server and promtool (Debian's
# `prometheus` package). Idempotent: does nothing when both binaries are already on PATH.
# The package's own service is never left running: the tests start their own server on loopback.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
set -x

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# Keep maintainer scripts from starting the packaged daemon. Container images usually ship a
# policy-rc.d that denies every start (exit 101); add one for the install only if it is missing.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  ADDED_POLICY=1
fi
cleanup() {
  if [ "$ADDED_POLICY" -eq 1 ]; then
    $SUDO rm -f "$POLICY"
  fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends prometheus

# Where systemd runs (a CI VM rather than a container), policy-rc.d does not cover every path:
# stop and disable the packaged service explicitly.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --now prometheus.service || true
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
