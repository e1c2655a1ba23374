//! The shared PostgreSQL store: any number of stateless `tokenvault serve` replicas on one
//! database.
//!
//! Each replica folds its queued serving writes into one transaction (group commit) on a
//! pooled connection and answers callers only after `COMMIT` returned; the vault never
//! weakens `synchronous_commit` (and refuses a session where it is `off`). A group costs the
//! same number of round trips whatever its size: the head lock and the active key pipelined,
//! one reuse lookup, one multi-row token insert (`unnest` arrays; again only for the rare
//! colliding token), then the key counts, the chained audit rows and the head pipelined, and
//! `COMMIT`. Concurrent lookups share one `token = ANY($1)` statement (`run_lookups`), and
//! every pooled session plans generically (`connect.rs`). A group reads as its requests one
//! by one in order: an item whose reusable row a delete earlier in the same group removed is
//! looked up again (never answered with the token that commit deletes).
//!
//! One audit trail for the whole vault, ordered by the database: every writing transaction,
//! serving group or admin operation, of every replica, first locks the one `audit_head`
//! row (`SELECT … FOR UPDATE`). Chain extension, the active key's encryption counts and
//! rotation decisions are thereby serialised by the database: no gaps, no forks, automatic
//! rotation exactly once, exact per-version counts. The lock is held for one group's
//! transaction only, so replicas interleave groups.
//!
//! Changes to keys and clients bump the `generation` counter, which every replica's vault
//! polls (every 250 ms) to reload them. All database I/O runs on a small runtime owned by
//! the store, so the store works the same from async servers and from the blocking CLI.

pub mod connect;
pub mod schema;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;

pub use connect::PgUrl;
use connect::{map_err, map_pool_err};

use super::lifecycle::{
    PurgeBatch, PurgeOutcome, RewrapBatch, RewrapOutcome, SealedRow, ADMIN_TX_BUDGET,
};
use super::sqlite::{duplicate, roles_from_text, roles_to_text, MAX_TOKEN_DRAWS, STALE_MASTER};
use super::{
    AdminRequestRow, AuditSigningKeyInfo, AuditVisitor, CheckpointPause, CheckpointSource,
    ClientRow, NewToken, OpenParams, RevealDecision, Storage, StoreFuture, StoredToken, TokenMeta,
    TokenRow, VaultHeader,
};
use crate::audit::{self, canonical_bytes, AuditEntry, AuditRecord, GENESIS_MAC};
use crate::card::Brand;
use crate::crypto::AUDIT_GENESIS_HASH;
use crate::crypto::{audit_chain_hash, AuditPublicKey, KeyPurpose, KeyWrappingKey};
use crate::error::{outcome_of, Error, Result};
use crate::keyring::{KeyRow, Keyring};
use crate::model::{now_micros, Caller, ClientInfo, KeyState, KeyVersionInfo, Micros};
use crate::token::{self, TokenFormat};

/// Rows read per step inside an admin transaction.
const ADMIN_CHUNK: i64 = 256;
/// Audit records read per step of a walk.
const WALK_CHUNK: i64 = 10_000;
/// How often an idle replica proves the database answers (health), and measures the vault's
/// size against `limits.max_storage_bytes`.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest a serving group or lookup waits for the database. A server that stops
/// answering without closing its connections (a hung host, a silent partition) would
/// otherwise hold callers until TCP gives up, which can be many minutes. Past this the
/// callers get UNAVAILABLE. A group cut off after its `COMMIT` was sent may still commit; its
/// callers were not told it did, which is what UNAVAILABLE means. Far above a healthy group
/// (milliseconds) or an admin transaction holding the head lock (`ADMIN_TX_BUDGET`).
const SERVING_WAIT: Duration = Duration::from_secs(10);
/// Share of the storage limit that tokenize may use; the rest is kept for audit records
/// (reveals stay possible). The same share as SQLite's.
const TOKENIZE_SHARE: f64 = 0.9;
/// The vault's size: every table of its schema with its indexes and TOAST, as on disk.
const SQL_VAULT_BYTES: &str = "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname = current_schema()";

/// What a caller hears when the database did not answer within [`SERVING_WAIT`].
fn no_answer() -> Error {
    Error::Unavailable(format!(
        "the database did not answer within {} s",
        SERVING_WAIT.as_secs()
    ))
}

/// Measures the vault's tables against the tokenize share of the limit; sets `full`.
async fn measure_storage(pool: &Pool, limit: u64, full: &AtomicBool) -> Result<()> {
    let client = PgShared::client(pool).await?;
    let bytes: i64 = client
        .query_one(SQL_VAULT_BYTES, &[])
        .await
        .map_err(map_err)?
        .get(0);
    full.store(
        bytes.max(0) as u64 >= (limit as f64 * TOKENIZE_SHARE) as u64,
        Ordering::Relaxed,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The connection and the runtime it lives on

/// The pool and the runtime its connections run on, shared by a [`StoreLocation`] and the
/// store it opens.
///
/// [`StoreLocation`]: super::StoreLocation
pub struct PgShared {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    url: PgUrl,
}

impl Drop for PgShared {
    fn drop(&mut self) {
        // Never block here: the last handle may be dropped on an async worker.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl PgShared {
    pub fn new(url: &PgUrl, pool_size: usize) -> Result<Arc<PgShared>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tokenvault-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("database runtime: {e}")))?;
        let pool = {
            let _guard = rt.enter();
            url.pool(pool_size)?
        };
        Ok(Arc::new(PgShared {
            rt: Some(rt),
            pool,
            url: url.clone(),
        }))
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("runtime lives as long as PgShared")
            .handle()
    }

    /// Runs `fut` on the store's runtime; usable from any runtime or none.
    pub fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> StoreFuture<T> {
        let task = self.handle().spawn(fut);
        Box::pin(async move {
            task.await
                .map_err(|e| Error::Internal(format!("database task: {e}")))?
        })
    }

    /// Runs `fut` on the store's runtime and waits for it, blocking this thread (open-time
    /// reads of a blocking caller; never called from the store's own runtime).
    pub fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Unavailable("the database runtime stopped".into()))?
    }

    async fn client(pool: &Pool) -> Result<deadpool_postgres::Object> {
        pool.get().await.map_err(map_pool_err)
    }
}

// ---------------------------------------------------------------------------------------
// Open-time operations (the StoreLocation's)

/// The vault's identity; FailedPrecondition when the database holds no vault.
pub fn read_header(shared: &Arc<PgShared>) -> Result<VaultHeader> {
    let pool = shared.pool.clone();
    let shown = shared.url.to_string();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        let version = schema::check_not_newer(schema::version(&**client).await?)?;
        if version < 1 {
            return Err(Error::FailedPrecondition(format!(
                "no vault at {shown} (run `tokenvault init --store-url …` first)"
            )));
        }
        let rows = client
            .query("SELECT key, value FROM meta", &[])
            .await
            .map_err(map_err)?;
        let mut meta: HashMap<String, Vec<u8>> = rows
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
            .collect();
        let mut get = |key: &str| -> Result<Vec<u8>> {
            meta.remove(key).ok_or_else(|| {
                Error::FailedPrecondition(format!("vault metadata `{key}` is missing"))
            })
        };
        Ok(VaultHeader {
            vault_id: get("vault_id")?,
            key_check: get("key_check")?,
            wrapped_fingerprint_key: get("wrapped_fingerprint_key")?,
            wrapped_audit_key: get("wrapped_audit_key")?,
            layers: crate::store::KeyLayers::from_meta(|key| Ok(meta.remove(key)))?,
        })
    })
}

async fn meta_opt(c: &impl tokio_postgres::GenericClient, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(map_err)?
            .map(|r| r.get(0)),
    )
}

async fn meta_set(c: &impl tokio_postgres::GenericClient, key: &str, value: &[u8]) -> Result<()> {
    c.execute(
        "INSERT INTO meta(key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&key, &value],
    )
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn rekey_state(c: &impl tokio_postgres::GenericClient) -> Result<Option<super::RekeyState>> {
    match meta_opt(c, "rekey").await? {
        None => Ok(None),
        Some(v) => super::RekeyState::decode(&v)
            .map(Some)
            .ok_or_else(|| Error::DataLoss("vault metadata `rekey` is malformed".into())),
    }
}

/// Re-wraps the kept data keys, the audit signing keys, and what earlier rekeys added
/// (fingerprint layers, replaced audit keys) under `new_kwk`. Returns the data keys done.
async fn rewrap_kept_keys(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    new_kwk: &KeyWrappingKey,
) -> Result<u32> {
    let mut rewrapped = 0u32;
    for row in load_key_rows(&**tx).await? {
        if row.state == KeyState::Retired {
            continue;
        }
        let w = keyring.rewrap_under(new_kwk, &row.wrapped, KeyPurpose::Data(row.version))?;
        tx.execute(
            "UPDATE data_keys SET wrapped = $2 WHERE version = $1",
            &[&i64::from(row.version), &w],
        )
        .await
        .map_err(map_err)?;
        rewrapped += 1;
    }
    let signing = tx
        .query(
            "SELECT id, wrapped FROM audit_signing_keys WHERE wrapped IS NOT NULL",
            &[],
        )
        .await
        .map_err(map_err)?;
    for r in &signing {
        let (id, wrapped): (i64, Vec<u8>) = (r.get(0), r.get(1));
        let w = keyring.rewrap_under(new_kwk, &wrapped, KeyPurpose::AuditSigning(id as u32))?;
        tx.execute(
            "UPDATE audit_signing_keys SET wrapped = $2 WHERE id = $1",
            &[&id, &w],
        )
        .await
        .map_err(map_err)?;
    }
    if let Some(v) = meta_opt(&**tx, "fingerprint_layers").await? {
        meta_set(
            &**tx,
            "fingerprint_layers",
            &keyring.rewrap_layers(new_kwk, &v)?,
        )
        .await?;
    }
    if let Some(v) = meta_opt(&**tx, "retired_audit_keys").await? {
        meta_set(
            &**tx,
            "retired_audit_keys",
            &keyring.rewrap_retired_audit(new_kwk, &v)?,
        )
        .await?;
    }
    Ok(rewrapped)
}

/// True when the database holds a vault.
pub fn exists(shared: &Arc<PgShared>) -> bool {
    let pool = shared.pool.clone();
    shared
        .block(async move {
            let client = PgShared::client(&pool).await?;
            if schema::version(&**client).await? < 1 {
                return Ok(false);
            }
            Ok(client
                .query_opt("SELECT 1 FROM meta WHERE key = 'vault_id'", &[])
                .await
                .map_err(map_err)?
                .is_some())
        })
        .unwrap_or(false)
}

/// Creates the schema and a new vault in it; refuses a database that already holds one.
pub fn create(
    shared: &Arc<PgShared>,
    header: &VaultHeader,
    wrapped_data_key: &[u8],
    dev: bool,
) -> Result<()> {
    let pool = shared.pool.clone();
    let header = header.clone();
    let data_key = wrapped_data_key.to_vec();
    let shown = shared.url.to_string();
    shared.block(async move {
        let mut client = PgShared::client(&pool).await?;
        schema::migrate(&mut client).await?;
        let tx = client.transaction().await.map_err(map_err)?;
        // Two `init`s at once: the second waits here and then sees the first's vault.
        tx.execute("LOCK TABLE meta IN EXCLUSIVE MODE", &[])
            .await
            .map_err(map_err)?;
        if tx
            .query_opt("SELECT 1 FROM meta WHERE key = 'vault_id'", &[])
            .await
            .map_err(map_err)?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "a vault already exists at {shown}"
            )));
        }
        for (k, v) in [
            ("vault_id", &header.vault_id),
            ("key_check", &header.key_check),
            ("wrapped_fingerprint_key", &header.wrapped_fingerprint_key),
            ("wrapped_audit_key", &header.wrapped_audit_key),
        ] {
            tx.execute("INSERT INTO meta(key, value) VALUES ($1, $2)", &[&k, v])
                .await
                .map_err(map_err)?;
        }
        let now = now_micros();
        for (k, v) in [
            ("generation", 1i64),
            ("created_at", now),
            ("dev_vault", i64::from(dev)),
        ] {
            tx.execute("INSERT INTO counters(key, value) VALUES ($1, $2)", &[&k, &v])
                .await
                .map_err(map_err)?;
        }
        tx.execute(
            "INSERT INTO audit_head(id, seq, mac, hash, at) VALUES (1, 0, $1, $2, $3)",
            &[&&GENESIS_MAC[..], &&AUDIT_GENESIS_HASH[..], &Micros::MIN],
        )
        .await
        .map_err(map_err)?;
        tx.execute(
            "INSERT INTO data_keys(version, wrapped, state, created_at) VALUES (1, $1, 'active', $2)",
            &[&data_key, &now],
        )
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(())
    })
}

pub fn initial_key_rows(shared: &Arc<PgShared>) -> Result<Vec<KeyRow>> {
    let pool = shared.pool.clone();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        load_key_rows(&**client).await
    })
}

pub fn initial_clients(shared: &Arc<PgShared>) -> Result<Vec<ClientRow>> {
    let pool = shared.pool.clone();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        query_clients(&**client).await
    })
}

pub fn newest_recorded_time(shared: &Arc<PgShared>) -> Result<Option<Micros>> {
    let pool = shared.pool.clone();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        Ok(client
            .query_opt("SELECT at FROM audit ORDER BY seq DESC LIMIT 1", &[])
            .await
            .map_err(map_err)?
            .map(|r| r.get(0)))
    })
}

/// The audit signing keys of a vault, read without the master key (they are public).
pub fn read_audit_public_keys(
    shared: &Arc<PgShared>,
) -> Result<(String, Vec<AuditSigningKeyInfo>)> {
    read_header(shared)?;
    let pool = shared.pool.clone();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        let keys = query_signing_keys(&**client).await?;
        if keys.is_empty() {
            return Err(Error::FailedPrecondition(
                "this vault has no audit signing key yet: open it once (for example \
                 `tokenvault check`) to create one"
                    .into(),
            ));
        }
        Ok((vault_hex(&**client).await?, keys))
    })
}

/// True when `serve --dev` created the vault.
pub fn is_dev_vault(shared: &Arc<PgShared>) -> Result<bool> {
    let pool = shared.pool.clone();
    shared.block(async move {
        let client = PgShared::client(&pool).await?;
        Ok(read_counter(&**client, "dev_vault").await? == 1)
    })
}

// ---------------------------------------------------------------------------------------
// Row helpers (any client or transaction)

async fn load_key_rows(c: &impl tokio_postgres::GenericClient) -> Result<Vec<KeyRow>> {
    let rows = c
        .query(
            "SELECT version, wrapped, state, created_at, encryptions FROM data_keys ORDER BY version",
            &[],
        )
        .await
        .map_err(map_err)?;
    rows.iter()
        .map(|r| {
            let version: i64 = r.get(0);
            let state: String = r.get(2);
            let state = KeyState::parse(&state)
                .ok_or_else(|| Error::Internal(format!("unknown key state for v{version}")))?;
            Ok(KeyRow {
                version: version as u32,
                wrapped: r.get(1),
                state,
                created_at: r.get(3),
                encryptions: r.get::<_, i64>(4) as u64,
            })
        })
        .collect()
}

async fn read_counter(c: &impl tokio_postgres::GenericClient, key: &str) -> Result<i64> {
    Ok(
        c.query_opt("SELECT value FROM counters WHERE key = $1", &[&key])
            .await
            .map_err(map_err)?
            .map(|r| r.get(0))
            .unwrap_or(0),
    )
}

async fn bump_generation(tx: &Transaction<'_>) -> Result<()> {
    tx.execute(
        "UPDATE counters SET value = value + 1 WHERE key = 'generation'",
        &[],
    )
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn read_meta(c: &impl tokio_postgres::GenericClient, key: &str) -> Result<Vec<u8>> {
    c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
        .await
        .map_err(map_err)?
        .map(|r| r.get(0))
        .ok_or_else(|| Error::FailedPrecondition(format!("vault metadata `{key}` is missing")))
}

async fn vault_hex(c: &impl tokio_postgres::GenericClient) -> Result<String> {
    Ok(audit::hex(&read_meta(c, "vault_id").await?))
}

async fn query_clients(c: &impl tokio_postgres::GenericClient) -> Result<Vec<ClientRow>> {
    let rows = c
        .query(
            "SELECT name, key_id, key_hash, roles, cert_identity, created_at, revoked_at, \
             detokenize_rate, reuse_rate, reuse_group FROM clients ORDER BY name",
            &[],
        )
        .await
        .map_err(map_err)?;
    Ok(rows
        .iter()
        .map(|r| {
            let hash: Vec<u8> = r.get(2);
            ClientRow {
                info: ClientInfo {
                    name: r.get(0),
                    roles: roles_from_text(&r.get::<_, String>(3)),
                    cert_identity: r.get(4),
                    detokenize_rate: r.get(7),
                    reuse_rate: r.get(8),
                    reuse_group: r.get(9),
                    created_at: r.get(5),
                    revoked_at: r.get(6),
                },
                key_id: r.get(1),
                key_hash: <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0u8; 32]),
            }
        })
        .collect())
}

async fn query_signing_keys(
    c: &impl tokio_postgres::GenericClient,
) -> Result<Vec<AuditSigningKeyInfo>> {
    let rows = c
        .query(
            "SELECT id, public_key, state, created_at, retired_at FROM audit_signing_keys ORDER BY id",
            &[],
        )
        .await
        .map_err(map_err)?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let public: Vec<u8> = r.get(1);
            let public_key = AuditPublicKey::from_bytes(&public).ok_or_else(|| {
                Error::DataLoss(format!("audit signing key {id} has a malformed public key"))
            })?;
            Ok(AuditSigningKeyInfo {
                id: id as u32,
                public_key,
                active: r.get::<_, String>(2) == "active",
                created_at: r.get(3),
                retired_at: r.get(4),
            })
        })
        .collect()
}

/// The metadata columns, in [`meta_from_row`] order.
macro_rules! meta_cols {
    () => {
        "format, brand, pan_length, bin, last4, created_at, expires_at"
    };
}

fn meta_from_row(r: &Row, base: usize) -> TokenMeta {
    TokenMeta {
        format: TokenFormat::from_code(r.get(base)).unwrap_or_default(),
        brand: Brand::from_code(r.get(base + 1)),
        pan_length: r.get::<_, i64>(base + 2) as u32,
        bin: r.get(base + 3),
        last4: r.get(base + 4),
        created_at: r.get(base + 5),
        expires_at: r.get(base + 6),
    }
}

/// Row format and [`super::canonical_meta`] of the stored columns as they are.
fn binding_from_row(r: &Row, base: usize) -> (u32, Vec<u8>) {
    let bin: String = r.get(base + 3);
    let last4: String = r.get(base + 4);
    let meta = super::canonical_meta(
        r.get(base),
        r.get(base + 1),
        r.get(base + 2),
        &bin,
        &last4,
        r.get(base + 5),
        r.get(base + 6),
    );
    let format = u32::try_from(r.get::<_, i64>(base + 7)).unwrap_or(u32::MAX);
    (format, meta)
}

macro_rules! sealed_cols {
    () => {
        "id, token, key_version, nonce, ciphertext, format, brand, pan_length, bin, last4, \
         created_at, expires_at, row_format"
    };
}

fn sealed_row(r: &Row) -> SealedRow {
    let (row_format, bound_meta) = binding_from_row(r, 5);
    SealedRow {
        id: r.get(0),
        token: r.get(1),
        key_version: r.get::<_, i64>(2) as u32,
        nonce: r.get(3),
        ciphertext: r.get(4),
        row_format,
        bound_meta,
    }
}

fn audit_record_from_row(r: &Row) -> AuditRecord {
    AuditRecord {
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
    }
}

const AUDIT_COLS: &str = "seq, at, principal, peer, action, subject, outcome, reason, mac, hash";

fn hash32(stored: &[u8]) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(stored)
        .map_err(|_| Error::DataLoss("the audit chain's head has no valid hash".into()))
}

// ---------------------------------------------------------------------------------------
// The transaction state: the chain head (locked) and the active key's usage

struct TxState {
    audit_seq: u64,
    audit_mac: Vec<u8>,
    audit_hash: [u8; 32],
    audit_at: Micros,
    active_version: u32,
    active_count: u64,
    active_created: Micros,
    counts: HashMap<u32, u64>,
    audit: Vec<AuditEntry>,
    /// Set by the transaction that switches the audit key (`--rekey`).
    audit_key_switch: bool,
    /// `meta.audit_key_from` as committed when the head lock was taken: only a transaction
    /// holding that lock changes it, and that one sets `audit_key_switch`.
    audit_key_from: Option<Vec<u8>>,
}

/// Locks the chain head (serialising every writer of every replica), then reads the
/// active key as committed now, reloading the keyring when another replica rotated.
async fn begin_state(tx: &Transaction<'_>, keyring: &Keyring) -> Result<TxState> {
    let (head_stmt, active_stmt, from_stmt) = tokio::try_join!(
        biased;
        tx.prepare_cached("SELECT seq, mac, hash, at FROM audit_head WHERE id = 1 FOR UPDATE"),
        tx.prepare_cached(
            "SELECT version, encryptions, created_at FROM data_keys WHERE state = 'active'"
        ),
        tx.prepare_cached("SELECT value FROM meta WHERE key = 'audit_key_from'"),
    )
    .map_err(map_err)?;
    // Pipelined in this order (`biased`: the lock's request is sent first), and the server
    // runs a connection's statements one after the other, each with a fresh snapshot: the
    // key and the audit key's start are read only once the lock is held, as committed by the
    // previous holder.
    let (head, active, from) = tokio::try_join!(
        biased;
        tx.query_one(&head_stmt, &[]),
        tx.query_one(&active_stmt, &[]),
        tx.query_opt(&from_stmt, &[]),
    )
    .map_err(map_err)?;
    let hash: Vec<u8> = head.get(2);
    let active_version = active.get::<_, i64>(0) as u32;
    if keyring.snapshot().active.version() != active_version {
        if let Err(e) = keyring.replace(&load_key_rows(&**tx).await?) {
            if master_is_current(tx, keyring).await? {
                return Err(e);
            }
            tracing::warn!("{STALE_MASTER}");
        }
    }
    let mut st = TxState {
        audit_seq: head.get::<_, i64>(0) as u64,
        audit_mac: head.get(1),
        audit_hash: hash32(&hash)?,
        audit_at: head.get(3),
        active_version,
        active_count: active.get::<_, i64>(1) as u64,
        active_created: active.get(2),
        counts: HashMap::new(),
        audit: Vec::new(),
        audit_key_switch: false,
        audit_key_from: from.map(|r| r.get(0)),
    };
    if keyring.needs_rotation(0, 0, st.active_created, now_micros())
        && master_is_current(tx, keyring).await?
    {
        rotate_in_tx(tx, keyring, &mut st).await?;
    }
    Ok(st)
}

async fn master_is_current(tx: &Transaction<'_>, keyring: &Keyring) -> Result<bool> {
    let wrapped = read_meta(&**tx, "wrapped_fingerprint_key").await?;
    keyring.master_opens(&wrapped)
}

async fn finish_state(tx: &Transaction<'_>, keyring: &Keyring, st: &mut TxState) -> Result<()> {
    let (count_stmt, head_stmt) = tokio::try_join!(
        biased;
        tx.prepare_cached("UPDATE data_keys SET encryptions = encryptions + $2 WHERE version = $1"),
        tx.prepare_cached("UPDATE audit_head SET seq = $1, mac = $2, hash = $3, at = $4 WHERE id = 1"),
    )
    .map_err(map_err)?;
    let counts: Vec<(i64, i64)> = st
        .counts
        .drain()
        .map(|(v, n)| (i64::from(v), n as i64))
        .collect();
    check_audit_key(keyring, st)?;
    let audit = chain_audit(keyring, st);
    let insert_audit = async {
        if let Some(rows) = &audit {
            let stmt = tx.prepare_cached(SQL_INSERT_AUDIT).await?;
            tx.execute(&stmt, &rows.params()).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    let update_counts = async {
        for (v, n) in &counts {
            tx.execute(&count_stmt, &[v, n]).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    let update_head = async {
        if audit.is_some() {
            tx.execute(
                &head_stmt,
                &[
                    &(st.audit_seq as i64),
                    &st.audit_mac,
                    &&st.audit_hash[..],
                    &st.audit_at,
                ],
            )
            .await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    // Pipelined: one round trip for the three, whatever the group held.
    tokio::try_join!(biased; update_counts, insert_audit, update_head).map_err(map_err)?;
    Ok(())
}

const SQL_INSERT_AUDIT: &str = "INSERT INTO audit(seq, at, principal, peer, action, subject, \
     outcome, reason, mac, hash) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], \
     $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bytea[], $10::bytea[])";

/// The pending audit entries, chained onto the head, as the columns of one insert.
struct AuditColumns {
    seq: Vec<i64>,
    at: Vec<i64>,
    principal: Vec<String>,
    peer: Vec<String>,
    action: Vec<String>,
    subject: Vec<String>,
    outcome: Vec<String>,
    reason: Vec<String>,
    mac: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl AuditColumns {
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 10] {
        [
            &self.seq,
            &self.at,
            &self.principal,
            &self.peer,
            &self.action,
            &self.subject,
            &self.outcome,
            &self.reason,
            &self.mac,
            &self.hash,
        ]
    }
}

/// A replica still holding the audit key a rekey replaced must not extend the chain: checked
/// before every chaining of records (serving groups and admin transactions alike).
fn check_audit_key(keyring: &Keyring, st: &TxState) -> Result<()> {
    if st.audit.is_empty() || st.audit_key_switch {
        return Ok(());
    }
    if super::sqlite::audit_key_from(st.audit_key_from.clone())? != keyring.audit_keys().from() {
        return Err(Error::Unavailable(STALE_MASTER.into()));
    }
    Ok(())
}

/// Chains the pending entries onto the head (advancing it in `st`); None when none is pending.
/// Only after [`check_audit_key`].
fn chain_audit(keyring: &Keyring, st: &mut TxState) -> Option<AuditColumns> {
    if st.audit.is_empty() {
        return None;
    }
    let keys = keyring.audit_keys();
    let n = st.audit.len();
    let mut c = AuditColumns {
        seq: Vec::with_capacity(n),
        at: Vec::with_capacity(n),
        principal: Vec::with_capacity(n),
        peer: Vec::with_capacity(n),
        action: Vec::with_capacity(n),
        subject: Vec::with_capacity(n),
        outcome: Vec::with_capacity(n),
        reason: Vec::with_capacity(n),
        mac: Vec::with_capacity(n),
        hash: Vec::with_capacity(n),
    };
    for mut entry in st.audit.drain(..) {
        entry.at = entry.at.max(st.audit_at);
        st.audit_at = entry.at;
        let seq = st.audit_seq + 1;
        let bytes = canonical_bytes(seq, &entry);
        let mac = keys.current().chain_mac(&st.audit_mac, &bytes);
        let hash = audit_chain_hash(&st.audit_hash, &bytes);
        c.seq.push(seq as i64);
        c.at.push(entry.at);
        c.principal.push(entry.principal);
        c.peer.push(entry.peer);
        c.action.push(entry.action);
        c.subject.push(entry.subject);
        c.outcome.push(entry.outcome);
        c.reason.push(entry.reason);
        c.mac.push(mac.to_vec());
        c.hash.push(hash.to_vec());
        st.audit_seq = seq;
        st.audit_mac = mac.to_vec();
        st.audit_hash = hash;
    }
    Some(c)
}

/// Appends the pending entries, chained, in one multi-row statement.
async fn flush_audit(tx: &Transaction<'_>, keyring: &Keyring, st: &mut TxState) -> Result<()> {
    check_audit_key(keyring, st)?;
    if let Some(rows) = chain_audit(keyring, st) {
        let stmt = tx.prepare_cached(SQL_INSERT_AUDIT).await.map_err(map_err)?;
        tx.execute(&stmt, &rows.params()).await.map_err(map_err)?;
    }
    Ok(())
}

async fn rotate_in_tx(tx: &Transaction<'_>, keyring: &Keyring, st: &mut TxState) -> Result<u32> {
    if !master_is_current(tx, keyring).await? {
        return Err(Error::FailedPrecondition(
            "the vault's master key was rotated; restart with the new master key".into(),
        ));
    }
    let max: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM data_keys", &[])
        .await
        .map_err(map_err)?
        .get(0);
    let version = (max + 1) as u32;
    let now = now_micros();
    tx.execute(
        "UPDATE data_keys SET state = 'decrypt_only' WHERE state = 'active'",
        &[],
    )
    .await
    .map_err(map_err)?;
    let wrapped = keyring.new_wrapped_data_key(version)?;
    tx.execute(
        "INSERT INTO data_keys(version, wrapped, state, created_at) VALUES ($1, $2, 'active', $3)",
        &[&i64::from(version), &wrapped, &now],
    )
    .await
    .map_err(map_err)?;
    bump_generation(tx).await?;
    keyring.replace(&load_key_rows(&**tx).await?)?;
    st.active_version = version;
    st.active_count = 0;
    st.active_created = now;
    st.audit.push(AuditEntry::new(
        &Caller::new("system", "local"),
        "key_rotate",
        &format!("key v{version}"),
        "OK",
        "",
    ));
    tracing::info!(version, "rotated data key");
    Ok(version)
}

/// The first live row of each asked (fingerprint, format), judged at each item's own time:
/// one statement for every `reuse_existing` item of a group (`$4` numbers them). While a
/// rekey re-layers fingerprints, a row may still hold the previous layer's value (`$5`).
const SQL_REUSE_MANY: &str = concat!(
    "SELECT q.i, t.token, t.key_version, ",
    "t.format, t.brand, t.pan_length, t.bin, t.last4, t.created_at, t.expires_at",
    " FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[]) \
     AS q(fp, fmt, now, i, prev) CROSS JOIN LATERAL (SELECT token, key_version, ",
    meta_cols!(),
    " FROM tokens WHERE fingerprint IN (q.fp, q.prev) AND format = q.fmt AND deleted_at IS NULL \
     AND (expires_at IS NULL OR expires_at > q.now) ORDER BY id LIMIT 1) t"
);
/// A whole group's new rows in one statement; a row whose token is taken is skipped and
/// missing from what it returns (that item draws again).
const SQL_INSERT_TOKENS: &str = concat!(
    "INSERT INTO tokens(token, key_version, nonce, ciphertext, fingerprint, ",
    meta_cols!(),
    ", row_format) SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[], \
     $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], \
     $11::bigint[], $12::bigint[], $13::bigint[]) ON CONFLICT (token) DO NOTHING RETURNING token"
);
const SQL_LOOKUP: &str = concat!(
    "SELECT token, key_version, nonce, ciphertext, ",
    meta_cols!(),
    ", row_format FROM tokens WHERE token = ANY($1) AND deleted_at IS NULL \
     AND ciphertext IS NOT NULL AND (expires_at IS NULL OR expires_at > $2)"
);

/// Where one item of a group stands while the group is written.
enum Slot {
    /// Queued for the next insert statement.
    Queued,
    /// Answered by an earlier item of the same group (`reuse_existing` of a card number the
    /// group itself stores first): takes that item's answer.
    SameAs(usize),
    Done(Result<StoredToken>),
}

/// The tokenize items of one group, written with a constant number of statements: one
/// reuse lookup, then one multi-row insert per draw (a second only for the rare item whose
/// token collided), whatever the group's size. The per-item decisions (rotation by usage,
/// sealing under the active version, counting every seal) are the one-by-one writer's, in
/// the group's order, so the counts and the rotation point are exactly what they were.
struct TokenBatch<'a> {
    items: Vec<&'a mut NewToken>,
    /// Index into `TxState::audit` of each item's record, completed once the item is done.
    audit_slot: Vec<usize>,
    slots: Vec<Slot>,
    draws: Vec<usize>,
    /// Tokens queued in this draw: two equal ones in one statement would be ambiguous.
    queued_tokens: std::collections::HashSet<String>,
    /// (fingerprint, format) -> the first queued item storing it, for later reuse items.
    first_of: HashMap<([u8; 32], i64), usize>,
}

impl<'a> TokenBatch<'a> {
    fn new() -> Self {
        TokenBatch {
            items: Vec::new(),
            audit_slot: Vec::new(),
            slots: Vec::new(),
            draws: Vec::new(),
            queued_tokens: Default::default(),
            first_of: HashMap::new(),
        }
    }

    /// Takes one item, in the group's order; `found` is its row from the reuse lookup.
    async fn add(
        &mut self,
        tx: &Transaction<'_>,
        keyring: &Keyring,
        st: &mut TxState,
        item: &'a mut NewToken,
        caller: &Caller,
        found: Option<StoredToken>,
    ) -> Result<()> {
        let g = self.items.len();
        let key = item
            .fingerprint
            .filter(|_| item.reuse_existing)
            .map(|f| (f, item.meta.format.code()));
        let now = item.now;
        self.items.push(item);
        self.draws.push(0);
        let same_as = key
            .as_ref()
            .and_then(|k| self.first_of.get(k))
            // The earlier item's row is the oldest live one, as the lookup would have found
            // it, unless it expires before this item's time.
            .filter(|&&first| self.items[first].meta.expires_at.map_or(true, |e| e > now));
        if let Some(found) = found {
            self.slots.push(Slot::Done(Ok(found)));
        } else if let Some(&first) = same_as {
            self.slots.push(Slot::SameAs(first));
        } else {
            self.slots.push(Slot::Queued);
            self.prepare(tx, keyring, st, g).await?;
            if let (Some(k), Slot::Queued) = (key, &self.slots[g]) {
                self.first_of.entry(k).or_insert(g);
            }
        }
        // After a rotation this item caused: the trail shows the rotation first.
        self.audit_slot.push(st.audit.len());
        st.audit
            .push(AuditEntry::new(caller, "tokenize", "", "", ""));
        Ok(())
    }

    /// Readies a queued item for the next insert: rotates when its seal would pass the
    /// policy, seals under the active version, counts the seal, and draws again while its
    /// token is already queued. Ends with the item queued or done (an error of its own).
    async fn prepare(
        &mut self,
        tx: &Transaction<'_>,
        keyring: &Keyring,
        st: &mut TxState,
        g: usize,
    ) -> Result<()> {
        loop {
            let item = &mut *self.items[g];
            if self.draws[g] >= MAX_TOKEN_DRAWS {
                self.slots[g] = Slot::Done(Err(Error::ResourceExhausted(format!(
                    "no free {} token left for this card number length; use another format",
                    item.meta.format.name()
                ))));
                return Ok(());
            }
            if keyring.needs_rotation(st.active_count, 1, st.active_created, item.now) {
                if !master_is_current(tx, keyring).await? {
                    self.slots[g] = Slot::Done(Err(Error::Unavailable(STALE_MASTER.into())));
                    return Ok(());
                }
                rotate_in_tx(tx, keyring, st).await?;
            }
            if item.key_version != st.active_version {
                reseal(keyring, item);
            }
            // Never seal under a version that is not the active one.
            if item.key_version != st.active_version {
                self.slots[g] = Slot::Done(Err(Error::Unavailable(STALE_MASTER.into())));
                return Ok(());
            }
            // A sealed PAN counts against its version even if its row loses a collision.
            st.active_count += 1;
            *st.counts.entry(item.key_version).or_insert(0) += 1;
            self.draws[g] += 1;
            if self.queued_tokens.insert(item.token.clone()) {
                return Ok(());
            }
            item.token = token::generate(item.meta.format, &item.pan).into_string();
            reseal(keyring, item);
        }
    }

    /// Inserts every queued item, one statement per draw, until none is left queued.
    async fn write(
        &mut self,
        tx: &Transaction<'_>,
        keyring: &Keyring,
        st: &mut TxState,
    ) -> Result<()> {
        let stmt = tx
            .prepare_cached(SQL_INSERT_TOKENS)
            .await
            .map_err(map_err)?;
        loop {
            let queued: Vec<usize> = (0..self.items.len())
                .filter(|&g| matches!(self.slots[g], Slot::Queued))
                .collect();
            if queued.is_empty() {
                return Ok(());
            }
            let n = queued.len();
            let mut cols = InsertColumns::with_capacity(n);
            for &g in &queued {
                cols.push(self.items[g]);
            }
            let inserted: std::collections::HashSet<String> = tx
                .query(&stmt, &cols.params())
                .await
                .map_err(map_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            self.queued_tokens.clear();
            let mut lost = Vec::new();
            for g in queued {
                let item = &*self.items[g];
                if inserted.contains(&item.token) {
                    self.slots[g] = Slot::Done(Ok(StoredToken {
                        token: item.token.clone(),
                        key_version: item.key_version,
                        created: true,
                        meta: item.meta.clone(),
                    }));
                } else {
                    lost.push(g);
                }
            }
            // Collisions with stored tokens: draw again (the AAD binds the token: re-seal).
            for g in lost {
                let item = &mut *self.items[g];
                item.token = token::generate(item.meta.format, &item.pan).into_string();
                reseal(keyring, item);
                self.prepare(tx, keyring, st, g).await?;
            }
        }
    }

    /// Every item's answer, in order, with its audit record completed.
    fn finish(mut self, st: &mut TxState) -> Vec<Result<StoredToken>> {
        let n = self.items.len();
        let mut out: Vec<Option<Result<StoredToken>>> = (0..n).map(|_| None).collect();
        for g in 0..n {
            let r = match std::mem::replace(&mut self.slots[g], Slot::Queued) {
                Slot::Done(r) => r,
                Slot::SameAs(first) => match out[first].as_ref() {
                    Some(Ok(s)) => Ok(StoredToken {
                        created: false,
                        ..s.clone()
                    }),
                    Some(Err(e)) => Err(duplicate(e)),
                    None => Err(Error::Internal("reuse of a later item".into())),
                },
                Slot::Queued => Err(Error::Internal("item left unwritten".into())),
            };
            let entry = &mut st.audit[self.audit_slot[g]];
            entry.subject = r.as_ref().map(|s| s.token.clone()).unwrap_or_default();
            entry.outcome = outcome_of(&r).to_string();
            out[g] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }
}

fn reseal(keyring: &Keyring, item: &mut NewToken) {
    let snapshot = keyring.snapshot();
    item.sealed = snapshot.active.seal(
        &item.token,
        &item.meta.canonical(),
        item.pan.expose_digits().as_bytes(),
    );
    item.key_version = snapshot.active.version();
}

/// The columns of a multi-row insert, as arrays.
struct InsertColumns {
    token: Vec<String>,
    key_version: Vec<i64>,
    nonce: Vec<Vec<u8>>,
    ciphertext: Vec<Vec<u8>>,
    fingerprint: Vec<Option<Vec<u8>>>,
    format: Vec<i64>,
    brand: Vec<i64>,
    pan_length: Vec<i64>,
    bin: Vec<String>,
    last4: Vec<String>,
    created_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
    row_format: Vec<i64>,
}

impl InsertColumns {
    fn with_capacity(n: usize) -> Self {
        InsertColumns {
            token: Vec::with_capacity(n),
            key_version: Vec::with_capacity(n),
            nonce: Vec::with_capacity(n),
            ciphertext: Vec::with_capacity(n),
            fingerprint: Vec::with_capacity(n),
            format: Vec::with_capacity(n),
            brand: Vec::with_capacity(n),
            pan_length: Vec::with_capacity(n),
            bin: Vec::with_capacity(n),
            last4: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            expires_at: Vec::with_capacity(n),
            row_format: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, item: &NewToken) {
        let m = &item.meta;
        self.token.push(item.token.clone());
        self.key_version.push(i64::from(item.key_version));
        self.nonce.push(item.sealed.nonce.to_vec());
        self.ciphertext.push(item.sealed.ciphertext.clone());
        self.fingerprint
            .push(item.fingerprint.as_ref().map(|f| f.to_vec()));
        self.format.push(m.format.code());
        self.brand.push(m.brand.code());
        self.pan_length.push(i64::from(m.pan_length));
        self.bin.push(m.bin.clone());
        self.last4.push(m.last4.clone());
        self.created_at.push(m.created_at);
        self.expires_at.push(m.expires_at);
        self.row_format.push(i64::from(crate::crypto::ROW_FORMAT));
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 13] {
        [
            &self.token,
            &self.key_version,
            &self.nonce,
            &self.ciphertext,
            &self.fingerprint,
            &self.format,
            &self.brand,
            &self.pan_length,
            &self.bin,
            &self.last4,
            &self.created_at,
            &self.expires_at,
            &self.row_format,
        ]
    }
}

/// The reuse lookup of every `reuse_existing` item of a group, in one statement; indexed
/// like the group's items in order.
async fn find_reusable(
    tx: &Transaction<'_>,
    group: &[WriteOp],
) -> Result<HashMap<usize, StoredToken>> {
    let items = group.iter().flat_map(|op| match op {
        WriteOp::Tokenize { items, .. } => items.as_slice(),
        _ => &[],
    });
    lookup_reusable(tx, items.enumerate()).await
}

/// The oldest live row each `(index, item)` may reuse, as the transaction sees it now.
async fn lookup_reusable<'i>(
    tx: &Transaction<'_>,
    items: impl Iterator<Item = (usize, &'i NewToken)>,
) -> Result<HashMap<usize, StoredToken>> {
    let (mut fps, mut fmts, mut nows, mut idx) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut prevs = Vec::new();
    for (g, item) in items {
        if let (true, Some(fp)) = (item.reuse_existing, &item.fingerprint) {
            fps.push(fp.to_vec());
            prevs.push(item.fingerprint_prev.as_ref().unwrap_or(fp).to_vec());
            fmts.push(item.meta.format.code());
            nows.push(item.now);
            idx.push(g as i64);
        }
    }
    if idx.is_empty() {
        return Ok(HashMap::new());
    }
    let stmt = tx.prepare_cached(SQL_REUSE_MANY).await.map_err(map_err)?;
    let rows = tx
        .query(&stmt, &[&fps, &fmts, &nows, &idx, &prevs])
        .await
        .map_err(map_err)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) as usize,
                StoredToken {
                    token: r.get(1),
                    key_version: r.get::<_, i64>(2) as u32,
                    created: false,
                    meta: meta_from_row(r, 3),
                },
            )
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// The writer: group commit of serving writes

type Reply<T> = oneshot::Sender<Result<T>>;

enum WriteOp {
    Tokenize {
        items: Vec<NewToken>,
        caller: Caller,
        reply: Reply<Vec<Result<StoredToken>>>,
    },
    Delete {
        token: String,
        caller: Caller,
        reply: Reply<bool>,
    },
    Audit {
        entries: Vec<AuditEntry>,
        reply: Reply<()>,
    },
}

impl WriteOp {
    fn weight(&self) -> usize {
        match self {
            WriteOp::Tokenize { items, .. } => items.len().max(1),
            WriteOp::Audit { entries, .. } => entries.len().max(1),
            WriteOp::Delete { .. } => 1,
        }
    }
}

enum Outcome {
    Tokenize(Vec<Result<StoredToken>>),
    Delete(bool),
    Audit,
}

struct Writer {
    pool: Pool,
    keyring: Arc<Keyring>,
    healthy: Arc<AtomicBool>,
    max_group_items: usize,
    /// The vault's tables passed the tokenize share of `limits.max_storage_bytes` at the
    /// last measurement (at most a second old): tokenize items are refused, nothing else.
    storage_full: Arc<AtomicBool>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<WriteOp>) {
        while let Some(first) = rx.recv().await {
            let mut weight = first.weight();
            let mut group = vec![first];
            while weight < self.max_group_items {
                match rx.try_recv() {
                    Ok(op) => {
                        weight += op.weight();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group).await;
        }
        tracing::debug!("database writer stopped");
    }

    async fn commit_group(&self, mut group: Vec<WriteOp>) {
        let (n, started) = (group.len(), Instant::now());
        let result = tokio::time::timeout(SERVING_WAIT, self.apply_group(&mut group))
            .await
            .unwrap_or_else(|_| Err(no_answer()));
        super::observe_commit(n, started.elapsed(), result.is_ok());
        match result {
            Ok(outcomes) => {
                self.healthy.store(true, Ordering::Relaxed);
                for (op, o) in group.into_iter().zip(outcomes) {
                    match (op, o) {
                        (WriteOp::Tokenize { reply, .. }, Outcome::Tokenize(r)) => {
                            let _ = reply.send(Ok(r));
                        }
                        (WriteOp::Delete { reply, .. }, Outcome::Delete(d)) => {
                            let _ = reply.send(Ok(d));
                        }
                        (WriteOp::Audit { reply, .. }, Outcome::Audit) => {
                            let _ = reply.send(Ok(()));
                        }
                        (op, _) => fail(
                            op,
                            Error::Internal("writer outcome of the wrong kind".into()),
                        ),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; no request of the group is acknowledged");
                if matches!(e, Error::Unavailable(_) | Error::ResourceExhausted(_)) {
                    self.healthy.store(false, Ordering::Relaxed);
                }
                for op in group {
                    fail(op, duplicate(&e));
                }
            }
        }
    }

    /// One transaction per group, in a number of round trips that does not grow with the
    /// group: the head lock and active key (pipelined), one reuse lookup, one multi-row
    /// insert of the group's tokens, then the counts, audit rows and head (pipelined).
    async fn apply_group(&self, group: &mut [WriteOp]) -> Result<Vec<Outcome>> {
        let keyring = &*self.keyring;
        let mut client = PgShared::client(&self.pool).await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let mut st = begin_state(&tx, keyring).await?;
        let fps = keyring.fingerprints();
        for op in group.iter_mut() {
            if let WriteOp::Tokenize { items, .. } = op {
                items.iter_mut().for_each(|i| i.catch_up_fingerprint(&fps));
            }
        }
        let full = self.storage_full.load(Ordering::Relaxed);
        let mut found = if full {
            HashMap::new()
        } else {
            find_reusable(&tx, group).await?
        };
        // Tokens this group's deletes removed so far, in the group's order.
        let mut deleted = std::collections::HashSet::new();
        let mut batch = TokenBatch::new();
        let mut outcomes = Vec::with_capacity(group.len());
        // (outcome index, item count) of each tokenize op, answered once the batch is written.
        let mut sizes = Vec::new();
        for op in group.iter_mut() {
            outcomes.push(match op {
                WriteOp::Tokenize { items, caller, .. } if full => {
                    // As SQLite's full store: each item refused and audited, none stored.
                    let results = items
                        .iter()
                        .map(|_| {
                            let r = Err(Error::ResourceExhausted(
                                "storage limit reached: tokenize is refused until space is \
                                 freed or the limit is raised"
                                    .into(),
                            ));
                            st.audit.push(AuditEntry::new(caller, "tokenize", "", outcome_of(&r), ""));
                            r
                        })
                        .collect();
                    Outcome::Tokenize(results)
                }
                WriteOp::Tokenize { items, caller, .. } => {
                    sizes.push((outcomes.len(), items.len()));
                    for item in items.iter_mut() {
                        let g = batch.items.len();
                        let mut reuse = found.remove(&g);
                        // The group-wide lookup ran before this group's deletes: a row one of
                        // them removed ahead of this item is looked up again, as the item
                        // would have found it one by one (the group reads as serial order).
                        if reuse.as_ref().is_some_and(|r| deleted.contains(&r.token)) {
                            reuse = lookup_reusable(&tx, std::iter::once((g, &*item)))
                                .await?
                                .remove(&g);
                        }
                        batch
                            .add(&tx, keyring, &mut st, item, caller, reuse)
                            .await?;
                    }
                    Outcome::Tokenize(Vec::new())
                }
                WriteOp::Delete { token, caller, .. } => {
                    let stmt = tx
                        .prepare_cached(
                            "UPDATE tokens SET nonce = NULL, ciphertext = NULL, fingerprint = NULL, \
                             deleted_at = $2 WHERE token = $1 AND deleted_at IS NULL",
                        )
                        .await
                        .map_err(map_err)?;
                    let was_deleted = tx
                        .execute(&stmt, &[&*token, &now_micros()])
                        .await
                        .map_err(map_err)?
                        > 0;
                    if was_deleted {
                        deleted.insert(token.clone());
                    }
                    let outcome = if was_deleted { "OK" } else { "NOT_FOUND" };
                    st.audit.push(AuditEntry::new(caller, "delete", token, outcome, ""));
                    Outcome::Delete(was_deleted)
                }
                WriteOp::Audit { entries, .. } => {
                    st.audit.append(entries);
                    Outcome::Audit
                }
            });
        }
        batch.write(&tx, keyring, &mut st).await?;
        let mut results = batch.finish(&mut st).into_iter();
        for (at, n) in sizes {
            outcomes[at] = Outcome::Tokenize(results.by_ref().take(n).collect());
        }
        finish_state(&tx, keyring, &mut st).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(outcomes)
    }
}

fn fail(op: WriteOp, e: Error) {
    match op {
        WriteOp::Tokenize { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Delete { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Audit { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Lookups

/// Tokens one statement looks up at most.
const MAX_LOOKUP_BATCH: usize = 512;

struct LookupReq {
    tokens: Vec<String>,
    now: Micros,
    reply: oneshot::Sender<Result<Vec<Option<TokenRow>>>>,
}

/// Folds concurrent lookups into one `token = ANY($1)` statement each. A request is sent at
/// once while a connection slot is free; only when every slot is busy do requests queue, and
/// the next statement then takes all of them. So an idle replica adds no wait, and a loaded
/// one spends one statement (one plan, one index descent per token, one round trip) on many
/// callers instead of one each.
async fn run_lookups(pool: Pool, slots: usize, mut rx: mpsc::Receiver<LookupReq>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(slots.max(1)));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut n = first.tokens.len();
        let mut batch = vec![first];
        while n < MAX_LOOKUP_BATCH {
            match rx.try_recv() {
                Ok(req) => {
                    n += req.tokens.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(SERVING_WAIT, lookup_batch(&pool, &batch))
                .await
                .unwrap_or_else(|_| Err(no_answer()));
            drop(permit);
            match result {
                Ok(found) => {
                    for req in batch {
                        let rows = req
                            .tokens
                            .iter()
                            .map(|t| {
                                found
                                    .get(t)
                                    // Each request judges expiry at its own time (the
                                    // statement used the batch's earliest).
                                    .filter(|r| r.meta.expires_at.map_or(true, |e| e > req.now))
                                    .cloned()
                            })
                            .collect();
                        let _ = req.reply.send(Ok(rows));
                    }
                }
                Err(e) => {
                    for req in batch {
                        let _ = req.reply.send(Err(duplicate(&e)));
                    }
                }
            }
        });
    }
}

async fn lookup_batch(pool: &Pool, batch: &[LookupReq]) -> Result<HashMap<String, TokenRow>> {
    let client = PgShared::client(pool).await?;
    let stmt = client.prepare_cached(SQL_LOOKUP).await.map_err(map_err)?;
    let tokens: Vec<&str> = batch
        .iter()
        .flat_map(|r| r.tokens.iter().map(String::as_str))
        .collect();
    let now = batch.iter().map(|r| r.now).min().unwrap_or_default();
    let rows = client
        .query(&stmt, &[&tokens, &now])
        .await
        .map_err(map_err)?;
    Ok(rows
        .iter()
        .map(|r| {
            let (row_format, bound_meta) = binding_from_row(r, 4);
            let row = TokenRow {
                token: r.get(0),
                key_version: r.get::<_, i64>(1) as u32,
                nonce: r.get(2),
                ciphertext: r.get(3),
                meta: meta_from_row(r, 4),
                row_format,
                bound_meta,
            };
            (row.token.clone(), row)
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// The store

pub struct PgStore {
    shared: Arc<PgShared>,
    keyring: Arc<Keyring>,
    writer_tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    lookup_tx: mpsc::Sender<LookupReq>,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl PgStore {
    /// Applies pending migrations, checks the session keeps commits durable, makes sure an
    /// audit signing key exists, and starts the writer and the health prober.
    pub fn open(shared: Arc<PgShared>, keyring: Arc<Keyring>, p: &OpenParams) -> Result<PgStore> {
        let pool = shared.pool.clone();
        let kr = keyring.clone();
        shared.block(async move {
            let mut client = PgShared::client(&pool).await?;
            schema::migrate(&mut client).await?;
            let sync: String = client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(map_err)?
                .get(0);
            if sync == "off" {
                return Err(Error::FailedPrecondition(
                    "the database session has synchronous_commit=off: an acknowledged write \
                     could be lost; set it to on (or stricter) for the vault's role"
                        .into(),
                ));
            }
            prepare_audit(&mut client, &kr).await
        })?;
        let storage_full = Arc::new(AtomicBool::new(false));
        let limit = p.max_storage_bytes;
        if let Some(limit) = limit {
            let (pool, full) = (shared.pool.clone(), storage_full.clone());
            shared.block(async move { measure_storage(&pool, limit, &full).await })?;
        }
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(p.writer_queue.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            pool: shared.pool.clone(),
            keyring: keyring.clone(),
            healthy: healthy.clone(),
            max_group_items: p.max_group_items.max(1),
            storage_full: storage_full.clone(),
        };
        shared.handle().spawn(async move {
            writer.run(rx).await;
            let _ = done_tx.send(());
        });
        // The pool holds the read connections plus two (the writer, the health probe).
        let lookup_slots = shared.pool.status().max_size.saturating_sub(2).max(1);
        let (lookup_tx, lookup_rx) = mpsc::channel(p.writer_queue.max(1));
        shared
            .handle()
            .spawn(run_lookups(shared.pool.clone(), lookup_slots, lookup_rx));
        {
            let (pool, healthy, stop) = (shared.pool.clone(), healthy.clone(), stop.clone());
            shared.handle().spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(PROBE_EVERY).await;
                    let probe = async {
                        match limit {
                            // The measurement is the probe: it needs the database too.
                            Some(limit) => measure_storage(&pool, limit, &storage_full).await?,
                            None => {
                                let c = PgShared::client(&pool).await?;
                                c.simple_query("SELECT 1").await.map_err(map_err)?;
                            }
                        }
                        Ok::<_, Error>(())
                    };
                    let ok = matches!(
                        tokio::time::timeout(connect::CONNECT_TIMEOUT, probe).await,
                        Ok(Ok(()))
                    );
                    healthy.store(ok, Ordering::Relaxed);
                }
            });
        }
        Ok(PgStore {
            shared,
            keyring,
            writer_tx: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(done_rx)),
            lookup_tx,
            healthy,
            stop,
        })
    }

    fn sender(&self) -> Option<mpsc::Sender<WriteOp>> {
        self.writer_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> WriteOp) -> StoreFuture<T> {
        let (reply, rx) = oneshot::channel();
        let op = make(reply);
        Box::pin(super::send_to_writer(self.sender(), op, rx))
    }

    /// Runs an admin operation in its own transaction holding the chain head, on any
    /// pooled connection: the database serialises it with every replica's groups.
    fn admin<T, F, Fut>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Keyring>, Pool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let (keyring, pool) = (self.keyring.clone(), self.shared.pool.clone());
        self.shared.spawn(f(keyring, pool))
    }

    fn read<T, F, Fut>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let pool = self.shared.pool.clone();
        self.shared.spawn(async move {
            let client = PgShared::client(&pool).await?;
            f(client).await
        })
    }
}

/// Creates the first audit signing key if there is none (by whichever replica opens first).
async fn prepare_audit(client: &mut deadpool_postgres::Object, keyring: &Keyring) -> Result<()> {
    let has_key = client
        .query_opt(
            "SELECT 1 FROM audit_signing_keys WHERE state = 'active'",
            &[],
        )
        .await
        .map_err(map_err)?
        .is_some();
    if has_key {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(map_err)?;
    tx.query_one("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE", &[])
        .await
        .map_err(map_err)?;
    let has_key = tx
        .query_opt(
            "SELECT 1 FROM audit_signing_keys WHERE state = 'active'",
            &[],
        )
        .await
        .map_err(map_err)?
        .is_some();
    if !has_key && master_is_current(&tx, keyring).await? {
        let n: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM audit_signing_keys",
                &[],
            )
            .await
            .map_err(map_err)?
            .get(0);
        let (key, wrapped) = keyring.new_audit_signing_key(n as u32)?;
        tx.execute(
            "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, created_at) \
             VALUES ($1, $2, $3, 'active', $4)",
            &[
                &n,
                &key.public_key().to_bytes().to_vec(),
                &wrapped,
                &now_micros(),
            ],
        )
        .await
        .map_err(map_err)?;
        tracing::info!(key_id = %key.public_key().key_id(), "created the audit signing key");
    }
    tx.commit().await.map_err(map_err)?;
    Ok(())
}

/// Opens a transaction on a pooled connection with the chain head locked.
const ADMIN_REQUEST_SELECT: &str = "SELECT id, operation, params, requester, created_at, \
     expires_at, approver, approved_at FROM admin_requests";

fn admin_request_from_row(r: &Row) -> AdminRequestRow {
    AdminRequestRow {
        id: r.get(0),
        operation: r.get(1),
        params: r.get(2),
        requester: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
        approver: r.get(6),
        approved_at: r.get(7),
    }
}

/// Replaces the active audit signing key inside `tx` (`audit rotate-key`, and the end of a
/// rekey): the handover record is signed by the old key, whose wrapped seed is destroyed.
async fn rotate_signing_in_tx(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    st: &mut TxState,
    caller: &Caller,
) -> Result<(u32, AuditPublicKey)> {
    let old = tx
        .query_opt(
            "SELECT id, wrapped FROM audit_signing_keys WHERE state = 'active'",
            &[],
        )
        .await
        .map_err(map_err)?
        .ok_or_else(|| Error::FailedPrecondition("the vault has no audit signing key".into()))?;
    let (old_id, old_wrapped): (i64, Vec<u8>) = (old.get(0), old.get(1));
    flush_audit(tx, keyring, st).await?;
    let h = keyring.audit_signing_handover(
        old_id as u32,
        &old_wrapped,
        &vault_hex(&**tx).await?,
        st.audit_seq + 1,
        &st.audit_hash,
        caller,
    )?;
    let now = now_micros();
    tx.execute(
        "UPDATE audit_signing_keys SET state = 'retired', wrapped = NULL, retired_at = $2 \
         WHERE id = $1",
        &[&old_id, &now],
    )
    .await
    .map_err(map_err)?;
    tx.execute(
        "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, created_at) \
         VALUES ($1, $2, $3, 'active', $4)",
        &[
            &i64::from(h.new_id),
            &h.public.to_bytes().to_vec(),
            &h.wrapped,
            &now,
        ],
    )
    .await
    .map_err(map_err)?;
    st.audit.push(h.entry);
    Ok((h.new_id, h.public))
}

macro_rules! admin_tx {
    ($pool:expr, $keyring:expr, |$tx:ident, $st:ident| $body:block) => {{
        let mut client = PgShared::client(&$pool).await?;
        let $tx = client.transaction().await.map_err(map_err)?;
        let mut state = begin_state(&$tx, &$keyring).await?;
        let out = {
            let $st = &mut state;
            $body
        };
        finish_state(&$tx, &$keyring, &mut state).await?;
        $tx.commit().await.map_err(map_err)?;
        Ok(out)
    }};
}

impl Storage for PgStore {
    fn tokenize(
        &self,
        items: Vec<NewToken>,
        caller: Caller,
    ) -> StoreFuture<Vec<Result<StoredToken>>> {
        self.write(move |reply| WriteOp::Tokenize {
            items,
            caller,
            reply,
        })
    }

    fn lookup(&self, tokens: Vec<String>, now: Micros) -> StoreFuture<Vec<Option<TokenRow>>> {
        let sender = self.lookup_tx.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            sender
                .send(LookupReq { tokens, now, reply })
                .await
                .map_err(|_| Error::Unavailable("the vault is closed".into()))?;
            rx.await
                .map_err(|_| Error::Unavailable("the vault is closed".into()))?
        })
    }

    fn delete(&self, token: String, caller: Caller) -> StoreFuture<bool> {
        self.write(move |reply| WriteOp::Delete {
            token,
            caller,
            reply,
        })
    }

    fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()> {
        self.write(move |reply| WriteOp::Audit { entries, reply })
    }

    /// Two trips: the lookup (batched with this replica's concurrent lookups), then the
    /// records in the writer's next group.
    fn reveal(
        &self,
        tokens: Vec<String>,
        now: Micros,
        decide: RevealDecision,
    ) -> StoreFuture<Option<Vec<Option<TokenRow>>>> {
        let lookup = self.lookup(tokens, now);
        let sender = self.sender();
        Box::pin(async move {
            match decide(lookup.await?) {
                Ok(entries) => {
                    let (reply, rx) = oneshot::channel();
                    super::send_to_writer(sender, WriteOp::Audit { entries, reply }, rx).await?;
                    Ok(None)
                }
                Err(rows) => Ok(Some(rows)),
            }
        })
    }

    fn rotate_key(&self, caller: Caller, unless_rekey: bool) -> StoreFuture<u32> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                if unless_rekey && rekey_state(&*tx).await?.is_some() {
                    return Err(Error::FailedPrecondition(
                        crate::store::lifecycle::REWRAP_DURING_REKEY.into(),
                    ));
                }
                let v = rotate_in_tx(&tx, &keyring, st).await?;
                if let Some(last) = st.audit.last_mut() {
                    *last = AuditEntry::new(&caller, "key_rotate", &format!("key v{v}"), "OK", "");
                }
                v
            })
        })
    }

    fn key_rows(&self) -> StoreFuture<Vec<KeyRow>> {
        self.read(|client| async move { load_key_rows(&**client).await })
    }

    fn key_usage(&self) -> StoreFuture<Vec<KeyVersionInfo>> {
        self.read(|client| async move {
            let rows = load_key_rows(&**client).await?;
            let counts: HashMap<u32, u64> = client
                .query(
                    "SELECT key_version, COUNT(*) FROM tokens WHERE ciphertext IS NOT NULL \
                     GROUP BY key_version",
                    &[],
                )
                .await
                .map_err(map_err)?
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u64))
                .collect();
            Ok(rows
                .into_iter()
                .map(|k| KeyVersionInfo {
                    version: k.version,
                    state: k.state,
                    created_at: k.created_at,
                    encryptions: k.encryptions,
                    max_encryptions: 0,
                    rows: counts.get(&k.version).copied().unwrap_or(0),
                })
                .collect())
        })
    }

    fn add_client(&self, row: ClientRow, caller: Caller) -> StoreFuture<()> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                if tx
                    .query_opt("SELECT 1 FROM clients WHERE name = $1", &[&row.info.name])
                    .await
                    .map_err(map_err)?
                    .is_some()
                {
                    return Err(Error::AlreadyExists(format!(
                        "a client named {} already exists",
                        row.info.name
                    )));
                }
                if let Some(id) = &row.info.cert_identity {
                    if tx
                        .query_opt("SELECT 1 FROM clients WHERE cert_identity = $1", &[id])
                        .await
                        .map_err(map_err)?
                        .is_some()
                    {
                        return Err(Error::AlreadyExists(
                            "that certificate identity is bound to another client".into(),
                        ));
                    }
                }
                tx.execute(
                    "INSERT INTO clients(name, key_id, key_hash, roles, cert_identity, created_at, \
                     detokenize_rate, reuse_rate, reuse_group) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &row.info.name,
                        &row.key_id,
                        &row.key_hash.to_vec(),
                        &roles_to_text(&row.info.roles),
                        &row.info.cert_identity,
                        &row.info.created_at,
                        &row.info.detokenize_rate,
                        &row.info.reuse_rate,
                        &row.info.reuse_group,
                    ],
                )
                .await
                .map_err(map_err)?;
                bump_generation(&tx).await?;
                st.audit.push(AuditEntry::new(
                    &caller,
                    "client_add",
                    &row.info.name,
                    "OK",
                    &roles_to_text(&row.info.roles),
                ));
            })
        })
    }

    fn revoke_client(&self, name: String, caller: Caller) -> StoreFuture<bool> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                let n = tx
                    .execute(
                        "UPDATE clients SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                        &[&name, &now_micros()],
                    )
                    .await
                    .map_err(map_err)?;
                if n > 0 {
                    bump_generation(&tx).await?;
                }
                let outcome = if n > 0 { "OK" } else { "NOT_FOUND" };
                st.audit.push(AuditEntry::new(
                    &caller,
                    "client_revoke",
                    &name,
                    outcome,
                    "",
                ));
                n > 0
            })
        })
    }

    fn clients(&self) -> StoreFuture<Vec<ClientRow>> {
        self.read(|client| async move { query_clients(&**client).await })
    }

    fn add_admin_request(&self, row: AdminRequestRow, caller: Caller) -> StoreFuture<()> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                tx.execute(
                    "INSERT INTO admin_requests(id, operation, params, requester, created_at, \
                     expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &row.id,
                        &row.operation,
                        &row.params,
                        &row.requester,
                        &row.created_at,
                        &row.expires_at,
                    ],
                )
                .await
                .map_err(map_err)?;
                st.audit.push(AuditEntry::new(
                    &caller,
                    "admin_request",
                    &row.id,
                    "OK",
                    &format!("{} {}", row.operation, row.params),
                ));
            })
        })
    }

    fn admin_requests(&self) -> StoreFuture<Vec<AdminRequestRow>> {
        self.read(|client| async move {
            let rows = client
                .query(
                    &format!("{ADMIN_REQUEST_SELECT} ORDER BY created_at DESC, id"),
                    &[],
                )
                .await
                .map_err(map_err)?;
            Ok(rows.iter().map(admin_request_from_row).collect())
        })
    }

    fn approve_admin_request(
        &self,
        id: String,
        approver: Caller,
        now: Micros,
    ) -> StoreFuture<AdminRequestRow> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                // Every writing transaction holds the audit head's lock first (admin_tx), so
                // two replicas approving the same request are serialized here.
                let row = tx
                    .query_opt(&format!("{ADMIN_REQUEST_SELECT} WHERE id = $1"), &[&id])
                    .await
                    .map_err(map_err)?
                    .map(|r| admin_request_from_row(&r))
                    .ok_or_else(|| {
                        Error::FailedPrecondition("there is no admin request with that id".into())
                    })?;
                if row.approver.is_some() {
                    return Err(Error::FailedPrecondition(
                        "that request was already approved".into(),
                    ));
                }
                if row.requester == approver.principal {
                    return Err(Error::PermissionDenied(
                        "dual control: a request must be approved by a different admin".into(),
                    ));
                }
                if now > row.expires_at {
                    return Err(Error::FailedPrecondition(
                        "that request expired before it was approved; request it again".into(),
                    ));
                }
                let n = tx
                    .execute(
                        "UPDATE admin_requests SET approver = $2, approved_at = $3 \
                         WHERE id = $1 AND approver IS NULL",
                        &[&id, &approver.principal, &now],
                    )
                    .await
                    .map_err(map_err)?;
                if n != 1 {
                    return Err(Error::FailedPrecondition(
                        "that request was already approved".into(),
                    ));
                }
                st.audit.push(AuditEntry::new(
                    &approver,
                    "admin_approve",
                    &id,
                    "OK",
                    &format!("{} requested by {}", row.operation, row.requester),
                ));
                AdminRequestRow {
                    approver: Some(approver.principal.clone()),
                    approved_at: Some(now),
                    ..row
                }
            })
        })
    }

    fn audit_records(&self, from: u64, limit: usize) -> StoreFuture<Vec<AuditRecord>> {
        self.read(move |client| async move {
            let rows = client
                .query(
                    &format!(
                        "SELECT {AUDIT_COLS} FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2"
                    ),
                    &[&(from as i64), &(limit as i64)],
                )
                .await
                .map_err(map_err)?;
            Ok(rows.iter().map(audit_record_from_row).collect())
        })
    }

    fn generation(&self) -> StoreFuture<u64> {
        self.read(|client| async move { Ok(read_counter(&**client, "generation").await? as u64) })
    }

    fn audit_head(&self) -> StoreFuture<Option<(u64, Vec<u8>)>> {
        self.read(|client| async move { recorded_head(&**client).await })
    }

    fn audit_walk(&self, mut visit: AuditVisitor) -> StoreFuture<Option<(u64, Vec<u8>)>> {
        self.read(move |mut client| async move {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(map_err)?;
            let head = recorded_head(&*tx).await?;
            let sql = format!(
                "SELECT {AUDIT_COLS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT {WALK_CHUNK}"
            );
            let mut after = 0i64;
            loop {
                let rows = tx.query(&sql, &[&after]).await.map_err(map_err)?;
                for r in &rows {
                    let rec = audit_record_from_row(r);
                    after = rec.seq as i64;
                    visit(&rec);
                }
                if (rows.len() as i64) < WALK_CHUNK {
                    break;
                }
            }
            tx.commit().await.map_err(map_err)?;
            Ok(head)
        })
    }

    fn audit_checkpoint_source(&self) -> StoreFuture<CheckpointSource> {
        self.read(|mut client| async move {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(map_err)?;
            let head = tx
                .query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
                .await
                .map_err(map_err)?;
            let hash: Vec<u8> = head.get(1);
            let key = tx
                .query_opt(
                    "SELECT id, wrapped FROM audit_signing_keys WHERE state = 'active'",
                    &[],
                )
                .await
                .map_err(map_err)?
                .ok_or_else(|| {
                    Error::FailedPrecondition("the vault has no audit signing key".into())
                })?;
            let source = CheckpointSource {
                vault: vault_hex(&*tx).await?,
                seq: head.get::<_, i64>(0) as u64,
                hash: hash32(&hash)?,
                key_id: key.get::<_, i64>(0) as u32,
                wrapped_key: key.get(1),
            };
            tx.commit().await.map_err(map_err)?;
            Ok(source)
        })
    }

    fn audit_signing_keys(&self) -> StoreFuture<Vec<AuditSigningKeyInfo>> {
        self.read(|client| async move { query_signing_keys(&**client).await })
    }

    fn rotate_audit_signing_key(&self, caller: Caller) -> StoreFuture<(u32, AuditPublicKey)> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                rotate_signing_in_tx(&tx, &keyring, st, &caller).await?
            })
        })
    }

    fn rewrap_batch(&self, b: RewrapBatch, caller: Caller) -> StoreFuture<RewrapOutcome> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                if rekey_state(&*tx).await?.is_some() {
                    return Err(Error::FailedPrecondition(
                        crate::store::lifecycle::REWRAP_DURING_REKEY.into(),
                    ));
                }
                let started = Instant::now();
                let select = tx
                    .prepare_cached(concat!(
                        "SELECT ",
                        sealed_cols!(),
                        " FROM tokens WHERE id > $1 AND ciphertext IS NOT NULL AND \
                         (CASE WHEN $3::bigint IS NULL THEN key_version < $2 OR row_format < $5 \
                         ELSE key_version = $3 AND key_version < $2 END) ORDER BY id LIMIT $4"
                    ))
                    .await
                    .map_err(map_err)?;
                let update = tx
                    .prepare_cached(
                        "UPDATE tokens SET key_version = $2, nonce = $3, ciphertext = $4, \
                         row_format = $5 WHERE id = $1",
                    )
                    .await
                    .map_err(map_err)?;
                let mut out = RewrapOutcome {
                    active_version: st.active_version,
                    ..Default::default()
                };
                let mut snapshot = keyring.snapshot();
                let (mut cursor, mut seen) = (b.after_id, 0usize);
                let only = b.only_version.map(i64::from);
                let row_format = i64::from(crate::crypto::ROW_FORMAT);
                while seen < b.limit && started.elapsed() < ADMIN_TX_BUDGET {
                    let want = ((b.limit - seen) as i64).min(ADMIN_CHUNK);
                    let rows: Vec<SealedRow> = tx
                        .query(
                            &select,
                            &[&cursor, &i64::from(b.below), &only, &want, &row_format],
                        )
                        .await
                        .map_err(map_err)?
                        .iter()
                        .map(sealed_row)
                        .collect();
                    let Some(last) = rows.last() else { break };
                    cursor = last.id;
                    out.last_id = Some(last.id);
                    seen += rows.len();
                    for row in &rows {
                        if keyring.needs_rotation(
                            st.active_count,
                            1,
                            st.active_created,
                            now_micros(),
                        ) {
                            rotate_in_tx(&tx, &keyring, st).await?;
                            snapshot = keyring.snapshot();
                        }
                        let Some(old) = snapshot.get(row.key_version) else {
                            out.failed.push(row.token.clone());
                            continue;
                        };
                        let Ok(plain) = old.open(
                            row.row_format,
                            &row.token,
                            &row.bound_meta,
                            &row.nonce,
                            &row.ciphertext,
                        ) else {
                            out.failed.push(row.token.clone());
                            continue;
                        };
                        let sealed = snapshot.active.seal(&row.token, &row.bound_meta, &plain);
                        let version = snapshot.active.version();
                        tx.execute(
                            &update,
                            &[
                                &row.id,
                                &i64::from(version),
                                &&sealed.nonce[..],
                                &sealed.ciphertext,
                                &row_format,
                            ],
                        )
                        .await
                        .map_err(map_err)?;
                        st.active_count += 1;
                        *st.counts.entry(version).or_insert(0) += 1;
                        out.rewrapped += 1;
                        out.active_version = version;
                    }
                    if (rows.len() as i64) < want {
                        break;
                    }
                }
                if out.rewrapped > 0 || !out.failed.is_empty() {
                    st.audit.push(AuditEntry::new(
                        &caller,
                        "key_rewrap",
                        &format!("key v{}", out.active_version),
                        if out.failed.is_empty() {
                            "OK"
                        } else {
                            "DATA_LOSS"
                        },
                        &format!(
                            "{} rows re-sealed, {} failed",
                            out.rewrapped,
                            out.failed.len()
                        ),
                    ));
                }
                out
            })
        })
    }

    fn retire_key(&self, version: u32, caller: Caller) -> StoreFuture<bool> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                let v = i64::from(version);
                let state: Option<String> = tx
                    .query_opt("SELECT state FROM data_keys WHERE version = $1", &[&v])
                    .await
                    .map_err(map_err)?
                    .map(|r| r.get(0));
                match state.as_deref().and_then(KeyState::parse) {
                    None => {
                        return Err(Error::FailedPrecondition(format!(
                            "there is no key version {version}"
                        )))
                    }
                    Some(KeyState::Active) => {
                        return Err(Error::FailedPrecondition(format!(
                            "v{version} is the active version: rotate first, or use `keys revoke {version}`"
                        )))
                    }
                    Some(KeyState::Retired) => false,
                    Some(KeyState::DecryptOnly) => {
                        let rows: i64 = tx
                            .query_one(
                                "SELECT COUNT(*) FROM tokens WHERE key_version = $1 AND ciphertext IS NOT NULL",
                                &[&v],
                            )
                            .await
                            .map_err(map_err)?
                            .get(0);
                        if rows > 0 {
                            return Err(Error::FailedPrecondition(format!(
                                "{rows} tokens are still sealed under v{version}; run `tokenvault keys rewrap` first"
                            )));
                        }
                        tx.execute(
                            "UPDATE data_keys SET state = 'retired', wrapped = '\\x'::bytea WHERE version = $1",
                            &[&v],
                        )
                        .await
                        .map_err(map_err)?;
                        bump_generation(&tx).await?;
                        st.audit.push(AuditEntry::new(
                            &caller,
                            "key_retire",
                            &format!("key v{version}"),
                            "OK",
                            "",
                        ));
                        true
                    }
                }
            })
        })
    }

    fn rekey_begin(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<super::RekeyState> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                if rekey_state(&*tx).await?.is_some() {
                    return Err(Error::FailedPrecondition(
                        "a rekey is already in progress: run `keys rotate-master --rekey` \
                         again with the new master key to finish it"
                            .into(),
                    ));
                }
                if crate::crypto::ct_eq(&read_meta(&*tx, "key_check").await?, &new_check) {
                    return Err(Error::InvalidArgument(
                        "the new master key is the vault's current master key".into(),
                    ));
                }
                let fingerprint = read_meta(&*tx, "wrapped_fingerprint_key").await?;
                if !keyring.master_opens(&fingerprint)? {
                    return Err(Error::FailedPrecondition(
                        "the master key was rotated by another process meanwhile".into(),
                    ));
                }
                rewrap_kept_keys(&tx, &keyring, &new_kwk).await?;
                let fingerprint =
                    keyring.rewrap_under(&new_kwk, &fingerprint, KeyPurpose::Fingerprint)?;
                let mut layers = keyring.rewrap_layers(
                    &new_kwk,
                    &meta_opt(&*tx, "fingerprint_layers")
                        .await?
                        .unwrap_or_default(),
                )?;
                let layer = (layers.len() / crate::crypto::WRAPPED_KEY_LEN) as u32 + 1;
                layers.extend(crate::keyring::new_wrapped_key(
                    &new_kwk,
                    KeyPurpose::FingerprintLayer(layer),
                )?);
                let max: i64 = tx
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM data_keys", &[])
                    .await
                    .map_err(map_err)?
                    .get(0);
                let version = (max + 1) as u32;
                let now = now_micros();
                tx.execute(
                    "UPDATE data_keys SET state = 'decrypt_only' WHERE state = 'active'",
                    &[],
                )
                .await
                .map_err(map_err)?;
                tx.execute(
                    "INSERT INTO data_keys(version, wrapped, state, created_at) \
                     VALUES ($1, $2, 'active', $3)",
                    &[
                        &i64::from(version),
                        &crate::keyring::new_wrapped_key(&new_kwk, KeyPurpose::Data(version))?,
                        &now,
                    ],
                )
                .await
                .map_err(map_err)?;
                st.active_version = version;
                st.active_count = 0;
                st.active_created = now;
                // The switch: this record is the last one MACed under the old audit key.
                st.audit.push(AuditEntry::new(
                    &caller,
                    "master_rekey",
                    "master key",
                    "OK",
                    &format!(
                        "new master key; data key v{version} and fingerprint layer {layer} \
                         created; records after this one are MACed under a new audit key"
                    ),
                ));
                st.audit_key_switch = true;
                let new_from = st.audit_seq + st.audit.len() as u64 + 1;
                let old_from =
                    super::sqlite::audit_key_from(meta_opt(&*tx, "audit_key_from").await?)?;
                let mut retired = keyring.rewrap_retired_audit(
                    &new_kwk,
                    &meta_opt(&*tx, "retired_audit_keys")
                        .await?
                        .unwrap_or_default(),
                )?;
                retired.extend_from_slice(&old_from.to_be_bytes());
                retired.extend(keyring.rewrap_as(
                    &new_kwk,
                    &read_meta(&*tx, "wrapped_audit_key").await?,
                    KeyPurpose::Audit,
                    KeyPurpose::RetiredAudit(old_from),
                )?);
                let audit_key = crate::keyring::new_wrapped_key(&new_kwk, KeyPurpose::Audit)?;
                let end_id: i64 = tx
                    .query_one("SELECT COALESCE(MAX(id), 0)::bigint FROM tokens", &[])
                    .await
                    .map_err(map_err)?
                    .get(0);
                let state = super::RekeyState {
                    version,
                    end_id,
                    cursor: 0,
                };
                for (k, v) in [
                    ("key_check", new_check.clone()),
                    ("wrapped_fingerprint_key", fingerprint),
                    ("fingerprint_layers", layers),
                    ("wrapped_audit_key", audit_key),
                    ("retired_audit_keys", retired),
                    ("audit_key_from", new_from.to_be_bytes().to_vec()),
                    ("rekey", state.encode()),
                ] {
                    meta_set(&*tx, k, &v).await?;
                }
                bump_generation(&tx).await?;
                state
            })
        })
    }

    fn rekey_batch(&self, limit: usize, caller: Caller) -> StoreFuture<super::RekeyOutcome> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                let started = Instant::now();
                let Some(mut state) = rekey_state(&*tx).await? else {
                    return Err(Error::FailedPrecondition("no rekey is in progress".into()));
                };
                let fingerprints = keyring.fingerprints();
                if fingerprints.relayer(&[0; 32]).is_none()
                    || keyring.snapshot().get(state.version).is_none()
                {
                    return Err(Error::FailedPrecondition(
                        crate::store::lifecycle::REKEY_NEW_KEYS.into(),
                    ));
                }
                let select = tx
                    .prepare_cached(concat!(
                        "SELECT ",
                        sealed_cols!(),
                        // Old versions only: a row written after the switch already has the
                        // new keys and layer (ids are never reused here, but keep both
                        // stores' rule the same).
                        ", fingerprint FROM tokens WHERE id > $1 AND id <= $2 \
                         AND ciphertext IS NOT NULL AND key_version < $4 ORDER BY id LIMIT $3"
                    ))
                    .await
                    .map_err(map_err)?;
                let update = tx
                    .prepare_cached(
                        "UPDATE tokens SET key_version = $2, nonce = $3, ciphertext = $4, \
                         row_format = $5, fingerprint = $6 WHERE id = $1",
                    )
                    .await
                    .map_err(map_err)?;
                let mut out = super::RekeyOutcome {
                    more: true,
                    ..Default::default()
                };
                let mut snapshot = keyring.snapshot();
                let row_format = i64::from(crate::crypto::ROW_FORMAT);
                let mut seen = 0usize;
                while seen < limit && started.elapsed() < ADMIN_TX_BUDGET {
                    let want = ((limit - seen) as i64).min(ADMIN_CHUNK);
                    let rows = tx
                        .query(
                            &select,
                            &[
                                &state.cursor,
                                &state.end_id,
                                &want,
                                &i64::from(state.version),
                            ],
                        )
                        .await
                        .map_err(map_err)?;
                    seen += rows.len();
                    for r in &rows {
                        let row = sealed_row(r);
                        let fp: Option<Vec<u8>> = r.get(13);
                        state.cursor = row.id;
                        if keyring.needs_rotation(
                            st.active_count,
                            1,
                            st.active_created,
                            now_micros(),
                        ) {
                            rotate_in_tx(&tx, &keyring, st).await?;
                            snapshot = keyring.snapshot();
                        }
                        let fp = match fp.as_deref().map(<[u8; 32]>::try_from) {
                            None => None,
                            Some(Ok(f)) => fingerprints.relayer(&f).map(|f| f.to_vec()),
                            Some(Err(_)) => {
                                return Err(Error::DataLoss(format!(
                                    "token {} has a malformed fingerprint",
                                    row.token
                                )))
                            }
                        };
                        let plain = snapshot.get(row.key_version).and_then(|old| {
                            old.open(
                                row.row_format,
                                &row.token,
                                &row.bound_meta,
                                &row.nonce,
                                &row.ciphertext,
                            )
                            .ok()
                        });
                        let Some(plain) = plain else {
                            out.failed.push(row.token.clone());
                            tx.execute(
                                "UPDATE tokens SET fingerprint = $2 WHERE id = $1",
                                &[&row.id, &fp],
                            )
                            .await
                            .map_err(map_err)?;
                            continue;
                        };
                        let sealed = snapshot.active.seal(&row.token, &row.bound_meta, &plain);
                        let version = snapshot.active.version();
                        tx.execute(
                            &update,
                            &[
                                &row.id,
                                &i64::from(version),
                                &&sealed.nonce[..],
                                &sealed.ciphertext,
                                &row_format,
                                &fp,
                            ],
                        )
                        .await
                        .map_err(map_err)?;
                        st.active_count += 1;
                        *st.counts.entry(version).or_insert(0) += 1;
                        out.resealed += 1;
                    }
                    if (rows.len() as i64) < want {
                        out.more = false;
                        break;
                    }
                }
                meta_set(&*tx, "rekey", &state.encode()).await?;
                if out.resealed > 0 || !out.failed.is_empty() {
                    st.audit.push(AuditEntry::new(
                        &caller,
                        "master_rekey_reseal",
                        &format!("key v{}", st.active_version),
                        if out.failed.is_empty() {
                            "OK"
                        } else {
                            "DATA_LOSS"
                        },
                        &format!(
                            "{} rows re-sealed, {} failed",
                            out.resealed,
                            out.failed.len()
                        ),
                    ));
                }
                out
            })
        })
    }

    fn rekey_finish(&self, caller: Caller) -> StoreFuture<u32> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                let Some(state) = rekey_state(&*tx).await? else {
                    return Err(Error::FailedPrecondition("no rekey is in progress".into()));
                };
                if keyring.snapshot().get(state.version).is_none() {
                    return Err(Error::FailedPrecondition(
                        crate::store::lifecycle::REKEY_NEW_KEYS.into(),
                    ));
                }
                let left: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM tokens WHERE id > $1 AND id <= $2 \
                         AND ciphertext IS NOT NULL AND key_version < $3",
                        &[&state.cursor, &state.end_id, &i64::from(state.version)],
                    )
                    .await
                    .map_err(map_err)?
                    .get(0);
                if left > 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "{left} rows are not re-sealed yet; run `keys rotate-master --rekey` again"
                    )));
                }
                let old: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM tokens WHERE key_version < $1 \
                         AND ciphertext IS NOT NULL",
                        &[&i64::from(state.version)],
                    )
                    .await
                    .map_err(map_err)?
                    .get(0);
                if old > 0 {
                    return Err(Error::DataLoss(format!(
                        "{old} tokens failed authentication and could not be re-sealed, so \
                         the old data keys stay usable for them; investigate with \
                         `tokenvault check --full`"
                    )));
                }
                let retired = tx
                    .execute(
                        "UPDATE data_keys SET state = 'retired', wrapped = ''::bytea \
                         WHERE version < $1 AND state <> 'retired'",
                        &[&i64::from(state.version)],
                    )
                    .await
                    .map_err(map_err)?;
                tx.execute("DELETE FROM meta WHERE key = 'rekey'", &[])
                    .await
                    .map_err(map_err)?;
                bump_generation(&tx).await?;
                st.audit.push(AuditEntry::new(
                    &caller,
                    "master_rekey_done",
                    "master key",
                    "OK",
                    &format!(
                        "every row re-sealed under v{}; {retired} old data keys destroyed",
                        state.version
                    ),
                ));
                // The old master and an earlier backup still open the signing key: replace
                // it, so they cannot sign a checkpoint over the chain from here on.
                rotate_signing_in_tx(&tx, &keyring, st, &caller).await?;
                retired as u32
            })
        })
    }

    fn rotate_master(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<u32> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                if rekey_state(&*tx).await?.is_some() {
                    return Err(Error::FailedPrecondition(
                        crate::store::lifecycle::REKEY_IN_PROGRESS.into(),
                    ));
                }
                let old_check = read_meta(&*tx, "key_check").await?;
                if crate::crypto::ct_eq(&old_check, &new_check) {
                    return Err(Error::InvalidArgument(
                        "the new master key is the vault's current master key".into(),
                    ));
                }
                let fingerprint = read_meta(&*tx, "wrapped_fingerprint_key").await?;
                if !keyring.master_opens(&fingerprint)? {
                    return Err(Error::FailedPrecondition(
                        "the master key was rotated by another process meanwhile".into(),
                    ));
                }
                let audit_key = read_meta(&*tx, "wrapped_audit_key").await?;
                let rewrapped = rewrap_kept_keys(&tx, &keyring, &new_kwk).await?;
                let fingerprint =
                    keyring.rewrap_under(&new_kwk, &fingerprint, KeyPurpose::Fingerprint)?;
                let audit_key = keyring.rewrap_under(&new_kwk, &audit_key, KeyPurpose::Audit)?;
                for (k, v) in [
                    ("wrapped_fingerprint_key", &fingerprint),
                    ("wrapped_audit_key", &audit_key),
                    ("key_check", &new_check),
                ] {
                    tx.execute("UPDATE meta SET value = $2 WHERE key = $1", &[&k, v])
                        .await
                        .map_err(map_err)?;
                }
                bump_generation(&tx).await?;
                st.audit.push(AuditEntry::new(
                    &caller,
                    "master_rotate",
                    "master key",
                    "OK",
                    &format!("{rewrapped} data keys, fingerprint and audit key re-wrapped"),
                ));
                rewrapped
            })
        })
    }

    fn vault_id(&self) -> StoreFuture<Vec<u8>> {
        self.read(|client| async move { read_meta(&**client, "vault_id").await })
    }

    fn rows_by_version(&self) -> StoreFuture<Vec<(u32, u64)>> {
        self.read(|client| async move {
            Ok(client
                .query(
                    "SELECT key_version, COUNT(*) FROM tokens WHERE ciphertext IS NOT NULL \
                     GROUP BY key_version ORDER BY key_version",
                    &[],
                )
                .await
                .map_err(map_err)?
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    fn sealed_rows(&self, after_id: i64, limit: usize) -> StoreFuture<Vec<SealedRow>> {
        self.read(move |client| async move {
            Ok(client
                .query(
                    concat!(
                        "SELECT ",
                        sealed_cols!(),
                        " FROM tokens WHERE id > $1 AND ciphertext IS NOT NULL ORDER BY id LIMIT $2"
                    ),
                    &[&after_id, &(limit as i64)],
                )
                .await
                .map_err(map_err)?
                .iter()
                .map(sealed_row)
                .collect())
        })
    }

    fn sample_sealed_rows(&self, n: usize) -> StoreFuture<Vec<SealedRow>> {
        self.read(move |client| async move {
            Ok(client
                .query(
                    concat!(
                        "SELECT ",
                        sealed_cols!(),
                        " FROM tokens WHERE id IN (SELECT id FROM tokens WHERE ciphertext IS NOT NULL \
                         ORDER BY random() LIMIT $1) ORDER BY id"
                    ),
                    &[&(n as i64)],
                )
                .await
                .map_err(map_err)?
                .iter()
                .map(sealed_row)
                .collect())
        })
    }

    fn integrity_check(&self) -> StoreFuture<Vec<String>> {
        // PostgreSQL checks its own pages (data checksums, amcheck by the DBA); what the
        // vault can check is its own invariants across tables.
        self.read(|client| async move {
            let mut problems = Vec::new();
            let active: i64 = client
                .query_one("SELECT COUNT(*) FROM data_keys WHERE state = 'active'", &[])
                .await
                .map_err(map_err)?
                .get(0);
            if active != 1 {
                problems.push(format!("{active} active data key versions (expected 1)"));
            }
            let orphans: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM tokens t WHERE ciphertext IS NOT NULL AND NOT EXISTS \
                     (SELECT 1 FROM data_keys k WHERE k.version = t.key_version)",
                    &[],
                )
                .await
                .map_err(map_err)?
                .get(0);
            if orphans > 0 {
                problems.push(format!(
                    "{orphans} rows name a key version that does not exist"
                ));
            }
            let head = client
                .query_one(
                    "SELECT h.seq, COALESCE((SELECT MAX(seq) FROM audit), 0), \
                     (SELECT COUNT(*) FROM audit) FROM audit_head h WHERE h.id = 1",
                    &[],
                )
                .await
                .map_err(map_err)?;
            let (head_seq, max_seq, count): (i64, i64, i64) =
                (head.get(0), head.get(1), head.get(2));
            if head_seq != max_seq || count != max_seq {
                problems.push(format!(
                    "audit head {head_seq}, newest record {max_seq}, {count} records"
                ));
            }
            Ok(problems)
        })
    }

    /// The portable snapshot format: a SQLite vault file, written from one REPEATABLE READ
    /// snapshot (see [`super::copy`]), so `restore` takes it whatever store it came from.
    fn backup_to(&self, out: PathBuf) -> StoreFuture<u64> {
        let shared = self.shared.clone();
        let (reply, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = reply.send(backup_to_file(&shared, &out));
        });
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::Internal("the backup thread stopped".into()))?
        })
    }

    fn purge_count(
        &self,
        deleted_before: Option<Micros>,
        expired_before: Option<Micros>,
    ) -> StoreFuture<(u64, u64)> {
        self.read(move |client| async move {
            let r = client
                .query_one(
                    "SELECT \
                     COUNT(*) FILTER (WHERE $1::bigint IS NOT NULL AND deleted_at IS NOT NULL AND deleted_at < $1), \
                     COUNT(*) FILTER (WHERE $2::bigint IS NOT NULL AND deleted_at IS NULL \
                                      AND expires_at IS NOT NULL AND expires_at < $2) \
                     FROM tokens",
                    &[&deleted_before, &expired_before],
                )
                .await
                .map_err(map_err)?;
            Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        })
    }

    fn purge_batch(&self, b: PurgeBatch, caller: Caller) -> StoreFuture<PurgeOutcome> {
        self.admin(move |keyring, pool| async move {
            admin_tx!(pool, keyring, |tx, st| {
                let started = Instant::now();
                let select = tx
                    .prepare_cached(
                        "SELECT id, deleted_at IS NOT NULL FROM tokens WHERE id > $1 AND ( \
                         ($2::bigint IS NOT NULL AND deleted_at IS NOT NULL AND deleted_at < $2) OR \
                         ($3::bigint IS NOT NULL AND deleted_at IS NULL AND expires_at IS NOT NULL \
                          AND expires_at < $3)) ORDER BY id LIMIT $4",
                    )
                    .await
                    .map_err(map_err)?;
                let mut out = PurgeOutcome::default();
                let (mut cursor, mut seen) = (b.after_id, 0usize);
                while seen < b.limit && started.elapsed() < ADMIN_TX_BUDGET {
                    let want = ((b.limit - seen) as i64).min(ADMIN_CHUNK);
                    let rows = tx
                        .query(&select, &[&cursor, &b.deleted_before, &b.expired_before, &want])
                        .await
                        .map_err(map_err)?;
                    let Some(last) = rows.last() else { break };
                    cursor = last.get(0);
                    out.last_id = Some(cursor);
                    seen += rows.len();
                    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                    tx.execute("DELETE FROM tokens WHERE id = ANY($1)", &[&ids])
                        .await
                        .map_err(map_err)?;
                    for r in &rows {
                        if r.get::<_, bool>(1) {
                            out.deleted += 1;
                        } else {
                            out.expired += 1;
                        }
                    }
                    if (rows.len() as i64) < want {
                        break;
                    }
                }
                if out.deleted + out.expired > 0 {
                    st.audit.push(AuditEntry::new(
                        &caller,
                        "purge",
                        "tokens",
                        "OK",
                        &format!("{} deleted, {} expired rows removed", out.deleted, out.expired),
                    ));
                }
                out
            })
        })
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn pause_checkpoints(&self) -> CheckpointPause {
        CheckpointPause::none()
    }

    fn close(&self) -> StoreFuture<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.writer_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let done = self
            .writer_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Box::pin(async move {
            if let Some(done) = done {
                let _ = done.await;
            }
            Ok(())
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.writer_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

fn backup_to_file(shared: &Arc<PgShared>, out: &std::path::Path) -> Result<u64> {
    if out.exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already exists",
            out.display()
        )));
    }
    let tmp = PathBuf::from(format!("{}.partial-{}", out.display(), std::process::id()));
    super::copy::copy(
        &super::copy::Endpoint::Postgres(shared.clone()),
        &super::copy::Endpoint::Sqlite(tmp.clone()),
        |_| {},
    )?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Unavailable(format!("cannot move the backup to {}: {e}", out.display()))
    })?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::Unavailable(format!("fsync {}: {e}", dir.display())))?;
    }
    Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
}

async fn recorded_head(c: &impl tokio_postgres::GenericClient) -> Result<Option<(u64, Vec<u8>)>> {
    let r = c
        .query_opt("SELECT seq, mac FROM audit_head WHERE id = 1", &[])
        .await
        .map_err(map_err)?;
    Ok(r.and_then(|r| {
        let seq: i64 = r.get(0);
        (seq > 0).then(|| (seq as u64, r.get(1)))
    }))
}
