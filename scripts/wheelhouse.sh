#!/usr/bin/env bash
# Download into wheelhouse/ (ignored by git, read by the image builds through a bind mount) every
# wheel the images install: the serving dependencies, the training extra and the build backend,
# at the versions constraints.txt pins, so that the builds need no network.
# Usage: scripts/wheelhouse.sh [PYTHON] (an interpreter of the images' Python minor version).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
mkdir -p wheelhouse
"$py" docker/requirements.py train > wheelhouse/requirements.txt
# setuptools and wheel: the build backend that `pip install .` needs inside the image.
"$py" -m pip download --quiet --only-binary=:all: --dest wheelhouse -c constraints.txt \
    -r wheelhouse/requirements.txt setuptools wheel
echo "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
