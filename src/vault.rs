//! The domain operations: tokenize, detokenize, info, delete, and the admin operations on keys
//! and clients. Knows neither tonic nor SQL: it validates, encrypts and decrypts, and talks to
//! storage through [`crate::store::Storage`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::audit::{AuditEntry, AuditRecord, ChainVerifier, Verification};
use crate::auth::Role;
use crate::card::{Brand, Pan};
use crate::crypto::{self, MasterKey, VaultId};
use crate::error::{outcome_of, Error, Result};
use crate::keyring::{Genesis, Keyring};
use crate::store::lock::DirLock;
use crate::store::sqlite::{self, OpenParams, SqliteStore};
use crate::store::{ClientRow, NewToken, Storage, StoredToken, TokenMeta, TokenRow, VaultHeader};
use crate::token::{self, Token, TokenFormat};

pub mod clock;
pub mod lifecycle;
pub use clock::{Clock, VaultTime, EXPIRED_PURGE_GRACE};
pub use lifecycle::{
    CheckReport, PurgeOptions, PurgePlan, PurgeReport, RevokeReport, RewrapOptions, RewrapProgress,
    RewrapReport,
};

/// Microseconds since the Unix epoch, UTC. The one time representation of the domain.
pub type Micros = i64;

/// The system clock (negative before 1970). The vault's own decisions use its [`Clock`].
pub fn now_micros() -> Micros {
    clock::system_micros()
}

/// How long a data-key version may be used before the vault rotates it.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// Encryptions per version; well under the 2^32 bound of NIST SP 800-38D for random nonces.
    pub max_encryptions: u64,
    pub max_age: Option<Duration>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            max_encryptions: 1 << 30,
            max_age: Some(Duration::from_secs(90 * 86400)),
        }
    }
}

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
    /// How long a write waits for a lock held by another process before UNAVAILABLE.
    pub busy_timeout: Duration,
    /// Where expiry and retention read the time (tests step it); see [`clock`].
    pub clock: Clock,
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
            busy_timeout: Duration::from_secs(10),
            clock: Clock::system(),
        }
    }
}

/// Who is asking, for authorisation and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: String,
    /// Peer address, or "cli" / "local" for admin commands.
    pub peer: String,
}

impl Caller {
    pub fn new(principal: impl Into<String>, peer: impl Into<String>) -> Caller {
        Caller {
            principal: principal.into(),
            peer: peer.into(),
        }
    }
    /// An admin command run from the CLI by the local OS user.
    pub fn cli() -> Caller {
        // Attribute admin actions to the OS account that ran them, even without $USER
        // (cron, containers): fall back to the numeric uid.
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            // SAFETY: getuid has no preconditions and cannot fail.
            .unwrap_or_else(|_| format!("uid-{}", unsafe { libc::getuid() }));
        Caller {
            principal: format!("cli:{user}"),
            peer: "local".into(),
        }
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

/// State of a data-key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    DecryptOnly,
    Retired,
}

#[derive(Clone, Debug)]
pub struct KeyVersionInfo {
    pub version: u32,
    pub state: KeyState,
    pub created_at: Micros,
    pub encryptions: u64,
    pub max_encryptions: u64,
    pub rows: u64,
}

#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub name: String,
    pub roles: Vec<Role>,
    pub cert_identity: Option<String>,
    /// Own detokenize limit in reveals per second; None = the server-wide default.
    pub detokenize_rate: Option<f64>,
    pub created_at: Micros,
    pub revoked_at: Option<Micros>,
}

/// A principal as the server sees it after authentication.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: String,
    pub roles: Vec<Role>,
    /// Own detokenize limit in reveals per second; None = the server-wide default.
    pub detokenize_rate: Option<f64>,
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

/// The vault. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Storage>,
    keyring: Arc<Keyring>,
    clients: RwLock<Arc<ClientCache>>,
    closed: AtomicBool,
    data_dir: PathBuf,
    time: VaultTime,
    /// The data directory's lock, held shared while this vault is open (see `store::lock`);
    /// released by `close`.
    lock: std::sync::Mutex<Option<DirLock>>,
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
        busy_timeout: cfg.busy_timeout,
    }
}

impl Vault {
    /// Creates a new vault in `cfg.data_dir` (refuses if one exists).
    pub fn create(cfg: VaultConfig, master: &MasterKey) -> Result<Vault> {
        check_data_dir(&cfg.data_dir)?;
        create_private_dir(&cfg.data_dir)?;
        let lock = DirLock::shared(&cfg.data_dir)?;
        let vault_id = VaultId::generate();
        let (kwk, check) = master.derive(&vault_id);
        let genesis = Genesis::generate(&kwk);
        let header = VaultHeader {
            vault_id: vault_id.0.to_vec(),
            key_check: check.0.to_vec(),
            wrapped_fingerprint_key: genesis.fingerprint_key,
            wrapped_audit_key: genesis.audit_key,
        };
        sqlite::create_database(&cfg.data_dir, &header, &genesis.data_key)?;
        tracing::info!(vault_id = %vault_id.to_hex(), "created vault");
        Vault::open_locked(cfg, master, Some(lock))
    }

    /// Opens an existing vault; a wrong master key fails before anything is read or written.
    /// Refused while a restore holds the data directory (see `store::lock`).
    pub fn open(cfg: VaultConfig, master: &MasterKey) -> Result<Vault> {
        check_data_dir(&cfg.data_dir)?;
        let present = sqlite::db_path(&cfg.data_dir).exists()
            || cfg.data_dir.join(crate::store::lock::LOCK_FILE).exists();
        // Without either there is no vault, and `read_header` says so.
        let lock = present
            .then(|| DirLock::shared(&cfg.data_dir))
            .transpose()?;
        Vault::open_locked(cfg, master, lock)
    }

    fn open_locked(cfg: VaultConfig, master: &MasterKey, lock: Option<DirLock>) -> Result<Vault> {
        // On a full disk SQLite cannot even map its index: give back the reserve first.
        crate::store::space::release_reserve_if_low(&cfg.data_dir);
        let header = sqlite::read_header(&cfg.data_dir)?;
        let vault_id = VaultId::from_slice(&header.vault_id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = master.derive(&vault_id);
        if !check.matches(&header.key_check) {
            return Err(Error::WrongMasterKey);
        }
        let rows = sqlite::initial_key_rows(&cfg.data_dir)?;
        let keyring = Arc::new(Keyring::new(
            kwk,
            &header.wrapped_fingerprint_key,
            &header.wrapped_audit_key,
            &rows,
            cfg.key_policy.clone(),
        )?);
        let clients = sqlite::initial_clients(&cfg.data_dir)?;
        let store = SqliteStore::open(&cfg.data_dir, keyring.clone(), &storage_params(&cfg))?;
        let newest = sqlite::newest_recorded_time(&cfg.data_dir)?;
        let vault = Vault {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                keyring,
                clients: RwLock::new(Arc::new(ClientCache::build(clients))),
                closed: AtomicBool::new(false),
                data_dir: cfg.data_dir.clone(),
                time: VaultTime::new(cfg.clock.clone(), newest),
                lock: std::sync::Mutex::new(lock),
            }),
        };
        vault.start_watcher();
        Ok(vault)
    }

    /// True when `data_dir` holds a vault database.
    pub fn exists(data_dir: &Path) -> bool {
        sqlite::db_path(data_dir).exists()
    }

    /// Picks up key and client changes made by other processes within [`WATCH_INTERVAL`].
    fn start_watcher(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut seen = None;
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Relaxed) {
                    break;
                }
                let vault = Vault { inner };
                match vault.inner.store.generation().await {
                    Ok(g) if seen != Some(g) => match vault.refresh().await {
                        Ok(()) => seen = Some(g),
                        Err(e) => tracing::warn!(error = %e, "could not refresh keys and clients"),
                    },
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "generation check failed"),
                }
            }
        });
    }

    async fn refresh(&self) -> Result<()> {
        let rows = self.inner.store.key_rows().await?;
        self.inner.keyring.replace(&rows)?;
        let clients = self.inner.store.clients().await?;
        *self
            .inner
            .clients
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(ClientCache::build(clients));
        Ok(())
    }

    fn prepare(&self, req: TokenizeRequest) -> NewToken {
        let snapshot = self.inner.keyring.snapshot();
        let token = token::generate(req.format, &req.pan).into_string();
        let digits = req.pan.expose_digits().as_bytes();
        let sealed = snapshot.active.seal(&token, digits);
        let fingerprint = req
            .reuse_existing
            .then(|| self.inner.keyring.fingerprint_key().fingerprint(digits));
        let meta = TokenMeta {
            format: req.format,
            brand: req.pan.brand(),
            pan_length: req.pan.len() as u32,
            bin: req.pan.bin(),
            last4: req.pan.last4(),
            created_at: self.now(),
            expires_at: req.expires_at,
        };
        NewToken {
            token,
            sealed,
            key_version: snapshot.active.version(),
            fingerprint,
            reuse_existing: req.reuse_existing,
            meta,
            pan: req.pan,
        }
    }

    fn check_request(req: &TokenizeRequest, now: Micros) -> Result<()> {
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
        let mut slots: Vec<Option<Result<Tokenized>>> = Vec::with_capacity(reqs.len());
        let mut items = Vec::with_capacity(reqs.len());
        for req in reqs {
            match Self::check_request(&req, now) {
                Ok(()) => {
                    slots.push(None);
                    items.push(self.prepare(req));
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
        let tokens = items.iter().map(|(t, _)| t.as_str().to_owned()).collect();
        let rows = self.inner.store.lookup(tokens, self.now()).await?;
        let mut results = Vec::with_capacity(rows.len());
        let mut audit = Vec::with_capacity(rows.len());
        for ((token, reason), row) in items.iter().zip(rows) {
            let r = match row {
                Some(row) => self.reveal(row).await,
                None => Err(Error::NotFound),
            };
            audit.push(AuditEntry::new(
                caller,
                "detokenize",
                token.as_str(),
                outcome_of(&r),
                reason,
            ));
            results.push(r);
        }
        // Fail closed: no PAN leaves unless the record of its reveal is committed.
        self.inner.store.append_audit(audit).await?;
        Ok(results)
    }

    async fn reveal(&self, row: TokenRow) -> Result<Revealed> {
        let mut snapshot = self.inner.keyring.snapshot();
        if snapshot.get(row.key_version).is_none() {
            // Possibly rotated by another process a moment ago.
            self.refresh().await?;
            snapshot = self.inner.keyring.snapshot();
        }
        let key = snapshot.get(row.key_version).ok_or_else(|| {
            Error::DataLoss(format!(
                "key version {} of this token is not available",
                row.key_version
            ))
        })?;
        let digits = key.open(&row.token, &row.nonce, &row.ciphertext)?;
        let text = std::str::from_utf8(&digits)
            .map_err(|_| Error::DataLoss("decrypted value is not a card number".into()))?;
        let pan = crate::card::Pan::parse(text)
            .map_err(|_| Error::DataLoss("decrypted value is not a card number".into()))?;
        let info = token_info(&row.token, row.key_version, &row.meta);
        Ok(Revealed { pan, info })
    }

    pub async fn info(&self, caller: &Caller, token: Token) -> Result<TokenInfo> {
        let mut rows = self
            .inner
            .store
            .lookup(vec![token.as_str().to_owned()], self.now())
            .await?;
        let r = match rows.pop().flatten() {
            Some(row) => Ok(token_info(&row.token, row.key_version, &row.meta)),
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

    /// Audit record for an event such as server start/stop.
    pub async fn audit_event(&self, caller: &Caller, action: &str, subject: &str) -> Result<()> {
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(caller, action, subject, "OK", "")])
            .await
    }

    pub async fn rotate_key(&self, caller: &Caller) -> Result<u32> {
        let v = self.inner.store.rotate_key(caller.clone()).await?;
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
        validate_client_name(name)?;
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
                detokenize_rate,
                created_at: now_micros(),
                revoked_at: None,
            },
            key_hash: crypto::api_key_hash(&secret),
            key_id: key_id.clone(),
        };
        self.inner.store.add_client(row, caller.clone()).await?;
        self.refresh().await?;
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
        self.refresh().await?;
        Ok(revoked)
    }

    /// Resolves an API key (`authorization: Bearer <key>`) to a live principal, in constant
    /// time per candidate, from a snapshot refreshed within a second of any change.
    pub fn authenticate_api_key(&self, key: &str) -> Result<Principal> {
        const UNKNOWN: &str = "missing or unknown API key";
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

    /// Walks the whole audit chain and checks that it ends at the recorded head.
    pub async fn verify_audit(&self) -> Result<Verification> {
        const PAGE: usize = 10_000;
        let key = self.inner.keyring.audit_key();
        let mut verifier = ChainVerifier::new(key);
        let mut from = 1;
        let mut last: Option<AuditRecord> = None;
        loop {
            let page = self.inner.store.audit_records(from, PAGE).await?;
            let n = page.len();
            for rec in page {
                if let Err(broken) = verifier.feed(&rec) {
                    return Ok(broken);
                }
                from = rec.seq + 1;
                last = Some(rec);
            }
            if n < PAGE {
                break;
            }
        }
        let head = self.inner.store.audit_head().await?;
        match (head, last) {
            (None, None) => {}
            (Some((seq, mac)), Some(rec)) if seq == rec.seq && crypto::ct_eq(&mac, &rec.mac) => {}
            (Some((seq, _)), Some(rec)) if seq > rec.seq => {
                return Ok(Verification::Broken {
                    seq: rec.seq + 1,
                    why: "records missing at the end of the trail",
                })
            }
            (_, last) => {
                let seq = last.map(|r| r.seq).unwrap_or(1);
                return Ok(Verification::Broken {
                    seq,
                    why: "the trail does not end at its recorded head",
                });
            }
        }
        Ok(verifier.finish())
    }

    /// Adopts a master key that `keys rotate-master` installed while this vault was open
    /// (serve calls it on SIGHUP). Refused, changing nothing, unless the key matches the
    /// vault's stored key check; afterwards key versions created under the new master load.
    pub async fn reload_master_key(&self, master: &MasterKey) -> Result<()> {
        let dir = self.inner.data_dir.clone();
        let header = tokio::task::spawn_blocking(move || sqlite::read_header(&dir))
            .await
            .map_err(|e| Error::Internal(format!("read header: {e}")))??;
        let vault_id = VaultId::from_slice(&header.vault_id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = master.derive(&vault_id);
        if !check.matches(&header.key_check) {
            return Err(Error::WrongMasterKey);
        }
        self.inner
            .keyring
            .set_key_wrapping_key(kwk, &header.wrapped_fingerprint_key)?;
        self.refresh().await
    }

    /// Vault time: the configured clock, never earlier than a time this vault already saw
    /// (see [`clock`]). Expiry is judged by it.
    pub fn now(&self) -> Micros {
        self.inner.time.now()
    }

    /// The data directory this vault was opened from.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// True while storage accepts writes.
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

fn token_info(token: &str, key_version: u32, m: &TokenMeta) -> TokenInfo {
    TokenInfo {
        // Stored tokens were produced by `token::generate`, so they are well-formed.
        token: Token::parse(token).unwrap_or_else(|_| Token::from_stored(token)),
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

fn validate_client_name(name: &str) -> Result<()> {
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

/// An empty path is a configuration error, never "the current directory".
pub fn check_data_dir(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(
            "the data directory is an empty path; give a directory such as /var/lib/tokenvault"
                .into(),
        ));
    }
    Ok(())
}

/// Creates a data directory (and its parents) with owner-only access: it holds the only copy
/// of the card data. An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", dir.display())))
}
