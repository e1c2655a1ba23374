//! The embedded SQLite store: one database file, one writer thread that owns the write
//! connection and commits in groups, and a pool of read-only connections on their own
//! threads.
//!
//! Durability: `journal_mode=WAL` and `synchronous=FULL` are set and read back at open; a
//! caller is answered only after the `COMMIT` of the group holding its write returned. A
//! failed commit fails every request of its group and acknowledges none. A disk that stops
//! answering holds no caller for long: a serving write waits at most [`WRITE_WAIT`], and once
//! the writer has been on one operation for [`STALL_LIMIT`] the store reports itself
//! unhealthy and refuses new serving writes at once (see [`Pulse`]). Reads are bounded the
//! same way, and a read that hangs never holds every runtime worker (see [`ReadPool`]).
//!
//! Destruction: every connection runs with `secure_delete=ON`, and a commit that destroys
//! data bumps `destroy_seq` in `meta`; the checkpointer of every process with the vault open
//! then truncates the WAL (and opening a vault truncates it too), so destroyed ciphertexts
//! leave every file of the data directory within a few checkpoint ticks.
//!
//! Other processes (the admin CLI) may change keys and clients while a server runs. Such
//! changes bump the `generation` counter in `meta`, which a running vault polls to reload
//! clients and keys. The writer itself reads the active key version at the start of each
//! transaction and reloads the keyring when it moved, so it never seals under a version that
//! is no longer active.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::{mpsc, oneshot};

use super::lifecycle::{self, PurgeBatch, PurgeOutcome, RewrapBatch, RewrapOutcome, SealedRow};
use super::migrations;
use super::space;
use super::{
    AdminRequestRow, AuditSigningKeyInfo, AuditVisitor, CheckpointPause, CheckpointSource,
    ClientRow, NewToken, RevealDecision, Storage, StoreFuture, StoredToken, TokenMeta, TokenRow,
    VaultHeader,
};
use crate::audit::{self, canonical_bytes, AuditEntry, AuditRecord, GENESIS_MAC};
use crate::auth::Role;
use crate::card::Brand;
use crate::crypto::KeyWrappingKey;
use crate::crypto::{audit_chain_hash, AuditPublicKey, AUDIT_GENESIS_HASH};
use crate::error::{outcome_of, Error, Result};
use crate::keyring::{KeyRow, Keyring};
use crate::model::{now_micros, Caller, ClientInfo, KeyState, KeyVersionInfo, Micros};
use crate::token::{self, TokenFormat};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "vault.db";
/// Draws of a new token before a shaped format's space is declared exhausted.
pub(crate) const MAX_TOKEN_DRAWS: usize = 32;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;
/// Lookups of at most this many tokens run on the caller's thread (see [`ReadPool`]).
const INLINE_LOOKUP: usize = 16;
/// The writer reads the database file through a memory map (readers do not: see
/// [`open_reader`]; the WAL is read normally).
const MMAP_SIZE: i64 = 1 << 30;
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// A serving write (tokenize, delete, an audit record) waits at most this long for its
/// commit, then its caller hears UNAVAILABLE: a disk that stops answering (a hung volume, a
/// frozen filesystem) must not hold callers for as long as it hangs. The same bound as the
/// PostgreSQL store's.
const WRITE_WAIT: Duration = Duration::from_secs(10);
/// Once the writer has been on one operation this long, the store reports itself unhealthy
/// and refuses new serving writes at once instead of queueing them behind it (see [`Pulse`]).
const STALL_LIMIT: Duration = Duration::from_secs(5);
/// A lookup handed to a reader thread waits at most this long for it (see [`ReadPool`]).
const READ_WAIT: Duration = WRITE_WAIT;

pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(C::DiskFull) => Error::ResourceExhausted("storage is full".into()),
            Some(C::ReadOnly)
            | Some(C::CannotOpen)
            | Some(C::DatabaseBusy)
            | Some(C::DatabaseLocked)
            | Some(C::SystemIoFailure)
            | Some(C::PermissionDenied) => Error::Unavailable(e.to_string()),
            Some(C::NotADatabase) | Some(C::DatabaseCorrupt) => Error::Unavailable(format!(
                "the vault database is damaged or not a tokenvault database ({e})"
            )),
            _ => Error::Internal(format!("sqlite: {e}")),
        }
    }
}

/// Re-creates an error for each caller of a failed group (errors are not `Clone`).
/// Exhaustive, so every caller sees the code the group failed with.
pub(crate) fn duplicate(e: &Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
        Error::NotFound => Error::NotFound,
        Error::Unauthenticated(m) => Error::Unauthenticated(m),
        Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
        Error::DataLoss(m) => Error::DataLoss(m.clone()),
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::WrongMasterKey => Error::WrongMasterKey,
        Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
        Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
        Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
        Error::Cancelled(m) => Error::Cancelled(m),
        Error::Internal(m) => Error::Internal(m.clone()),
    }
}

/// `secure_delete=ON`, read back: SQLite then overwrites deleted cells and freed pages with
/// zeros, so a destroyed ciphertext does not linger in the free space of a page. It is a
/// per-connection setting, so every connection the store opens goes through here.
pub(super) fn enable_secure_delete(conn: &Connection) -> Result<()> {
    let on: i64 = conn.query_row("PRAGMA secure_delete = ON", [], |r| r.get(0))?;
    if on != 1 {
        return Err(Error::Unavailable(format!(
            "could not enable secure_delete (got {on})"
        )));
    }
    Ok(())
}

/// Counts a commit that destroyed data (a ciphertext, a wrapped key), in the same
/// transaction. Every process with the vault open watches the counter and truncates the WAL
/// once it moved, so the old bytes leave the WAL too ([`SqliteStore::start_prober`]).
pub(super) fn mark_destroyed(tx: &Transaction<'_>) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('destroy_seq', 1) \
         ON CONFLICT(key) DO UPDATE SET value = value + 1",
    )?
    .execute([])?;
    Ok(())
}

fn read_destroy_seq(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'destroy_seq'")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// `wal_checkpoint(TRUNCATE)`: copies every frame back and truncates the WAL to zero bytes.
/// True when it completed; false when a reader or writer (of any process) kept it from
/// finishing within the connection's busy timeout.
pub(super) fn checkpoint_truncate(conn: &Connection) -> Result<bool> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    Ok(busy == 0 && log <= 0 && done <= 0)
}

/// `wal_checkpoint(RESTART)`: copies every frame back and makes the next commit write the
/// WAL from its start, over the blocks the file already has. The file keeps its size (at
/// most the journal size limit), and a commit's fsync then flushes data only: appending to
/// a file that was truncated to zero also makes every fsync commit the file's new size to
/// the filesystem's journal. Old frames stay in the file until overwritten, so this is for
/// bounding the WAL only; destroyed data needs [`checkpoint_truncate`]. True when it
/// completed (every frame copied back, no reader left on the WAL).
fn checkpoint_restart(conn: &Connection) -> Result<bool> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    Ok(busy == 0 && log == done)
}

pub(super) fn set_pragmas(conn: &Connection, max_storage_bytes: Option<u64>) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_secure_delete(conn)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Unavailable(format!(
            "could not enable WAL journal mode (got {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync != 2 {
        return Err(Error::Unavailable(format!(
            "could not set synchronous=FULL (got {sync})"
        )));
    }
    conn.pragma_update(None, "cache_size", -32_000)?;
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    if let Some(bytes) = max_storage_bytes {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (bytes as i64 / page_size).max(1);
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
    }
    Ok(())
}

/// Reads the vault header with a read-only connection, before anything is written.
pub fn read_header(data_dir: &Path) -> Result<VaultHeader> {
    let path = db_path(data_dir);
    if !path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "no vault at {} (run `tokenvault init` first)",
            data_dir.display()
        )));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_secure_delete(&conn)?;
    let version = migrations::check_not_newer(&conn)?;
    if version < 1 {
        return Err(Error::FailedPrecondition(format!(
            "{} is not an initialised vault",
            path.display()
        )));
    }
    let get = |key: &str| -> Result<Vec<u8>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .optional()?
        .ok_or_else(|| Error::FailedPrecondition(format!("vault metadata `{key}` is missing")))
    };
    Ok(VaultHeader {
        vault_id: get("vault_id")?,
        key_check: get("key_check")?,
        wrapped_fingerprint_key: get("wrapped_fingerprint_key")?,
        wrapped_audit_key: get("wrapped_audit_key")?,
        layers: crate::store::KeyLayers::from_meta(|key| {
            Ok(conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                    r.get::<_, Vec<u8>>(0)
                })
                .optional()?)
        })?,
    })
}

/// True when `serve --dev` created the vault in `data_dir` (recorded in its `meta` at
/// creation); false for every other vault, whatever files sit beside it.
pub fn is_dev_vault(data_dir: &Path) -> Result<bool> {
    let conn = Connection::open_with_flags(db_path(data_dir), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let dev: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'dev_vault'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(dev == Some(1))
}

/// Creates the database of a new vault with its header and first data key.
///
/// `dev` records that `serve --dev` created it: only such a vault may be opened with the
/// generated key file beside its data ([`is_dev_vault`]).
pub fn create_database(
    data_dir: &Path,
    header: &VaultHeader,
    wrapped_data_key: &[u8],
    dev: bool,
) -> Result<()> {
    let path = db_path(data_dir);
    if path.exists() {
        return Err(Error::AlreadyExists(format!(
            "a vault already exists at {}",
            data_dir.display()
        )));
    }
    // Owner-only from the first byte, whatever the umask or the directory's mode: SQLite
    // gives the -wal and -shm files the database file's permissions.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", path.display())))?;
    }
    let mut conn = Connection::open(&path)?;
    set_pragmas(&conn, None)?;
    migrations::migrate(&mut conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let now = now_micros();
    for (k, v) in [
        ("vault_id", &header.vault_id),
        ("key_check", &header.key_check),
        ("wrapped_fingerprint_key", &header.wrapped_fingerprint_key),
        ("wrapped_audit_key", &header.wrapped_audit_key),
    ] {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)",
            params![k, v],
        )?;
    }
    tx.execute("INSERT INTO meta(key, value) VALUES ('generation', 1)", [])?;
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('created_at', ?1)",
        [now],
    )?;
    if dev {
        tx.execute("INSERT INTO meta(key, value) VALUES ('dev_vault', 1)", [])?;
    }
    tx.execute(
        "INSERT INTO data_keys(version, wrapped, state, created_at) VALUES (1, ?1, 'active', ?2)",
        params![wrapped_data_key, now],
    )?;
    tx.commit()?;
    Ok(())
}

pub(super) fn load_key_rows(conn: &Connection) -> Result<Vec<KeyRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, wrapped, state, created_at, encryptions FROM data_keys ORDER BY version",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, String>(2)?,
            r.get(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (version, wrapped, state, created_at, encryptions) = row?;
        let state = KeyState::parse(&state)
            .ok_or_else(|| Error::Internal(format!("unknown key state for v{version}")))?;
        out.push(KeyRow {
            version: version as u32,
            wrapped,
            state,
            created_at,
            encryptions: encryptions as u64,
        });
    }
    Ok(out)
}

fn read_generation(conn: &Connection) -> Result<u64> {
    let g: i64 = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'generation'")?
        .query_row([], |r| r.get(0))?;
    Ok(g as u64)
}

pub(super) fn bump_generation(tx: &Transaction<'_>) -> Result<()> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'generation'",
        [],
    )?;
    Ok(())
}

fn meta_from_row(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<TokenMeta> {
    let format: i64 = r.get(base)?;
    Ok(TokenMeta {
        format: TokenFormat::from_code(format).unwrap_or_default(),
        brand: Brand::from_code(r.get(base + 1)?),
        pan_length: r.get::<_, i64>(base + 2)? as u32,
        bin: r.get(base + 3)?,
        last4: r.get(base + 4)?,
        created_at: r.get(base + 5)?,
        expires_at: r.get(base + 6)?,
    })
}

/// Row format and [`super::canonical_meta`] of a row, from the raw values of the metadata
/// columns at `base` (in [`meta_cols!`] order) followed by `row_format`.
pub(super) fn binding_from_row(
    r: &rusqlite::Row<'_>,
    base: usize,
) -> rusqlite::Result<(u32, Vec<u8>)> {
    let bin: String = r.get(base + 3)?;
    let last4: String = r.get(base + 4)?;
    let meta = super::canonical_meta(
        r.get(base)?,
        r.get(base + 1)?,
        r.get(base + 2)?,
        &bin,
        &last4,
        r.get(base + 5)?,
        r.get(base + 6)?,
    );
    let format = u32::try_from(r.get::<_, i64>(base + 7)?).unwrap_or(u32::MAX);
    Ok((format, meta))
}

/// The metadata columns, as a macro so statements are `&'static str` (no per-row formatting).
macro_rules! meta_cols {
    () => {
        "format, brand, pan_length, bin, last4, created_at, expires_at"
    };
}

const SQL_REUSE: &str = concat!(
    "SELECT token, key_version, ",
    meta_cols!(),
    " FROM tokens WHERE fingerprint IN (?1, ?4) AND format = ?2 AND deleted_at IS NULL \
     AND (expires_at IS NULL OR expires_at > ?3) ORDER BY id LIMIT 1"
);
const SQL_INSERT_TOKEN: &str = concat!(
    "INSERT INTO tokens(token, key_version, nonce, ciphertext, fingerprint, ",
    meta_cols!(),
    ", row_format) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT(token) DO NOTHING"
);
const SQL_LOOKUP: &str = concat!(
    "SELECT token, key_version, nonce, ciphertext, ",
    meta_cols!(),
    ", row_format FROM tokens WHERE token = ?1 AND deleted_at IS NULL AND ciphertext IS NOT NULL \
     AND (expires_at IS NULL OR expires_at > ?2)"
);

pub(crate) fn roles_to_text(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(",")
}

pub(crate) fn roles_from_text(text: &str) -> Vec<Role> {
    text.split(',').filter_map(Role::parse).collect()
}

// ---------------------------------------------------------------------------------------
// The writer

type Reply<T> = oneshot::Sender<Result<T>>;
type AdminFn = Box<dyn FnOnce(&mut Writer) + Send>;

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
    Reveal {
        tokens: Vec<String>,
        now: Micros,
        decide: RevealDecision,
        reply: Reply<Option<Vec<Option<TokenRow>>>>,
    },
    /// Runs alone, in its own transaction, between groups.
    Admin(AdminFn),
}

impl WriteOp {
    fn weight(&self) -> usize {
        match self {
            WriteOp::Tokenize { items, .. } => items.len().max(1),
            WriteOp::Audit { entries, .. } => entries.len().max(1),
            WriteOp::Reveal { tokens, .. } => tokens.len().max(1),
            _ => 1,
        }
    }
}

/// An operation of a group without its reply channel: what the transaction works on.
enum Work {
    Tokenize {
        items: Vec<NewToken>,
        caller: Caller,
    },
    Delete {
        token: String,
        caller: Caller,
    },
    Audit {
        entries: Vec<AuditEntry>,
    },
    Reveal {
        tokens: Vec<String>,
        now: Micros,
        decide: RevealDecision,
    },
}

/// What an operation produced, sent only after the group's commit.
enum Outcome {
    Tokenize(Vec<Result<StoredToken>>),
    Delete(bool),
    Audit,
    /// `Some(rows)`: the decision handed the rows back, nothing was recorded.
    Reveal(Option<Vec<Option<TokenRow>>>),
}

/// Where an operation is answered. Kept apart from its [`Work`] so that every caller hears
/// back on every path: the outcome after a commit, the group's error otherwise.
enum Pending {
    Tokenize(Reply<Vec<Result<StoredToken>>>),
    Delete(Reply<bool>),
    Audit(Reply<()>),
    Reveal(Reply<Option<Vec<Option<TokenRow>>>>),
}

impl WriteOp {
    fn split(self) -> (Work, Pending) {
        match self {
            WriteOp::Tokenize {
                items,
                caller,
                reply,
            } => (Work::Tokenize { items, caller }, Pending::Tokenize(reply)),
            WriteOp::Delete {
                token,
                caller,
                reply,
            } => (Work::Delete { token, caller }, Pending::Delete(reply)),
            WriteOp::Audit { entries, reply } => (Work::Audit { entries }, Pending::Audit(reply)),
            WriteOp::Reveal {
                tokens,
                now,
                decide,
                reply,
            } => (
                Work::Reveal {
                    tokens,
                    now,
                    decide,
                },
                Pending::Reveal(reply),
            ),
            WriteOp::Admin(_) => unreachable!("admin operations run alone, never in a group"),
        }
    }
}

impl Pending {
    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Pending::Tokenize(r), Outcome::Tokenize(results)) => {
                let _ = r.send(Ok(results));
            }
            (Pending::Delete(r), Outcome::Delete(deleted)) => {
                let _ = r.send(Ok(deleted));
            }
            (Pending::Audit(r), Outcome::Audit) => {
                let _ = r.send(Ok(()));
            }
            (Pending::Reveal(r), Outcome::Reveal(rows)) => {
                let _ = r.send(Ok(rows));
            }
            (p, _) => p.fail(Error::Internal("writer outcome of the wrong kind".into())),
        }
    }

    fn fail(self, e: Error) {
        match self {
            Pending::Tokenize(r) => {
                let _ = r.send(Err(e));
            }
            Pending::Delete(r) => {
                let _ = r.send(Err(e));
            }
            Pending::Audit(r) => {
                let _ = r.send(Err(e));
            }
            Pending::Reveal(r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// When the writer began what it is doing now (a group, an admin step, a WAL reset); zero
/// while it waits for work. A disk that stops completing writes shows here as an operation
/// that never ends, seen from threads that do not touch the disk (health checks and callers),
/// since the writer itself is stuck in the kernel.
struct Pulse {
    base: Instant,
    /// Milliseconds since `base`, plus one (so zero means idle).
    busy_since: AtomicU64,
}

impl Pulse {
    fn new() -> Pulse {
        Pulse {
            base: Instant::now(),
            busy_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn begin(&self) {
        self.busy_since.store(self.now(), Ordering::Relaxed);
    }

    fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    /// How long the current operation has been running, once that is [`STALL_LIMIT`] or more.
    fn stalled(&self) -> Option<Duration> {
        // Idle is the common case, on every request's path: no clock read for it.
        let since = self.busy_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let busy = Duration::from_millis(self.now().saturating_sub(since));
        (busy >= STALL_LIMIT).then_some(busy)
    }
}

/// A serving request refused at once: storage has been on one `what` (write, read) for
/// `stuck`.
fn stalled_error(what: &str, stuck: Duration) -> Error {
    Error::Unavailable(format!(
        "storage has not completed a {what} for {} s (a disk that stopped answering?)",
        stuck.as_secs()
    ))
}

/// A serving request that waited `wait` for storage to complete its `what`, and gave up.
fn gave_up_error(what: &str, wait: Duration) -> Error {
    Error::Unavailable(format!(
        "storage did not complete the {what} within {} s (a disk that stopped answering?)",
        wait.as_secs()
    ))
}

pub struct Writer {
    conn: Connection,
    pulse: Arc<Pulse>,
    keyring: Arc<Keyring>,
    healthy: Arc<AtomicBool>,
    max_group_items: usize,
    /// Bytes (database pages in use + every other file of the data directory) beyond which
    /// tokenize is refused, leaving headroom so the audit records of reveals (and so
    /// detokenize) keep working when storage is nearly full.
    tokenize_byte_limit: Option<u64>,
    page_size: u64,
    space: Arc<SpaceGauge>,
    data_dir: PathBuf,
    /// `vault.db-wal` and the size past which the writer resets it (see [`Writer::bound_wal`]).
    wal_path: PathBuf,
    wal_bound: u64,
    /// The destroy counter at this writer's last completed reset (None: none yet).
    truncated_at: Option<i64>,
    /// No reset is tried before this (set after one was kept from finishing).
    reset_backoff: Option<Instant>,
    /// Paused checkpoints ([`CheckpointPause`]) hold off this writer's resets too.
    checkpoints: Arc<CheckpointGate>,
    busy_timeout: Duration,
}

/// Share of the storage limit that tokenize may use; the rest is kept for audit records.
const TOKENIZE_SHARE: f64 = 0.9;

/// What the prober last measured of the data directory (see [`super::space`]).
#[derive(Default)]
pub(super) struct SpaceGauge {
    /// Allocated bytes of every file but the database itself (WAL, index, leftovers).
    other: AtomicU64,
    /// Bytes available on the filesystem (u64::MAX when unknown).
    free: AtomicU64,
    /// Set by the writer after each group, cleared by the prober's tick: while the writer is
    /// busy it resets the WAL itself ([`Writer::bound_wal`]) and truncates after destroying
    /// commits, and the prober only copies frames back (PASSIVE) ahead of those resets.
    writing: AtomicBool,
}

impl SpaceGauge {
    fn measure(&self, data_dir: &Path) {
        self.other
            .store(space::other_bytes(data_dir), Ordering::Relaxed);
        self.free.store(
            space::free_bytes(data_dir).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

fn pages_in_use(tx: &Transaction<'_>) -> Result<i64> {
    Ok(tx
        .prepare_cached(
            "SELECT (SELECT page_count FROM pragma_page_count()) \
             - (SELECT freelist_count FROM pragma_freelist_count())",
        )?
        .query_row([], |r| r.get(0))?)
}

/// Per-transaction state: the audit chain head and the active key's usage.
pub(super) struct TxState {
    pub(super) audit_seq: u64,
    audit_mac: Vec<u8>,
    audit_hash: [u8; 32],
    /// Time of the newest record: a record is never stamped earlier, so the trail's times
    /// are in sequence order even when the wall clock steps back.
    audit_at: Micros,
    pub(super) active_version: u32,
    pub(super) active_count: u64,
    pub(super) active_created: Micros,
    pub(super) counts: HashMap<u32, u64>,
    pub(super) audit: Vec<AuditEntry>,
    /// Set by the transaction that switches the audit key (`--rekey`): its records are the
    /// last ones MACed under the key being replaced.
    pub(super) audit_key_switch: bool,
}

impl Writer {
    /// Serving writes go ahead of admin batches: an admin operation found in the queue waits
    /// until the serving writes queued with it are committed, and then one admin operation
    /// runs after each serving group, so neither side starves.
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut admin: std::collections::VecDeque<AdminFn> = std::collections::VecDeque::new();
        loop {
            let first = if admin.is_empty() {
                self.pulse.idle();
                match rx.blocking_recv() {
                    Some(op) => op,
                    None => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(op) => op,
                    Err(_) => {
                        if let Some(f) = admin.pop_front() {
                            self.pulse.begin();
                            f(&mut self);
                        }
                        continue;
                    }
                }
            };
            let first = match first {
                WriteOp::Admin(f) => {
                    admin.push_back(f);
                    continue;
                }
                op => op,
            };
            let mut group = vec![first];
            let mut weight = group[0].weight();
            while weight < self.max_group_items {
                match rx.try_recv() {
                    Ok(WriteOp::Admin(f)) => admin.push_back(f),
                    Ok(op) => {
                        weight += op.weight();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.pulse.begin();
            self.commit_group(group);
            if let Some(f) = admin.pop_front() {
                self.pulse.begin();
                f(&mut self);
            }
            self.space.writing.store(true, Ordering::Relaxed);
            self.pulse.begin();
            self.bound_wal();
        }
        self.pulse.idle();
        tracing::debug!("writer stopped");
    }

    /// Resets the WAL once it has grown past its bound, or once a commit (of any process)
    /// destroyed data since the last reset. The prober's PASSIVE checkpoints never block
    /// anyone, and so never catch up with a writer that always has the next group queued:
    /// under sustained writes the WAL would grow for as long as the load lasts (2.3 GB in
    /// 40 s at 22k tokenize/s), and so would recovery after a crash. Here, between two
    /// groups, the writer itself copies the rest of the WAL back and restarts it in place
    /// (after destroying commits: truncates it); the few readers finish their point reads
    /// within the busy timeout. It costs one pause of the writer per `wal_bound` bytes
    /// written, which shows in p99 (BENCHMARKS.md); the prober's PASSIVE checkpoints copy
    /// most frames back beforehand, off the writer's thread, to keep that pause short. A
    /// reset kept from finishing (a long reader, another process) is retried later.
    fn bound_wal(&mut self) {
        let len = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        let seq = read_destroy_seq(&self.conn).ok();
        let destroyed = seq.is_some() && seq != self.truncated_at;
        if len <= self.wal_bound && !destroyed {
            return;
        }
        // The prober's PASSIVE checkpoint is copying frames back: a reset now would wait on
        // it (its copy and fsync), with every queued request behind the writer. Unless the
        // WAL is well past its bound, let it finish; the reset after it has little to copy.
        if !destroyed && len <= self.wal_bound + self.wal_bound / 4 && self.checkpoints.running() {
            return;
        }
        // After a reset kept from finishing, wait before the next try: each try may hold
        // the write lock for up to the checkpoint's busy timeout, and a long reader (a
        // backup, an export) can keep every try from finishing for seconds.
        if self
            .reset_backoff
            .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        let started = Instant::now();
        // Briefly: a reset waiting for a reader holds the write lock, and another process
        // (a server beside this admin command) may be waiting to write.
        let _ = self.conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT);
        // After destroying commits the old bytes must leave the file: truncate. Otherwise
        // restart the WAL in place (see `checkpoint_restart`).
        let done = self
            .checkpoints
            .run(|| {
                if destroyed {
                    checkpoint_truncate(&self.conn)
                } else {
                    checkpoint_restart(&self.conn)
                }
            })
            .unwrap_or(Ok(false));
        let _ = self.conn.busy_timeout(self.busy_timeout);
        super::observe_wal_reset(started.elapsed(), matches!(done, Ok(true)));
        self.reset_backoff = (!matches!(done, Ok(true))).then(|| Instant::now() + RESET_BACKOFF);
        match done {
            Ok(true) => {
                if destroyed {
                    self.truncated_at = seq;
                }
            }
            Ok(false) => tracing::debug!(wal_bytes = len, "WAL reset postponed: busy"),
            Err(e) => tracing::warn!(error = %e, wal_bytes = len, "WAL reset failed"),
        }
    }

    fn commit_group(&mut self, group: Vec<WriteOp>) {
        let (n, started) = (group.len(), Instant::now());
        let (work, pending): (Vec<Work>, Vec<Pending>) =
            group.into_iter().map(WriteOp::split).unzip();
        let result = self.apply_group(work);
        super::observe_commit(n, started.elapsed(), result.is_ok());
        match result {
            Ok(outcomes) => {
                self.healthy.store(true, Ordering::Relaxed);
                for (p, o) in pending.into_iter().zip(outcomes) {
                    p.answer(o);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; no request of the group is acknowledged");
                if matches!(e, Error::Unavailable(_) | Error::ResourceExhausted(_)) {
                    self.healthy.store(false, Ordering::Relaxed);
                }
                if matches!(e, Error::ResourceExhausted(_)) {
                    // The disk filled up under us: give back the reserve so the next group
                    // (reveals and their audit records) can commit; tokenize stays refused
                    // while space is low.
                    space::release_reserve(&self.data_dir);
                    self.space.measure(&self.data_dir);
                }
                for p in pending {
                    p.fail(duplicate(&e));
                }
            }
        }
    }

    /// Applies a group in one transaction and commits it; any error rolls the whole group
    /// back (the transaction is dropped uncommitted).
    fn apply_group(&mut self, work: Vec<Work>) -> Result<Vec<Outcome>> {
        let keyring = self.keyring.clone();
        let (byte_limit, page_size) = (self.tokenize_byte_limit, self.page_size);
        let other = self.space.other.load(Ordering::Relaxed);
        let low_disk = self.space.free.load(Ordering::Relaxed) < space::LOW_SPACE_BYTES;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut st = begin_state(&tx, &keyring)?;
        let mut outcomes = Vec::with_capacity(work.len());
        for w in work {
            outcomes.push(match w {
                Work::Tokenize { mut items, caller } => {
                    let full = match byte_limit {
                        Some(limit) => {
                            (pages_in_use(&tx)?.max(0) as u64)
                                .saturating_mul(page_size)
                                .saturating_add(other)
                                >= limit
                        }
                        None => false,
                    };
                    let mut results = Vec::with_capacity(items.len());
                    for item in items.iter_mut() {
                        let r = if full {
                            Err(Error::ResourceExhausted(
                                "storage limit reached: tokenize is refused until space is \
                                 freed (purge) or the limit is raised"
                                    .into(),
                            ))
                        } else if low_disk {
                            Err(Error::ResourceExhausted(
                                "the disk is nearly full: tokenize is refused until space is \
                                 freed (purge, or elsewhere on the disk)"
                                    .into(),
                            ))
                        } else {
                            insert_token(&tx, &keyring, &mut st, item)?
                        };
                        let subject = r.as_ref().map(|s| s.token.as_str()).unwrap_or_default();
                        st.audit.push(AuditEntry::new(&caller, "tokenize", subject, outcome_of(&r), ""));
                        results.push(r);
                    }
                    Outcome::Tokenize(results)
                }
                Work::Delete { token, caller } => {
                    let deleted = tx
                        .prepare_cached(
                            "UPDATE tokens SET nonce = NULL, ciphertext = NULL, fingerprint = NULL, \
                             deleted_at = ?2 WHERE token = ?1 AND deleted_at IS NULL",
                        )?
                        .execute(params![token, now_micros()])?
                        > 0;
                    if deleted {
                        mark_destroyed(&tx)?;
                    }
                    let outcome = if deleted { "OK" } else { "NOT_FOUND" };
                    st.audit.push(AuditEntry::new(&caller, "delete", &token, outcome, ""));
                    Outcome::Delete(deleted)
                }
                Work::Audit { entries } => {
                    st.audit.extend(entries);
                    Outcome::Audit
                }
                // On the writer's connection: its page cache and memory map survive its own
                // commits, while a reader's are dropped after every commit of the writer.
                // The decision is the caller's code: a panic in it fails this group, not
                // the writer.
                Work::Reveal {
                    tokens,
                    now,
                    decide,
                } => {
                    let rows = lookup_rows(&tx, &tokens, now)?;
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(rows))) {
                        Ok(Ok(entries)) => {
                            st.audit.extend(entries);
                            Outcome::Reveal(None)
                        }
                        Ok(Err(rows)) => Outcome::Reveal(Some(rows)),
                        Err(_) => return Err(Error::Internal("a reveal's decision panicked".into())),
                    }
                }
            });
        }
        finish_state(&tx, &keyring, &mut st)?;
        tx.commit()?;
        Ok(outcomes)
    }

    /// Runs `f` in its own immediate transaction with the writer's state synchronised.
    fn admin_tx<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Keyring, &mut TxState) -> Result<T>,
    ) -> Result<T> {
        let keyring = self.keyring.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = (|| {
            let mut st = begin_state(&tx, &keyring)?;
            let out = f(&tx, &keyring, &mut st)?;
            finish_state(&tx, &keyring, &mut st)?;
            Ok(out)
        })();
        result.and_then(|out| {
            tx.commit()?;
            Ok(out)
        })
    }

    /// Proves the storage still takes writes (health), with no lasting change.
    fn probe(&mut self) {
        let r = (|| -> Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("UPDATE meta SET value = value WHERE key = 'generation'", [])?;
            tx.commit()?;
            Ok(())
        })();
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
    }
}

fn begin_state(tx: &Transaction<'_>, keyring: &Keyring) -> Result<TxState> {
    // The database, not the in-memory snapshot, says which version is active: another
    // process may have rotated, and a rolled-back rotation may linger in the snapshot.
    let (active_version, active_count, active_created): (i64, i64, i64) = tx
        .prepare_cached(
            "SELECT version, encryptions, created_at FROM data_keys WHERE state = 'active'",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let active_version = active_version as u32;
    if keyring.snapshot().active.version() != active_version {
        if let Err(e) = keyring.replace(&load_key_rows(tx)?) {
            // A version created under a rotated master cannot be opened with ours. Reveals,
            // deletes and audit records go on; tokenize refuses until the new key is loaded.
            if master_is_current(tx, keyring)? {
                return Err(e);
            }
            tracing::warn!("{STALE_MASTER}");
        }
    }
    // (seq, mac, hash, at) of the newest record.
    type Head = (i64, Vec<u8>, Option<Vec<u8>>, Micros);
    let head: Option<Head> = tx
        .prepare_cached("SELECT seq, mac, hash, at FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let (audit_seq, audit_mac, audit_hash, audit_at) = match head {
        Some((s, m, h, at)) => (s as u64, m, hash32(h.as_deref())?, at),
        None => (0, GENESIS_MAC.to_vec(), AUDIT_GENESIS_HASH, Micros::MIN),
    };
    let mut st = TxState {
        audit_seq,
        audit_mac,
        audit_hash,
        audit_at,
        active_version,
        active_count: active_count as u64,
        active_created,
        counts: HashMap::new(),
        audit: Vec::new(),
        audit_key_switch: false,
    };
    // Age-based rotation happens before the first encryption under an expired version
    // (with a stale master, tokenize refuses instead: see `insert_token`).
    if keyring.needs_rotation(0, 0, st.active_created, now_micros())
        && master_is_current(tx, keyring)?
    {
        rotate_in_tx(tx, keyring, &mut st)?;
    }
    Ok(st)
}

/// Why tokenize is refused while this process holds a master key that was rotated away.
pub(crate) const STALE_MASTER: &str =
    "the master key was rotated by another process: reload it (SIGHUP) \
                            or restart with the new key; tokenize is refused until then";

/// False once another process rotated the master key away from the one this process holds.
fn master_is_current(tx: &Transaction<'_>, keyring: &Keyring) -> Result<bool> {
    let wrapped: Vec<u8> = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'wrapped_fingerprint_key'")?
        .query_row([], |r| r.get(0))?;
    keyring.master_opens(&wrapped)
}

/// A stored chain hash; a record without one was never given one (see [`prepare_audit`]).
fn hash32(stored: Option<&[u8]>) -> Result<[u8; 32]> {
    stored
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
        .ok_or_else(|| Error::DataLoss("the newest audit record has no valid chain hash".into()))
}

fn finish_state(tx: &Transaction<'_>, keyring: &Keyring, st: &mut TxState) -> Result<()> {
    for (version, n) in st.counts.drain() {
        tx.prepare_cached(
            "UPDATE data_keys SET encryptions = encryptions + ?2 WHERE version = ?1",
        )?
        .execute(params![version, n as i64])?;
    }
    if st.audit.is_empty() {
        return Ok(());
    }
    flush_audit(tx, keyring, st)?;
    // The head anchors the end of the chain, so removing the newest records shows too.
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('audit_head_seq', ?1) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute([st.audit_seq as i64])?;
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('audit_head_mac', ?1) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute([&st.audit_mac])?;
    Ok(())
}

/// Appends the pending audit entries, each with its MAC and its public chain hash. One
/// SHA-256 of a short record per entry: the signing of checkpoints happens elsewhere, off
/// this path.
fn flush_audit(tx: &Transaction<'_>, keyring: &Keyring, st: &mut TxState) -> Result<()> {
    let keys = keyring.audit_keys();
    // A process still holding the audit key a rekey replaced must not extend the chain with
    // it: whoever holds the old master key could forge those records.
    let stored_from: Option<Vec<u8>> = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'audit_key_from'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    if !st.audit_key_switch && audit_key_from(stored_from)? != keys.from() {
        return Err(Error::Unavailable(STALE_MASTER.into()));
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO audit(seq, at, principal, peer, action, subject, outcome, reason, mac, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for mut entry in st.audit.drain(..) {
        // Never stamped earlier than the newest record: the trail's times stay in sequence
        // order even when the wall clock steps back.
        entry.at = entry.at.max(st.audit_at);
        st.audit_at = entry.at;
        let seq = st.audit_seq + 1;
        let bytes = canonical_bytes(seq, &entry);
        let mac = keys.current().chain_mac(&st.audit_mac, &bytes);
        let hash = audit_chain_hash(&st.audit_hash, &bytes);
        stmt.execute(params![
            seq as i64,
            entry.at,
            entry.principal,
            entry.peer,
            entry.action,
            entry.subject,
            entry.outcome,
            entry.reason,
            &mac[..],
            &hash[..]
        ])?;
        st.audit_seq = seq;
        st.audit_mac = mac.to_vec();
        st.audit_hash = hash;
    }
    Ok(())
}

/// The stored `audit_key_from` (absent: 1, the vault's first key).
pub(crate) fn audit_key_from(stored: Option<Vec<u8>>) -> Result<u64> {
    match stored {
        None => Ok(1),
        Some(v) => Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
            Error::DataLoss("vault metadata `audit_key_from` is malformed".into())
        })?)),
    }
}

/// True when an audit signing key is active.
fn has_active_signing_key(conn: &Connection) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM audit_signing_keys WHERE state = 'active'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false))
}

/// Run at open, after the migrations, by whoever opens the vault first: gives records
/// written before the hash chain existed their hashes (public data only, so no secret is
/// needed and the result is what any verifier recomputes), and creates the first audit
/// signing key if there is none. One transaction.
fn prepare_audit(conn: &mut Connection, keyring: &Keyring) -> Result<()> {
    // Cheap checks first, without the write lock: once done, the newest record has a hash
    // (the writer gives every new one its hash) and a signing key is active.
    let newest_unhashed: bool = conn
        .query_row(
            "SELECT hash IS NULL FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false);
    let has_key = has_active_signing_key(conn)?;
    if !newest_unhashed && has_key {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let first_missing: Option<i64> =
        tx.query_row("SELECT MIN(seq) FROM audit WHERE hash IS NULL", [], |r| {
            r.get(0)
        })?;
    if let Some(first) = first_missing {
        let mut prev = if first <= 1 {
            AUDIT_GENESIS_HASH
        } else {
            let h: Option<Vec<u8>> = tx
                .query_row("SELECT hash FROM audit WHERE seq = ?1", [first - 1], |r| {
                    r.get(0)
                })
                .optional()?
                .flatten();
            hash32(h.as_deref())?
        };
        // The public chain must not launder an edit made before it existed: extend it only
        // over records whose HMAC chain holds (the audit key is loaded), else refuse to open.
        let mut prev_mac = if first <= 1 {
            GENESIS_MAC.to_vec()
        } else {
            tx.query_row("SELECT mac FROM audit WHERE seq = ?1", [first - 1], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
        };
        let mut n = 0u64;
        {
            let mut read = tx.prepare(AUDIT_SELECT_FROM)?;
            let mut write = tx.prepare("UPDATE audit SET hash = ?2 WHERE seq = ?1")?;
            let records: Vec<AuditRecord> = read
                .query_map([first], audit_record_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            for rec in records {
                let bytes = canonical_bytes(rec.seq, &rec.entry());
                if !keyring
                    .audit_keys()
                    .for_seq(rec.seq)
                    .verify(&prev_mac, &bytes, &rec.mac)
                {
                    return Err(Error::DataLoss(format!(
                        "audit record {} fails its HMAC chain: the trail was altered before \
                         this upgrade; refusing to extend the public hash chain over it \
                         (investigate with `tokenvault audit verify` of the previous version)",
                        rec.seq
                    )));
                }
                prev_mac = rec.mac.clone();
                prev = audit_chain_hash(&prev, &bytes);
                write.execute(params![rec.seq as i64, &prev[..]])?;
                n += 1;
            }
        }
        tracing::info!(
            records = n,
            "computed the audit hash chain of existing records"
        );
    }
    let has_key = has_active_signing_key(&tx)?;
    if !has_key && master_is_current(&tx, keyring)? {
        let n: i64 = tx.query_row(
            "SELECT COALESCE(MAX(id), 0) + 1 FROM audit_signing_keys",
            [],
            |r| r.get(0),
        )?;
        let (key, wrapped) = keyring.new_audit_signing_key(n as u32)?;
        tx.execute(
            "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, created_at) \
             VALUES (?1, ?2, ?3, 'active', ?4)",
            params![n, &key.public_key().to_bytes()[..], wrapped, now_micros()],
        )?;
        tracing::info!(key_id = %key.public_key().key_id(), "created the audit signing key");
    }
    tx.commit()?;
    Ok(())
}

const AUDIT_SELECT_FROM: &str =
    "SELECT seq, at, principal, peer, action, subject, outcome, reason, mac, hash FROM audit \
     WHERE seq >= ?1 ORDER BY seq";

fn audit_record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
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
}

fn query_signing_keys(conn: &Connection) -> Result<Vec<AuditSigningKeyInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, public_key, state, created_at, retired_at FROM audit_signing_keys ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, public, state, created_at, retired_at) = row?;
        let public_key = AuditPublicKey::from_bytes(&public).ok_or_else(|| {
            Error::DataLoss(format!("audit signing key {id} has a malformed public key"))
        })?;
        out.push(AuditSigningKeyInfo {
            id: id as u32,
            public_key,
            active: state == "active",
            created_at,
            retired_at,
        });
    }
    Ok(out)
}

/// Sequence number and MAC of the newest record, as recorded in `meta` beside the chain.
fn recorded_head(conn: &Connection) -> Result<Option<(u64, Vec<u8>)>> {
    let seq: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'audit_head_seq'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let mac: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'audit_head_mac'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(seq.zip(mac).map(|(s, m)| (s as u64, m)))
}

fn vault_hex(conn: &Connection) -> Result<String> {
    let id: Vec<u8> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'vault_id'")?
        .query_row([], |r| r.get(0))?;
    Ok(audit::hex(&id))
}

/// The audit signing keys of a vault, read without the master key (they are public).
pub fn read_audit_public_keys(data_dir: &Path) -> Result<(String, Vec<AuditSigningKeyInfo>)> {
    read_header(data_dir)?;
    let conn = Connection::open_with_flags(db_path(data_dir), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let keys = match query_signing_keys(&conn) {
        Ok(keys) if !keys.is_empty() => keys,
        _ => {
            return Err(Error::FailedPrecondition(
                "this vault has no audit signing key yet: open it once with this version \
                 (for example `tokenvault check`) to create one"
                    .into(),
            ))
        }
    };
    Ok((vault_hex(&conn)?, keys))
}

/// Makes a new active version inside `tx`; the old one becomes decrypt-only. The keyring is
/// updated at once so the rest of the transaction seals under the new version; if the
/// transaction rolls back, the writer reloads the keyring from the database.
pub(super) fn rotate_in_tx(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    st: &mut TxState,
) -> Result<u32> {
    // A process still holding the previous master must not add a key the vault cannot open.
    let wrapped_fp: Vec<u8> = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'wrapped_fingerprint_key'")?
        .query_row([], |r| r.get(0))?;
    if !keyring.master_opens(&wrapped_fp)? {
        return Err(Error::FailedPrecondition(
            "the vault's master key was rotated; restart with the new master key".into(),
        ));
    }
    let max: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) FROM data_keys", [], |r| {
        r.get(0)
    })?;
    let version = (max + 1) as u32;
    let now = now_micros();
    tx.execute(
        "UPDATE data_keys SET state = 'decrypt_only' WHERE state = 'active'",
        [],
    )?;
    tx.execute(
        "INSERT INTO data_keys(version, wrapped, state, created_at) VALUES (?1, ?2, 'active', ?3)",
        params![version, keyring.new_wrapped_data_key(version)?, now],
    )?;
    bump_generation(tx)?;
    keyring.replace(&load_key_rows(tx)?)?;
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

/// Inserts one token (or finds it, with `reuse_existing`). The outer error is a storage
/// failure that must fail the whole group; the inner one belongs to this item alone.
fn insert_token(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    st: &mut TxState,
    item: &mut NewToken,
) -> Result<Result<StoredToken>> {
    item.catch_up_fingerprint(&keyring.fingerprints());
    if let (true, Some(fingerprint)) = (item.reuse_existing, &item.fingerprint) {
        let existing = tx
            .prepare_cached(SQL_REUSE)?
            .query_row(
                params![
                    &fingerprint[..],
                    item.meta.format.code(),
                    item.now,
                    &item.fingerprint_prev.as_ref().unwrap_or(fingerprint)[..]
                ],
                |r| {
                    Ok(StoredToken {
                        token: r.get(0)?,
                        key_version: r.get::<_, i64>(1)? as u32,
                        created: false,
                        meta: meta_from_row(r, 2)?,
                    })
                },
            )
            .optional()?;
        if let Some(found) = existing {
            return Ok(Ok(found));
        }
    }
    for _ in 0..MAX_TOKEN_DRAWS {
        if keyring.needs_rotation(st.active_count, 1, st.active_created, item.now) {
            if !master_is_current(tx, keyring)? {
                return Ok(Err(Error::Unavailable(STALE_MASTER.into())));
            }
            rotate_in_tx(tx, keyring, st)?;
        }
        if item.key_version != st.active_version {
            let snapshot = keyring.snapshot();
            item.sealed = snapshot.active.seal(
                &item.token,
                &item.meta.canonical(),
                item.pan.expose_digits().as_bytes(),
            );
            item.key_version = snapshot.active.version();
        }
        // Never seal under a version that is not the active one.
        if item.key_version != st.active_version {
            return Ok(Err(Error::Unavailable(STALE_MASTER.into())));
        }
        let m = &item.meta;
        let inserted = tx.prepare_cached(SQL_INSERT_TOKEN)?.execute(params![
            item.token,
            item.key_version,
            &item.sealed.nonce[..],
            item.sealed.ciphertext,
            item.fingerprint.as_ref().map(|f| &f[..]),
            m.format.code(),
            m.brand.code(),
            m.pan_length,
            m.bin,
            m.last4,
            m.created_at,
            m.expires_at,
            crate::crypto::ROW_FORMAT,
        ])?;
        // A sealed PAN counts against its version even if the row lost a token collision:
        // the nonce was drawn.
        st.active_count += 1;
        *st.counts.entry(item.key_version).or_insert(0) += 1;
        if inserted == 1 {
            return Ok(Ok(StoredToken {
                token: item.token.clone(),
                key_version: item.key_version,
                created: true,
                meta: item.meta.clone(),
            }));
        }
        // Collision: draw again; the AAD binds the token, so re-seal too.
        item.token = token::generate(m.format, &item.pan).into_string();
        let snapshot = keyring.snapshot();
        item.sealed = snapshot.active.seal(
            &item.token,
            &item.meta.canonical(),
            item.pan.expose_digits().as_bytes(),
        );
        item.key_version = snapshot.active.version();
    }
    Ok(Err(Error::ResourceExhausted(format!(
        "no free {} token left for this card number length; use another format",
        item.meta.format.name()
    ))))
}

// ---------------------------------------------------------------------------------------
// The read pool

type ReadJob = Box<dyn FnOnce(&Connection, &Pulse) + Send>;

fn lookup_rows(conn: &Connection, tokens: &[String], now: Micros) -> Result<Vec<Option<TokenRow>>> {
    let mut stmt = conn.prepare_cached(SQL_LOOKUP)?;
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        let row = stmt
            .query_row(params![t, now], |r| {
                let (row_format, bound_meta) = binding_from_row(r, 4)?;
                Ok(TokenRow {
                    token: r.get(0)?,
                    key_version: r.get::<_, i64>(1)? as u32,
                    nonce: r.get(2)?,
                    ciphertext: r.get(3)?,
                    meta: meta_from_row(r, 4)?,
                    row_format,
                    bound_meta,
                })
            })
            .optional()?;
        out.push(row);
    }
    Ok(out)
}

/// Readers. Point reads (a Detokenize's lookup) run on the calling thread, on a connection
/// taken from `idle`: a WAL-mode read never waits for the writer, and a point read costs less
/// there than the two thread hand-offs of a trip to a reader thread. Longer reads (exports,
/// checks, listings) go to the reader threads.
///
/// A disk that stops answering reads blocks a thread inside `pread` for as long as it hangs,
/// and a runtime worker blocked there serves nothing else. So there is always one
/// point-read connection fewer than the runtime has workers: at least one worker stays free
/// for health checks and for refusing what the store cannot serve. Every serving read is on
/// a [`Pulse`], so a read that hangs is seen from outside: the store reports itself
/// unhealthy and refuses new lookups at once, and a lookup sent to a reader thread waits at
/// most [`READ_WAIT`].
struct ReadPool {
    tx: Mutex<Option<std_mpsc::SyncSender<ReadJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections for point reads, each with its pulse; None once the vault is closed.
    idle: Mutex<Option<Vec<PointReader>>>,
    /// One per point-read connection and one per reader thread.
    pulses: Vec<Arc<Pulse>>,
}

/// A point-read connection and the pulse its reads run on.
type PointReader = (Connection, Arc<Pulse>);

/// Point-read connections: one fewer than the runtime's workers (see [`ReadPool`]), at most
/// 7; none on a runtime with one worker. A read finding none free goes to a reader thread.
fn inline_readers() -> usize {
    let workers = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or_else(|_| std::thread::available_parallelism().map_or(2, |n| n.get()));
    workers.saturating_sub(1).min(7)
}

/// How long a point read on a runtime worker waits for a busy database before it is handed
/// to a reader thread, which waits the full [`BUSY_TIMEOUT`].
const INLINE_BUSY_TIMEOUT: Duration = Duration::from_millis(20);

/// Reads queued for the reader threads beyond which a new one is refused (UNAVAILABLE), not
/// waited for: the caller may be a runtime worker.
const READ_QUEUE: usize = 1024;

fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    enable_secure_delete(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Every commit of the writer invalidates a reader's page cache, so the cache is small.
    // No memory map either: in WAL mode a reader that finds the database changed since its
    // last read drops its whole map (`pagerBeginReadTransaction` → unfetch), so under
    // writes every lookup paid an munmap (with a TLB shootdown across cores) and page
    // faults to map it again; plain reads from the OS page cache cost less (BENCHMARKS.md,
    // "Issue 14 after stop 25").
    conn.pragma_update(None, "cache_size", -2_000)?;
    conn.pragma_update(None, "mmap_size", 0)?;
    Ok(conn)
}

impl ReadPool {
    fn start(path: &Path, n: usize) -> Result<ReadPool> {
        let (tx, rx) = std_mpsc::sync_channel::<ReadJob>(READ_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        let mut pulses = Vec::new();
        for i in 0..n.max(1) {
            let conn = open_reader(path, BUSY_TIMEOUT)?;
            let rx = rx.clone();
            let pulse = Arc::new(Pulse::new());
            pulses.push(pulse.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tokenvault-read-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|e| e.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok(job) => job(&conn, &pulse),
                            Err(_) => break,
                        }
                    })
                    .map_err(|e| Error::Internal(format!("spawn reader: {e}")))?,
            );
        }
        let mut idle = Vec::new();
        for _ in 0..inline_readers() {
            let pulse = Arc::new(Pulse::new());
            pulses.push(pulse.clone());
            idle.push((open_reader(path, INLINE_BUSY_TIMEOUT)?, pulse));
        }
        Ok(ReadPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            idle: Mutex::new(Some(idle)),
            pulses,
        })
    }

    /// How long the oldest serving read still running has been at it, once that is
    /// [`STALL_LIMIT`] or more.
    fn stalled(&self) -> Option<Duration> {
        self.pulses.iter().filter_map(|p| p.stalled()).max()
    }

    /// Runs a short serving read here, on this thread (see [`ReadPool`]); None when no
    /// point-read connection is free (or the vault is closed): the caller then submits it.
    fn inline<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Option<Result<T>> {
        let (conn, pulse) = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()?
            .pop()?;
        pulse.begin();
        let out = f(&conn);
        pulse.idle();
        if let Some(idle) = &mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()) {
            idle.push((conn, pulse));
        }
        Some(out)
    }

    /// Queues a read for the reader threads; `serving` puts it on the thread's pulse (a
    /// lookup for a caller, not an export or a check, which may rightly take long).
    fn submit<T: Send + 'static>(
        &self,
        serving: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> oneshot::Receiver<Result<T>> {
        let (reply, rx) = oneshot::channel();
        let sender = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(s) = sender else {
            let _ = reply.send(Err(Error::Unavailable("the vault is closed".into())));
            return rx;
        };
        let job: ReadJob = Box::new(move |conn, pulse| {
            if serving {
                pulse.begin();
            }
            let out = f(conn);
            pulse.idle();
            let _ = reply.send(out);
        });
        // Never block the caller (a runtime worker) on a full queue: readers that stopped
        // answering would take the runtime with them.
        let refused = match s.try_send(job) {
            Ok(()) => return rx,
            Err(std_mpsc::TrySendError::Full(_)) => {
                format!("{READ_QUEUE} reads are already waiting for storage")
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => "the vault is closed".into(),
        };
        // The job, and the reply in it, went with the error: answer through a new one.
        let (reply, rx) = oneshot::channel();
        let _ = reply.send(Err(Error::Unavailable(refused)));
        rx
    }

    fn stop(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checkpointer

/// How long the writer waits after a WAL reset was kept from finishing before it tries again.
const RESET_BACKOFF: Duration = Duration::from_millis(250);

/// How often the prober checkpoints.
const PROBE_TICK: Duration = Duration::from_millis(100);
/// How long one checkpoint waits for readers and the writer; short, because a TRUNCATE
/// checkpoint holds off new writers while it waits.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(50);

/// One checkpoint: TRUNCATE while the destroy counter is ahead of the last truncation (or
/// none happened yet), PASSIVE otherwise. Returns the counter value truncated at.
fn checkpoint_tick(conn: &Connection, truncated_at: Option<i64>) -> Option<i64> {
    let seq = match read_destroy_seq(conn) {
        Ok(seq) => seq,
        Err(e) => {
            tracing::debug!(error = %e, "reading the destroy counter");
            return truncated_at;
        }
    };
    if truncated_at == Some(seq) {
        checkpoint_passive(conn);
        return truncated_at;
    }
    match checkpoint_truncate(conn) {
        Ok(true) => Some(seq),
        Ok(false) => truncated_at,
        Err(e) => {
            tracing::debug!(error = %e, "truncating checkpoint");
            truncated_at
        }
    }
}

/// PASSIVE never blocks the writer or readers; a writer restarts the WAL from its start
/// once everything in it has been copied back.
fn checkpoint_passive(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::debug!(error = %e, "checkpoint");
    }
}

/// Lets a process that is about to stop (Ctrl-Z between admin batches) keep its checkpointer
/// from holding the write lock while it is stopped: a TRUNCATE checkpoint holds off every
/// writer of the vault, the server's reveals included, while it waits for readers.
#[derive(Default)]
struct CheckpointGate {
    /// (pauses outstanding, a checkpoint is running)
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl CheckpointGate {
    /// Runs `checkpoint` unless paused; None when it was skipped. One checkpoint of this
    /// process at a time (the writer's resets and the prober's ticks): a second would find
    /// SQLite's checkpoint lock taken and fail as busy at once, without a busy handler, and
    /// a writer's truncate after destroying commits would keep failing under load.
    fn run<T>(&self, checkpoint: impl FnOnce() -> T) -> Option<T> {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.1 && st.0 == 0 {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.0 > 0 {
                return None;
            }
            st.1 = true;
        }
        let out = checkpoint();
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
        self.changed.notify_all();
        Some(out)
    }

    /// A checkpoint of this process is running.
    fn running(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    fn pause(self: &Arc<Self>) -> CheckpointPause {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        while st.1 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        CheckpointPause::new(GatePause { gate: self.clone() })
    }
}

/// While alive, this process starts no checkpoint and none is running (see
/// [`super::Storage::pause_checkpoints`]).
struct GatePause {
    gate: Arc<CheckpointGate>,
}

impl Drop for GatePause {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 -= 1;
    }
}

// ---------------------------------------------------------------------------------------
// The store

pub struct SqliteStore {
    writer_tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    pulse: Arc<Pulse>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reads: ReadPool,
    healthy: Arc<AtomicBool>,
    stop_probe: Arc<AtomicBool>,
    prober: Mutex<Option<JoinHandle<()>>>,
    checkpoints: Arc<CheckpointGate>,
}

pub struct OpenParams {
    pub read_connections: usize,
    pub max_group_items: usize,
    pub writer_queue: usize,
    pub max_storage_bytes: Option<u64>,
    /// WAL size past which the writer resets it; None: the journal size limit (64 MiB, or
    /// 1/16 of the storage limit).
    pub max_wal_bytes: Option<u64>,
    /// How long a write waits for a lock held by another process before UNAVAILABLE.
    pub busy_timeout: Duration,
}

impl SqliteStore {
    /// Opens the writer (running pending migrations) and the readers. The caller has checked
    /// the master key against [`read_header`] and built the keyring from [`initial_key_rows`].
    pub fn open(data_dir: &Path, keyring: Arc<Keyring>, p: &OpenParams) -> Result<SqliteStore> {
        let path = db_path(data_dir);
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        set_pragmas(&conn, p.max_storage_bytes)?;
        conn.busy_timeout(p.busy_timeout)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // The writer cycles through more distinct statements than rusqlite's default cache of
        // 16 holds; an evicted statement is finalised and prepared again on every group.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // The WAL counts against the limit: keep what a checkpoint leaves of it small.
        let journal_limit = p
            .max_storage_bytes
            .map_or(64 << 20, |b| (b / 16).clamp(256 << 10, 64 << 20));
        // The writer restarts the WAL in place at its bound (see `checkpoint_restart`); a
        // limit below the bound would cut the file back on every restart, and every commit
        // until the next would append again.
        let wal_bound = p.max_wal_bytes.unwrap_or(journal_limit);
        conn.pragma_update(None, "journal_size_limit", wal_bound as i64)?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let tokenize_byte_limit = p
            .max_storage_bytes
            .map(|bytes| (bytes as f64 * TOKENIZE_SHARE) as u64);
        space::ensure_reserve(data_dir);
        let space = Arc::new(SpaceGauge::default());
        space.measure(data_dir);
        migrations::migrate(&mut conn)?;
        prepare_audit(&mut conn, &keyring)?;
        // A process killed after a destroying commit and before its WAL was truncated left
        // the old bytes in the WAL: truncate before serving (briefly, as another process may
        // be busy with the vault; then the prober keeps trying).
        conn.busy_timeout(Duration::from_millis(200))?;
        let truncated_at = if checkpoint_truncate(&conn)? {
            Some(read_destroy_seq(&conn)?)
        } else {
            tracing::debug!("WAL not truncated at open; the checkpointer retries");
            None
        };
        conn.busy_timeout(p.busy_timeout)?;
        let reads = ReadPool::start(&path, p.read_connections)?;
        let checkpoints: Arc<CheckpointGate> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel(p.writer_queue.max(1));
        let pulse = Arc::new(Pulse::new());
        let writer = Writer {
            conn,
            pulse: pulse.clone(),
            keyring,
            healthy: healthy.clone(),
            max_group_items: p.max_group_items.max(1),
            tokenize_byte_limit,
            page_size: page_size.max(512) as u64,
            space: space.clone(),
            data_dir: data_dir.to_path_buf(),
            wal_path: path.with_extension("db-wal"),
            wal_bound,
            truncated_at,
            reset_backoff: None,
            checkpoints: checkpoints.clone(),
            busy_timeout: p.busy_timeout,
        };
        let handle = std::thread::Builder::new()
            .name("tokenvault-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::Internal(format!("spawn writer: {e}")))?;
        let store = SqliteStore {
            writer_tx: Mutex::new(Some(tx)),
            pulse,
            writer: Mutex::new(Some(handle)),
            reads,
            healthy,
            stop_probe: Arc::new(AtomicBool::new(false)),
            prober: Mutex::new(None),
            checkpoints,
        };
        store.start_prober(&path, data_dir, space);
        Ok(store)
    }

    /// Every second without a successful commit, asks the writer to prove storage is
    /// writable, so health reflects a read-only or vanished disk even when idle.
    ///
    /// The same thread checkpoints the WAL into the database file. The writer's automatic
    /// checkpoint is off, so the fsyncs of a checkpoint never sit in a commit's latency.
    /// Normally it checkpoints PASSIVE (never blocks anyone). Once a commit of any process
    /// destroyed data (the `destroy_seq` counter moved, see [`mark_destroyed`]), it runs
    /// `wal_checkpoint(TRUNCATE)` every tick until one completes: the destroyed bytes are
    /// then gone from the WAL, and `secure_delete` has zeroed them in the database file.
    ///
    /// And it measures the data directory for the storage limit, and restores the reserve
    /// file once there is room (see [`super::space`]).
    fn start_prober(&self, path: &Path, data_dir: &Path, space: Arc<SpaceGauge>) {
        let Some(tx) = self.sender() else { return };
        let data_dir = data_dir.to_path_buf();
        let stop = self.stop_probe.clone();
        let gate = self.checkpoints.clone();
        let checkpointer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(Error::from)
        .and_then(|c| {
            c.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)?;
            c.pragma_update(None, "synchronous", "FULL")?;
            enable_secure_delete(&c)?;
            Ok(c)
        });
        if let Err(e) = &checkpointer {
            tracing::error!(error = %e, "cannot open the checkpointer connection");
        }
        let handle = std::thread::Builder::new()
            .name("tokenvault-probe".into())
            .spawn(move || {
                let mut last = Instant::now();
                // None: truncate once at start too, whatever the counter says.
                let mut truncated_at: Option<i64> = None;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(PROBE_TICK);
                    if let Ok(c) = &checkpointer {
                        let t = truncated_at;
                        // While the writer writes, it bounds the WAL and truncates after
                        // destroying commits itself (`Writer::bound_wal`); here PASSIVE
                        // copies frames back ahead of its resets, so that a reset has only
                        // the last moments' frames to copy, and its pause stays short.
                        if space.writing.swap(false, Ordering::Relaxed) {
                            gate.run(|| checkpoint_passive(c));
                        } else {
                            truncated_at = gate.run(|| checkpoint_tick(c, t)).unwrap_or(t);
                        }
                    }
                    space.measure(&data_dir);
                    if space.free.load(Ordering::Relaxed) < space::RESERVE_BYTES / 2 {
                        // Someone filled the disk: hand the reserve to the WAL before a
                        // reveal's audit record needs it.
                        space::release_reserve(&data_dir);
                    }
                    if last.elapsed() >= Duration::from_secs(1) {
                        last = Instant::now();
                        space::ensure_reserve(&data_dir);
                        let op = WriteOp::Admin(Box::new(|w: &mut Writer| w.probe()));
                        if tx.try_send(op).is_err() && tx.is_closed() {
                            break;
                        }
                    }
                }
                // Last chance for this process's own destroying commits (a CLI exits
                // right after them); another process with the vault open carries on.
                if let Ok(c) = &checkpointer {
                    gate.run(|| checkpoint_tick(c, truncated_at));
                }
            });
        if let Ok(h) = handle {
            *self.prober.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
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

    /// A write on a client's behalf: refused at once while the writer is stalled, and
    /// bounded by [`WRITE_WAIT`] otherwise. A request that gave up may still commit once the
    /// disk answers again (its operation was handed over): a token its caller never
    /// received, or the audit record of a reveal that was never answered, never the reverse.
    fn serving_write<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> WriteOp,
    ) -> StoreFuture<T> {
        // A read that hangs means the same disk: a write now would likely hang too.
        let stalled = [
            ("write", self.pulse.stalled()),
            ("read", self.reads.stalled()),
        ];
        if let Some((what, Some(stuck))) = stalled.into_iter().find(|(_, s)| s.is_some()) {
            let e = stalled_error(what, stuck);
            return Box::pin(async move { Err(e) });
        }
        let write = self.write(make);
        Box::pin(async move {
            tokio::time::timeout(WRITE_WAIT, write)
                .await
                .unwrap_or_else(|_| Err(gave_up_error("write", WRITE_WAIT)))
        })
    }

    pub(super) fn admin<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>, &Keyring, &mut TxState) -> Result<T> + Send + 'static,
    ) -> StoreFuture<T> {
        self.write(move |reply| {
            WriteOp::Admin(Box::new(move |w: &mut Writer| {
                let _ = reply.send(w.admin_tx(f));
            }))
        })
    }

    pub(super) fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> StoreFuture<T> {
        let rx = self.reads.submit(false, f);
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::Unavailable("the vault is closed".into()))?
        })
    }

    /// A lookup for a caller: refused at once while a serving read is stalled, run on this
    /// thread when `inline` and a point-read connection is free, else on a reader thread,
    /// waited for at most [`READ_WAIT`] (see [`ReadPool`]).
    fn serving_read<T: Send + 'static>(
        &self,
        inline: bool,
        f: impl Fn(&Connection) -> Result<T> + Send + 'static,
    ) -> StoreFuture<T> {
        if let Some(stuck) = self.reads.stalled() {
            let e = stalled_error("read", stuck);
            return Box::pin(async move { Err(e) });
        }
        // A read kept waiting (a WAL reset holding the index) goes to a reader thread, so a
        // runtime worker never waits long.
        match inline.then(|| self.reads.inline(&f)).flatten() {
            Some(Err(Error::Unavailable(_))) | None => {}
            Some(rows) => return Box::pin(async move { rows }),
        }
        let rx = self.reads.submit(true, f);
        Box::pin(async move {
            match tokio::time::timeout(READ_WAIT, rx).await {
                Ok(r) => r.map_err(|_| Error::Unavailable("the vault is closed".into()))?,
                Err(_) => Err(gave_up_error("read", READ_WAIT)),
            }
        })
    }
}

fn admin_request_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AdminRequestRow> {
    Ok(AdminRequestRow {
        id: r.get(0)?,
        operation: r.get(1)?,
        params: r.get(2)?,
        requester: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        approver: r.get(6)?,
        approved_at: r.get(7)?,
    })
}

/// Every client row, revoked ones included.
pub fn query_clients(conn: &Connection) -> Result<Vec<ClientRow>> {
    let mut stmt = conn.prepare_cached(
                "SELECT name, key_id, key_hash, roles, cert_identity, created_at, revoked_at, detokenize_rate, \
                 reuse_rate, reuse_group \
                 FROM clients ORDER BY name",
            )?;
    let rows = stmt.query_map([], |r| {
        let hash: Vec<u8> = r.get(2)?;
        Ok(ClientRow {
            info: ClientInfo {
                name: r.get(0)?,
                roles: roles_from_text(&r.get::<_, String>(3)?),
                cert_identity: r.get(4)?,
                detokenize_rate: r.get(7)?,
                reuse_rate: r.get(8)?,
                reuse_group: r.get(9)?,
                created_at: r.get(5)?,
                revoked_at: r.get(6)?,
            },
            key_id: r.get(1)?,
            key_hash: <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0u8; 32]),
        })
    })?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::from)
}

/// Client rows read once at open, before the readers exist.
pub fn initial_clients(data_dir: &Path) -> Result<Vec<ClientRow>> {
    let conn = Connection::open_with_flags(db_path(data_dir), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_secure_delete(&conn)?;
    query_clients(&conn)
}

/// The newest time the audit trail records (its last record's), read at open: vault time
/// never goes back before it (see `vault::clock`).
pub fn newest_recorded_time(data_dir: &Path) -> Result<Option<Micros>> {
    let conn = Connection::open_with_flags(db_path(data_dir), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn
        .query_row("SELECT at FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Key rows read once at open, before the writer exists.
pub fn initial_key_rows(data_dir: &Path) -> Result<Vec<KeyRow>> {
    let conn = Connection::open_with_flags(db_path(data_dir), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_secure_delete(&conn)?;
    load_key_rows(&conn)
}

/// Replaces the active audit signing key inside `tx` (`audit rotate-key`, and the end of a
/// rekey): the handover record is signed by the old key, whose wrapped seed is destroyed.
pub(super) fn rotate_signing_in_tx(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    st: &mut TxState,
    caller: &Caller,
) -> Result<(u32, AuditPublicKey)> {
    let (old_id, old_wrapped): (i64, Vec<u8>) = tx
        .query_row(
            "SELECT id, wrapped FROM audit_signing_keys WHERE state = 'active'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| Error::FailedPrecondition("the vault has no audit signing key".into()))?;
    // The handover names the rotation record's place in the chain: write whatever
    // is pending first, so that place is known.
    flush_audit(tx, keyring, st)?;
    let h = keyring.audit_signing_handover(
        old_id as u32,
        &old_wrapped,
        &vault_hex(tx)?,
        st.audit_seq + 1,
        &st.audit_hash,
        caller,
    )?;
    let now = now_micros();
    tx.execute(
        "UPDATE audit_signing_keys SET state = 'retired', wrapped = NULL, retired_at = ?2 \
         WHERE id = ?1",
        params![old_id, now],
    )?;
    // The old wrapped seed is destroyed: truncate it out of the WAL too.
    mark_destroyed(tx)?;
    tx.execute(
        "INSERT INTO audit_signing_keys(id, public_key, wrapped, state, created_at) \
         VALUES (?1, ?2, ?3, 'active', ?4)",
        params![h.new_id, &h.public.to_bytes()[..], h.wrapped, now],
    )?;
    st.audit.push(h.entry);
    Ok((h.new_id, h.public))
}

impl Storage for SqliteStore {
    fn tokenize(
        &self,
        items: Vec<NewToken>,
        caller: Caller,
    ) -> StoreFuture<Vec<Result<StoredToken>>> {
        self.serving_write(move |reply| WriteOp::Tokenize {
            items,
            caller,
            reply,
        })
    }

    fn lookup(&self, tokens: Vec<String>, now: Micros) -> StoreFuture<Vec<Option<TokenRow>>> {
        // A few tokens are a few index probes: cheaper here than a trip to a reader thread.
        let inline = tokens.len() <= INLINE_LOOKUP;
        self.serving_read(inline, move |conn| lookup_rows(conn, &tokens, now))
    }

    fn delete(&self, token: String, caller: Caller) -> StoreFuture<bool> {
        self.serving_write(move |reply| WriteOp::Delete {
            token,
            caller,
            reply,
        })
    }

    fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()> {
        self.serving_write(move |reply| WriteOp::Audit { entries, reply })
    }

    fn reveal(
        &self,
        tokens: Vec<String>,
        now: Micros,
        decide: RevealDecision,
    ) -> StoreFuture<Option<Vec<Option<TokenRow>>>> {
        self.serving_write(move |reply| WriteOp::Reveal {
            tokens,
            now,
            decide,
            reply,
        })
    }

    fn rotate_key(&self, caller: Caller, unless_rekey: bool) -> StoreFuture<u32> {
        self.admin(move |tx, keyring, st| {
            if unless_rekey && lifecycle::rekey_state(tx)?.is_some() {
                return Err(Error::FailedPrecondition(
                    lifecycle::REWRAP_DURING_REKEY.into(),
                ));
            }
            let v = rotate_in_tx(tx, keyring, st)?;
            // Attribute the rotation to whoever asked for it.
            if let Some(last) = st.audit.last_mut() {
                *last = AuditEntry::new(&caller, "key_rotate", &format!("key v{v}"), "OK", "");
            }
            Ok(v)
        })
    }

    fn key_rows(&self) -> StoreFuture<Vec<KeyRow>> {
        self.read(load_key_rows)
    }

    fn key_usage(&self) -> StoreFuture<Vec<KeyVersionInfo>> {
        self.read(|conn| {
            let rows = load_key_rows(conn)?;
            let mut counts = HashMap::new();
            let mut stmt = conn.prepare_cached(
                "SELECT key_version, COUNT(*) FROM tokens WHERE ciphertext IS NOT NULL GROUP BY key_version",
            )?;
            for r in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
                let (v, n) = r?;
                counts.insert(v as u32, n as u64);
            }
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
        self.admin(move |tx, _keyring, st| {
            let exists: bool = tx
                .query_row(
                    "SELECT 1 FROM clients WHERE name = ?1",
                    [&row.info.name],
                    |_| Ok(true),
                )
                .optional()?
                .unwrap_or(false);
            if exists {
                return Err(Error::AlreadyExists(format!(
                    "a client named {} already exists",
                    row.info.name
                )));
            }
            if let Some(id) = &row.info.cert_identity {
                let taken: bool = tx
                    .query_row(
                        "SELECT 1 FROM clients WHERE cert_identity = ?1",
                        [id],
                        |_| Ok(true),
                    )
                    .optional()?
                    .unwrap_or(false);
                if taken {
                    return Err(Error::AlreadyExists(
                        "that certificate identity is bound to another client".into(),
                    ));
                }
            }
            tx.execute(
                "INSERT INTO clients(name, key_id, key_hash, roles, cert_identity, created_at, detokenize_rate, \
                 reuse_rate, reuse_group) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    row.info.name,
                    row.key_id,
                    &row.key_hash[..],
                    roles_to_text(&row.info.roles),
                    row.info.cert_identity,
                    row.info.created_at,
                    row.info.detokenize_rate,
                    row.info.reuse_rate,
                    row.info.reuse_group
                ],
            )?;
            bump_generation(tx)?;
            st.audit.push(AuditEntry::new(
                &caller,
                "client_add",
                &row.info.name,
                "OK",
                &roles_to_text(&row.info.roles),
            ));
            Ok(())
        })
    }

    fn revoke_client(&self, name: String, caller: Caller) -> StoreFuture<bool> {
        self.admin(move |tx, _keyring, st| {
            let n = tx.execute(
                "UPDATE clients SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, now_micros()],
            )?;
            if n > 0 {
                bump_generation(tx)?;
            }
            let outcome = if n > 0 { "OK" } else { "NOT_FOUND" };
            st.audit.push(AuditEntry::new(
                &caller,
                "client_revoke",
                &name,
                outcome,
                "",
            ));
            Ok(n > 0)
        })
    }

    fn clients(&self) -> StoreFuture<Vec<ClientRow>> {
        self.read(query_clients)
    }

    fn add_admin_request(&self, row: AdminRequestRow, caller: Caller) -> StoreFuture<()> {
        self.admin(move |tx, _keyring, st| {
            tx.execute(
                "INSERT INTO admin_requests(id, operation, params, requester, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    row.id,
                    row.operation,
                    row.params,
                    row.requester,
                    row.created_at,
                    row.expires_at
                ],
            )?;
            st.audit.push(AuditEntry::new(
                &caller,
                "admin_request",
                &row.id,
                "OK",
                &format!("{} {}", row.operation, row.params),
            ));
            Ok(())
        })
    }

    fn admin_requests(&self) -> StoreFuture<Vec<AdminRequestRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, operation, params, requester, created_at, expires_at, approver, \
                 approved_at FROM admin_requests ORDER BY created_at DESC, id",
            )?;
            let rows = stmt.query_map([], admin_request_from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(Error::from)
        })
    }

    fn approve_admin_request(
        &self,
        id: String,
        approver: Caller,
        now: Micros,
    ) -> StoreFuture<AdminRequestRow> {
        self.admin(move |tx, _keyring, st| {
            let row = tx
                .query_row(
                    "SELECT id, operation, params, requester, created_at, expires_at, approver, \
                     approved_at FROM admin_requests WHERE id = ?1",
                    [&id],
                    admin_request_from_row,
                )
                .optional()?
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
            let n = tx.execute(
                "UPDATE admin_requests SET approver = ?2, approved_at = ?3 \
                 WHERE id = ?1 AND approver IS NULL",
                params![id, approver.principal, now],
            )?;
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
            Ok(AdminRequestRow {
                approver: Some(approver.principal.clone()),
                approved_at: Some(now),
                ..row
            })
        })
    }

    fn audit_records(&self, from: u64, limit: usize) -> StoreFuture<Vec<AuditRecord>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!("{AUDIT_SELECT_FROM} LIMIT ?2"))?;
            let rows = stmt.query_map(params![from as i64, limit as i64], audit_record_from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(Error::from)
        })
    }

    fn generation(&self) -> StoreFuture<u64> {
        self.read(read_generation)
    }

    fn audit_head(&self) -> StoreFuture<Option<(u64, Vec<u8>)>> {
        self.read(recorded_head)
    }

    fn audit_walk(&self, mut visit: AuditVisitor) -> StoreFuture<Option<(u64, Vec<u8>)>> {
        self.read(move |conn| {
            // One read transaction: the head and every record come from the same snapshot.
            conn.execute_batch("BEGIN")?;
            let result = (|| -> Result<Option<(u64, Vec<u8>)>> {
                let head = recorded_head(conn)?;
                let mut stmt = conn.prepare_cached(AUDIT_SELECT_FROM)?;
                let mut rows = stmt.query([1i64])?;
                while let Some(row) = rows.next()? {
                    visit(&audit_record_from_row(row)?);
                }
                Ok(head)
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
    }

    fn audit_checkpoint_source(&self) -> StoreFuture<CheckpointSource> {
        self.read(|conn| {
            conn.execute_batch("BEGIN")?;
            let result = (|| -> Result<CheckpointSource> {
                let head: Option<(i64, Option<Vec<u8>>)> = conn
                    .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let (seq, hash) = match head {
                    Some((s, h)) => (s as u64, hash32(h.as_deref())?),
                    None => (0, AUDIT_GENESIS_HASH),
                };
                let (key_id, wrapped_key): (i64, Vec<u8>) = conn
                    .prepare_cached(
                        "SELECT id, wrapped FROM audit_signing_keys WHERE state = 'active'",
                    )?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
                    .ok_or_else(|| {
                        Error::FailedPrecondition("the vault has no audit signing key".into())
                    })?;
                Ok(CheckpointSource {
                    vault: vault_hex(conn)?,
                    seq,
                    hash,
                    key_id: key_id as u32,
                    wrapped_key,
                })
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
    }

    fn audit_signing_keys(&self) -> StoreFuture<Vec<AuditSigningKeyInfo>> {
        self.read(query_signing_keys)
    }

    fn rotate_audit_signing_key(&self, caller: Caller) -> StoreFuture<(u32, AuditPublicKey)> {
        self.admin(move |tx, keyring, st| rotate_signing_in_tx(tx, keyring, st, &caller))
    }

    fn rewrap_batch(&self, batch: RewrapBatch, caller: Caller) -> StoreFuture<RewrapOutcome> {
        lifecycle::rewrap_batch(self, batch, caller)
    }

    fn retire_key(&self, version: u32, caller: Caller) -> StoreFuture<bool> {
        lifecycle::retire_key(self, version, caller)
    }

    fn rekey_begin(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<crate::store::RekeyState> {
        lifecycle::rekey_begin(self, new_kwk, new_check, caller)
    }
    fn rekey_batch(&self, limit: usize, caller: Caller) -> StoreFuture<crate::store::RekeyOutcome> {
        lifecycle::rekey_batch(self, limit, caller)
    }
    fn rekey_finish(&self, caller: Caller) -> StoreFuture<u32> {
        lifecycle::rekey_finish(self, caller)
    }
    fn rotate_master(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<u32> {
        lifecycle::rotate_master(self, new_kwk, new_check, caller)
    }

    fn vault_id(&self) -> StoreFuture<Vec<u8>> {
        lifecycle::vault_id(self)
    }

    fn rows_by_version(&self) -> StoreFuture<Vec<(u32, u64)>> {
        lifecycle::rows_by_version(self)
    }

    fn sealed_rows(&self, after_id: i64, limit: usize) -> StoreFuture<Vec<SealedRow>> {
        lifecycle::sealed_rows(self, after_id, limit)
    }

    fn sample_sealed_rows(&self, n: usize) -> StoreFuture<Vec<SealedRow>> {
        lifecycle::sample_sealed_rows(self, n)
    }

    fn integrity_check(&self) -> StoreFuture<Vec<String>> {
        lifecycle::integrity_check(self)
    }

    fn backup_to(&self, out: PathBuf) -> StoreFuture<u64> {
        lifecycle::backup_to(self, out)
    }

    fn purge_count(
        &self,
        deleted_before: Option<Micros>,
        expired_before: Option<Micros>,
    ) -> StoreFuture<(u64, u64)> {
        lifecycle::purge_count(self, deleted_before, expired_before)
    }

    fn purge_batch(&self, batch: PurgeBatch, caller: Caller) -> StoreFuture<PurgeOutcome> {
        lifecycle::purge_batch(self, batch, caller)
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.pulse.stalled().is_none()
            && self.reads.stalled().is_none()
    }

    fn pause_checkpoints(&self) -> CheckpointPause {
        self.checkpoints.pause()
    }

    fn close(&self) -> StoreFuture<()> {
        self.stop_probe.store(true, Ordering::Relaxed);
        let prober = self.prober.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Dropping the last sender lets the writer drain its queue and stop.
        self.writer_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.reads.stop();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                if let Some(p) = prober {
                    let _ = p.join();
                }
                if let Some(w) = writer {
                    let _ = w.join();
                }
            })
            .await
            .map_err(|e| Error::Internal(format!("join writer: {e}")))
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop_probe.store(true, Ordering::Relaxed);
        self.writer_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
        self.reads.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader with a memory map drops it whenever the writer committed since its last read,
    /// so under writes each lookup would unmap and fault the map back in (BENCHMARKS.md,
    /// "Issue 14 after stop 25").
    #[test]
    fn readers_read_without_a_memory_map_and_the_writer_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let writer = Connection::open(&path).unwrap();
        set_pragmas(&writer, None).unwrap();
        writer.execute_batch("CREATE TABLE t(x)").unwrap();
        let reader = open_reader(&path, BUSY_TIMEOUT).unwrap();
        let mmap =
            |c: &Connection| -> i64 { c.query_row("PRAGMA mmap_size", [], |r| r.get(0)).unwrap() };
        assert_eq!(mmap(&reader), 0);
        assert_eq!(mmap(&writer), MMAP_SIZE);
    }
}
