#!/usr/bin/env bash
# The PostgreSQL tests (tests/conformance.rs, tests/replicas.rs) start throwaway clusters
# with initdb + pg_ctl themselves; this only makes sure the server binaries are installed
# (Debian's `postgresql` package). In CI a missing binary fails those tests, never skips them.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "--- PostgreSQL: $(ls -d /usr/lib/postgresql/*/bin | tail -n1)"
  exit 0
fi
echo "--- installing postgresql (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# The package starts (and enables) a cluster of its own on 5432; the tests need none.
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for c in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do
    pg_ctlcluster "${c%/*}" "${c#*/}" stop || true
  done
fi
ls -d /usr/lib/postgresql/*/bin/initdb
