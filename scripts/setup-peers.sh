#!/usr/bin/env bash
# Create one virtualenv per peer server of `make bench-peers` under .venv-peers/ (KServe,
# Triton through PyTriton), from bench/peer_requirements/<peer>.txt; a peer that does not install is reported
# and skipped, the others still are.
set -uo pipefail
python=${1:-python3}
root=${2:-.venv-peers}
mkdir -p "$root"
for requirements in bench/peer_requirements/*.txt; do
    peer=$(basename "$requirements" .txt)
    venv="$root/$peer"
    stamp="$venv/.installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$requirements" ]; then
        continue
    fi
    echo "setup-peers: installing $peer into $venv" >&2
    rm -rf "$venv"
    if "$python" -m venv "$venv" \
        && "$venv/bin/python" -m pip install --quiet --upgrade pip \
        && "$venv/bin/python" -m pip install --quiet -r "$requirements"; then
        touch "$stamp"
    else
        echo "setup-peers: $peer could not be installed; bench-peers will skip it" >&2
        rm -rf "$venv"
    fi
done
