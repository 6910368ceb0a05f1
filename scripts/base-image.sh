#!/usr/bin/env bash
# A Python base image made from Debian packages with mmdebstrap, for machines that reach Debian's
# archive but no container registry: minbase plus python3 (3.11 on bookworm), venv and CA
# certificates. Usage: scripts/base-image.sh [TAG] (default localhost/recsys-python:3.11-bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/recsys-python:3.11-bookworm}
suite=${DEBIAN_SUITE:-bookworm}
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
command -v mmdebstrap >/dev/null || { echo "base-image: mmdebstrap is not installed (apt-get install mmdebstrap)" >&2; exit 2; }
# passwd brings useradd/groupadd, which the images use to create their user.
mmdebstrap --quiet --variant=minbase --mode=root \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$suite" - \
  | "$ENGINE" import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "base-image: $tag ($("$ENGINE" image inspect --format '{{.Size}}' "$tag") bytes)"
