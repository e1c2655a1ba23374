//! Copies a whole vault between the two stores, row for row and ciphertext as is (nothing
//! is decrypted): `tokenvault store migrate` (SQLite ⇄ PostgreSQL) and `backup` of a
//! PostgreSQL store (into the portable snapshot format: a SQLite vault file, which
//! `restore` takes whatever store it came from).
//!
//! The source is read in ONE consistent snapshot (a SQLite read transaction, a PostgreSQL
//! REPEATABLE READ read-only transaction), the target is written in ONE transaction into an
//! empty store: it either holds the whole vault or nothing. The audit head is carried over
//! as the source recorded it (not recomputed from the records), so a truncated trail still
//! shows on the target. Tables and columns are checked against the list this module copies:
//! a schema with anything more is refused rather than copied in part.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::mpsc;

use super::postgres::connect::map_err;
use super::postgres::{schema, PgShared};
use super::{migrations, sqlite};
use crate::audit::{AuditRecord, GENESIS_MAC};
use crate::crypto::AUDIT_GENESIS_HASH;
use crate::error::{Error, Result};

/// Rows per chunk between reader and writer.
const CHUNK: usize = 1000;

/// Every table and column a vault has; anything else in a source is refused.
const TABLES: &[(&str, &[&str])] = &[
    ("meta", &["key", "value"]),
    (
        "data_keys",
        &["version", "wrapped", "state", "created_at", "encryptions"],
    ),
    (
        "tokens",
        &[
            "id",
            "token",
            "key_version",
            "nonce",
            "ciphertext",
            "fingerprint",
            "format",
            "brand",
            "pan_length",
            "bin",
            "last4",
            "created_at",
            "expires_at",
            "deleted_at",
            "row_format",
        ],
    ),
    (
        "clients",
        &[
            "name",
            "key_id",
            "key_hash",
            "roles",
            "cert_identity",
            "created_at",
            "revoked_at",
            "detokenize_rate",
            "reuse_rate",
            "reuse_group",
        ],
    ),
    (
        "audit",
        &[
            "seq",
            "at",
            "principal",
            "peer",
            "action",
            "subject",
            "outcome",
            "reason",
            "mac",
            "hash",
        ],
    ),
    (
        "audit_signing_keys",
        &[
            "id",
            "public_key",
            "wrapped",
            "state",
            "created_at",
            "retired_at",
        ],
    ),
];
/// Tables only one store has, of its own bookkeeping.
const PG_ONLY: &[&str] = &["counters", "audit_head", "schema_version"];
/// Tables left behind: pending dual-control requests (issue 16) live at most their approval
/// window and name principals of the source's admin sessions; they are requested again on
/// the target (README "Moving a vault there").
const NOT_COPIED: &[&str] = &["admin_requests"];

/// One end of a copy.
#[derive(Clone)]
pub enum Endpoint {
    /// A SQLite vault database file.
    Sqlite(PathBuf),
    Postgres(Arc<PgShared>),
}

/// What was copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyCounts {
    pub tokens: u64,
    pub audit: u64,
    pub keys: u64,
    pub clients: u64,
    pub signing_keys: u64,
}

#[derive(Clone, Debug)]
struct Key {
    version: i64,
    wrapped: Vec<u8>,
    state: String,
    created_at: i64,
    encryptions: i64,
}

#[derive(Clone, Debug)]
struct Client {
    name: String,
    key_id: String,
    key_hash: Vec<u8>,
    roles: String,
    cert_identity: Option<String>,
    created_at: i64,
    revoked_at: Option<i64>,
    detokenize_rate: Option<f64>,
    reuse_rate: Option<f64>,
    reuse_group: Option<String>,
}

#[derive(Clone, Debug)]
struct Signing {
    id: i64,
    public_key: Vec<u8>,
    wrapped: Option<Vec<u8>>,
    state: String,
    created_at: i64,
    retired_at: Option<i64>,
}

#[derive(Clone, Debug)]
struct Tok {
    id: i64,
    token: String,
    key_version: i64,
    nonce: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
    fingerprint: Option<Vec<u8>>,
    format: i64,
    brand: i64,
    pan_length: i64,
    bin: String,
    last4: String,
    created_at: i64,
    expires_at: Option<i64>,
    deleted_at: Option<i64>,
    row_format: i64,
}

/// The small tables, read first.
#[derive(Clone, Debug, Default)]
struct Head {
    /// vault_id, key_check, wrapped_fingerprint_key, wrapped_audit_key, and the
    /// [`super::REKEY_META_KEYS`] present.
    blobs: Vec<(String, Vec<u8>)>,
    generation: i64,
    created_at: i64,
    dev_vault: bool,
    /// The recorded audit head (seq, mac); None before the first record.
    audit_head: Option<(i64, Vec<u8>)>,
    keys: Vec<Key>,
    clients: Vec<Client>,
    signing: Vec<Signing>,
}

enum Chunk {
    Head(Box<Head>),
    Tokens(Vec<Tok>),
    Audit(Vec<AuditRecord>),
}

const HEADER_KEYS: [&str; 4] = [
    "vault_id",
    "key_check",
    "wrapped_fingerprint_key",
    "wrapped_audit_key",
];

/// Copies the vault at `from` into the empty store `to`. Blocks: call it from a blocking
/// thread. `progress` hears the number of tokens written so far.
pub fn copy(
    from: &Endpoint,
    to: &Endpoint,
    progress: impl FnMut(u64) + Send,
) -> Result<CopyCounts> {
    let (tx, rx) = mpsc::channel::<Result<Chunk>>(4);
    std::thread::scope(|scope| {
        let reader = match from {
            Endpoint::Sqlite(path) => {
                let path = path.clone();
                scope.spawn(move || {
                    if let Err(e) = read_sqlite(&path, &tx) {
                        let _ = tx.blocking_send(Err(e));
                    }
                })
            }
            Endpoint::Postgres(shared) => {
                let shared = shared.clone();
                scope.spawn(move || {
                    let sender = tx.clone();
                    let pool = shared.pool().clone();
                    let r = shared.block(async move { read_postgres(pool, sender).await });
                    if let Err(e) = r {
                        let _ = tx.blocking_send(Err(e));
                    }
                })
            }
        };
        let r = match to {
            Endpoint::Sqlite(path) => write_sqlite(path, rx, progress),
            Endpoint::Postgres(shared) => write_postgres(shared, rx, progress),
        };
        let _ = reader.join();
        r
    })
}

// ---------------------------------------------------------------------------------------
// SQLite

fn check_sqlite_schema(conn: &Connection) -> Result<()> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for t in &tables {
        if NOT_COPIED.contains(&t.as_str()) {
            continue;
        }
        let Some((_, cols)) = TABLES.iter().find(|(n, _)| n == t) else {
            return Err(Error::FailedPrecondition(format!(
                "the source has a table `{t}` this tokenvault cannot copy; refusing to copy part of the vault"
            )));
        };
        let have: BTreeSet<String> = conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{t}')"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let known: BTreeSet<String> = cols.iter().map(|c| c.to_string()).collect();
        if have != known {
            return Err(Error::FailedPrecondition(format!(
                "the source's table `{t}` has columns this tokenvault cannot copy; refusing"
            )));
        }
    }
    Ok(())
}

fn read_sqlite(path: &Path, tx: &mpsc::Sender<Result<Chunk>>) -> Result<()> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(sqlite::BUSY_TIMEOUT)?;
    sqlite::enable_secure_delete(&conn)?;
    // One read transaction: every chunk comes from the same snapshot.
    conn.execute_batch("BEGIN")?;
    if migrations::user_version(&conn)? != migrations::LATEST {
        return Err(Error::FailedPrecondition(
            "the source vault's schema is not this tokenvault's: open it once with this \
             version (for example `tokenvault check`) first"
                .into(),
        ));
    }
    check_sqlite_schema(&conn)?;
    let mut head = Head::default();
    for k in HEADER_KEYS {
        let v: Vec<u8> =
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))?;
        head.blobs.push((k.to_string(), v));
    }
    // What `keys rotate-master --rekey` added, when it ran.
    for k in super::REKEY_META_KEYS {
        use rusqlite::OptionalExtension;
        let v: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
            .optional()?;
        if let Some(v) = v {
            head.blobs.push((k.to_string(), v));
        }
    }
    let int = |k: &str| -> Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
            .optional()?)
    };
    head.generation = int("generation")?.unwrap_or(1);
    head.created_at = int("created_at")?.unwrap_or(0);
    head.dev_vault = int("dev_vault")? == Some(1);
    if let Some(seq) = int("audit_head_seq")? {
        let mac: Vec<u8> = conn.query_row(
            "SELECT value FROM meta WHERE key = 'audit_head_mac'",
            [],
            |r| r.get(0),
        )?;
        head.audit_head = Some((seq, mac));
    }
    head.keys = conn
        .prepare("SELECT version, wrapped, state, created_at, encryptions FROM data_keys ORDER BY version")?
        .query_map([], |r| {
            Ok(Key {
                version: r.get(0)?,
                wrapped: r.get(1)?,
                state: r.get(2)?,
                created_at: r.get(3)?,
                encryptions: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    head.clients = conn
        .prepare(
            "SELECT name, key_id, key_hash, roles, cert_identity, created_at, revoked_at, \
             detokenize_rate, reuse_rate, reuse_group FROM clients ORDER BY name",
        )?
        .query_map([], |r| {
            Ok(Client {
                name: r.get(0)?,
                key_id: r.get(1)?,
                key_hash: r.get(2)?,
                roles: r.get(3)?,
                cert_identity: r.get(4)?,
                created_at: r.get(5)?,
                revoked_at: r.get(6)?,
                detokenize_rate: r.get(7)?,
                reuse_rate: r.get(8)?,
                reuse_group: r.get(9)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    head.signing = conn
        .prepare(
            "SELECT id, public_key, wrapped, state, created_at, retired_at FROM audit_signing_keys ORDER BY id",
        )?
        .query_map([], |r| {
            Ok(Signing {
                id: r.get(0)?,
                public_key: r.get(1)?,
                wrapped: r.get(2)?,
                state: r.get(3)?,
                created_at: r.get(4)?,
                retired_at: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    if tx.blocking_send(Ok(Chunk::Head(Box::new(head)))).is_err() {
        return Ok(());
    }
    let mut after = i64::MIN;
    let mut stmt = conn.prepare(
        "SELECT id, token, key_version, nonce, ciphertext, fingerprint, format, brand, pan_length, \
         bin, last4, created_at, expires_at, deleted_at, row_format FROM tokens WHERE id > ?1 \
         ORDER BY id LIMIT ?2",
    )?;
    loop {
        let rows: Vec<Tok> = stmt
            .query_map(params![after, CHUNK as i64], |r| {
                Ok(Tok {
                    id: r.get(0)?,
                    token: r.get(1)?,
                    key_version: r.get(2)?,
                    nonce: r.get(3)?,
                    ciphertext: r.get(4)?,
                    fingerprint: r.get(5)?,
                    format: r.get(6)?,
                    brand: r.get(7)?,
                    pan_length: r.get(8)?,
                    bin: r.get(9)?,
                    last4: r.get(10)?,
                    created_at: r.get(11)?,
                    expires_at: r.get(12)?,
                    deleted_at: r.get(13)?,
                    row_format: r.get(14)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let full = rows.len() == CHUNK;
        if tx.blocking_send(Ok(Chunk::Tokens(rows))).is_err() {
            return Ok(());
        }
        if !full {
            break;
        }
    }
    let mut stmt = conn.prepare(
        "SELECT seq, at, principal, peer, action, subject, outcome, reason, mac, hash FROM audit \
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let mut after = 0i64;
    loop {
        let rows: Vec<AuditRecord> = stmt
            .query_map(params![after, CHUNK as i64], |r| {
                Ok(AuditRecord {
                    seq: r.get::<_, i64>(0)? as u64,
                    at: r.get(1)?,
                    principal: r.get(2)?,
                    peer: r.get(3)?,
                    action: r.get(4)?,
                    subject: r.get(5)?,
                    outcome: r.get(6)?,
                    reason: r.get(7)?,
                    mac: r.get(8)?,
                    hash: r.get::<_, Option<Vec<u8>>>(9)?.unwrap_or_default(),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last() else { break };
        after = last.seq as i64;
        let full = rows.len() == CHUNK;
        if tx.blocking_send(Ok(Chunk::Audit(rows))).is_err() {
            return Ok(());
        }
        if !full {
            break;
        }
    }
    conn.execute_batch("COMMIT")?;
    Ok(())
}

fn write_sqlite(
    path: &Path,
    mut rx: mpsc::Receiver<Result<Chunk>>,
    mut progress: impl FnMut(u64),
) -> Result<CopyCounts> {
    if path.exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already exists: the target must be empty",
            path.display()
        )));
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", path.display())))?;
    }
    let r = (|| -> Result<CopyCounts> {
        let mut conn = Connection::open(path)?;
        sqlite::set_pragmas(&conn, None)?;
        migrations::migrate(&mut conn)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        let mut counts = CopyCounts::default();
        while let Some(chunk) = rx.blocking_recv() {
            match chunk? {
                Chunk::Head(h) => {
                    for (k, v) in &h.blobs {
                        tx.execute(
                            "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                            params![k, v],
                        )?;
                    }
                    for (k, v) in [("generation", h.generation), ("created_at", h.created_at)] {
                        tx.execute(
                            "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                            params![k, v],
                        )?;
                    }
                    if h.dev_vault {
                        tx.execute("INSERT INTO meta(key, value) VALUES ('dev_vault', 1)", [])?;
                    }
                    if let Some((seq, mac)) = &h.audit_head {
                        tx.execute(
                            "INSERT INTO meta(key, value) VALUES ('audit_head_seq', ?1)",
                            [seq],
                        )?;
                        tx.execute(
                            "INSERT INTO meta(key, value) VALUES ('audit_head_mac', ?1)",
                            [mac],
                        )?;
                    }
                    for k in &h.keys {
                        tx.execute(
                            "INSERT INTO data_keys(version, wrapped, state, created_at, encryptions) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![k.version, k.wrapped, k.state, k.created_at, k.encryptions],
                        )?;
                    }
                    for c in &h.clients {
                        tx.execute(
                            "INSERT INTO clients(name, key_id, key_hash, roles, cert_identity, created_at, \
                             revoked_at, detokenize_rate, reuse_rate, reuse_group) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                            params![
                                c.name, c.key_id, c.key_hash, c.roles, c.cert_identity, c.created_at,
                                c.revoked_at, c.detokenize_rate, c.reuse_rate, c.reuse_group
                            ],
                        )?;
                    }
                    for s in &h.signing {
                        tx.execute(
                            "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, created_at, \
                             retired_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![s.id, s.public_key, s.wrapped, s.state, s.created_at, s.retired_at],
                        )?;
                    }
                    counts.keys = h.keys.len() as u64;
                    counts.clients = h.clients.len() as u64;
                    counts.signing_keys = h.signing.len() as u64;
                }
                Chunk::Tokens(rows) => {
                    let mut stmt = tx.prepare_cached(
                        "INSERT INTO tokens(id, token, key_version, nonce, ciphertext, fingerprint, format, \
                         brand, pan_length, bin, last4, created_at, expires_at, deleted_at, row_format) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    )?;
                    for t in &rows {
                        stmt.execute(params![
                            t.id,
                            t.token,
                            t.key_version,
                            t.nonce,
                            t.ciphertext,
                            t.fingerprint,
                            t.format,
                            t.brand,
                            t.pan_length,
                            t.bin,
                            t.last4,
                            t.created_at,
                            t.expires_at,
                            t.deleted_at,
                            t.row_format
                        ])?;
                    }
                    counts.tokens += rows.len() as u64;
                    progress(counts.tokens);
                }
                Chunk::Audit(rows) => {
                    let mut stmt = tx.prepare_cached(
                        "INSERT INTO audit(seq, at, principal, peer, action, subject, outcome, reason, mac, hash) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )?;
                    for a in &rows {
                        stmt.execute(params![
                            a.seq as i64,
                            a.at,
                            a.principal,
                            a.peer,
                            a.action,
                            a.subject,
                            a.outcome,
                            a.reason,
                            a.mac,
                            a.hash
                        ])?;
                    }
                    counts.audit += rows.len() as u64;
                }
            }
        }
        if counts.keys == 0 {
            return Err(Error::Internal("the source sent no vault".into()));
        }
        tx.commit()?;
        Ok(counts)
    })();
    if r.is_err() {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    r
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

async fn check_pg_schema(c: &impl tokio_postgres::GenericClient) -> Result<()> {
    let rows = c
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .map_err(map_err)?;
    let mut have: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for r in &rows {
        have.entry(r.get(0)).or_default().insert(r.get(1));
    }
    for (t, cols) in &have {
        if PG_ONLY.contains(&t.as_str()) || NOT_COPIED.contains(&t.as_str()) {
            continue;
        }
        let known = TABLES.iter().find(|(n, _)| n == t).map(|(_, c)| {
            c.iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<String>>()
        });
        if known.as_ref() != Some(cols) {
            return Err(Error::FailedPrecondition(format!(
                "the source's table `{t}` is not one this tokenvault can copy whole; refusing"
            )));
        }
    }
    Ok(())
}

async fn read_postgres(
    pool: deadpool_postgres::Pool,
    tx: mpsc::Sender<Result<Chunk>>,
) -> Result<()> {
    let mut client = pool
        .get()
        .await
        .map_err(super::postgres::connect::map_pool_err)?;
    let t = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(map_err)?;
    if schema::version(&*t).await? != schema::LATEST {
        return Err(Error::FailedPrecondition(
            "the source vault's schema is not this tokenvault's: open it once with this \
             version first"
                .into(),
        ));
    }
    check_pg_schema(&*t).await?;
    let mut head = Head::default();
    for k in HEADER_KEYS {
        let r = t
            .query_one("SELECT value FROM meta WHERE key = $1", &[&k])
            .await
            .map_err(map_err)?;
        head.blobs.push((k.to_string(), r.get(0)));
    }
    for k in super::REKEY_META_KEYS {
        let r = t
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&k])
            .await
            .map_err(map_err)?;
        if let Some(r) = r {
            head.blobs.push((k.to_string(), r.get(0)));
        }
    }
    let counter = |rows: &[tokio_postgres::Row], k: &str| -> Option<i64> {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == k)
            .map(|r| r.get(1))
    };
    let counters = t
        .query("SELECT key, value FROM counters", &[])
        .await
        .map_err(map_err)?;
    head.generation = counter(&counters, "generation").unwrap_or(1);
    head.created_at = counter(&counters, "created_at").unwrap_or(0);
    head.dev_vault = counter(&counters, "dev_vault") == Some(1);
    let h = t
        .query_one("SELECT seq, mac FROM audit_head WHERE id = 1", &[])
        .await
        .map_err(map_err)?;
    let seq: i64 = h.get(0);
    head.audit_head = (seq > 0).then(|| (seq, h.get(1)));
    head.keys = t
        .query(
            "SELECT version, wrapped, state, created_at, encryptions FROM data_keys ORDER BY version",
            &[],
        )
        .await
        .map_err(map_err)?
        .iter()
        .map(|r| Key {
            version: r.get(0),
            wrapped: r.get(1),
            state: r.get(2),
            created_at: r.get(3),
            encryptions: r.get(4),
        })
        .collect();
    head.clients = t
        .query(
            "SELECT name, key_id, key_hash, roles, cert_identity, created_at, revoked_at, \
             detokenize_rate, reuse_rate, reuse_group FROM clients ORDER BY name",
            &[],
        )
        .await
        .map_err(map_err)?
        .iter()
        .map(|r| Client {
            name: r.get(0),
            key_id: r.get(1),
            key_hash: r.get(2),
            roles: r.get(3),
            cert_identity: r.get(4),
            created_at: r.get(5),
            revoked_at: r.get(6),
            detokenize_rate: r.get(7),
            reuse_rate: r.get(8),
            reuse_group: r.get(9),
        })
        .collect();
    head.signing = t
        .query(
            "SELECT id, public_key, wrapped, state, created_at, retired_at FROM audit_signing_keys ORDER BY id",
            &[],
        )
        .await
        .map_err(map_err)?
        .iter()
        .map(|r| Signing {
            id: r.get(0),
            public_key: r.get(1),
            wrapped: r.get(2),
            state: r.get(3),
            created_at: r.get(4),
            retired_at: r.get(5),
        })
        .collect();
    if tx.send(Ok(Chunk::Head(Box::new(head)))).await.is_err() {
        return Ok(());
    }
    let mut after = i64::MIN;
    loop {
        let rows: Vec<Tok> = t
            .query(
                "SELECT id, token, key_version, nonce, ciphertext, fingerprint, format, brand, \
                 pan_length, bin, last4, created_at, expires_at, deleted_at, row_format FROM tokens \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &(CHUNK as i64)],
            )
            .await
            .map_err(map_err)?
            .iter()
            .map(|r| Tok {
                id: r.get(0),
                token: r.get(1),
                key_version: r.get(2),
                nonce: r.get(3),
                ciphertext: r.get(4),
                fingerprint: r.get(5),
                format: r.get(6),
                brand: r.get(7),
                pan_length: r.get(8),
                bin: r.get(9),
                last4: r.get(10),
                created_at: r.get(11),
                expires_at: r.get(12),
                deleted_at: r.get(13),
                row_format: r.get(14),
            })
            .collect();
        let Some(last) = rows.last() else { break };
        after = last.id;
        let full = rows.len() == CHUNK;
        if tx.send(Ok(Chunk::Tokens(rows))).await.is_err() {
            return Ok(());
        }
        if !full {
            break;
        }
    }
    let mut after = 0i64;
    loop {
        let rows: Vec<AuditRecord> = t
            .query(
                "SELECT seq, at, principal, peer, action, subject, outcome, reason, mac, hash \
                 FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &(CHUNK as i64)],
            )
            .await
            .map_err(map_err)?
            .iter()
            .map(|r| AuditRecord {
                seq: r.get::<_, i64>(0) as u64,
                at: r.get(1),
                principal: r.get(2),
                peer: r.get(3),
                action: r.get(4),
                subject: r.get(5),
                outcome: r.get(6),
                reason: r.get(7),
                mac: r.get(8),
                hash: r.get(9),
            })
            .collect();
        let Some(last) = rows.last() else { break };
        after = last.seq as i64;
        let full = rows.len() == CHUNK;
        if tx.send(Ok(Chunk::Audit(rows))).await.is_err() {
            return Ok(());
        }
        if !full {
            break;
        }
    }
    t.commit().await.map_err(map_err)?;
    Ok(())
}

fn write_postgres(
    shared: &Arc<PgShared>,
    mut rx: mpsc::Receiver<Result<Chunk>>,
    mut progress: impl FnMut(u64) + Send,
) -> Result<CopyCounts> {
    let pool = shared.pool().clone();
    // Progress is reported from this thread: the writer task sends its counts back.
    let (ptx, mut prx) = mpsc::unbounded_channel::<u64>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = shared.clone();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let r = handle.block(async move {
                let mut client = pool.get().await.map_err(super::postgres::connect::map_pool_err)?;
                let existing = schema::version(&**client).await?;
                if existing > 0
                    && client
                        .query_opt("SELECT 1 FROM meta LIMIT 1", &[])
                        .await
                        .map_err(map_err)?
                        .is_some()
                {
                    return Err(Error::AlreadyExists(
                        "the target database already holds a vault: the target must be empty"
                            .into(),
                    ));
                }
                if existing == 0
                    && client
                        .query_opt(
                            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema()",
                            &[],
                        )
                        .await
                        .map_err(map_err)?
                        .is_some()
                {
                    return Err(Error::AlreadyExists(
                        "the target schema is not empty (it has tables): use an empty database".into(),
                    ));
                }
                schema::migrate(&mut client).await?;
                let t = client.transaction().await.map_err(map_err)?;
                let mut counts = CopyCounts::default();
                let mut head_seq: Option<(i64, Vec<u8>)> = None;
                while let Some(chunk) = rx.recv().await {
                    match chunk? {
                        Chunk::Head(h) => {
                            for (k, v) in &h.blobs {
                                t.execute("INSERT INTO meta(key, value) VALUES ($1, $2)", &[k, v])
                                    .await
                                    .map_err(map_err)?;
                            }
                            for (k, v) in [
                                ("generation", h.generation),
                                ("created_at", h.created_at),
                                ("dev_vault", i64::from(h.dev_vault)),
                            ] {
                                t.execute("INSERT INTO counters(key, value) VALUES ($1, $2)", &[&k, &v])
                                    .await
                                    .map_err(map_err)?;
                            }
                            for k in &h.keys {
                                t.execute(
                                    "INSERT INTO data_keys(version, wrapped, state, created_at, encryptions) \
                                     VALUES ($1, $2, $3, $4, $5)",
                                    &[&k.version, &k.wrapped, &k.state, &k.created_at, &k.encryptions],
                                )
                                .await
                                .map_err(map_err)?;
                            }
                            for c in &h.clients {
                                t.execute(
                                    "INSERT INTO clients(name, key_id, key_hash, roles, cert_identity, \
                                     created_at, revoked_at, detokenize_rate, reuse_rate, reuse_group) \
                                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                                    &[
                                        &c.name, &c.key_id, &c.key_hash, &c.roles, &c.cert_identity,
                                        &c.created_at, &c.revoked_at, &c.detokenize_rate,
                                        &c.reuse_rate, &c.reuse_group,
                                    ],
                                )
                                .await
                                .map_err(map_err)?;
                            }
                            for s in &h.signing {
                                t.execute(
                                    "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, \
                                     created_at, retired_at) VALUES ($1, $2, $3, $4, $5, $6)",
                                    &[&s.id, &s.public_key, &s.wrapped, &s.state, &s.created_at, &s.retired_at],
                                )
                                .await
                                .map_err(map_err)?;
                            }
                            counts.keys = h.keys.len() as u64;
                            counts.clients = h.clients.len() as u64;
                            counts.signing_keys = h.signing.len() as u64;
                            head_seq = h.audit_head.clone();
                        }
                        Chunk::Tokens(rows) => {
                            let stmt = t
                                .prepare(
                                    "INSERT INTO tokens(id, token, key_version, nonce, ciphertext, fingerprint, \
                                     format, brand, pan_length, bin, last4, created_at, expires_at, deleted_at, \
                                     row_format) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                                     $9, $10, $11, $12, $13, $14, $15)",
                                )
                                .await
                                .map_err(map_err)?;
                            for r in &rows {
                                t.execute(
                                    &stmt,
                                    &[
                                        &r.id, &r.token, &r.key_version, &r.nonce, &r.ciphertext,
                                        &r.fingerprint, &r.format, &r.brand, &r.pan_length, &r.bin,
                                        &r.last4, &r.created_at, &r.expires_at, &r.deleted_at,
                                        &r.row_format,
                                    ],
                                )
                                .await
                                .map_err(map_err)?;
                            }
                            counts.tokens += rows.len() as u64;
                            let _ = ptx.send(counts.tokens);
                        }
                        Chunk::Audit(rows) => {
                            let stmt = t
                                .prepare(
                                    "INSERT INTO audit(seq, at, principal, peer, action, subject, outcome, \
                                     reason, mac, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                                )
                                .await
                                .map_err(map_err)?;
                            for a in &rows {
                                t.execute(
                                    &stmt,
                                    &[
                                        &(a.seq as i64), &a.at, &a.principal, &a.peer, &a.action,
                                        &a.subject, &a.outcome, &a.reason, &a.mac, &a.hash,
                                    ],
                                )
                                .await
                                .map_err(map_err)?;
                            }
                            counts.audit += rows.len() as u64;
                        }
                    }
                }
                if counts.keys == 0 {
                    return Err(Error::Internal("the source sent no vault".into()));
                }
                // The head as the source recorded it; its hash and time from that record.
                let (seq, mac, hash, at) = match head_seq {
                    Some((seq, mac)) => {
                        let r = t
                            .query_opt("SELECT hash, at FROM audit WHERE seq = $1", &[&seq])
                            .await
                            .map_err(map_err)?
                            .ok_or_else(|| {
                                Error::DataLoss(format!(
                                    "the source's recorded audit head {seq} has no record: the trail was truncated"
                                ))
                            })?;
                        (seq, mac, r.get::<_, Vec<u8>>(0), r.get::<_, i64>(1))
                    }
                    None => (0, GENESIS_MAC.to_vec(), AUDIT_GENESIS_HASH.to_vec(), i64::MIN),
                };
                t.execute(
                    "INSERT INTO audit_head(id, seq, mac, hash, at) VALUES (1, $1, $2, $3, $4)",
                    &[&seq, &mac, &hash, &at],
                )
                .await
                .map_err(map_err)?;
                t.execute(
                    "SELECT setval(pg_get_serial_sequence('tokens', 'id'), \
                     GREATEST((SELECT COALESCE(MAX(id), 0) FROM tokens), 1))",
                    &[],
                )
                .await
                .map_err(map_err)?;
                t.commit().await.map_err(map_err)?;
                Ok(counts)
            });
            let _ = done_tx.send(r);
        });
        while let Some(n) = prx.blocking_recv() {
            progress(n);
        }
        done_rx
            .recv()
            .map_err(|_| Error::Internal("the copy stopped".into()))?
    })
}
