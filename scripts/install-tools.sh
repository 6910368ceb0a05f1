#!/usr/bin/env bash
# Install the system tools the tests use: the Prometheus server and promtool (Debian's package).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
set -x
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends prometheus
