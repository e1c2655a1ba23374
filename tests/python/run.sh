#!/usr/bin/env bash
# The Python checks, as .ci/run runs them after `cargo test`:
#   bash tests/python/run.sh client      # tests/python/test_client.py: the gRPC contract from Python
#   bash tests/python/run.sh tls-scan    # tests/python/tls_scan.py: sslyze vs Mozilla "intermediate"
# Installs tests/python/requirements.txt into target/python-venv (reused while the file is
# unchanged). Needs python3 with venv/pip and target/debug/tokenvault (built if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/python-venv
req=tests/python/requirements.txt
py="$venv/bin/python"
if ! cmp -s "$req" "$venv/.installed-requirements" 2>/dev/null; then
    rm -rf "$venv"
    mkdir -p target
    start=$SECONDS
    python3 -m venv "$venv"
    timeout 900 "$py" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
    cp "$req" "$venv/.installed-requirements"
    echo "python venv ready in $((SECONDS - start)) s"
fi

export TOKENVAULT_BIN="${TOKENVAULT_BIN:-$PWD/target/debug/tokenvault}"
if [ ! -x "$TOKENVAULT_BIN" ]; then
    cargo build --quiet
fi

status=0
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for check in "$@"; do
    case "$check" in
        client) script=tests/python/test_client.py ;;
        tls-scan) script=tests/python/tls_scan.py ;;
        *) echo "unknown check: $check (client, tls-scan)" >&2; exit 2 ;;
    esac
    start=$SECONDS
    # The scripts bound themselves (watchdogs); `timeout` is the outer fence.
    if ! timeout --kill-after=10 600 "$py" "$script" 2>&1 | tee "$log"; then
        status=1
    fi
    # Each script's closing line: "<name>: N passed, N failed".
    counts=$(grep -E '^[a-z-]+: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)
    if [ -z "$counts" ]; then
        status=1
        failed=$((failed + 1))  # the script died before counting
    else
        read -r p f <<<"$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed/\1 \2/' <<<"$counts")"
        passed=$((passed + p))
        failed=$((failed + f))
    fi
    echo "$check took $((SECONDS - start)) s"
done
echo "python: $passed passed, $failed failed"
exit "$status"
