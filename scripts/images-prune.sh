#!/usr/bin/env bash
# Remove what the image targets left in the engine's storage: the smoke's containers, the project's
# images (both tags of this version and the Debian-built base) and the dangling build layers.
# --keep-base keeps the base image (the smoke's cold build starts from an empty layer cache).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
for name in $("$ENGINE" ps -a --format '{{.Names}}' | grep '^recsys-smoke-'); do
    "$ENGINE" rm --force "$name" >/dev/null
done
# Build containers an interrupted build left behind (they pin its layers).
for id in $("$ENGINE" ps --all --external --format '{{.ID}} {{.Names}}' 2>/dev/null \
    | awk '$2 ~ /-working-container(-[0-9]+)?$/ {print $1}'); do
    "$ENGINE" rm --force "$id" >/dev/null 2>&1
done
images=("localhost/recsys-transfer:$tag" "localhost/recsys-transfer-training:$tag")
[ "${1:-}" = --keep-base ] || images+=(localhost/recsys-python:3.11-bookworm)
for image in "${images[@]}"; do
    "$ENGINE" image inspect "$image" >/dev/null 2>&1 && "$ENGINE" rmi --force "$image" >/dev/null
done
"$ENGINE" image prune --force >/dev/null
echo "images-prune: $("$ENGINE" images --quiet | wc -l) images left"
