#!/usr/bin/env bash
# Before/after of a change, in one sitting: two builds of tokenvault (A, B) and the no-op
# reference, each in its own process on loopback, alternated round by round so that drift of
# the machine falls on both sides. Per round and side: tokenize (64 in flight), detokenize with
# its durable audit record (64), TokenizeBatch of 1,000 (4), and tokenize in an open loop at
# RATE/s for its p99 (with a WAL bound of P99_WAL bytes, so the WAL resets show in it).
#
#   A=/tmp/tv-before B=target/release/tokenvault bash bench/ab.sh
#
# Environment: DUR (8s), ROUNDS (3), RATE (10000), P99_WAL (67108864: the default bound).
# Run on a quiet machine. Prints medians per side and the ratio B/A; reports stay in $OUT.
set -euo pipefail
A=$(realpath "${A:?A=path of the first build}")
B=$(realpath "${B:-target/release/tokenvault}")
DUR=${DUR:-8s}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-10000}
P99_WAL=${P99_WAL:-67108864}
OUT=$(mktemp -d /tmp/tokenvault-ab.XXXXXX)
REF=127.0.0.1:50092
VAULT=127.0.0.1:50091
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
log() { echo "ab: $*" >&2; }

"$B" bench --serve-reference "$REF" 2>>"$OUT/reference.log" &
pids+=($!)
sleep 1

run_side() { # side bin round
    local side=$1 bin=$2 r=$3 dir="$OUT/$1-$3" i
    "$bin" --log-level warn serve --dev --data-dir "$dir" --listen "$VAULT" --max-wal-bytes "$P99_WAL" \
        >>"$OUT/serve.out" 2>>"$OUT/serve.log" &
    local pid=$!
    for ((i = 0; i < 600; i++)); do
        "$bin" health --addr "http://$VAULT" >/dev/null 2>&1 && break
        sleep 0.05
    done
    export TOKENVAULT_TOKENIZE_KEY TOKENVAULT_DETOKENIZE_KEY
    TOKENVAULT_TOKENIZE_KEY=$(sed -n 's/^checkout=//p' "$dir/dev-credentials")
    TOKENVAULT_DETOKENIZE_KEY=$(sed -n 's/^payments=//p' "$dir/dev-credentials")
    local b=("$B" bench --addr "http://$VAULT" -d "$DUR" --warmup 2s --json -q)
    "${b[@]}" --op tokenize -c 64 >"$OUT/$side-tokenize-$r.json"
    "${b[@]}" --op detokenize -c 64 --prefill 10000 >"$OUT/$side-detokenize-$r.json"
    "${b[@]}" --op tokenize-batch --batch-size 1000 -c 4 >"$OUT/$side-batch-$r.json"
    "${b[@]}" --op tokenize -c 64 --rate "$RATE" >"$OUT/$side-p99-$r.json"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS"
    b=("$B" bench --addr "http://$REF" -d "$DUR" --warmup 2s --json -q --api-key reference)
    "${b[@]}" --op tokenize -c 64 >"$OUT/ref-tokenize-$r.json"
    "${b[@]}" --op detokenize -c 64 --prefill 10000 >"$OUT/ref-detokenize-$r.json"
    run_side A "$A" "$r"
    run_side B "$B" "$r"
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { # side op jq-expr
    for ((r = 1; r <= ROUNDS; r++)); do jq -r "$3" "$OUT/$1-$2-$r.json"; done | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
rt=$(med ref tokenize .pans_per_s); rd=$(med ref detokenize .pans_per_s)
echo
echo "| median of $ROUNDS | no-op reference | A | B | B/A | A/ref | B/ref |"
echo "|---|---|---|---|---|---|---|"
for op in tokenize detokenize batch; do
    a=$(med A $op .pans_per_s); b=$(med B $op .pans_per_s)
    case $op in tokenize) ref=$rt ;; detokenize) ref=$rd ;; *) ref= ;; esac
    echo "| $op/s | ${ref:--} | $a | $b | $(ratio "$b" "$a") | ${ref:+$(ratio "$a" "$ref")} | ${ref:+$(ratio "$b" "$ref")} |"
done
pa=$(med A p99 '.latency.p99_us / 1000'); pb=$(med B p99 '.latency.p99_us / 1000')
echo "| tokenize p99 at $RATE/s, ms | | $pa | $pb | $(ratio "$pb" "$pa") | | |"
echo
echo "A=$A B=$B reports: $OUT"
