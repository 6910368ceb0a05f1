#!/usr/bin/env bash
# Render every kustomize overlay with the venv's kubectl into build/k8s/<overlay>.yaml.
set -euo pipefail
set -x
bin=${1:-.venv/bin}
out=build/k8s
mkdir -p "$out"
for overlay in cpu gpu cpu/training gpu/training; do
  "$bin/kubectl" kustomize "k8s/overlays/$overlay" > "$out/${overlay//\//-}.yaml"
done
