//! Storage: the narrow interface the vault talks to ([`Storage`]: operations, not SQL) and
//! its embedded SQLite implementation ([`sqlite::SqliteStore`]).
//!
//! Every write goes through one writer that folds whatever is queued into one transaction
//! (group commit) and answers callers only after `COMMIT` returned with `synchronous=FULL`.
//! Audit records ride in the same transactions as the data they describe. Reads run on a
//! small pool of read-only connections on their own threads, never on async workers.
//! A PostgreSQL backend can implement the same trait later.

pub mod lifecycle;
pub mod lock;
pub mod migrations;
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
use crate::token::TokenFormat;
use crate::vault::{Caller, ClientInfo, KeyVersionInfo, Micros};

pub use lifecycle::{PurgeBatch, PurgeOutcome, RewrapBatch, RewrapOutcome, SealedRow};

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
    pub reuse_existing: bool,
    pub meta: TokenMeta,
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
}

/// A principal as stored, with its API key hash.
#[derive(Clone, Debug)]
pub struct ClientRow {
    pub info: ClientInfo,
    pub key_id: String,
    pub key_hash: [u8; 32],
}

/// The vault's identity, read before anything else to check the master key.
#[derive(Clone, Debug)]
pub struct VaultHeader {
    pub vault_id: Vec<u8>,
    pub key_check: Vec<u8>,
    pub wrapped_fingerprint_key: Vec<u8>,
    pub wrapped_audit_key: Vec<u8>,
}

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
    /// Destroys the ciphertext of a live token and appends the audit record.
    fn delete(&self, token: String, caller: Caller) -> StoreFuture<bool>;
    /// Appends audit records; resolves once they are committed.
    fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()>;
    /// New active version; the previous one becomes decrypt-only.
    fn rotate_key(&self, caller: Caller) -> StoreFuture<u32>;
    fn key_rows(&self) -> StoreFuture<Vec<KeyRow>>;
    fn key_usage(&self) -> StoreFuture<Vec<KeyVersionInfo>>;
    fn add_client(&self, row: ClientRow, caller: Caller) -> StoreFuture<()>;
    fn revoke_client(&self, name: String, caller: Caller) -> StoreFuture<bool>;
    fn clients(&self) -> StoreFuture<Vec<ClientRow>>;
    /// Audit records with `seq >= from`, at most `limit`, ascending.
    fn audit_records(&self, from: u64, limit: usize) -> StoreFuture<Vec<AuditRecord>>;
    /// Counter bumped by every change to keys or clients, from any process.
    fn generation(&self) -> StoreFuture<u64>;
    /// Sequence number and MAC of the newest audit record, as recorded beside the chain.
    fn audit_head(&self) -> StoreFuture<Option<(u64, Vec<u8>)>>;
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
    /// Lets queued writes commit, then stops the writer and the readers.
    fn close(&self) -> StoreFuture<()>;
}
