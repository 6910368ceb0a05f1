#!/usr/bin/env bash
# Build the CPU images (`make images`): recsys-transfer (serving: the ranker, retrieval, the gateway)
# and recsys-transfer-training, tagged with the package version, with podman (docker where its
# daemon answers). The base is the official Python image where a registry is reachable, else the
# Debian-built one (scripts/base-image.sh); PYTHON_IMAGE=... chooses. pip reads only wheelhouse/
# and the builds run with --network none. Extra arguments go to every build (e.g. --no-cache).
# Writes build/images/build.json: the base, each image's build seconds and size in bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
py=${PY:-.venv/bin/python}
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
official=docker.io/library/python:3.11.11-slim-bookworm
debian=localhost/recsys-python:3.11-bookworm
if [ -z "${PYTHON_IMAGE:-}" ]; then
    if "$ENGINE" image inspect "$official" >/dev/null 2>&1 || timeout 300 "$ENGINE" pull -q "$official" >/dev/null 2>&1; then
        PYTHON_IMAGE=$official
    else
        echo "images: no registry reachable for $official; using the Debian-built base $debian"
        "$ENGINE" image inspect "$debian" >/dev/null 2>&1 || scripts/base-image.sh "$debian"
        PYTHON_IMAGE=$debian
    fi
fi
# The wheelhouse, remade when the pins or the requirements change.
if scripts/wheelhouse.sh --stale "$py"; then
    scripts/wheelhouse.sh "$py"
fi
mkdir -p build/images
# podman would otherwise look a local base up in registries; docker's --pull is only a switch.
pull=(); [ "$ENGINE" = podman ] && pull=(--pull=never)
results=()
for target in serving training; do
    name=recsys-transfer; [ "$target" = training ] && name=recsys-transfer-training
    start=$(date +%s.%N)
    "$ENGINE" build --network none "${pull[@]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
        -f docker/Dockerfile --target "$target" -t "localhost/$name:$tag" "$@" . \
        > "build/images/$target.log" 2>&1 \
        || { tail -30 "build/images/$target.log" >&2; echo "images: $target build failed (build/images/$target.log)" >&2; exit 1; }
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    size=$("$ENGINE" image inspect --format '{{.Size}}' "localhost/$name:$tag")
    printf 'images: %-36s %6.1f s  %5d MB\n' "localhost/$name:$tag" "$seconds" $((size / 1000000))
    results+=("\"$target\": {\"image\": \"localhost/$name:$tag\", \"build_s\": $seconds, \"size_bytes\": $size}")
done
base_size=$("$ENGINE" image inspect --format '{{.Size}}' "$PYTHON_IMAGE")
(IFS=,; echo "{\"engine\": \"$ENGINE\", \"base\": \"$PYTHON_IMAGE\", \"base_size_bytes\": $base_size, ${results[*]}}") \
    > build/images/build.json
