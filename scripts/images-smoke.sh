#!/usr/bin/env bash
# `make images-smoke`: build the CPU images cold (an empty layer cache: the project's images and
# build layers pruned, the base image and the wheelhouse kept) and again cached, then run the
# smoke (scripts/images_smoke.py: train as uid 10001 with no network, serve hardened, recommend,
# drain, serve as another uid) and record sizes, times and the smoke's output in
# bench/results/images.{json,md}. Exit status: the smoke's.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
py=${PY:-.venv/bin/python}
out=build/images
mkdir -p "$out"
debian=localhost/recsys-python:3.11-bookworm
base_s=null
if [ -z "${PYTHON_IMAGE:-}" ] && ! "$ENGINE" image inspect "$debian" >/dev/null 2>&1 \
    && ! timeout 300 "$ENGINE" pull -q docker.io/library/python:3.11.11-slim-bookworm >/dev/null 2>&1; then
    start=$(date +%s.%N)
    scripts/base-image.sh "$debian"
    base_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
fi
wheelhouse_s=null
if scripts/wheelhouse.sh --stale "$py"; then
    start=$(date +%s.%N)
    scripts/wheelhouse.sh "$py"
    wheelhouse_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
fi
echo "images-smoke: cold build (empty layer cache)"
scripts/images-prune.sh --keep-base
scripts/images.sh
cp "$out/build.json" "$out/cold.json"
# IMAGES_CACHED_BUILD=0 (CI) skips the cached rebuild, which only measures.
if [ "${IMAGES_CACHED_BUILD:-1}" = 1 ]; then
    echo "images-smoke: cached build (unchanged tree)"
    scripts/images.sh
    cp "$out/build.json" "$out/cached.json"
else
    rm -f "$out/cached.json"
fi
status=0
"$py" scripts/images_smoke.py --engine "$ENGINE" --json "$out/smoke.json" 2>&1 | tee "$out/smoke.log" \
    || status=$?
"$py" scripts/images_results.py --cold "$out/cold.json" --cached "$out/cached.json" \
    --smoke "$out/smoke.json" --log "$out/smoke.log" --status "$status" \
    --base-s "$base_s" --wheelhouse-s "$wheelhouse_s" --out bench/results/images
exit "$status"
