//! Ordered schema migrations tracked by `PRAGMA user_version`, each applied in an exclusive
//! transaction. A database from a newer tokenvault is refused rather than guessed at.

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value ANY NOT NULL
    ) STRICT;

    CREATE TABLE data_keys (
        version     INTEGER PRIMARY KEY,
        wrapped     BLOB NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('active', 'decrypt_only', 'retired')),
        created_at  INTEGER NOT NULL,
        encryptions INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE UNIQUE INDEX data_keys_one_active ON data_keys(state) WHERE state = 'active';

    -- Integer rowid as the table key gives inserts locality; the random token lives in a
    -- unique index. PCI DSS allows the first six and last four beside the ciphertext.
    CREATE TABLE tokens (
        id          INTEGER PRIMARY KEY,
        token       TEXT NOT NULL UNIQUE,
        key_version INTEGER NOT NULL,
        nonce       BLOB,
        ciphertext  BLOB,
        fingerprint BLOB,
        format      INTEGER NOT NULL,
        brand       INTEGER NOT NULL,
        pan_length  INTEGER NOT NULL,
        bin         TEXT NOT NULL,
        last4       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        deleted_at  INTEGER
    ) STRICT;
    CREATE INDEX tokens_fingerprint ON tokens(fingerprint, format) WHERE fingerprint IS NOT NULL;
    CREATE INDEX tokens_key_version ON tokens(key_version);

    CREATE TABLE clients (
        name          TEXT PRIMARY KEY,
        key_id        TEXT NOT NULL UNIQUE,
        key_hash      BLOB NOT NULL,
        roles         TEXT NOT NULL,
        cert_identity TEXT UNIQUE,
        created_at    INTEGER NOT NULL,
        revoked_at    INTEGER
    ) STRICT;

    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        principal TEXT NOT NULL,
        peer      TEXT NOT NULL,
        action    TEXT NOT NULL,
        subject   TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        reason    TEXT NOT NULL,
        mac       BLOB NOT NULL
    ) STRICT;
    "#,
    // 2: per-client detokenize rate limit (reveals per second; NULL = the server default).
    r#"
    ALTER TABLE clients ADD COLUMN detokenize_rate REAL;
    "#,
    // 3 (issue 12): the public SHA-256 chain over audit records (filled in for existing
    // records at open, from public data only: see `sqlite::prepare_audit`) and the Ed25519
    // keys that sign checkpoints of it. A retired key keeps its public half for verifiers;
    // its wrapped private seed is destroyed.
    r#"
    ALTER TABLE audit ADD COLUMN hash BLOB;
    CREATE TABLE audit_signing_keys (
        id          INTEGER PRIMARY KEY,
        public_key  BLOB NOT NULL,
        wrapped     BLOB,
        state       TEXT NOT NULL CHECK (state IN ('active', 'retired')),
        created_at  INTEGER NOT NULL,
        retired_at  INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX audit_signing_keys_one_active ON audit_signing_keys(state)
        WHERE state = 'active';
    "#,
    // 4 (issue 11): row format of each sealed PAN (crypto::ROW_FORMAT_*). Rows written before it are
    // format 1 (AAD binds key version and token); new rows are written as 2 (AAD binds the
    // metadata columns too). `keys rewrap` upgrades format-1 rows.
    r#"
    ALTER TABLE tokens ADD COLUMN row_format INTEGER NOT NULL DEFAULT 1;
    "#,
    // 5 (issue 11): `reuse_existing` is scoped to the creating principal or its reuse group,
    // with a per-client lookup budget. Fingerprints are now keyed by scope; the unscoped ones
    // of earlier versions would let any client find any other's token, so they are dropped:
    // those tokens stay valid for detokenize, and the next `reuse_existing` call for such a
    // card issues a new token in the caller's scope.
    r#"
    ALTER TABLE clients ADD COLUMN reuse_rate REAL;
    ALTER TABLE clients ADD COLUMN reuse_group TEXT;
    UPDATE tokens SET fingerprint = NULL WHERE fingerprint IS NOT NULL;
    "#,
    // Dual control (issue 16): admin operations awaiting a second admin's approval.
    r#"
    CREATE TABLE admin_requests (
        id          TEXT PRIMARY KEY,
        operation   TEXT NOT NULL,
        params      TEXT NOT NULL,
        requester   TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        approver    TEXT,
        approved_at INTEGER
    ) STRICT;
    "#,
];

/// The schema version whose migration contains `marker` (for upgrade tests that rewind a
/// database to just before one migration, whatever was appended after it).
pub fn version_of(marker: &str) -> Option<i64> {
    MIGRATIONS
        .iter()
        .position(|m| m.contains(marker))
        .map(|i| i as i64 + 1)
}

/// The schema version this build writes.
pub const LATEST: i64 = MIGRATIONS.len() as i64;

pub fn user_version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(Error::from)
}

/// Refuses a database written by a newer tokenvault.
pub fn check_not_newer(conn: &Connection) -> Result<i64> {
    let v = user_version(conn)?;
    if v > LATEST {
        return Err(Error::FailedPrecondition(format!(
            "the vault's schema version {v} is newer than this tokenvault supports ({LATEST}); \
             upgrade tokenvault"
        )));
    }
    Ok(v)
}

/// Applies every pending migration, each in its own exclusive transaction.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        let current = check_not_newer(&tx)?;
        if current == LATEST {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[current as usize])?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
        tracing::info!(version = current + 1, "applied schema migration");
    }
}
