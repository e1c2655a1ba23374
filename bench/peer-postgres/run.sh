#!/usr/bin/env bash
# The peer of issue 6: what teams build without a vault. PostgreSQL 15 + pgcrypto on this
# machine, table vault(token text primary key, pan bytea), driven by
# `pgbench -c 64 -j 2 -M prepared` with durable commits (fsync=on, synchronous_commit=on).
#
#   tokenize   = INSERT ... VALUES (encode(gen_random_bytes(16),'hex'), encrypt(pan, key, 'aes'))
#                RETURNING token
#   detokenize = SELECT convert_from(decrypt(pan, key, 'aes'), 'UTF8') FROM vault WHERE token = ...
#                over 100,000 rows
#
# One command: installs PostgreSQL from the distribution's packages if missing (Debian/Ubuntu,
# needs root), runs a private throw-away cluster that listens on a Unix socket only (no TCP),
# prints tokenize/s and detokenize/s, then stops the cluster and deletes it.
#
# Environment: DURATION (seconds per run, default 30), CLIENTS (64), THREADS (2),
# ROWS (detokenize table size, 100000), PGPORT_BENCH (socket port number, 54329),
# KEEP=1 keeps the cluster directory, JSON=1 prints one JSON line at the end.
set -euo pipefail

DURATION=${DURATION:-30}
CLIENTS=${CLIENTS:-64}
THREADS=${THREADS:-2}
ROWS=${ROWS:-100000}
PORT=${PGPORT_BENCH:-54329}

log() { echo "peer-postgres: $*" >&2; }

pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

if ! BIN=$(pg_bin) || [ ! -e "$(dirname "$BIN")/lib/pgcrypto.so" ]; then
    log "installing PostgreSQL from the distribution's packages"
    if [ "$(id -u)" -ne 0 ]; then
        log "need root to apt-get install postgresql postgresql-contrib"; exit 1
    fi
    # Do not let the package start its default cluster: this script runs its own.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    [ "$created_policy" = 1 ] && rm -f "$policy"
    BIN=$(pg_bin)
fi
PGBENCH="$BIN/pgbench"; PSQL="$BIN/psql"
[ -x "$PSQL" ] || PSQL=$(command -v psql)
log "using $("$BIN/postgres" --version)"

# The cluster runs as an unprivileged user (PostgreSQL refuses root).
RUN_AS=()
OWNER=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
    RUN_AS=(runuser -u postgres --)
    OWNER=postgres
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/peer-postgres.XXXXXX")
chmod 755 "$WORK"
chown "$OWNER" "$WORK"
PGDATA="$WORK/data"
SOCK="$WORK"
cleanup() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        "${RUN_AS[@]}" "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT

"${RUN_AS[@]}" "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
# peer benchmark: Unix socket only, durable commits
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PORT
max_connections = $((CLIENTS + 20))
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 256MB
CONF
"${RUN_AS[@]}" "$BIN/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w start >/dev/null

PSQLC=("${RUN_AS[@]}" "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres)
# Random 256-bit key, as a vault-less team would keep in its application config.
KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

"${PSQLC[@]}" <<SQL
CREATE EXTENSION pgcrypto;
CREATE TABLE vault(token text PRIMARY KEY, pan bytea);
SQL
log "fsync=$("${PSQLC[@]}" -tAc 'SHOW fsync'), synchronous_commit=$("${PSQLC[@]}" -tAc 'SHOW synchronous_commit')"

# Detokenize table: ROWS tokens that pgbench can address by number. Their tokens are
# md5(i), the same shape (32 hex digits, uniformly spread) as gen_random_bytes(16) in hex.
"${PSQLC[@]}" <<SQL
INSERT INTO vault(token, pan)
SELECT md5(i::text), encrypt(convert_to((4000000000000000 + i * 7919)::text, 'UTF8'), decode('$KEY', 'hex'), 'aes')
FROM generate_series(1, $ROWS) AS i;
VACUUM ANALYZE vault;
CHECKPOINT;
SQL

cat >"$WORK/tokenize.sql" <<SQL
\set n random(4000000000000000, 4999999999999999)
INSERT INTO vault(token, pan) VALUES (encode(gen_random_bytes(16), 'hex'), encrypt(convert_to(:n::text, 'UTF8'), decode('$KEY', 'hex'), 'aes')) RETURNING token;
SQL
cat >"$WORK/detokenize.sql" <<SQL
\set i random(1, $ROWS)
SELECT convert_from(decrypt(pan, decode('$KEY', 'hex'), 'aes'), 'UTF8') FROM vault WHERE token = md5(:i::text);
SQL
chmod 644 "$WORK"/*.sql

run_pgbench() {
    local name=$1 script=$2
    log "$name: pgbench -c $CLIENTS -j $THREADS -M prepared -T $DURATION"
    local out
    out=$("${RUN_AS[@]}" "$PGBENCH" -n -h "$SOCK" -p "$PORT" -U postgres -c "$CLIENTS" -j "$THREADS" \
        -M prepared -T "$DURATION" -f "$script" postgres 2>&1)
    echo "$out" | grep -E "latency average|tps|failed" >&2 || true
    echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

TOK=$(run_pgbench tokenize "$WORK/tokenize.sql")
DETOK=$(run_pgbench detokenize "$WORK/detokenize.sql")
echo "peer tokenize:   ${TOK} ops/s"
echo "peer detokenize: ${DETOK} ops/s"
if [ "${JSON:-0}" = 1 ]; then
    printf '{"peer":"postgresql+pgcrypto","clients":%s,"threads":%s,"duration_s":%s,"tokenize_ops_per_s":%s,"detokenize_ops_per_s":%s}\n' \
        "$CLIENTS" "$THREADS" "$DURATION" "$TOK" "$DETOK"
fi
