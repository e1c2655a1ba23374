#!/usr/bin/env bash
# The 10M-token figures (issue 6's goals, kept by issue 14): a fresh vault measured at 10k
# tokens, filled to ~10M with TokenizeBatch, restarted (start-up timed to health SERVING),
# measured again. Server RSS after the fill and after the runs.
#   goals: >= 70% of the 10k throughput at 10M, RSS < 150 MB, start-up < 1 s
# Run on a quiet machine after `cargo build --release`; needs ~3.5 GB free in /tmp.
# Environment: BIN (target/release/tokenvault), DUR (10s), FILL (8400 batches of 1,000).
set -euo pipefail
BIN=$(realpath "${BIN:-target/release/tokenvault}")
DUR=${DUR:-10s}
FILL=${FILL:-8400}
OUT=$(mktemp -d /tmp/tokenvault-10m.XXXXXX)
ADDR=127.0.0.1:50071
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

start() {
    "$BIN" --log-level warn serve --dev --data-dir "$OUT/vault" --listen "$ADDR" >>"$OUT/serve.out" 2>>"$OUT/serve.log" &
    pid=$!
    local t0 i
    t0=$(date +%s.%N)
    for ((i = 0; i < 2000; i++)); do
        "$BIN" health --addr "http://$ADDR" >/dev/null 2>&1 && break
        sleep 0.005
    done
    STARTUP=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
    export TOKENVAULT_TOKENIZE_KEY TOKENVAULT_DETOKENIZE_KEY
    TOKENVAULT_TOKENIZE_KEY=$(sed -n 's/^checkout=//p' "$OUT/vault/dev-credentials")
    TOKENVAULT_DETOKENIZE_KEY=$(sed -n 's/^payments=//p' "$OUT/vault/dev-credentials")
}
rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"; }
b() { "$BIN" bench --addr "http://$ADDR" -q --json "$@"; }
runs() { # label
    b --op tokenize -c 64 -d "$DUR" --warmup 2s >"$OUT/$1-tokenize.json"
    b --op detokenize -c 64 -d "$DUR" --warmup 2s --prefill 10000 >"$OUT/$1-detokenize.json"
    b --op tokenize-batch --batch-size 1000 -c 4 -d "$DUR" --warmup 1s >"$OUT/$1-batch.json"
}
rate() { jq -r '.pans_per_s | floor' "$OUT/$1.json"; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f%%", 100 * a / b}'; }

start; startup_empty=$STARTUP
runs small
echo "scale10m: filling ($FILL batches of 1,000)" >&2
b --op tokenize-batch --batch-size 1000 -c 4 -n "$FILL" --warmup 0s >"$OUT/fill.json"
rss_fill=$(rss)
kill "$pid"; wait "$pid" 2>/dev/null || true
start; startup_big=$STARTUP
rss_restart=$(rss)
runs big
rss_runs=$(rss)
tokens=$(sqlite3 "file:$OUT/vault/vault.db?mode=ro" 'SELECT count(*) FROM tokens' 2>/dev/null || echo "~$((FILL * 1000 + 10000))")
db=$(du -h "$OUT/vault/vault.db" | cut -f1)
cat <<EOT

| vault | tokenize/s | detokenize/s | TokenizeBatch PANs/s | start-up | RSS |
|---|---|---|---|---|---|
| ~10k tokens (fresh) | $(rate small-tokenize) | $(rate small-detokenize) | $(rate small-batch) | ${startup_empty} s | |
| $tokens tokens ($db) | $(rate big-tokenize) ($(pct "$(rate big-tokenize)" "$(rate small-tokenize)")) | $(rate big-detokenize) ($(pct "$(rate big-detokenize)" "$(rate small-detokenize)")) | $(rate big-batch) ($(pct "$(rate big-batch)" "$(rate small-batch)")) | ${startup_big} s | ${rss_fill} MB after the fill, ${rss_restart} MB after restart, ${rss_runs} MB after the runs |

fill: $(rate fill) PANs/s. Reports: $OUT
EOT
rm -rf "$OUT/vault"
