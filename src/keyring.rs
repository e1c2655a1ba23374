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

use crate::crypto::{
    AuditKey, AuditSigningKey, DataKey, FingerprintKey, KeyPurpose, KeyWrappingKey, SecretKey,
};
use crate::error::{Error, Result};
use crate::model::{KeyPolicy, KeyState, Micros};

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

pub struct Keyring {
    /// Replaced whole when the server is handed a rotated master key (SIGHUP).
    kwk: RwLock<Arc<KeyWrappingKey>>,
    fingerprint: FingerprintKey,
    audit: AuditKey,
    policy: KeyPolicy,
    current: RwLock<Arc<Snapshot>>,
    /// The audit signing key last used, by number.
    signer: Mutex<Option<(u32, Arc<AuditSigningKey>)>>,
}

impl Keyring {
    /// Unwraps every non-retired version. Fails with DataLoss if a wrapped key is altered.
    pub fn new(
        kwk: KeyWrappingKey,
        wrapped_fingerprint: &[u8],
        wrapped_audit: &[u8],
        rows: &[KeyRow],
        policy: KeyPolicy,
    ) -> Result<Keyring> {
        let fingerprint = FingerprintKey::new(
            kwk.unwrap(wrapped_fingerprint, KeyPurpose::Fingerprint)
                .map_err(|_| {
                    Error::DataLoss("wrapped fingerprint key failed authentication".into())
                })?,
        );
        let audit = AuditKey::new(
            kwk.unwrap(wrapped_audit, KeyPurpose::Audit)
                .map_err(|_| Error::DataLoss("wrapped audit key failed authentication".into()))?,
        );
        let snapshot = Self::build(&kwk, rows, None)?;
        Ok(Keyring {
            kwk: RwLock::new(Arc::new(kwk)),
            fingerprint,
            audit,
            policy,
            current: RwLock::new(Arc::new(snapshot)),
            signer: Mutex::new(None),
        })
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
                .unwrap(&row.wrapped, KeyPurpose::Data(row.version))
                .map_err(|_| {
                    Error::DataLoss(format!(
                        "wrapped data key v{} failed authentication",
                        row.version
                    ))
                })?;
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

    pub fn fingerprint_key(&self) -> &FingerprintKey {
        &self.fingerprint
    }

    pub fn audit_key(&self) -> &AuditKey {
        &self.audit
    }

    pub fn policy(&self) -> &KeyPolicy {
        &self.policy
    }

    fn kwk(&self) -> Arc<KeyWrappingKey> {
        self.kwk.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adopts the key-wrapping key of a rotated master key, once it is known to open the
    /// stored fingerprint key. The data keys themselves never change, so nothing else moves.
    pub fn set_key_wrapping_key(
        &self,
        kwk: KeyWrappingKey,
        wrapped_fingerprint: &[u8],
    ) -> Result<()> {
        if kwk
            .unwrap(wrapped_fingerprint, KeyPurpose::Fingerprint)
            .is_err()
        {
            return Err(Error::WrongMasterKey);
        }
        *self.kwk.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(kwk);
        Ok(())
    }

    /// True when this keyring's key-wrapping key opens `wrapped_fingerprint` (the stored
    /// fingerprint key): false once another process rotated the master key.
    pub fn kwk_opens(&self, wrapped_fingerprint: &[u8]) -> bool {
        self.kwk()
            .unwrap(wrapped_fingerprint, KeyPurpose::Fingerprint)
            .is_ok()
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
