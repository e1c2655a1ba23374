//! Data-key versions and their states, unwrapped under the master key's key-wrapping key.
//!
//! The keyring is an in-memory snapshot of the `data_keys` rows: one [`DataKey`] (with its AES
//! key schedule computed once) per usable version, the active version that new PANs are
//! sealed under, the fingerprint and audit keys, and the audit signing key that signs
//! checkpoints (unwrapped on first use and cached by its number). Storage owns the rows; the keyring owns
//! the unwrapped keys. A snapshot is replaced whole (see [`Keyring::replace`]) when the
//! store sees that another process changed the keys, so a reader never sees half a change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::audit::{self, AuditEntry};
use crate::crypto::{
    AuditKey, AuditPublicKey, AuditSigningKey, DataKey, FingerprintKey, KeyPurpose, KeyWrappingKey,
    SecretKey, UnwrapError, WRAPPED_KEY_LEN,
};
use crate::error::{Error, Result};
use crate::model::{Caller, KeyPolicy, KeyState, Micros};
use crate::store::VaultHeader;

/// What [`Keyring::audit_signing_handover`] gives the store to write.
pub struct SigningHandover {
    pub new_id: u32,
    pub public: AuditPublicKey,
    /// The new key's seed, wrapped under the master key.
    pub wrapped: Vec<u8>,
    pub entry: AuditEntry,
}

/// A `data_keys` row as stored.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub version: u32,
    pub wrapped: Vec<u8>,
    pub state: KeyState,
    pub created_at: Micros,
    pub encryptions: u64,
}

/// The unwrapped data keys of one moment.
pub struct Snapshot {
    pub active: Arc<DataKey>,
    pub active_created_at: Micros,
    keys: HashMap<u32, Arc<DataKey>>,
}

impl Snapshot {
    /// The key for `version`, unless it is retired or unknown.
    pub fn get(&self, version: u32) -> Option<&Arc<DataKey>> {
        self.keys.get(&version)
    }
}

/// The reuse fingerprint keys: the vault's first key, then one layer per `--rekey`
/// (fingerprint = layer_n(… layer_1(root(scope, card)))). While a rekey is in progress
/// (`pending`) stored fingerprints are either without the newest layer or with it.
pub struct Fingerprints {
    root: FingerprintKey,
    layers: Vec<FingerprintKey>,
    pending: bool,
}

impl Fingerprints {
    /// The fingerprint new rows get, and, during a rekey, the one rows not yet re-layered have.
    pub fn reuse(&self, scope: &str, data: &[u8]) -> ([u8; 32], Option<[u8; 32]>) {
        let mut fp = self.root.scoped_fingerprint(scope, data);
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n && self.pending {
                return (layer.layer(&fp), Some(fp));
            }
            fp = layer.layer(&fp);
        }
        (fp, None)
    }

    /// How many layers `reuse` applies now.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Brings a fingerprint `reuse` computed under `depth` layers up to the current ones (with
    /// the value before the pending layer during a rekey). A request prepared before a reload
    /// (SIGHUP after `--rekey` began) and written after it would otherwise be stored without
    /// the new layer, testable with the old master key and an old backup, and its lookup would
    /// miss rows already re-layered. None when nothing is missing (layers are only ever added).
    pub fn catch_up(&self, fp: &[u8; 32], depth: usize) -> Option<([u8; 32], Option<[u8; 32]>)> {
        let n = self.layers.len();
        if depth >= n {
            return None;
        }
        let (mut fp, mut prev) = (*fp, None);
        for (i, layer) in self.layers.iter().enumerate().skip(depth) {
            if i + 1 == n && self.pending {
                prev = Some(fp);
            }
            fp = layer.layer(&fp);
        }
        Some((fp, prev))
    }

    /// A stored fingerprint with the pending layer applied; None when no rekey is pending.
    pub fn relayer(&self, stored: &[u8; 32]) -> Option<[u8; 32]> {
        match (self.pending, self.layers.last()) {
            (true, Some(layer)) => Some(layer.layer(stored)),
            _ => None,
        }
    }
}

/// The audit MAC keys: the current one and those `--rekey` replaced, each from the
/// sequence number of the first record it MACed.
pub struct AuditKeys {
    current: AuditKey,
    from: u64,
    retired: Vec<(u64, AuditKey)>,
}

impl AuditKeys {
    pub fn current(&self) -> &AuditKey {
        &self.current
    }
    /// Sequence number of the first record MACed under the current key.
    pub fn from(&self) -> u64 {
        self.from
    }
    /// The key record `seq` was MACed under.
    pub fn for_seq(&self, seq: u64) -> &AuditKey {
        if seq >= self.from {
            return &self.current;
        }
        self.retired
            .iter()
            .filter(|(from, _)| *from <= seq)
            .max_by_key(|(from, _)| *from)
            .map(|(_, k)| k)
            .unwrap_or(&self.current)
    }
}

pub struct Keyring {
    /// Replaced whole when the server is handed a rotated master key (SIGHUP).
    kwk: RwLock<Arc<KeyWrappingKey>>,
    fingerprint: RwLock<Arc<Fingerprints>>,
    audit: RwLock<Arc<AuditKeys>>,
    policy: KeyPolicy,
    current: RwLock<Arc<Snapshot>>,
    /// The audit signing key last used, by number.
    signer: Mutex<Option<(u32, Arc<AuditSigningKey>)>>,
}

impl Keyring {
    /// Unwraps every non-retired version. Fails with DataLoss if a wrapped key is altered.
    pub fn new(
        kwk: KeyWrappingKey,
        header: &VaultHeader,
        rows: &[KeyRow],
        policy: KeyPolicy,
    ) -> Result<Keyring> {
        let (fingerprint, audit) = Self::header_keys(&kwk, header)?;
        let snapshot = Self::build(&kwk, rows, None)?;
        Ok(Keyring {
            kwk: RwLock::new(Arc::new(kwk)),
            fingerprint: RwLock::new(Arc::new(fingerprint)),
            audit: RwLock::new(Arc::new(audit)),
            policy,
            current: RwLock::new(Arc::new(snapshot)),
            signer: Mutex::new(None),
        })
    }

    /// The fingerprint and audit keys of `header`, unwrapped.
    fn header_keys(
        kwk: &KeyWrappingKey,
        header: &VaultHeader,
    ) -> Result<(Fingerprints, AuditKeys)> {
        let unwrap = |wrapped: &[u8], purpose: KeyPurpose| {
            kwk.try_unwrap(wrapped, purpose)
                .map_err(|e| unwrap_error(e, &format!("wrapped key ({purpose:?})")))
        };
        let root = FingerprintKey::new(unwrap(
            &header.wrapped_fingerprint_key,
            KeyPurpose::Fingerprint,
        )?);
        let mut layers = Vec::new();
        for (i, w) in header
            .layers
            .fingerprint_layers
            .chunks(WRAPPED_KEY_LEN)
            .enumerate()
        {
            layers.push(FingerprintKey::new(unwrap(
                w,
                KeyPurpose::FingerprintLayer(i as u32 + 1),
            )?));
        }
        let current = AuditKey::new(unwrap(&header.wrapped_audit_key, KeyPurpose::Audit)?);
        let mut retired = Vec::new();
        for entry in header.layers.retired_audit_keys.chunks(8 + WRAPPED_KEY_LEN) {
            let from = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            retired.push((
                from,
                AuditKey::new(unwrap(&entry[8..], KeyPurpose::RetiredAudit(from))?),
            ));
        }
        let pending = header.layers.rekey.is_some();
        if pending && layers.is_empty() {
            return Err(Error::DataLoss(
                "a rekey is recorded in progress but no fingerprint layer exists".into(),
            ));
        }
        Ok((
            Fingerprints {
                root,
                layers,
                pending,
            },
            AuditKeys {
                current,
                from: header.layers.audit_key_from,
                retired,
            },
        ))
    }

    /// Adopts the keys of `header` under `kwk` (a master key loaded on SIGHUP, or after a
    /// rekey step), once they all unwrap; changes nothing otherwise.
    pub fn reload(&self, kwk: KeyWrappingKey, header: &VaultHeader) -> Result<()> {
        let (fingerprint, audit) = Self::header_keys(&kwk, header).map_err(|e| match e {
            Error::DataLoss(_) if !kwk_opens(&kwk, &header.wrapped_fingerprint_key) => {
                Error::WrongMasterKey
            }
            e => e,
        })?;
        *self.kwk.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(kwk);
        *self.fingerprint.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fingerprint);
        *self.audit.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(audit);
        Ok(())
    }

    /// `known`: keys already unwrapped. A version's key never changes, so they are reused; this
    /// also keeps a running process serving known versions after the master key was rotated
    /// by another process (it can no longer unwrap, but it need not).
    fn build(
        kwk: &KeyWrappingKey,
        rows: &[KeyRow],
        known: Option<&HashMap<u32, Arc<DataKey>>>,
    ) -> Result<Snapshot> {
        let mut keys = HashMap::new();
        let mut active = None;
        for row in rows.iter().filter(|r| r.state != KeyState::Retired) {
            if let Some(key) = known.and_then(|k| k.get(&row.version)) {
                if row.state == KeyState::Active {
                    if active.is_some() {
                        return Err(Error::Internal("more than one active key version".into()));
                    }
                    active = Some((key.clone(), row.created_at));
                }
                keys.insert(row.version, key.clone());
                continue;
            }
            let secret = kwk
                .try_unwrap(&row.wrapped, KeyPurpose::Data(row.version))
                .map_err(|e| unwrap_error(e, &format!("wrapped data key v{}", row.version)))?;
            let key = Arc::new(DataKey::new(row.version, secret));
            if row.state == KeyState::Active {
                if active.is_some() {
                    return Err(Error::Internal("more than one active key version".into()));
                }
                active = Some((key.clone(), row.created_at));
            }
            keys.insert(row.version, key);
        }
        let (active, active_created_at) =
            active.ok_or_else(|| Error::Internal("no active key version".into()))?;
        Ok(Snapshot {
            active,
            active_created_at,
            keys,
        })
    }

    /// Replaces the snapshot after the key rows changed.
    pub fn replace(&self, rows: &[KeyRow]) -> Result<()> {
        let current = self.snapshot();
        let snapshot = Arc::new(Self::build(&self.kwk(), rows, Some(&current.keys))?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn fingerprints(&self) -> Arc<Fingerprints> {
        self.fingerprint
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn audit_keys(&self) -> Arc<AuditKeys> {
        self.audit.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn policy(&self) -> &KeyPolicy {
        &self.policy
    }

    fn kwk(&self) -> Arc<KeyWrappingKey> {
        self.kwk.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when this keyring's key-wrapping key opens `wrapped_fingerprint` (the stored
    /// fingerprint key): false once another process rotated the master key.
    pub fn kwk_opens(&self, wrapped_fingerprint: &[u8]) -> bool {
        kwk_opens(&self.kwk(), wrapped_fingerprint)
    }

    /// Like [`Keyring::kwk_opens`], but a token that cannot be used is an error
    /// (UNAVAILABLE) rather than "another process rotated the master key".
    pub fn master_opens(&self, wrapped_fingerprint: &[u8]) -> Result<bool> {
        match self
            .kwk()
            .try_unwrap(wrapped_fingerprint, KeyPurpose::Fingerprint)
        {
            Ok(_) => Ok(true),
            Err(UnwrapError::Authentication) => Ok(false),
            Err(UnwrapError::Device(e)) => Err(e.into()),
        }
    }

    /// Re-wraps a stored key under `new`, changing its purpose (see
    /// [`KeyWrappingKey::rewrap_as`]).
    pub fn rewrap_as(
        &self,
        new: &KeyWrappingKey,
        wrapped: &[u8],
        from: KeyPurpose,
        to: KeyPurpose,
    ) -> Result<Vec<u8>> {
        Ok(self.kwk().rewrap_as(new, wrapped, from, to).map_err(|_| {
            Error::DataLoss(format!("wrapped key ({from:?}) failed authentication"))
        })??)
    }

    /// Re-wraps a stored key (wrapped under this keyring's master) under `new`.
    pub fn rewrap_under(
        &self,
        new: &KeyWrappingKey,
        wrapped: &[u8],
        purpose: KeyPurpose,
    ) -> Result<Vec<u8>> {
        Ok(self.kwk().rewrap(new, wrapped, purpose).map_err(|_| {
            Error::DataLoss(format!("wrapped key ({purpose:?}) failed authentication"))
        })??)
    }

    /// Re-wraps a `fingerprint_layers` value under `new`.
    pub fn rewrap_layers(&self, new: &KeyWrappingKey, blob: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blob.len());
        for (i, w) in blob.chunks(WRAPPED_KEY_LEN).enumerate() {
            let purpose = KeyPurpose::FingerprintLayer(i as u32 + 1);
            out.extend(self.rewrap_under(new, w, purpose)?);
        }
        Ok(out)
    }

    /// Re-wraps a `retired_audit_keys` value under `new`.
    pub fn rewrap_retired_audit(&self, new: &KeyWrappingKey, blob: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blob.len());
        for entry in blob.chunks(8 + WRAPPED_KEY_LEN) {
            if entry.len() != 8 + WRAPPED_KEY_LEN {
                return Err(Error::DataLoss("retired audit keys are malformed".into()));
            }
            let from = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            out.extend_from_slice(&entry[..8]);
            out.extend(self.rewrap_under(new, &entry[8..], KeyPurpose::RetiredAudit(from))?);
        }
        Ok(out)
    }

    /// Audit signing key number `n`, unwrapped from `wrapped` unless already cached.
    pub fn audit_signer(&self, n: u32, wrapped: &[u8]) -> Result<Arc<AuditSigningKey>> {
        let mut cached = self.signer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, key)) = cached.as_ref() {
            if *m == n {
                return Ok(key.clone());
            }
        }
        let key = Arc::new(
            AuditSigningKey::unwrap(&self.kwk(), wrapped, n).map_err(|_| {
                Error::DataLoss(format!(
                    "wrapped audit signing key {n} failed authentication"
                ))
            })?,
        );
        *cached = Some((n, key.clone()));
        Ok(key)
    }

    /// A fresh audit signing key number `n` and its seed wrapped for storage.
    pub fn new_audit_signing_key(&self, n: u32) -> Result<(AuditSigningKey, Vec<u8>)> {
        Ok(AuditSigningKey::generate_wrapped(&self.kwk(), n)?)
    }

    /// The replacement of audit signing key `old_id` (`audit rotate-key`, the end of a
    /// rekey), the same for every store: key `old_id + 1` wrapped under the master, and the
    /// `audit_key_rotate` entry carrying the old key's handover signature over the place the
    /// entry takes in the chain (`seq`, after `prev_hash`). The store retires the old row
    /// (destroying its wrapped seed), inserts the new one and appends the entry.
    pub fn audit_signing_handover(
        &self,
        old_id: u32,
        old_wrapped: &[u8],
        vault: &str,
        seq: u64,
        prev_hash: &[u8; 32],
        caller: &Caller,
    ) -> Result<SigningHandover> {
        let old = self.audit_signer(old_id, old_wrapped)?;
        let new_id = old_id + 1;
        let (new, wrapped) = self.new_audit_signing_key(new_id)?;
        let public = new.public_key();
        let old_key_id = old.public_key().key_id();
        let message = audit::handover_message(vault, seq, prev_hash, &old_key_id, &public);
        let handover = old.sign(&message);
        Ok(SigningHandover {
            new_id,
            public,
            wrapped,
            entry: AuditEntry::key_rotation(
                caller,
                &format!("audit key {new_id}"),
                audit::rotation_reason(&public, &old_key_id, &handover),
            ),
        })
    }

    /// A fresh random data key for `version`, wrapped for storage.
    pub fn new_wrapped_data_key(&self, version: u32) -> Result<Vec<u8>> {
        Ok(self
            .kwk()
            .wrap(&SecretKey::generate(), KeyPurpose::Data(version))?)
    }

    /// True when the active version must be replaced before sealing `extra` more PANs.
    pub fn needs_rotation(
        &self,
        encryptions: u64,
        extra: u64,
        created_at: Micros,
        now: Micros,
    ) -> bool {
        if encryptions.saturating_add(extra) > self.policy.max_encryptions {
            return true;
        }
        match self.policy.max_age {
            Some(age) => now.saturating_sub(created_at) >= age.as_micros() as i64,
            None => false,
        }
    }
}

/// A token that cannot be used is UNAVAILABLE; a key that fails authentication DATA_LOSS.
fn unwrap_error(e: UnwrapError, what: &str) -> Error {
    match e {
        UnwrapError::Authentication => Error::DataLoss(format!("{what} failed authentication")),
        UnwrapError::Device(e) => Error::from(e),
    }
}

fn kwk_opens(kwk: &KeyWrappingKey, wrapped_fingerprint: &[u8]) -> bool {
    kwk.unwrap(wrapped_fingerprint, KeyPurpose::Fingerprint)
        .is_ok()
}

/// A fresh random key wrapped under `kwk` for `purpose` (a rekey's new keys).
pub fn new_wrapped_key(kwk: &KeyWrappingKey, purpose: KeyPurpose) -> Result<Vec<u8>> {
    Ok(kwk.wrap(&SecretKey::generate(), purpose)?)
}

/// Material for a brand-new vault: the first data key, the fingerprint key, the audit key.
pub struct Genesis {
    pub data_key: Vec<u8>,
    pub fingerprint_key: Vec<u8>,
    pub audit_key: Vec<u8>,
}

impl Genesis {
    pub fn generate(kwk: &KeyWrappingKey) -> Result<Genesis> {
        Ok(Genesis {
            data_key: kwk.wrap(&SecretKey::generate(), KeyPurpose::Data(1))?,
            fingerprint_key: kwk.wrap(&SecretKey::generate(), KeyPurpose::Fingerprint)?,
            audit_key: kwk.wrap(&SecretKey::generate(), KeyPurpose::Audit)?,
        })
    }
}
