#!/usr/bin/env bash
# Build the GPU image (docker/Dockerfile.gpu) from the CUDA base: needs a registry for the base and
# PyPI for the CUDA wheels. A CA bundle the host needs (CA_BUNDLE=FILE, default the system's) is
# passed as a build secret, mounted for the download step only.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$ca" ] && secret=(--secret "id=ca-bundle,src=$ca")
"$ENGINE" build "${secret[@]}" -f docker/Dockerfile.gpu -t "localhost/recsys-transfer-gpu:$tag" "$@" .
