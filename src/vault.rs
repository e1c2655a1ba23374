//! The domain operations: tokenize, detokenize, info, delete, and the admin operations on keys
//! and clients. Knows neither tonic nor SQL: it validates, encrypts and decrypts, and talks to
//! storage through [`crate::store::Storage`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::audit::{
    AuditEntry, AuditRecord, ChainVerifier, Checkpoint, CheckpointLines, TrailReport,
    TrailVerifier, Verification,
};
use crate::auth::Role;
use crate::card::{Brand, Pan};
use crate::crypto::{self, AuditPublicKey, DataKey, MasterKey, VaultId};
use crate::error::{outcome_of, Error, Result};
use crate::keyring::{Genesis, Keyring};
use crate::store::lock::DirLock;
use crate::store::{
    AuditSigningKeyInfo, ClientRow, NewToken, OpenParams, Storage, StoreLocation, StoredToken,
    TokenMeta, TokenRow, VaultHeader,
};
use crate::token::{self, Token, TokenFormat};

pub mod clock;
pub mod dual;
pub mod lifecycle;
pub mod rekey;
#[cfg(test)]
mod rekey_race_tests;
#[cfg(test)]
mod reveal_tests;
#[cfg(test)]
mod row_format_tests;
pub use crate::model::{
    now_micros, Caller, ClientInfo, KeyPolicy, KeyState, KeyVersionInfo, Micros,
};
pub use crate::store::datadir::{check_data_dir, create_private_dir, refuse_writable_by_others};
pub use clock::{Clock, VaultTime, EXPIRED_PURGE_GRACE};
pub use lifecycle::{
    CheckReport, PurgeOptions, PurgePlan, PurgeReport, RevokeReport, RewrapOptions, RewrapProgress,
    RewrapReport,
};
pub use rekey::{RekeyOptions, RekeyReport};

#[derive(Clone, Debug)]
pub struct VaultConfig {
    pub data_dir: PathBuf,
    pub key_policy: KeyPolicy,
    /// Read-only connections, each on its own thread.
    pub read_connections: usize,
    /// Largest number of items the writer folds into one transaction.
    pub max_group_items: usize,
    /// Bound of the writer's queue; callers wait (backpressure) when it is full.
    pub writer_queue: usize,
    /// Storage size limit in bytes (SQLite `max_page_count`); None = unlimited.
    pub max_storage_bytes: Option<u64>,
    /// WAL size past which the writer resets it; None: 64 MiB (1/16 of the storage limit).
    pub max_wal_bytes: Option<u64>,
    /// How long a write waits for a lock held by another process before UNAVAILABLE.
    pub busy_timeout: Duration,
    /// Where expiry and retention read the time (tests step it); see [`clock`].
    pub clock: Clock,
    /// A shared PostgreSQL store (`postgres://…`); None = SQLite in `data_dir`.
    pub store_url: Option<crate::config::StoreUrl>,
}

impl VaultConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> VaultConfig {
        VaultConfig {
            data_dir: data_dir.into(),
            key_policy: KeyPolicy::default(),
            read_connections: 4,
            max_group_items: 4096,
            writer_queue: 1024,
            max_storage_bytes: None,
            max_wal_bytes: None,
            busy_timeout: Duration::from_secs(10),
            clock: Clock::system(),
            store_url: None,
        }
    }

    /// Where this configuration's vault lives.
    pub fn location(&self) -> Result<StoreLocation> {
        StoreLocation::from_config(
            &self.data_dir,
            self.store_url.as_deref(),
            self.read_connections + 2,
        )
    }
}

pub struct TokenizeRequest {
    pub pan: Pan,
    pub format: TokenFormat,
    pub reuse_existing: bool,
    pub expires_at: Option<Micros>,
}

/// Everything about a token that may be shown without revealing the PAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub token: Token,
    pub masked_pan: String,
    pub last4: String,
    pub bin: String,
    pub brand: Brand,
    pub pan_length: u32,
    pub format: TokenFormat,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub key_version: u32,
}

#[derive(Clone, Debug)]
pub struct Tokenized {
    pub token: Token,
    /// False when `reuse_existing` returned a token that already existed.
    pub created: bool,
    pub info: TokenInfo,
}

#[derive(Debug)]
pub struct Revealed {
    pub pan: Pan,
    pub info: TokenInfo,
}

/// A reveal as asked: shared between [`Vault::reveal_batch`] and the decision it hands the
/// store, which may run on the store's writer thread.
struct RevealRequest {
    caller: Caller,
    action: &'static str,
    items: Vec<(Token, String)>,
}

impl RevealRequest {
    /// One result and one audit record per item, in order: `open` is called for each item
    /// with a row whose reason is acceptable.
    fn settle<R>(
        &self,
        rows: Vec<Option<R>>,
        mut open: impl FnMut(R) -> Result<Revealed>,
    ) -> (Vec<Result<Revealed>>, Vec<AuditEntry>) {
        let mut results = Vec::with_capacity(rows.len());
        let mut audit = Vec::with_capacity(rows.len());
        for ((token, reason), row) in self.items.iter().zip(rows) {
            // The reason is stored in the audit trail, so it must not carry a card number.
            let card_in_reason = crate::card::contains_card_number(reason);
            let r = match row {
                _ if card_in_reason => Err(Error::InvalidArgument(
                    "reason must not contain a card number (it is stored in the audit trail)"
                        .into(),
                )),
                Some(row) => open(row),
                None => Err(Error::NotFound),
            };
            audit.push(AuditEntry::new(
                &self.caller,
                self.action,
                token.as_str(),
                outcome_of(&r),
                if card_in_reason { "" } else { reason },
            ));
            results.push(r);
        }
        (results, audit)
    }
}

/// Per-client settings an admin chooses at `clients add`.
#[derive(Clone, Debug, Default)]
pub struct ClientLimits {
    /// Reveals per second; None = the server default.
    pub detokenize_rate: Option<f64>,
    /// `reuse_existing` lookups per second; None = the server default.
    pub reuse_rate: Option<f64>,
    /// Shared reuse scope; None = the client's own tokens only.
    pub reuse_group: Option<String>,
}

/// A principal as the server sees it after authentication.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: String,
    pub roles: Vec<Role>,
    /// Own detokenize limit in reveals per second; None = the server-wide default.
    pub detokenize_rate: Option<f64>,
    /// Own `reuse_existing` budget in lookups per second; None = the server-wide default.
    pub reuse_rate: Option<f64>,
    /// Named reuse group, if any.
    pub reuse_group: Option<String>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Prefix of every API key, so leaked keys are easy to recognise and scan for.
pub const API_KEY_PREFIX: &str = "tvk_";
/// How often a running vault looks for changes made by other processes (CLI).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Longest a running vault serves from a client list it could not confirm as current; past
/// it every request is refused UNAVAILABLE, so a revocation never fails open.
pub const CLIENTS_STALE_AFTER: Duration = Duration::from_secs(5);

/// The vault. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Storage>,
    keyring: Arc<Keyring>,
    clients: RwLock<Arc<ClientCache>>,
    /// When the client list was last confirmed current (read, or generation unchanged), in
    /// milliseconds since `opened`; enforced only while the watcher runs.
    clients_confirmed_ms: AtomicU64,
    opened: Instant,
    watching: AtomicBool,
    closed: AtomicBool,
    data_dir: PathBuf,
    location: StoreLocation,
    time: VaultTime,
    /// The data directory's lock, held shared while this vault is open (see `store::lock`);
    /// released by `close`.
    lock: std::sync::Mutex<Option<DirLock>>,
}

impl Inner {
    fn elapsed_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }
    fn confirm_clients(&self) {
        self.clients_confirmed_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
    }
    /// UNAVAILABLE when the watcher has not confirmed the client list for too long.
    fn check_clients_fresh(&self) -> Result<()> {
        if !self.watching.load(Ordering::Relaxed) {
            return Ok(());
        }
        let age = self
            .elapsed_ms()
            .saturating_sub(self.clients_confirmed_ms.load(Ordering::Relaxed));
        if age > CLIENTS_STALE_AFTER.as_millis() as u64 {
            return Err(Error::Unavailable(
                "the client list could not be read recently; refusing requests until it can".into(),
            ));
        }
        Ok(())
    }
}

/// Live principals by API key id and by certificate identity.
#[derive(Default)]
struct ClientCache {
    by_key_id: HashMap<String, ([u8; 32], Principal)>,
    by_cert: HashMap<String, Principal>,
}

impl ClientCache {
    fn build(rows: Vec<ClientRow>) -> ClientCache {
        let mut cache = ClientCache::default();
        for row in rows.into_iter().filter(|r| r.info.revoked_at.is_none()) {
            let principal = Principal {
                name: row.info.name.clone(),
                roles: row.info.roles.clone(),
                detokenize_rate: row.info.detokenize_rate,
                reuse_rate: row.info.reuse_rate,
                reuse_group: row.info.reuse_group.clone(),
            };
            if let Some(id) = &row.info.cert_identity {
                cache.by_cert.insert(id.clone(), principal.clone());
            }
            cache
                .by_key_id
                .insert(row.key_id, (row.key_hash, principal));
        }
        cache
    }
}

fn storage_params(cfg: &VaultConfig) -> OpenParams {
    OpenParams {
        read_connections: cfg.read_connections,
        max_group_items: cfg.max_group_items,
        writer_queue: cfg.writer_queue,
        max_storage_bytes: cfg.max_storage_bytes,
        max_wal_bytes: cfg.max_wal_bytes,
        busy_timeout: cfg.busy_timeout,
    }
}

impl Vault {
    /// Creates a new vault in `cfg.data_dir` (refuses if one exists).
    pub fn create(cfg: VaultConfig, master: &MasterKey) -> Result<Vault> {
        Vault::create_as(cfg, master, false)
    }

    /// [`Vault::create`] for `serve --dev`, recorded in the vault: only such a vault may be
    /// opened with the generated key file kept beside its data.
    pub fn create_dev(cfg: VaultConfig, master: &MasterKey) -> Result<Vault> {
        Vault::create_as(cfg, master, true)
    }

    fn create_as(cfg: VaultConfig, master: &MasterKey, dev: bool) -> Result<Vault> {
        let location = cfg.location()?;
        let lock = match location.data_dir() {
            Some(dir) => {
                check_data_dir(dir)?;
                create_private_dir(dir)?;
                Some(DirLock::shared(dir)?)
            }
            None => None,
        };
        let vault_id = VaultId::generate();
        let (kwk, check) = master.derive(&vault_id);
        let genesis = Genesis::generate(&kwk)?;
        let header = VaultHeader {
            vault_id: vault_id.0.to_vec(),
            key_check: check.to_stored()?,
            wrapped_fingerprint_key: genesis.fingerprint_key,
            wrapped_audit_key: genesis.audit_key,
            layers: Default::default(),
        };
        location.create(&header, &genesis.data_key, dev)?;
        tracing::info!(vault_id = %vault_id.to_hex(), "created vault");
        Vault::open_locked(cfg, location, master, lock)
    }

    /// Opens an existing vault; a wrong master key fails before anything is read or written.
    /// Refused while a restore holds the data directory (see `store::lock`).
    pub fn open(cfg: VaultConfig, master: &MasterKey) -> Result<Vault> {
        let location = cfg.location()?;
        let lock = match location.data_dir() {
            Some(dir) => {
                check_data_dir(dir)?;
                refuse_writable_by_others(dir)?;
                let present = location.exists() || dir.join(crate::store::lock::LOCK_FILE).exists();
                // Without either there is no vault, and `read_header` says so.
                present.then(|| DirLock::shared(dir)).transpose()?
            }
            None => None,
        };
        Vault::open_locked(cfg, location, master, lock)
    }

    fn open_locked(
        cfg: VaultConfig,
        location: StoreLocation,
        master: &MasterKey,
        lock: Option<DirLock>,
    ) -> Result<Vault> {
        if let Some(dir) = location.data_dir() {
            // On a full disk SQLite cannot even map its index: give back the reserve first.
            crate::store::space::release_reserve_if_low(dir);
        }
        crate::store::set_commit_observer(crate::metrics::observe_store_commit);
        crate::store::set_wal_reset_observer(crate::metrics::record_wal_reset);
        let header = location.read_header()?;
        let vault_id = VaultId::from_slice(&header.vault_id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = master.derive(&vault_id);
        // A token that cannot be used is UNAVAILABLE, not a wrong key.
        if !check.verify(&header.key_check)? {
            return Err(Error::WrongMasterKey);
        }
        let rows = location.initial_key_rows()?;
        let keyring = Arc::new(Keyring::new(kwk, &header, &rows, cfg.key_policy.clone())?);
        let store = location.open(keyring.clone(), &storage_params(&cfg))?;
        // After the store opened: it applies pending migrations the client query relies on.
        let clients = location.initial_clients()?;
        let newest = location.newest_recorded_time()?;
        let vault = Vault {
            inner: Arc::new(Inner {
                store,
                keyring,
                clients: RwLock::new(Arc::new(ClientCache::build(clients))),
                clients_confirmed_ms: AtomicU64::new(0),
                opened: Instant::now(),
                watching: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                data_dir: cfg.data_dir.clone(),
                location,
                time: VaultTime::new(cfg.clock.clone(), newest),
                lock: std::sync::Mutex::new(lock),
            }),
        };
        vault.start_watcher();
        Ok(vault)
    }

    /// True when `data_dir` holds a vault database.
    pub fn exists(data_dir: &Path) -> bool {
        StoreLocation::sqlite(data_dir).exists()
    }

    /// Picks up key and client changes made by other processes within [`WATCH_INTERVAL`].
    /// Clients and keys are refreshed independently: a key version this process cannot
    /// unwrap yet (a rotated master key before SIGHUP) must never hold back a revocation.
    fn start_watcher(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.inner.confirm_clients();
        self.inner.watching.store(true, Ordering::Relaxed);
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut seen_clients = None;
            let mut seen_keys = None;
            let mut warned_keys = false;
            let mut warned_generation = false;
            let mut warned_clients = false;
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Relaxed) {
                    break;
                }
                let vault = Vault { inner };
                let g = match vault.inner.store.generation().await {
                    Ok(g) => {
                        warned_generation = false;
                        g
                    }
                    Err(e) => {
                        // Once per failure streak; past CLIENTS_STALE_AFTER requests are refused.
                        if !warned_generation {
                            warned_generation = true;
                            tracing::warn!(error = %e, "could not check for client and key changes");
                        }
                        continue;
                    }
                };
                if seen_clients == Some(g) {
                    vault.inner.confirm_clients();
                } else {
                    match vault.refresh_clients().await {
                        Ok(()) => {
                            seen_clients = Some(g);
                            warned_clients = false;
                        }
                        Err(e) if !warned_clients => {
                            warned_clients = true;
                            tracing::warn!(error = %e, "could not refresh clients; retrying");
                        }
                        Err(_) => {}
                    }
                }
                if seen_keys != Some(g) {
                    match vault.refresh_keys().await {
                        Ok(()) => {
                            seen_keys = Some(g);
                            warned_keys = false;
                        }
                        Err(e) if !warned_keys => {
                            warned_keys = true;
                            tracing::warn!(error = %e, "could not refresh keys; retrying");
                        }
                        Err(_) => {}
                    }
                }
            }
        });
    }

    /// Reloads clients and keys, each on its own: a failure of one does not keep the
    /// other stale. Returns the first error.
    async fn refresh(&self) -> Result<()> {
        let clients = self.refresh_clients().await;
        let keys = self.refresh_keys().await;
        clients.and(keys)
    }

    async fn refresh_keys(&self) -> Result<()> {
        let rows = self.inner.store.key_rows().await?;
        self.inner.keyring.replace(&rows)
    }

    async fn refresh_clients(&self) -> Result<()> {
        let clients = self.inner.store.clients().await?;
        *self
            .inner
            .clients
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(ClientCache::build(clients));
        self.inner.confirm_clients();
        Ok(())
    }

    fn prepare(&self, req: TokenizeRequest, reuse_scope: &str) -> NewToken {
        let snapshot = self.inner.keyring.snapshot();
        let token = token::generate(req.format, &req.pan).into_string();
        let digits = req.pan.expose_digits().as_bytes();
        let now = self.now();
        let meta = TokenMeta {
            format: req.format,
            brand: req.pan.brand(),
            pan_length: req.pan.len() as u32,
            bin: req.pan.bin(),
            last4: req.pan.last4(),
            created_at: now,
            expires_at: req.expires_at,
        };
        // The AAD binds the metadata too: an edited column fails authentication.
        let sealed = snapshot.active.seal(&token, &meta.canonical(), digits);
        // Scoped: a lookup can only ever find a token of the caller's own reuse scope.
        let fps = self.inner.keyring.fingerprints();
        let (fingerprint, fingerprint_prev) = if req.reuse_existing {
            let (fp, prev) = fps.reuse(reuse_scope, digits);
            (Some(fp), prev)
        } else {
            (None, None)
        };
        NewToken {
            token,
            sealed,
            key_version: snapshot.active.version(),
            fingerprint,
            fingerprint_prev,
            fingerprint_depth: fps.depth(),
            reuse_existing: req.reuse_existing,
            meta,
            pan: req.pan,
            now,
        }
    }

    fn check_request(req: &TokenizeRequest, now: Micros) -> Result<()> {
        // Six plus four kept digits would leave a card under 15 digits with fewer hidden
        // digits than PCI DSS masking allows (GetTokenInfo shows only the last four there).
        if req.format == TokenFormat::PanShapedKeepBin
            && req.pan.len() < crate::card::BIN_VISIBLE_MIN_LEN
        {
            return Err(Error::InvalidArgument(format!(
                "format: PAN_SHAPED_KEEP_BIN needs a card number of at least {} digits",
                crate::card::BIN_VISIBLE_MIN_LEN
            )));
        }
        if let Some(at) = req.expires_at {
            if at <= now {
                return Err(Error::InvalidArgument("expires_at is in the past".into()));
            }
        }
        Ok(())
    }

    pub async fn tokenize(&self, caller: &Caller, req: TokenizeRequest) -> Result<Tokenized> {
        let mut results = self.tokenize_batch(caller, vec![req]).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("empty tokenize result".into())))
    }

    /// One result per request, in order; a failing item does not fail the others.
    pub async fn tokenize_batch(
        &self,
        caller: &Caller,
        reqs: Vec<TokenizeRequest>,
    ) -> Result<Vec<Result<Tokenized>>> {
        let now = self.now();
        let scope = caller.reuse_scope();
        let mut slots: Vec<Option<Result<Tokenized>>> = Vec::with_capacity(reqs.len());
        let mut items = Vec::with_capacity(reqs.len());
        for req in reqs {
            match Self::check_request(&req, now) {
                Ok(()) => {
                    slots.push(None);
                    items.push(self.prepare(req, &scope));
                }
                Err(e) => slots.push(Some(Err(e))),
            }
        }
        let stored = if items.is_empty() {
            Vec::new()
        } else {
            self.inner.store.tokenize(items, caller.clone()).await?
        };
        let mut stored = stored.into_iter();
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                Some(r) => r,
                None => match stored.next() {
                    Some(r) => r.map(tokenized),
                    None => Err(Error::Internal("missing tokenize result".into())),
                },
            })
            .collect())
    }

    /// Reveals the PAN; returns only after the audit record of the reveal is committed.
    pub async fn detokenize(
        &self,
        caller: &Caller,
        token: Token,
        reason: String,
    ) -> Result<Revealed> {
        let mut results = self.detokenize_batch(caller, vec![(token, reason)]).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("empty detokenize result".into())))
    }

    pub async fn detokenize_batch(
        &self,
        caller: &Caller,
        items: Vec<(Token, String)>,
    ) -> Result<Vec<Result<Revealed>>> {
        self.reveal_batch(caller, "detokenize", items).await
    }

    /// [`Vault::detokenize_batch`] recorded under another audit `action` (the proxy's
    /// `proxy_detokenize`): the same lookup, checks and fail-closed audit commit.
    ///
    /// One trip to the store where it can: the rows are opened inside the store's
    /// transaction ([`Storage::reveal`]) with the keys loaded here, and the PANs leave only
    /// once the store answers that the records of their reveals are committed. A row under
    /// a key version not loaded yet is handed back, and then the reveal takes two trips
    /// (lookup, refresh and open here, then the records).
    pub async fn reveal_batch(
        &self,
        caller: &Caller,
        action: &'static str,
        items: Vec<(Token, String)>,
    ) -> Result<Vec<Result<Revealed>>> {
        let tokens = items.iter().map(|(t, _)| t.as_str().to_owned()).collect();
        let request = Arc::new(RevealRequest {
            caller: caller.clone(),
            action,
            items,
        });
        let opened: Arc<Mutex<Option<Vec<Result<Revealed>>>>> = Arc::default();
        let now = self.now();
        // Not the whole vault: the decision is dropped on the writer's thread, and the last
        // handle of a vault dropped there would stop the writer from its own thread.
        let decide = {
            let (keyring, request, opened) =
                (self.inner.keyring.clone(), request.clone(), opened.clone());
            Box::new(move |rows: Vec<Option<TokenRow>>| {
                let snapshot = keyring.snapshot();
                let missing = rows
                    .iter()
                    .flatten()
                    .any(|row| snapshot.get(row.key_version).is_none());
                if missing {
                    return Err(rows);
                }
                let (results, audit) = request.settle(rows, |row| {
                    let key = snapshot.get(row.key_version).ok_or_else(|| {
                        Error::Internal("key version vanished from a snapshot".into())
                    })?;
                    open_row(key, row, now)
                });
                *opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(results);
                Ok(audit)
            })
        };
        match self.inner.store.reveal(tokens, now, decide).await? {
            None => opened
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| Error::Internal("reveal recorded without its results".into())),
            Some(rows) => {
                let mut opened = Vec::with_capacity(rows.len());
                for ((_, reason), row) in request.items.iter().zip(rows) {
                    opened.push(match row {
                        Some(row) if !crate::card::contains_card_number(reason) => {
                            Some(self.reveal(row).await)
                        }
                        _ => None,
                    });
                }
                let (results, audit) = request.settle(opened, |r| r);
                // Fail closed: no PAN leaves unless the record of its reveal is committed.
                self.inner.store.append_audit(audit).await?;
                Ok(results)
            }
        }
    }

    async fn reveal(&self, row: TokenRow) -> Result<Revealed> {
        let mut snapshot = self.inner.keyring.snapshot();
        if snapshot.get(row.key_version).is_none() {
            // Possibly rotated by another process a moment ago.
            if let Err(e) = self.refresh().await {
                // A version wrapped under a master key this process does not hold yet (a
                // rotation or rekey by another process) is unavailable here, not lost.
                return Err(if self.master_is_stale().await {
                    Error::Unavailable(crate::store::sqlite::STALE_MASTER.into())
                } else {
                    e
                });
            }
            snapshot = self.inner.keyring.snapshot();
        }
        let key = snapshot.get(row.key_version).ok_or_else(|| {
            Error::DataLoss(format!(
                "key version {} of this token is not available",
                row.key_version
            ))
        })?;
        open_row(key, row, self.now())
    }

    pub async fn info(&self, caller: &Caller, token: Token) -> Result<TokenInfo> {
        let mut rows = self
            .inner
            .store
            .lookup(vec![token.as_str().to_owned()], self.now())
            .await?;
        let r = match rows.pop().flatten() {
            // Authenticated like a reveal (the PAN is dropped, wiped, at once): an edited
            // row is DATA_LOSS here too, never a description of what the editor wrote.
            Some(row) => self.reveal(row).await.map(|r| r.info),
            None => Err(Error::NotFound),
        };
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(
                caller,
                "info",
                token.as_str(),
                outcome_of(&r),
                "",
            )])
            .await?;
        r
    }

    /// Destroys the ciphertext; idempotent (false when there was nothing live to delete).
    pub async fn delete(&self, caller: &Caller, token: Token) -> Result<bool> {
        self.inner
            .store
            .delete(token.into_string(), caller.clone())
            .await
    }

    /// Records a request that was refused before reaching the vault (authentication,
    /// authorisation, rate limit). `outcome` is the gRPC code name, e.g. "UNAUTHENTICATED".
    pub async fn audit_refusal(&self, caller: &Caller, action: &str, outcome: &str) -> Result<()> {
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(caller, action, "", outcome, "")])
            .await
    }

    /// One record standing for `outcome` refusals that were counted, not recorded one by
    /// one; `detail` says how many.
    pub async fn audit_summary(
        &self,
        caller: &Caller,
        action: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<()> {
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(caller, action, "", outcome, detail)])
            .await
    }

    /// Audit record for an event such as server start/stop.
    pub async fn audit_event(&self, caller: &Caller, action: &str, subject: &str) -> Result<()> {
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(caller, action, subject, "OK", "")])
            .await
    }

    pub async fn rotate_key(&self, caller: &Caller) -> Result<u32> {
        self.rotate(caller, false).await
    }

    /// `unless_rekey`: see [`crate::store::Storage::rotate_key`].
    pub(crate) async fn rotate(&self, caller: &Caller, unless_rekey: bool) -> Result<u32> {
        let v = self
            .inner
            .store
            .rotate_key(caller.clone(), unless_rekey)
            .await?;
        self.refresh().await?;
        Ok(v)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyVersionInfo>> {
        let max = self.inner.keyring.policy().max_encryptions;
        let mut keys = self.inner.store.key_usage().await?;
        for k in &mut keys {
            k.max_encryptions = max;
        }
        Ok(keys)
    }

    /// Creates a principal; returns its API key, which is shown once and stored only hashed.
    pub async fn add_client(
        &self,
        caller: &Caller,
        name: &str,
        roles: &[Role],
        cert_identity: Option<&str>,
    ) -> Result<String> {
        self.add_client_limited(caller, name, roles, cert_identity, None)
            .await
    }

    /// [`Vault::add_client`] with the client's own detokenize limit (reveals per second).
    pub async fn add_client_limited(
        &self,
        caller: &Caller,
        name: &str,
        roles: &[Role],
        cert_identity: Option<&str>,
        detokenize_rate: Option<f64>,
    ) -> Result<String> {
        let limits = ClientLimits {
            detokenize_rate,
            ..ClientLimits::default()
        };
        self.add_client_with(caller, name, roles, cert_identity, limits)
            .await
    }

    /// [`Vault::add_client`] with the client's own limits and reuse group.
    pub async fn add_client_with(
        &self,
        caller: &Caller,
        name: &str,
        roles: &[Role],
        cert_identity: Option<&str>,
        limits: ClientLimits,
    ) -> Result<String> {
        validate_client_name(name)?;
        if let Some(group) = &limits.reuse_group {
            validate_client_name(group).map_err(|_| {
                Error::InvalidArgument(
                    "reuse group must be 1-64 characters of letters, digits, '-', '_', '.', '@', ':'"
                        .into(),
                )
            })?;
        }
        if roles.is_empty() {
            return Err(Error::InvalidArgument(
                "a client needs at least one role".into(),
            ));
        }
        let key_id = base64url(&crypto::random_bytes::<9>());
        let secret = zeroize::Zeroizing::new(base64url(&crypto::random_bytes::<24>()));
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let row = ClientRow {
            info: ClientInfo {
                name: name.to_owned(),
                roles,
                cert_identity: cert_identity.map(str::to_owned),
                detokenize_rate: limits.detokenize_rate,
                reuse_rate: limits.reuse_rate,
                reuse_group: limits.reuse_group,
                created_at: now_micros(),
                revoked_at: None,
            },
            key_hash: crypto::api_key_hash(&secret),
            key_id: key_id.clone(),
        };
        self.inner.store.add_client(row, caller.clone()).await?;
        self.refresh_clients().await?;
        Ok(format!("{API_KEY_PREFIX}{key_id}_{}", secret.as_str()))
    }

    pub async fn list_clients(&self) -> Result<Vec<ClientInfo>> {
        Ok(self
            .inner
            .store
            .clients()
            .await?
            .into_iter()
            .map(|r| r.info)
            .collect())
    }

    /// False when there was no such live client.
    pub async fn revoke_client(&self, caller: &Caller, name: &str) -> Result<bool> {
        let revoked = self
            .inner
            .store
            .revoke_client(name.to_owned(), caller.clone())
            .await?;
        self.refresh_clients().await?;
        Ok(revoked)
    }

    /// UNAVAILABLE while the client list is older than [`CLIENTS_STALE_AFTER`]: who is
    /// revoked is not known, so nobody is served.
    pub fn check_clients_fresh(&self) -> Result<()> {
        self.inner.check_clients_fresh()
    }

    /// Resolves an API key (`authorization: Bearer <key>`) to a live principal, in constant
    /// time per candidate, from a snapshot refreshed within a second of any change.
    pub fn authenticate_api_key(&self, key: &str) -> Result<Principal> {
        const UNKNOWN: &str = "missing or unknown API key";
        self.inner.check_clients_fresh()?;
        let rest = key
            .strip_prefix(API_KEY_PREFIX)
            .ok_or(Error::Unauthenticated(UNKNOWN))?;
        let (key_id, secret) = rest
            .split_once('_')
            .ok_or(Error::Unauthenticated(UNKNOWN))?;
        let cache = self
            .inner
            .clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (hash, principal) = cache
            .by_key_id
            .get(key_id)
            .ok_or(Error::Unauthenticated(UNKNOWN))?;
        if crypto::ct_eq(hash, &crypto::api_key_hash(secret)) {
            Ok(principal.clone())
        } else {
            Err(Error::Unauthenticated(UNKNOWN))
        }
    }

    /// Resolves a verified certificate identity (URI or DNS SAN) to a live principal.
    pub fn authenticate_cert_identity(&self, identity: &str) -> Result<Principal> {
        self.inner.check_clients_fresh()?;
        let cache = self
            .inner
            .clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        cache
            .by_cert
            .get(identity)
            .cloned()
            .ok_or(Error::Unauthenticated(
                "certificate identity is not bound to any client",
            ))
    }

    /// A page of the audit trail: records with `seq >= from`, ascending.
    pub async fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.inner.store.audit_records(from, limit).await
    }

    /// Sequence number of the newest audit record (0 when the trail is empty).
    pub async fn audit_head_seq(&self) -> Result<u64> {
        Ok(self
            .inner
            .store
            .audit_head()
            .await?
            .map(|(s, _)| s)
            .unwrap_or(0))
    }

    /// Walks the whole audit chain (HMAC and hash) and checks that it ends at the recorded
    /// head, all in one snapshot.
    pub async fn verify_audit(&self) -> Result<Verification> {
        Ok(self.verify_audit_with(Vec::new(), &[]).await?.verification)
    }

    /// [`Vault::verify_audit`] and, with public information only, the trail against signed
    /// checkpoints. `pinned`: the audit public keys to trust; empty trusts the keys listed in
    /// the vault, which is only as trustworthy as the database: pin the key (kept apart from
    /// the vault) when the database itself is in doubt.
    ///
    /// The head and every record are read in ONE read transaction, so a writer committing
    /// meanwhile cannot make an untouched trail look truncated.
    pub async fn verify_audit_with(
        &self,
        checkpoints: CheckpointLines,
        pinned: &[AuditPublicKey],
    ) -> Result<TrailReport> {
        let trusted: Vec<AuditPublicKey> = if pinned.is_empty() {
            self.audit_signing_keys()
                .await?
                .into_iter()
                .map(|k| k.public_key)
                .collect()
        } else {
            pinned.to_vec()
        };
        let vault = self.audit_vault_id().await?;
        struct Walk {
            mac: ChainVerifier,
            mac_broken: Option<Verification>,
            trail: TrailVerifier,
            last: Option<(u64, Vec<u8>)>,
        }
        let walk = Arc::new(std::sync::Mutex::new(Some(Walk {
            mac: ChainVerifier::new(),
            mac_broken: None,
            trail: TrailVerifier::new(&vault, &trusted, checkpoints),
            last: None,
        })));
        let (w, keyring) = (walk.clone(), self.inner.keyring.clone());
        let recorded = self
            .inner
            .store
            .audit_walk(Box::new(move |rec: &AuditRecord| {
                let mut guard = w.lock().unwrap_or_else(|e| e.into_inner());
                let Some(walk) = guard.as_mut() else { return };
                if walk.mac_broken.is_none() {
                    let keys = keyring.audit_keys();
                    if let Err(broken) = walk.mac.feed(keys.for_seq(rec.seq), rec) {
                        walk.mac_broken = Some(broken);
                    }
                }
                walk.trail.feed(rec, Some(&rec.hash));
                walk.last = Some((rec.seq, rec.mac.clone()));
            }))
            .await?;
        let walk = walk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Internal("audit walk state missing".into()))?;
        let mut report = walk.trail.finish();
        if matches!(report.verification, Verification::Contradicted { .. }) {
            return Ok(report);
        }
        // The earliest chain break, by either chain.
        let hash_broken = match &report.verification {
            Verification::Broken { seq, .. } => Some(*seq),
            _ => None,
        };
        if let Some(Verification::Broken { seq, why }) = walk.mac_broken {
            if hash_broken.map_or(true, |h| seq < h) {
                report.verification = Verification::Broken { seq, why };
            }
        }
        if !report.verification.is_ok() {
            return Ok(report);
        }
        match (recorded, walk.last) {
            (None, None) => {}
            (Some((seq, mac)), Some((last, last_mac)))
                if seq == last && crypto::ct_eq(&mac, &last_mac) => {}
            (Some((seq, _)), Some((last, _))) if seq > last => {
                report.verification = Verification::Broken {
                    seq: last + 1,
                    why: "records missing at the end of the trail",
                }
            }
            (_, last) => {
                report.verification = Verification::Broken {
                    seq: last.map(|(s, _)| s).unwrap_or(1),
                    why: "the trail does not end at its recorded head",
                }
            }
        }
        Ok(report)
    }

    /// The vault's id in hex, as checkpoints and exports name it.
    pub async fn audit_vault_id(&self) -> Result<String> {
        Ok(crate::audit::hex(&self.inner.store.vault_id().await?))
    }

    /// Every audit signing key (public halves), oldest first.
    pub async fn audit_signing_keys(&self) -> Result<Vec<AuditSigningKeyInfo>> {
        self.inner.store.audit_signing_keys().await
    }

    /// A signed checkpoint of the chain's current head (None while the trail is empty).
    pub async fn audit_checkpoint(&self) -> Result<Option<Checkpoint>> {
        let src = self.inner.store.audit_checkpoint_source().await?;
        if src.seq == 0 {
            return Ok(None);
        }
        let key = self
            .inner
            .keyring
            .audit_signer(src.key_id, &src.wrapped_key)?;
        Ok(Some(Checkpoint::sign(
            &src.vault,
            src.seq,
            &src.hash,
            now_micros(),
            &key,
        )))
    }

    /// Rotates the audit signing key; the chain records the change (see [`crate::audit`]).
    pub async fn rotate_audit_key(&self, caller: &Caller) -> Result<(u32, AuditPublicKey)> {
        self.inner
            .store
            .rotate_audit_signing_key(caller.clone())
            .await
    }

    /// Adopts a master key that `keys rotate-master` installed while this vault was open
    /// (serve calls it on SIGHUP). Refused, changing nothing, unless the key matches the
    /// vault's stored key check; afterwards key versions created under the new master load.
    pub async fn reload_master_key(&self, master: &MasterKey) -> Result<()> {
        let location = self.inner.location.clone();
        let header = tokio::task::spawn_blocking(move || location.read_header())
            .await
            .map_err(|e| Error::Internal(format!("read header: {e}")))??;
        let vault_id = VaultId::from_slice(&header.vault_id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = master.derive(&vault_id);
        // A token that cannot be used is UNAVAILABLE, not a wrong key.
        if !check.verify(&header.key_check)? {
            return Err(Error::WrongMasterKey);
        }
        self.inner.keyring.reload(kwk, &header)?;
        self.refresh().await
    }

    /// True when the vault's master key changed away from the one this process holds.
    async fn master_is_stale(&self) -> bool {
        let location = self.inner.location.clone();
        match tokio::task::spawn_blocking(move || location.read_header()).await {
            Ok(Ok(header)) => !self
                .inner
                .keyring
                .kwk_opens(&header.wrapped_fingerprint_key),
            _ => false,
        }
    }

    /// Vault time: the configured clock, never earlier than a time this vault already saw
    /// (see [`clock`]). Expiry is judged by it.
    pub fn now(&self) -> Micros {
        self.inner.time.now()
    }

    /// Where this vault's store is.
    pub fn location(&self) -> &StoreLocation {
        &self.inner.location
    }

    /// The data directory this vault was opened from.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// True while storage accepts writes.
    /// Pauses this process's background checkpoints (after waiting for one in progress) until
    /// the pause is dropped; for a process about to stop itself (see `cli::keys`).
    pub fn pause_checkpoints(&self) -> crate::store::CheckpointPause {
        self.inner.store.pause_checkpoints()
    }

    pub fn healthy(&self) -> bool {
        !self.inner.closed.load(Ordering::Relaxed) && self.inner.store.healthy()
    }

    /// Stops accepting work, lets queued writes commit, joins the store's threads.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        if let Err(e) = self.inner.store.close().await {
            tracing::warn!(error = %e, "closing the store");
        }
        // Only once every connection is closed may a restore replace the files.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

fn tokenized(s: StoredToken) -> Tokenized {
    let info = token_info(&s.token, s.key_version, &s.meta);
    Tokenized {
        token: info.token.clone(),
        created: s.created,
        info,
    }
}

/// Authenticates and opens a row under its key version: an altered row is DATA_LOSS. `now`
/// is vault time (the system clock may be behind or ahead of it).
fn open_row(key: &DataKey, row: TokenRow, now: Micros) -> Result<Revealed> {
    let digits = key.open(
        row.row_format,
        &row.token,
        &row.bound_meta,
        &row.nonce,
        &row.ciphertext,
    )?;
    // The expiry just authenticated, checked again here rather than only in the lookup's
    // SQL: a row's format can predate the binding.
    if row.meta.expires_at.is_some_and(|at| at <= now) {
        return Err(Error::NotFound);
    }
    let text = std::str::from_utf8(&digits)
        .map_err(|_| Error::DataLoss("decrypted value is not a card number".into()))?;
    let pan = crate::card::Pan::parse(text)
        .map_err(|_| Error::DataLoss("decrypted value is not a card number".into()))?;
    let info = token_info(&row.token, row.key_version, &row.meta);
    Ok(Revealed { pan, info })
}

fn token_info(token: &str, key_version: u32, m: &TokenMeta) -> TokenInfo {
    TokenInfo {
        // Stored tokens were produced by `token::generate`: parsing them again would only
        // repeat the checks meant for a caller's input (a Luhn pass among them).
        token: Token::from_stored(token),
        masked_pan: crate::card::mask_parts(&m.bin, &m.last4, m.pan_length as usize),
        last4: m.last4.clone(),
        bin: m.bin.clone(),
        brand: m.brand,
        pan_length: m.pan_length,
        format: m.format,
        created_at: m.created_at,
        expires_at: m.expires_at,
        key_version,
    }
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(bytes)
        .replace('_', "-")
}

pub fn validate_client_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "client name must be 1-64 characters of letters, digits, '-', '_', '.', '@', ':'"
                .into(),
        ))
    }
}
