#!/usr/bin/env bash
# The whole test suite under coverage.
set -euo pipefail
set -x
bin=${1:-.venv/bin}
"$bin/coverage" run -m pytest "${@:2}"
echo "coverage: $("$bin/coverage" report --format=total)% of lines"
