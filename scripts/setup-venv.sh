#!/usr/bin/env bash
# Create the virtualenv and install the project with the pinned dependencies.
set -euo pipefail
set -x
python=${1:-python3}
venv=${2:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e '.[train,dev,distributed]'
