#!/usr/bin/env bash
# Contract hygiene for proto/: `buf lint`, and `buf breaking` against the parent commit.
# Installs @bufbuild/buf (which ships the buf binary) with npm into a throw-away directory;
# nothing is installed globally or written into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION="${BUF_VERSION:-1.57.0}"
if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm is required to install @bufbuild/buf for 'buf lint' (install Node.js/npm)" >&2
  exit 1
fi
tool_dir="$(mktemp -d)"
trap 'rm -rf "$tool_dir"' EXIT
echo "--- installing @bufbuild/buf@${BUF_VERSION} (npm, into a temporary directory)"
npm install --prefix "$tool_dir" --no-save --no-audit --no-fund --loglevel=error \
  "@bufbuild/buf@${BUF_VERSION}" >/dev/null
buf="$tool_dir/node_modules/.bin/buf"
"$buf" --version

echo "--- buf lint"
"$buf" lint

echo "--- buf breaking"
if git rev-parse --verify --quiet HEAD~1 >/dev/null 2>&1; then
  if git cat-file -e HEAD~1:buf.yaml 2>/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then
    if git show HEAD~1:proto/tokenvault/v1/tokenvault.proto | grep -q '^option go_package'; then
      "$buf" breaking --against ".git#ref=HEAD~1"
    else
      # The parent predates the language options (issue 18): setting them for the first time
      # changes no wire name, so only that comparison skips the FILE_SAME_* option rules; from
      # then on they guard the generated Go and Java packages like every other rule.
      "$buf" breaking --against ".git#ref=HEAD~1" --config '{"version":"v2","modules":[{"path":"proto"}],"breaking":{"use":["FILE"],"except":["FILE_SAME_GO_PACKAGE","FILE_SAME_JAVA_PACKAGE","FILE_SAME_JAVA_MULTIPLE_FILES","FILE_SAME_JAVA_OUTER_CLASSNAME"]}}'
    fi
    echo "no breaking changes against HEAD~1"
  else
    echo "HEAD~1 has no buf module (buf.yaml and proto/); nothing to compare against"
  fi
else
  echo "no parent commit (first commit or shallow clone); skipping buf breaking"
fi
