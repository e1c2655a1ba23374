#!/usr/bin/env sh
# Generates the Python stubs for tokenvault.v1 from the repository's proto/ into ./gen/.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
proto="$here/../../proto"
mkdir -p "$here/gen"
python3 -m grpc_tools.protoc -I "$proto" \
  --python_out="$here/gen" --grpc_python_out="$here/gen" \
  "$proto/tokenvault/v1/tokenvault.proto"
touch "$here/gen/tokenvault/__init__.py" "$here/gen/tokenvault/v1/__init__.py"
echo "stubs written to $here/gen/tokenvault/v1/"
