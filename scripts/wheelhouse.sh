#!/usr/bin/env bash
# Download into wheelhouse/ (ignored by git, read by the image builds through a bind mount) every
# wheel the images install: the serving dependencies, the train and distributed extras and the
# build backend, at the versions constraints.txt pins, so that the builds need no network.
# Usage: scripts/wheelhouse.sh [PYTHON] (an interpreter of the images' Python minor version).
#        scripts/wheelhouse.sh --stale [PYTHON]: exit 0 when it must be remade (no wheelhouse,
#        newer pins, or a different requirement list), 1 when it is current.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --stale ]; then
    py=${2:-.venv/bin/python}
    [ -f wheelhouse/requirements.txt ] || exit 0
    [ constraints.txt -nt wheelhouse/requirements.txt ] && exit 0
    "$py" docker/requirements.py train distributed | cmp -s - wheelhouse/requirements.txt && exit 1
    exit 0
fi
py=${1:-.venv/bin/python}
mkdir -p wheelhouse
"$py" docker/requirements.py train distributed > wheelhouse/requirements.next
# setuptools and wheel: the build backend that `pip install .` needs inside the image.
"$py" -m pip download --quiet --only-binary=:all: --dest wheelhouse -c constraints.txt \
    -r wheelhouse/requirements.next setuptools wheel
# Written last, so that a failed download leaves the wheelhouse stale.
mv wheelhouse/requirements.next wheelhouse/requirements.txt
echo "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
