#!/usr/bin/env bash
# Regenerate every stub in recsys/ from protos/ and fail if the result differs from what is committed.
set -euo pipefail
set -x
py=${1:-.venv/bin/python}
"$py" -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. \
  protos/recsys/v1/*.proto protos/recsys/inference/*.proto
git diff --exit-code -- recsys/v1 recsys/inference
untracked=$(git ls-files --others --exclude-standard -- recsys/v1 recsys/inference)
if [ -n "$untracked" ]; then
  echo "generated files not committed: $untracked" >&2
  exit 1
fi
