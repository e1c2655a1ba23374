//! Storage: the narrow interface the vault talks to ([`Storage`]: operations, not SQL) and
//! its two implementations side by side: the embedded SQLite store ([`sqlite::SqliteStore`],
//! the default) and the shared PostgreSQL store ([`postgres::PgStore`], for many stateless
//! replicas). [`StoreLocation`] names one of them and is all the vault knows of the choice.
//!
//! The store persists; it does not decide. What it is handed from above: the keyring (the
//! unwrapped keys and the rotation policy the writer applies inside its transaction, so the
//! per-version counts stay exact), and a commit observer for metrics
//! ([`set_commit_observer`]). The domain types it stores live in [`crate::model`].
//!
//! Every write goes through one writer that folds whatever is queued into one transaction
//! (group commit) and answers callers only after `COMMIT` returned with `synchronous=FULL`.
//! Audit records ride in the same transactions as the data they describe. A reveal's
//! lookup rides with its audit record too where the backend can ([`Storage::reveal`]:
//! SQLite's writer). Other reads use a small pool of read-only connections (SQLite: a point
//! read on the calling thread when a connection is free, else on the reader threads).

pub mod copy;
pub mod datadir;
pub mod lifecycle;
pub mod location;
pub mod lock;
pub mod migrations;
pub mod postgres;
pub mod space;
pub mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::audit::{AuditEntry, AuditRecord};
use crate::card::{Brand, Pan};
use crate::crypto::{KeyWrappingKey, Sealed};
use crate::error::Result;
use crate::keyring::KeyRow;
use crate::model::{Caller, ClientInfo, KeyVersionInfo, Micros};
use crate::token::TokenFormat;

pub use lifecycle::{PurgeBatch, PurgeOutcome, RewrapBatch, RewrapOutcome, SealedRow};

pub use location::StoreLocation;
pub use sqlite::OpenParams;

/// Called after every group commit with (requests in the group, time taken, committed).
pub type CommitObserver = fn(usize, std::time::Duration, bool);

static COMMIT_OBSERVER: std::sync::OnceLock<CommitObserver> = std::sync::OnceLock::new();

/// Installs the process-wide commit observer (metrics); the first call wins.
pub fn set_commit_observer(f: CommitObserver) {
    let _ = COMMIT_OBSERVER.set(f);
}

pub(crate) fn observe_commit(n: usize, elapsed: std::time::Duration, ok: bool) {
    if let Some(f) = COMMIT_OBSERVER.get() {
        f(n, elapsed, ok);
    }
}

/// Called after the SQLite writer reset a WAL past its bound with (time taken, completed).
pub type WalResetObserver = fn(std::time::Duration, bool);

static WAL_RESET_OBSERVER: std::sync::OnceLock<WalResetObserver> = std::sync::OnceLock::new();

/// Installs the process-wide WAL reset observer (metrics); the first call wins.
pub fn set_wal_reset_observer(f: WalResetObserver) {
    let _ = WAL_RESET_OBSERVER.set(f);
}

pub(crate) fn observe_wal_reset(elapsed: std::time::Duration, done: bool) {
    if let Some(f) = WAL_RESET_OBSERVER.get() {
        f(elapsed, done);
    }
}

/// While alive, this process starts no background maintenance that would hold a lock of the
/// store (SQLite: a WAL checkpoint); see [`Storage::pause_checkpoints`]. A backend without
/// such maintenance hands out an empty pause.
pub struct CheckpointPause {
    _guard: Option<Box<dyn Send>>,
}

impl CheckpointPause {
    pub fn new(guard: impl Send + 'static) -> CheckpointPause {
        CheckpointPause {
            _guard: Some(Box::new(guard)),
        }
    }
    pub fn none() -> CheckpointPause {
        CheckpointPause { _guard: None }
    }
}

pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// A PAN prepared for insertion: token drawn, PAN sealed and fingerprinted by the caller, so
/// the writer only re-seals when the active key changed or the token collided.
pub struct NewToken {
    pub pan: Pan,
    pub token: String,
    pub sealed: Sealed,
    pub key_version: u32,
    /// Keyed fingerprint of the PAN, only when `reuse_existing` asked for one: a vault keeps
    /// no more PAN-derived values than its callers need, and an index entry fewer per row.
    pub fingerprint: Option<[u8; 32]>,
    /// During a rekey: the fingerprint without the newest layer, which rows not yet
    /// re-layered still have; the reuse lookup finds either.
    pub fingerprint_prev: Option<[u8; 32]>,
    /// The fingerprint layers (`Fingerprints::depth`) `fingerprint` was computed under: the
    /// writer catches it up (`NewToken::catch_up_fingerprint`) if a reload added one since.
    pub fingerprint_depth: usize,
    pub reuse_existing: bool,
    pub meta: TokenMeta,
    /// The vault's time when the request was taken: `reuse_existing` judges expiry by it (never
    /// the system clock), as the lookup does, so it never returns a token detokenize refuses.
    pub now: Micros,
}

impl NewToken {
    /// Called by the writers before the reuse lookup and the insert: a fingerprint computed
    /// before a reload added a layer gets it now (see `Fingerprints::catch_up`).
    pub fn catch_up_fingerprint(&mut self, fps: &crate::keyring::Fingerprints) {
        if let Some(fp) = self.fingerprint {
            if let Some((fp, prev)) = fps.catch_up(&fp, self.fingerprint_depth) {
                self.fingerprint = Some(fp);
                self.fingerprint_prev = prev;
                self.fingerprint_depth = fps.depth();
            }
        }
    }
}

/// What is stored beside the ciphertext: what PCI DSS allows to be shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMeta {
    pub format: TokenFormat,
    pub brand: Brand,
    pub pan_length: u32,
    pub bin: String,
    pub last4: String,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
}

impl TokenMeta {
    /// The canonical bytes the ciphertext's AAD binds (row format 2).
    pub fn canonical(&self) -> Vec<u8> {
        canonical_meta(
            self.format.code(),
            self.brand.code(),
            i64::from(self.pan_length),
            &self.bin,
            &self.last4,
            self.created_at,
            self.expires_at,
        )
    }
}

/// Canonical encoding of a row's metadata, from the stored column values as they are (so an
/// out-of-range code is bound as itself, never normalised into a valid one): format i64 BE ‖
/// brand i64 BE ‖ pan_length i64 BE ‖ len(bin) u32 BE ‖ bin ‖ len(last4) u32 BE ‖ last4 ‖
/// created_at i64 BE ‖ expiry flag u8 (0 none, 1 some) ‖ expires_at i64 BE (0 when none).
/// Fixed-width fields and length prefixes: no two rows share an encoding.
pub fn canonical_meta(
    format: i64,
    brand: i64,
    pan_length: i64,
    bin: &str,
    last4: &str,
    created_at: i64,
    expires_at: Option<i64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * 5 + 4 * 2 + 1 + bin.len() + last4.len());
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(&brand.to_be_bytes());
    out.extend_from_slice(&pan_length.to_be_bytes());
    for text in [bin, last4] {
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&created_at.to_be_bytes());
    out.push(u8::from(expires_at.is_some()));
    out.extend_from_slice(&expires_at.unwrap_or(0).to_be_bytes());
    out
}

/// A live token as the writer stored or found it.
#[derive(Clone, Debug)]
pub struct StoredToken {
    pub token: String,
    pub key_version: u32,
    pub created: bool,
    pub meta: TokenMeta,
}

/// A live token row with its ciphertext, for detokenize.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub token: String,
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub meta: TokenMeta,
    /// `crypto::ROW_FORMAT_*` the row says it was sealed in.
    pub row_format: u32,
    /// [`canonical_meta`] of the stored columns, for the AAD.
    pub bound_meta: Vec<u8>,
}

/// A principal as stored, with its API key hash.
#[derive(Clone, Debug)]
pub struct ClientRow {
    pub info: ClientInfo,
    pub key_id: String,
    pub key_hash: [u8; 32],
}

/// An admin operation under dual control, awaiting (or given) a second admin's approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRequestRow {
    pub id: String,
    /// What is to be done, e.g. `revoke_key`, `add_client`.
    pub operation: String,
    /// Its parameters (JSON); never a secret.
    pub params: String,
    pub requester: String,
    pub created_at: Micros,
    /// Approval after this time is refused.
    pub expires_at: Micros,
    pub approver: Option<String>,
    pub approved_at: Option<Micros>,
}

/// The vault's identity, read before anything else to check the master key.
#[derive(Clone, Debug)]
pub struct VaultHeader {
    pub vault_id: Vec<u8>,
    pub key_check: Vec<u8>,
    pub wrapped_fingerprint_key: Vec<u8>,
    pub wrapped_audit_key: Vec<u8>,
    /// What `keys rotate-master --rekey` added (empty for a vault never rekeyed).
    pub layers: KeyLayers,
}

/// The `meta` keys `--rekey` writes; absent in a vault never rekeyed.
pub const REKEY_META_KEYS: [&str; 4] = [
    "fingerprint_layers",
    "retired_audit_keys",
    "audit_key_from",
    "rekey",
];

/// Key material and state added by `keys rotate-master --rekey` (see [`crate::vault::rekey`]).
#[derive(Clone, Debug, Default)]
pub struct KeyLayers {
    /// Wrapped fingerprint layers 1..=n, [`crate::crypto::WRAPPED_KEY_LEN`] bytes each.
    pub fingerprint_layers: Vec<u8>,
    /// Replaced audit MAC keys: (first sequence number u64 BE ‖ wrapped key) each.
    pub retired_audit_keys: Vec<u8>,
    /// Sequence number of the first record MACed under the current audit key.
    pub audit_key_from: u64,
    /// A rekey in progress.
    pub rekey: Option<RekeyState>,
}

impl KeyLayers {
    /// From the optional `meta` values; an ill-formed one is DataLoss.
    pub fn from_meta(mut get: impl FnMut(&str) -> Result<Option<Vec<u8>>>) -> Result<KeyLayers> {
        let bad =
            |k: &str| crate::error::Error::DataLoss(format!("vault metadata `{k}` is malformed"));
        let fingerprint_layers = get("fingerprint_layers")?.unwrap_or_default();
        if fingerprint_layers.len() % crate::crypto::WRAPPED_KEY_LEN != 0 {
            return Err(bad("fingerprint_layers"));
        }
        let retired_audit_keys = get("retired_audit_keys")?.unwrap_or_default();
        if retired_audit_keys.len() % (8 + crate::crypto::WRAPPED_KEY_LEN) != 0 {
            return Err(bad("retired_audit_keys"));
        }
        let audit_key_from = match get("audit_key_from")? {
            None => 1,
            Some(v) => u64::from_be_bytes(v.try_into().map_err(|_| bad("audit_key_from"))?),
        };
        let rekey = match get("rekey")? {
            None => None,
            Some(v) => Some(RekeyState::decode(&v).ok_or_else(|| bad("rekey"))?),
        };
        Ok(KeyLayers {
            fingerprint_layers,
            retired_audit_keys,
            audit_key_from,
            rekey,
        })
    }
}

/// A `--rekey` between its first transaction and its last: the new active data key version,
/// the last row id that existed at the switch, and the last row id already re-sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RekeyState {
    pub version: u32,
    pub end_id: i64,
    pub cursor: i64,
}

impl RekeyState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.end_id.to_be_bytes());
        out.extend_from_slice(&self.cursor.to_be_bytes());
        out
    }
    pub fn decode(v: &[u8]) -> Option<RekeyState> {
        if v.len() != 20 {
            return None;
        }
        Some(RekeyState {
            version: u32::from_be_bytes(v[0..4].try_into().ok()?),
            end_id: i64::from_be_bytes(v[4..12].try_into().ok()?),
            cursor: i64::from_be_bytes(v[12..20].try_into().ok()?),
        })
    }
}

/// One batch of a rekey's re-seal pass.
#[derive(Clone, Debug, Default)]
pub struct RekeyOutcome {
    /// Rows re-sealed under the new data key (and their fingerprints re-layered).
    pub resealed: u64,
    /// Tokens whose ciphertext failed authentication; left as they were.
    pub failed: Vec<String>,
    /// False once the pass reached the end (nothing was left to do).
    pub more: bool,
}

/// An audit signing key as stored: its number, public half and state.
#[derive(Clone, Debug)]
pub struct AuditSigningKeyInfo {
    pub id: u32,
    pub public_key: crate::crypto::AuditPublicKey,
    pub active: bool,
    pub created_at: Micros,
    pub retired_at: Option<Micros>,
}

/// What a checkpoint signs, read in one snapshot: the chain's head and the signing key
/// active at that point.
#[derive(Clone, Debug)]
pub struct CheckpointSource {
    /// Vault id, hex.
    pub vault: String,
    pub seq: u64,
    pub hash: [u8; 32],
    pub key_id: u32,
    pub wrapped_key: Vec<u8>,
}

/// Hands one operation to a backend's writer and waits for its answer, which the writer
/// sends after its group's commit (or with the group's error). `None`: the store is closed.
pub(crate) async fn send_to_writer<Op, T>(
    sender: Option<tokio::sync::mpsc::Sender<Op>>,
    op: Op,
    answer: tokio::sync::oneshot::Receiver<Result<T>>,
) -> Result<T> {
    let closed = || crate::error::Error::Unavailable("the vault is closed".into());
    let sender = sender.ok_or_else(closed)?;
    sender.send(op).await.map_err(|_| closed())?;
    answer
        .await
        .map_err(|_| crate::error::Error::Internal("the writer stopped before answering".into()))?
}

/// Turns a reveal's looked-up rows into its audit records, inside the store's transaction
/// (see [`Storage::reveal`]): `Ok(records)` to commit them, or `Err(rows)` to hand the rows
/// back with nothing written, when deciding needs what cannot be done there (a key version
/// not loaded yet). It runs on the store's writer, so it must not block or wait.
pub type RevealDecision = Box<
    dyn FnOnce(Vec<Option<TokenRow>>) -> std::result::Result<Vec<AuditEntry>, Vec<Option<TokenRow>>>
        + Send,
>;

/// Called for each audit record of a snapshot walk, in ascending order.
pub type AuditVisitor = Box<dyn FnMut(&AuditRecord) + Send>;

/// What every store provides. Adding a method means implementing it in both backends:
///
/// - **SQLite** (`sqlite/`): writes go through the single writer (`SqliteStore::admin` for
///   admin work: one immediate transaction between serving groups, with `begin_state` /
///   `finish_state` around it so the audit chain and key counts stay in step), reads through
///   the read pool; a commit that destroys data calls `mark_destroyed`, one that changes
///   keys or clients `bump_generation`.
/// - **PostgreSQL** (`postgres/`): writes run in their own transaction that begins with
///   `begin_state` (it locks the `audit_head` row FOR UPDATE: the one lock that orders every
///   writer of every replica) and ends with `finish_state` (the `admin_tx!` macro does both);
///   reads on a pooled connection, in one REPEATABLE READ transaction when they must agree
///   with each other; a change to keys or clients bumps `counters.generation`. New tables
///   need a migration in `postgres/schema.rs` beside the SQLite one, the GRANTs in the
///   README cover them, and `store/copy.rs` must copy them (it refuses unknown tables).
///
/// Both: the audit record of a change rides in the change's transaction (push it on
/// `TxState::audit`), errors are `crate::error::Error` (PostgreSQL ones through
/// `postgres::connect::map_err`), and `tests/conformance.rs` gets one body for the behaviour.
pub trait Storage: Send + Sync + 'static {
    /// Inserts (or, with `reuse_existing`, finds) tokens and appends one audit record per
    /// item, all in one group commit. One result per item, in order.
    fn tokenize(
        &self,
        items: Vec<NewToken>,
        caller: Caller,
    ) -> StoreFuture<Vec<Result<StoredToken>>>;
    /// Live rows (not deleted, not expired at `now`) for each token, in order.
    fn lookup(&self, tokens: Vec<String>, now: Micros) -> StoreFuture<Vec<Option<TokenRow>>>;
    /// A reveal: looks up `tokens` as [`Storage::lookup`] does, hands the rows to `decide` and
    /// commits the audit records it returns. Resolves to `None` once those are committed,
    /// or to `Some(rows)` when `decide` handed the rows back (nothing written). SQLite does
    /// it all in one trip to its writer: the lookup on the writer's own connection, whose
    /// page cache survives its commits, in the group that commits the records.
    fn reveal(
        &self,
        tokens: Vec<String>,
        now: Micros,
        decide: RevealDecision,
    ) -> StoreFuture<Option<Vec<Option<TokenRow>>>>;
    /// Destroys the ciphertext of a live token and appends the audit record.
    fn delete(&self, token: String, caller: Caller) -> StoreFuture<bool>;
    /// Appends audit records; resolves once they are committed.
    fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()>;
    /// New active version; the previous one becomes decrypt-only. With `unless_rekey`,
    /// refused (FailedPrecondition) in the same transaction when a rekey is in progress: the
    /// first step of a revoke, whose rewrap a rekey would refuse.
    fn rotate_key(&self, caller: Caller, unless_rekey: bool) -> StoreFuture<u32>;
    fn key_rows(&self) -> StoreFuture<Vec<KeyRow>>;
    fn key_usage(&self) -> StoreFuture<Vec<KeyVersionInfo>>;
    fn add_client(&self, row: ClientRow, caller: Caller) -> StoreFuture<()>;
    fn revoke_client(&self, name: String, caller: Caller) -> StoreFuture<bool>;
    fn clients(&self) -> StoreFuture<Vec<ClientRow>>;
    /// Records a dual-control request (and its audit record).
    fn add_admin_request(&self, row: AdminRequestRow, caller: Caller) -> StoreFuture<()>;
    /// Every dual-control request, newest first.
    fn admin_requests(&self) -> StoreFuture<Vec<AdminRequestRow>>;
    /// Marks request `id` approved by `approver` at `now`, atomically refusing an unknown,
    /// already approved or expired request and the requester's own approval; returns it.
    fn approve_admin_request(
        &self,
        id: String,
        approver: Caller,
        now: Micros,
    ) -> StoreFuture<AdminRequestRow>;
    /// Audit records with `seq >= from`, at most `limit`, ascending.
    fn audit_records(&self, from: u64, limit: usize) -> StoreFuture<Vec<AuditRecord>>;
    /// Counter bumped by every change to keys or clients, from any process.
    fn generation(&self) -> StoreFuture<u64>;
    /// Sequence number and MAC of the newest audit record, as recorded beside the chain.
    fn audit_head(&self) -> StoreFuture<Option<(u64, Vec<u8>)>>;
    /// Walks every audit record and reads the recorded head in ONE read transaction, so a
    /// busy writer cannot make the two disagree. Returns the recorded head.
    fn audit_walk(&self, visit: AuditVisitor) -> StoreFuture<Option<(u64, Vec<u8>)>>;
    /// The chain's head and the active signing key, in one snapshot.
    fn audit_checkpoint_source(&self) -> StoreFuture<CheckpointSource>;
    /// Every audit signing key, oldest first.
    fn audit_signing_keys(&self) -> StoreFuture<Vec<AuditSigningKeyInfo>>;
    /// New active audit signing key; the previous one signs the handover in the rotation
    /// record and its private half is destroyed. Returns the new key's number and public key.
    fn rotate_audit_signing_key(
        &self,
        caller: Caller,
    ) -> StoreFuture<(u32, crate::crypto::AuditPublicKey)>;
    /// Re-seals one batch of rows under the active version, counting each against it, with
    /// one audit record, in one transaction between serving groups.
    fn rewrap_batch(&self, batch: RewrapBatch, caller: Caller) -> StoreFuture<RewrapOutcome>;
    /// Retires a decrypt-only version no row uses and destroys its wrapped key. False when
    /// it was already retired; FailedPrecondition (with the row count) while rows use it.
    fn retire_key(&self, version: u32, caller: Caller) -> StoreFuture<bool>;
    /// Re-wraps every stored key under `new_kwk` and stores `new_check`, in one transaction.
    /// Returns the number of data keys re-wrapped.
    fn rotate_master(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<u32>;
    /// First transaction of `keys rotate-master --rekey`: re-wraps every stored key under
    /// `new_kwk`, adds a data key version, a fingerprint layer and an audit key wrapped only
    /// under it, retires the audit key (MAC switch recorded in the chain) and records the
    /// [`RekeyState`]. FailedPrecondition when a rekey is already in progress.
    fn rekey_begin(
        &self,
        new_kwk: KeyWrappingKey,
        new_check: Vec<u8>,
        caller: Caller,
    ) -> StoreFuture<RekeyState>;
    /// Re-seals up to `limit` rows after the recorded cursor under the active version and
    /// re-layers their fingerprints, advancing the cursor in the same transaction.
    fn rekey_batch(&self, limit: usize, caller: Caller) -> StoreFuture<RekeyOutcome>;
    /// Last transaction: retires (destroys) every data key older than the rekey's version,
    /// once no row uses one, and clears the state. Returns the versions retired.
    fn rekey_finish(&self, caller: Caller) -> StoreFuture<u32>;
    fn vault_id(&self) -> StoreFuture<Vec<u8>>;
    /// Rows holding a ciphertext, per key version referenced.
    fn rows_by_version(&self) -> StoreFuture<Vec<(u32, u64)>>;
    /// Rows holding a ciphertext with `id > after_id`, ascending, at most `limit`.
    fn sealed_rows(&self, after_id: i64, limit: usize) -> StoreFuture<Vec<SealedRow>>;
    /// A random sample of rows holding a ciphertext.
    fn sample_sealed_rows(&self, n: usize) -> StoreFuture<Vec<SealedRow>>;
    /// Problems reported by the database's integrity check; empty when sound.
    fn integrity_check(&self) -> StoreFuture<Vec<String>>;
    /// Writes a consistent snapshot of the database to a new file; returns its size.
    fn backup_to(&self, out: PathBuf) -> StoreFuture<u64>;
    /// Rows a purge with these cut-offs would remove: (tombstoned, expired).
    fn purge_count(
        &self,
        deleted_before: Option<Micros>,
        expired_before: Option<Micros>,
    ) -> StoreFuture<(u64, u64)>;
    /// Removes one batch of tombstoned and/or expired rows, with one audit record.
    fn purge_batch(&self, batch: PurgeBatch, caller: Caller) -> StoreFuture<PurgeOutcome>;
    /// False after a write failed for lack of storage, until a later write succeeds.
    fn healthy(&self) -> bool;
    /// Pauses this process's background checkpoints until the pause is dropped, after waiting
    /// for one in progress to end: a process about to stop (Ctrl-Z) then holds no lock.
    /// Blocks for at most one checkpoint's busy timeout.
    fn pause_checkpoints(&self) -> CheckpointPause;
    /// Lets queued writes commit, then stops the writer and the readers.
    fn close(&self) -> StoreFuture<()>;
}
