#!/usr/bin/env bash
# deploy/docker-compose.yml (SQLite) and deploy/docker-compose.postgres.yml (PostgreSQL and two
# replicas) must work with both compose implementations: Debian's
# docker-compose 1.29 (`config -q` parses and validates it with that version's own rules) and
# the Compose Specification (what today's `docker compose` implements), validated against the
# specification's JSON schema as Debian's docker-compose package ships it
# (compose/config/compose_spec.json). Installs Debian's docker-compose (which brings
# python3-jsonschema and python3-yaml) when it is missing; needs no Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
files=(deploy/docker-compose.yml deploy/docker-compose.postgres.yml)

if ! command -v docker-compose >/dev/null 2>&1; then
  echo "--- installing Debian's docker-compose (apt)"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: docker-compose 1.29 is required (apt-get install docker-compose)" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
for file in "${files[@]}"; do
  echo "--- $(docker-compose version --short 2>/dev/null || echo docker-compose) config -q: $file"
  docker-compose -p tokenvault -f "$file" config -q
  echo "docker-compose: $file valid"
done

echo "--- Compose Specification schema"
/usr/bin/python3 - "${files[@]}" <<'PY'
import json
import os
import sys

import compose
import jsonschema
import yaml

spec = os.path.join(os.path.dirname(compose.__file__), "config", "compose_spec.json")
with open(spec) as f:
    schema = json.load(f)
failed = False
for path in sys.argv[1:]:
    with open(path) as f:
        doc = yaml.safe_load(f)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
    )
    for e in errors:
        print(f"{path}: {'/'.join(map(str, e.path)) or '<root>'}: {e.message}", file=sys.stderr)
    failed = failed or bool(errors)
    if not errors:
        print(f"compose spec: {path} valid")
if failed:
    sys.exit(1)
PY
