#!/usr/bin/env bash
# ruff (lint and format check) and mypy on hand-written code.
set -euo pipefail
set -x
bin=${1:-.venv/bin}
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
