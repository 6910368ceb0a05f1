#!/usr/bin/env bash
# Regenerate every stub from protos/ and fail if the result differs from what is committed.
set -euo pipefail
set -x
py=${1:-.venv/bin/python}
"$py" -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
  protos/recsys/v1/*.proto protos/recsys/inference/*.proto
git diff --exit-code -- protos/
untracked=$(git ls-files --others --exclude-standard -- protos/)
if [ -n "$untracked" ]; then
  echo "generated files not committed: $untracked" >&2
  exit 1
fi
