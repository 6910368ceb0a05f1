#!/usr/bin/env bash
# ruff (lint and format check), mypy on hand-written code (the packages and the images
# scripts), and the import contracts (pyproject.toml).
set -euo pipefail
set -x
bin=${1:-.venv/bin}
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
# The images smoke and its report run from the venv too, outside the packages above.
"$bin/mypy" scripts/images_smoke.py scripts/images_results.py
"$bin/lint-imports"
