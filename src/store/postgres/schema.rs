//! The PostgreSQL schema, in ordered migrations tracked by the `schema_version` table (the
//! twin of SQLite's `PRAGMA user_version`). Every replica runs pending migrations at open
//! under a transaction-level advisory lock, so two replicas starting together apply each
//! migration once. A database from a newer tokenvault is refused rather than guessed at.
//!
//! Append only: never edit a migration that has shipped. A migration appended to the
//! SQLite list (`store::migrations`) that changes what the store keeps needs its twin here.

use deadpool_postgres::Client;
use tokio_postgres::GenericClient;

use super::connect::map_err;
use crate::error::{Error, Result};

/// Advisory lock key of schema migrations ("tvschema").
const MIGRATE_LOCK: i64 = 0x7476_7363_6865_6d61;

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema, equal in content to SQLite's migrations 1-5.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE counters (
        key   TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );
    -- The audit chain's head, one row: every writing transaction locks it first (FOR
    -- UPDATE), so the chain is extended by one transaction at a time across all replicas.
    CREATE TABLE audit_head (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        seq  BIGINT NOT NULL,
        mac  BYTEA NOT NULL,
        hash BYTEA NOT NULL,
        at   BIGINT NOT NULL
    );
    CREATE TABLE data_keys (
        version     BIGINT PRIMARY KEY,
        wrapped     BYTEA NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('active', 'decrypt_only', 'retired')),
        created_at  BIGINT NOT NULL,
        encryptions BIGINT NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX data_keys_one_active ON data_keys(state) WHERE state = 'active';
    CREATE TABLE tokens (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        token       TEXT NOT NULL UNIQUE,
        key_version BIGINT NOT NULL,
        nonce       BYTEA,
        ciphertext  BYTEA,
        fingerprint BYTEA,
        format      BIGINT NOT NULL,
        brand       BIGINT NOT NULL,
        pan_length  BIGINT NOT NULL,
        bin         TEXT NOT NULL,
        last4       TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT,
        deleted_at  BIGINT,
        row_format  BIGINT NOT NULL DEFAULT 1
    );
    CREATE INDEX tokens_fingerprint ON tokens(fingerprint, format) WHERE fingerprint IS NOT NULL;
    CREATE INDEX tokens_key_version ON tokens(key_version);
    CREATE TABLE clients (
        name            TEXT PRIMARY KEY,
        key_id          TEXT NOT NULL UNIQUE,
        key_hash        BYTEA NOT NULL,
        roles           TEXT NOT NULL,
        cert_identity   TEXT UNIQUE,
        created_at      BIGINT NOT NULL,
        revoked_at      BIGINT,
        detokenize_rate DOUBLE PRECISION,
        reuse_rate      DOUBLE PRECISION,
        reuse_group     TEXT
    );
    CREATE TABLE audit (
        seq       BIGINT PRIMARY KEY,
        at        BIGINT NOT NULL,
        principal TEXT NOT NULL,
        peer      TEXT NOT NULL,
        action    TEXT NOT NULL,
        subject   TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        reason    TEXT NOT NULL,
        mac       BYTEA NOT NULL,
        hash      BYTEA NOT NULL
    );
    CREATE TABLE audit_signing_keys (
        id          BIGINT PRIMARY KEY,
        public_key  BYTEA NOT NULL,
        wrapped     BYTEA,
        state       TEXT NOT NULL CHECK (state IN ('active', 'retired')),
        created_at  BIGINT NOT NULL,
        retired_at  BIGINT
    );
    CREATE UNIQUE INDEX audit_signing_keys_one_active ON audit_signing_keys(state)
        WHERE state = 'active';
    "#,
    // Dual control (issue 16), SQLite's migration 6: admin operations awaiting a second
    // admin's approval.
    r#"
    CREATE TABLE admin_requests (
        id          TEXT PRIMARY KEY,
        operation   TEXT NOT NULL,
        params      TEXT NOT NULL,
        requester   TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL,
        approver    TEXT,
        approved_at BIGINT
    );
    "#,
];

/// The schema version this build writes.
pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// The schema version of the database; 0 when the vault's tables do not exist.
pub async fn version(client: &impl GenericClient) -> Result<i64> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await
        .map_err(map_err)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .map_err(map_err)?;
    Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0))
}

pub fn check_not_newer(v: i64) -> Result<i64> {
    if v > LATEST {
        return Err(Error::FailedPrecondition(format!(
            "the vault's PostgreSQL schema version {v} is newer than this tokenvault supports \
             ({LATEST}); upgrade tokenvault"
        )));
    }
    Ok(v)
}

/// Applies every pending migration, each in its own transaction under the migration lock.
/// Needs CREATE on the schema only when a migration is pending: a `serve` role with
/// SELECT/INSERT/UPDATE/DELETE alone opens an up-to-date vault.
pub async fn migrate(client: &mut Client) -> Result<()> {
    loop {
        if check_not_newer(version(&***client).await?)? == LATEST {
            return Ok(());
        }
        let tx = client.transaction().await.map_err(map_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(map_err)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL); \
             INSERT INTO schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version)",
        )
        .await
        .map_err(map_err)?;
        let current: i64 = tx
            .query_one("SELECT version FROM schema_version", &[])
            .await
            .map_err(map_err)?
            .get(0);
        if check_not_newer(current)? < LATEST {
            tx.batch_execute(MIGRATIONS[current as usize])
                .await
                .map_err(map_err)?;
            tx.execute("UPDATE schema_version SET version = $1", &[&(current + 1)])
                .await
                .map_err(map_err)?;
            tracing::info!(version = current + 1, "applied PostgreSQL schema migration");
        }
        tx.commit().await.map_err(map_err)?;
    }
}
