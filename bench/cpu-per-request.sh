#!/usr/bin/env bash
# What one request costs the server in CPU, beside the no-op reference, in one sitting: the
# server's user and system time and its context switches (summed over all its threads, from
# /proc) divided by the requests answered in a closed-loop run of `tokenvault bench`, 64 in
# flight. The load generator's own CPU is not counted. Throughput on a shared machine says
# how the two processes split the cores; this says where the server's share goes.
#
#   BIN=target/release/tokenvault OP=tokenize bash bench/cpu-per-request.sh
#
# Environment: BIN, OP (tokenize | detokenize), DUR (8, seconds measured, after 2 s of load
# not measured), ROUNDS (1). Linux only. Run on a quiet machine. For detokenize, the measured
# run first stores its 10,000 tokens (TokenizeBatch); that falls inside the window and adds
# under 0.5 µs per request to the vault's figures.
set -euo pipefail
BIN=$(realpath "${BIN:-target/release/tokenvault}")
OP=${OP:-tokenize}
DUR=${DUR:-8}
ROUNDS=${ROUNDS:-1}
REF=127.0.0.1:50094
VAULT=127.0.0.1:50093
OUT=$(mktemp -d /tmp/tokenvault-cpu.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$OUT/vault"
}
trap cleanup EXIT
TICK=$(getconf CLK_TCK)

# pid -> "voluntary nonvoluntary utime-ticks stime-ticks", summed over its threads.
snap() {
    local t v=0 n=0 u=0 s=0 st
    for t in /proc/"$1"/task/*; do
        v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t/status")))
        n=$((n + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")))
        # Fields 14 and 15 of stat; the command name (field 2) has no spaces here.
        read -r -a st <"$t/stat"
        u=$((u + st[13]))
        s=$((s + st[14]))
    done
    echo "$v $n $u $s"
}

measure() { # name pid addr bench-args...
    local name=$1 pid=$2 addr=$3 before after
    shift 3
    local b=("$BIN" bench --addr "http://$addr" -q -c 64 --op "$OP" "$@")
    "${b[@]}" -d 2s --warmup 0s >/dev/null
    before=$(snap "$pid")
    "${b[@]}" -d "${DUR}s" --warmup 0s --json >"$OUT/$name.json"
    after=$(snap "$pid")
    read -r v1 n1 u1 s1 <<<"$before"
    read -r v2 n2 u2 s2 <<<"$after"
    awk -v name="$name" -v req="$(jq .requests "$OUT/$name.json")" -v rate="$(jq .pans_per_s "$OUT/$name.json")" \
        -v v=$((v2 - v1)) -v n=$((n2 - n1)) -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v tick="$TICK" \
        'BEGIN {printf "| %s | %.0f | %.1f | %.1f | %.1f | %.2f | %.2f |\n", name, rate,
                u * 1e6 / tick / req, s * 1e6 / tick / req, (u + s) * 1e6 / tick / req, v / req, n / req}'
}

"$BIN" bench --serve-reference "$REF" 2>>"$OUT/reference.log" &
pids+=($!)
rpid=$!
"$BIN" --log-level warn serve --dev --data-dir "$OUT/vault" --listen "$VAULT" >>"$OUT/serve.log" 2>&1 &
pids+=($!)
vpid=$!
for ((i = 0; i < 600; i++)); do
    "$BIN" health --addr "http://$VAULT" >/dev/null 2>&1 && break
    sleep 0.05
done
export TOKENVAULT_TOKENIZE_KEY TOKENVAULT_DETOKENIZE_KEY
TOKENVAULT_TOKENIZE_KEY=$(sed -n 's/^checkout=//p' "$OUT/vault/dev-credentials")
TOKENVAULT_DETOKENIZE_KEY=$(sed -n 's/^payments=//p' "$OUT/vault/dev-credentials")
extra=()
[ "$OP" = detokenize ] && extra=(--prefill 10000)

echo "| $OP, 64 in flight, ${DUR} s | requests/s | server user µs/request | system µs/request | CPU µs/request | voluntary switches/request | involuntary/request |"
echo "|---|---|---|---|---|---|---|"
for ((r = 1; r <= ROUNDS; r++)); do
    measure "no-op reference" "$rpid" "$REF" --api-key reference "${extra[@]}"
    measure tokenvault "$vpid" "$VAULT" "${extra[@]}"
done
echo "reports: $OUT" >&2
