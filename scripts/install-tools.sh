#!/usr/bin/env bash
# Installs the monitoring tools the k8s checks use: `prometheus` and `promtool` (Debian's
# `prometheus` package). Idempotent: does nothing when both binaries are already on PATH.
# The package's own service is never left running: the tests start their own server on loopback.
set -e
set -x

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    prometheus --version 2>&1 | head -n 1
    exit 0
fi

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
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends prometheus

# Where systemd runs (a CI VM rather than a container), policy-rc.d does not cover every path:
# stop and disable the packaged service explicitly.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus.service || true
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
