#!/usr/bin/env bash
# Issue 15's goals in one sitting: tokenvault on PostgreSQL beside the PostgreSQL + pgcrypto
# peer (bench/peer-postgres: what a team builds without a vault), on the SAME throw-away
# database server (one cluster, loopback TCP for both), 64 requests in flight.
#
#   one replica tokenize     goal >= 1.0 x the peer's raw tokenize (group commit beats one
#                            commit per request)
#   one replica detokenize   goal >= 0.5 x the peer's raw detokenize (the vault also commits a
#                            durable audit record per reveal; the peer audits nothing)
#   two replicas             the same load split over two `serve` processes on one database
#
# Run on a quiet machine (no compiler, no other load), from the repository root, after
# `cargo build --release`, as root or a user who can run PostgreSQL's initdb (as root, the
# cluster runs as `postgres`). Environment: BIN (target/release/tokenvault), DURATION (10,
# seconds per run), ROUNDS (3, medians), CLIENTS (64), ROWS (peer detokenize table, 100000),
# PREFILL (vault detokenize tokens, 10000), PGPORT_BENCH (54339), KEEP=1 keeps the cluster.
# Prints one summary table at the end; every run's report stays in $OUT (printed).
#
# ONLY=tokenize|detokenize skips the peer and the table: one replica, one run of that
# operation, then its rate and latency, the writer's groups (size, time) from the replica's
# metrics, and a `top` snapshot taken mid-run; PERF=1 adds a system-wide
# `perf record -a -g` of 4 s mid-run, kept as $OUT/perf.data.
set -euo pipefail

BIN=$(realpath "${BIN:-target/release/tokenvault}")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-64}
ROWS=${ROWS:-100000}
PREFILL=${PREFILL:-10000}
PORT=${PGPORT_BENCH:-54339}
R1=127.0.0.1:50091
R2=127.0.0.1:50092
log() { echo "issue15: $*" >&2; }

pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/pgbench" ] && { echo "$d"; return 0; }
    done
    return 1
}
PGBIN=$(pg_bin) || { log "PostgreSQL (initdb, pgbench) is not installed: apt-get install postgresql postgresql-contrib"; exit 1; }
[ -e "$(dirname "$PGBIN")/lib/pgcrypto.so" ] || { log "pgcrypto is missing: apt-get install postgresql-contrib"; exit 1; }
command -v jq >/dev/null || { log "jq is needed"; exit 1; }

RUN_AS=()
OWNER=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
    RUN_AS=(runuser -u postgres --)
    OWNER=postgres
fi

OUT=$(mktemp -d "${TMPDIR:-/tmp}/tokenvault-issue15.XXXXXX")
chmod 755 "$OUT"
PGDATA="$OUT/pgdata"
mkdir -m 700 "$PGDATA"
chown "$OWNER" "$PGDATA"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -f "$PGDATA/postmaster.pid" ]; then
        "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$PGDATA"; else log "kept $PGDATA"; fi
}
trap cleanup EXIT

# One cluster for both contenders: durable commits, loopback TCP only.
"${RUN_AS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
port = $PORT
max_connections = $((CLIENTS * 2 + 60))
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 256MB
CONF
"${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w start >/dev/null
PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE peer" -c "CREATE DATABASE vault"
log "$("$PGBIN/postgres" --version); fsync=$("${PSQL[@]}" -d postgres -tAc 'SHOW fsync'), synchronous_commit=$("${PSQL[@]}" -d postgres -tAc 'SHOW synchronous_commit')"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# --- The peer: the statements of bench/peer-postgres/run.sh, over TCP to this cluster.
KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
"${PSQL[@]}" -d peer <<SQL
CREATE EXTENSION pgcrypto;
CREATE TABLE vault(token text PRIMARY KEY, pan bytea);
INSERT INTO vault(token, pan)
SELECT md5(i::text), encrypt(convert_to((4000000000000000 + i * 7919)::text, 'UTF8'), decode('$KEY', 'hex'), 'aes')
FROM generate_series(1, $ROWS) AS i;
VACUUM ANALYZE vault;
CHECKPOINT;
SQL
cat >"$OUT/tokenize.sql" <<SQL
\set n random(4000000000000000, 4999999999999999)
INSERT INTO vault(token, pan) VALUES (encode(gen_random_bytes(16), 'hex'), encrypt(convert_to(:n::text, 'UTF8'), decode('$KEY', 'hex'), 'aes')) RETURNING token;
SQL
cat >"$OUT/detokenize.sql" <<SQL
\set i random(1, $ROWS)
SELECT convert_from(decrypt(pan, decode('$KEY', 'hex'), 'aes'), 'UTF8') FROM vault WHERE token = md5(:i::text);
SQL
peer() { # name script -> ops/s
    local out
    out=$("$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -M prepared \
        -T "$DURATION" -f "$OUT/$2" peer 2>&1)
    echo "$out" >"$OUT/$1.pgbench"
    echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

# --- The vault: init on the same server, two clients, then replicas.
URL="postgres://postgres@127.0.0.1:$PORT/vault?sslmode=disable"
VARGS=(--store-url "$URL" --master-key-file "$OUT/master.key" --data-dir "$OUT/unused")
"$BIN" --log-level warn init --store-url "$URL" --generate-master-key "$OUT/master.key" >/dev/null
# Limits high enough not to be what is measured.
TOKENVAULT_TOKENIZE_KEY=$("$BIN" --log-level warn clients add checkout --roles tokenize --reuse-rate 1000000/s "${VARGS[@]}")
TOKENVAULT_DETOKENIZE_KEY=$("$BIN" --log-level warn clients add payments --roles detokenize --detokenize-rate 10000000/s "${VARGS[@]}")
export TOKENVAULT_TOKENIZE_KEY TOKENVAULT_DETOKENIZE_KEY

wait_serving() { # addr
    local i
    for ((i = 0; i < 600; i++)); do
        if "$BIN" health --addr "http://$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    log "no SERVING from $1 within 30 s"; return 1
}
start_replica() { # addr [extra serve args]
    local addr=$1; shift
    "$BIN" --log-level warn serve --listen "$addr" "$@" --detokenize-rate 10000000/s "${VARGS[@]}" \
        >>"$OUT/serve.out" 2>>"$OUT/serve-$addr.log" &
    pids+=($!)
    wait_serving "$addr"
}
bench() { # name addr concurrency op extra...
    local name=$1 addr=$2 c=$3 op=$4; shift 4
    "$BIN" bench --addr "http://$addr" -d "${DURATION}s" --warmup 2s --json -q -c "$c" --op "$op" "$@" \
        >"$OUT/$name.json"
}
rate() { jq -r '.pans_per_s' "$OUT/$1.json"; }
# Two replicas: half the load on each at once, distinct card-number seeds; the sum.
bench2() { # name op extra...
    local name=$1 op=$2; shift 2
    bench "$name-a" "$R1" $((CLIENTS / 2)) "$op" --seed 11 "$@" &
    local a=$!
    bench "$name-b" "$R2" $((CLIENTS - CLIENTS / 2)) "$op" --seed 12 "$@" &
    local b=$!
    wait "$a" "$b"
    awk -v a="$(rate "$name-a")" -v b="$(rate "$name-b")" 'BEGIN {printf "%.1f\n", a + b}' >"$OUT/$name.sum"
}

if [ -n "${ONLY:-}" ]; then
    METRICS=127.0.0.1:50099
    start_replica "$R1" --metrics-listen "$METRICS"
    extra=()
    [ "$ONLY" = detokenize ] && extra=(--prefill "$PREFILL")
    (
        sleep $((DURATION / 2 + 2))
        top -b -n 1 -w 200 | head -16 >"$OUT/top.txt"
        if [ "${PERF:-0}" = 1 ]; then
            perf record -a -g -o "$OUT/perf.data" -- sleep 4 >/dev/null 2>&1
        fi
    ) &
    snap=$!
    bench "only-$ONLY" "$R1" "$CLIENTS" "$ONLY" "${extra[@]}"
    wait "$snap"
    curl -s "http://$METRICS/metrics" >"$OUT/metrics.txt"
    jq -r '"\(.op): \(.pans_per_s) /s, p50 \(.latency.p50_us) us, p99 \(.latency.p99_us) us"' "$OUT/only-$ONLY.json"
    awk '/^tokenvault_store_group_commit_items_sum/ {i=$2} /^tokenvault_store_group_commit_items_count/ {n=$2}
         /^tokenvault_store_commit_duration_seconds_sum/ {t=$2}
         END {printf "writer (whole run, prefill included): %d groups, %.1f items/group, %.2f ms/group, busy %.1f s\n", n, i/n, 1000*t/n, t}' "$OUT/metrics.txt"
    cat "$OUT/top.txt"
    echo "Reports: $OUT"
    exit 0
fi

start_replica "$R1"
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS: peer, then one replica"
    peer "peer-tokenize-$r" tokenize.sql >"$OUT/peer-tokenize-$r.rate"
    peer "peer-detokenize-$r" detokenize.sql >"$OUT/peer-detokenize-$r.rate"
    bench "one-tokenize-$r" "$R1" "$CLIENTS" tokenize
    bench "one-detokenize-$r" "$R1" "$CLIENTS" detokenize --prefill "$PREFILL"
done
start_replica "$R2"
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS: two replicas"
    bench2 "two-tokenize-$r" tokenize
    bench2 "two-detokenize-$r" detokenize --prefill $((PREFILL / 2))
done

med_file() { for ((r = 1; r <= ROUNDS; r++)); do cat "$OUT/$1-$r.$2"; done | median; }
med_json() { for ((r = 1; r <= ROUNDS; r++)); do rate "$1-$r"; done | median; }
PEER_T=$(med_file peer-tokenize rate)
PEER_D=$(med_file peer-detokenize rate)
ONE_T=$(med_json one-tokenize)
ONE_D=$(med_json one-detokenize)
TWO_T=$(med_file two-tokenize sum)
TWO_D=$(med_file two-detokenize sum)
# The chain must still verify after all of it.
VERIFY=$("$BIN" --log-level warn audit verify "${VARGS[@]}" 2>&1 | tail -1 || true)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
cat <<EOF

| $CLIENTS in flight, median of $ROUNDS x ${DURATION} s | ops/s | vs peer | goal |
|---|---|---|---|
| peer (PostgreSQL + pgcrypto, pgbench -M prepared) tokenize | $PEER_T | 1.00 | |
| peer detokenize | $PEER_D | 1.00 | |
| tokenvault, one replica, tokenize | $ONE_T | $(ratio "$ONE_T" "$PEER_T") | >= 1.0 |
| tokenvault, one replica, detokenize (durable audit) | $ONE_D | $(ratio "$ONE_D" "$PEER_D") | >= 0.5 |
| tokenvault, two replicas, tokenize (load split) | $TWO_T | $(ratio "$TWO_T" "$PEER_T") ($(ratio "$TWO_T" "$ONE_T") x one) | |
| tokenvault, two replicas, detokenize (load split) | $TWO_D | $(ratio "$TWO_D" "$PEER_D") ($(ratio "$TWO_D" "$ONE_D") x one) | |

Same cluster for all rows: $("$PGBIN/postgres" --version), fsync=on, synchronous_commit=on, loopback TCP.
audit verify afterwards: $VERIFY
Reports: $OUT
EOF
