#!/usr/bin/env bash
# Issue 14's goals in one sitting, on one machine: the vault beside the no-op reference server
# (the same gRPC contract answering fixed responses: what gRPC itself costs here), each in its
# own process on loopback, alternating round by round; then the PostgreSQL + pgcrypto peer.
#
#   tokenize, 64 in flight         goal >= 0.60 x reference
#   detokenize (durable audit), 64 goal >= 0.55 x reference
#   TokenizeBatch of 1,000         goal >= 300,000 PANs/s
#   p99 at half of the peak        goal <= 3 ms (tokenize and detokenize, open loop)
#   45 s of full-speed tokenize    goal: the data directory minus vault.db < 256 MB throughout,
#                                  and after kill -9, SERVING again in < 2 s
#
# Run on a quiet machine (no compiler, no other load), from the repository root, after
# `cargo build --release`. Environment: BIN (target/release/tokenvault), DUR (10s per run),
# ROUNDS (3), SOAK (45, seconds of the bounded-WAL run), PEER=0 skips the PostgreSQL peer.
# Prints one summary table at the end; every run's JSON report stays in $OUT (printed).
set -euo pipefail

BIN=$(realpath "${BIN:-target/release/tokenvault}")
DUR=${DUR:-10s}
ROUNDS=${ROUNDS:-3}
SOAK=${SOAK:-45}
OUT=$(mktemp -d /tmp/tokenvault-issue14.XXXXXX)
REF=127.0.0.1:50082
VAULT=127.0.0.1:50081
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
log() { echo "issue14: $*" >&2; }

wait_serving() { # addr, seconds
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        if "$BIN" health --addr "http://$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    log "no SERVING from $1 within $2 s"; return 1
}

start_vault() { # data dir
    "$BIN" --log-level warn serve --dev --data-dir "$1" --listen "$VAULT" >>"$OUT/serve.out" 2>>"$OUT/serve.log" &
    VAULT_PID=$!
    pids+=("$VAULT_PID")
    wait_serving "$VAULT" 30
    export TOKENVAULT_TOKENIZE_KEY TOKENVAULT_DETOKENIZE_KEY
    TOKENVAULT_TOKENIZE_KEY=$(sed -n 's/^checkout=//p' "$1/dev-credentials")
    TOKENVAULT_DETOKENIZE_KEY=$(sed -n 's/^payments=//p' "$1/dev-credentials")
}

"$BIN" bench --serve-reference "$REF" 2>>"$OUT/reference.log" &
pids+=($!)
start_vault "$OUT/vault"
# The reference has no health service: it is up once a bench against it answers.
sleep 1

bench() { # name target extra-args...
    local name=$1 target=$2; shift 2
    "$BIN" bench --addr "http://$target" -d "$DUR" --warmup 2s --json -q "$@" >"$OUT/$name.json"
}
rate() { jq -r '.pans_per_s' "$OUT/$1.json"; }
p99() { jq -r '.latency.p99_us / 1000' "$OUT/$1.json"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS"
    bench "ref-tokenize-$r" "$REF" --op tokenize -c 64
    bench "vault-tokenize-$r" "$VAULT" --op tokenize -c 64
    bench "ref-detokenize-$r" "$REF" --op detokenize -c 64 --prefill 10000
    bench "vault-detokenize-$r" "$VAULT" --op detokenize -c 64 --prefill 10000
    bench "ref-batch-$r" "$REF" --op tokenize-batch --batch-size 1000 -c 4
    bench "vault-batch-$r" "$VAULT" --op tokenize-batch --batch-size 1000 -c 4
done
med() { for ((r = 1; r <= ROUNDS; r++)); do rate "$1-$r"; done | median; }
for op in tokenize detokenize batch; do
    declare "REF_$op=$(med "ref-$op")" "VAULT_$op=$(med "vault-$op")"
done

# p99 at half of the peak just measured (open loop: latency from each scheduled send time).
half_t=$(awk -v v="$VAULT_tokenize" 'BEGIN {printf "%d", v / 2}')
half_d=$(awk -v v="$VAULT_detokenize" 'BEGIN {printf "%d", v / 2}')
bench half-tokenize "$VAULT" --op tokenize -c 64 --rate "$half_t"
bench half-detokenize "$VAULT" --op detokenize -c 64 --prefill 10000 --rate "$half_d"
bench half-ref-tokenize "$REF" --op tokenize -c 64 --rate "$half_t"

# Bounded files: a fresh vault, SOAK seconds of full-speed tokenize while the data directory
# (minus vault.db) is sampled every 0.2 s, then kill -9 and the time back to SERVING.
kill "$VAULT_PID"; wait "$VAULT_PID" 2>/dev/null || true
start_vault "$OUT/soak"
(
    peak=0
    while kill -0 "$VAULT_PID" 2>/dev/null; do
        other=$(find "$OUT/soak" -maxdepth 1 -type f ! -name vault.db -printf '%s\n' | awk '{s+=$1} END {print s+0}')
        ((other > peak)) && peak=$other && echo "$peak" >"$OUT/soak-peak"
        sleep 0.2
    done
) &
sampler=$!
"$BIN" bench --addr "http://$VAULT" --op tokenize -c 64 -d "${SOAK}s" --warmup 0s --json -q >"$OUT/soak.json"
wal_at_kill=$(stat -c %s "$OUT/soak/vault.db-wal" 2>/dev/null || echo 0)
kill -9 "$VAULT_PID"; wait "$VAULT_PID" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
t0=$(date +%s.%N)
start_vault "$OUT/soak"
t1=$(date +%s.%N)
recovery=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')

if [ "${PEER:-1}" = 1 ]; then
    log "the PostgreSQL + pgcrypto peer"
    DURATION=${DUR%s} JSON=1 bash "$(dirname "$0")/peer-postgres/run.sh" | tail -1 >"$OUT/peer.json" || true
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
cat <<EOF

| 64 in flight unless noted | no-op reference | tokenvault | ratio | goal |
|---|---|---|---|---|
| Tokenize (median of $ROUNDS) | $REF_tokenize/s | $VAULT_tokenize/s | $(ratio "$VAULT_tokenize" "$REF_tokenize") | >= 0.60 |
| Detokenize, durable audit (median of $ROUNDS) | $REF_detokenize/s | $VAULT_detokenize/s | $(ratio "$VAULT_detokenize" "$REF_detokenize") | >= 0.55 |
| TokenizeBatch of 1,000, 4 in flight, PANs/s | $REF_batch | $VAULT_batch | $(ratio "$VAULT_batch" "$REF_batch") | >= 300,000 PANs/s |
| p99 at half peak: tokenize $half_t/s, detokenize $half_d/s | $(p99 half-ref-tokenize) ms (tokenize) | $(p99 half-tokenize) ms / $(p99 half-detokenize) ms | | <= 3 ms |
| ${SOAK} s full-speed tokenize: largest non-database total in the data dir | | $(cat "$OUT/soak-peak" 2>/dev/null || echo 0) bytes ($(rate soak)/s; WAL at kill $wal_at_kill) | | < 256 MB |
| kill -9 right after it: back to SERVING | | ${recovery} s | | < 2 s |
| PostgreSQL + pgcrypto peer | $(cat "$OUT/peer.json" 2>/dev/null || echo "not run") | | | |

Reports: $OUT
EOF
