#!/usr/bin/env bash
# ruff (lint and format check), mypy on hand-written code, and the import contracts (pyproject.toml).
set -euo pipefail
set -x
bin=${1:-.venv/bin}
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
"$bin/lint-imports"
