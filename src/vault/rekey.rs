//! `keys rotate-master --rekey`: a master rotation that cuts the old master key off.
//!
//! A plain `rotate-master` only re-wraps the stored keys, so the old master key together with
//! any earlier backup still opens the data, fingerprint and audit keys, and through them
//! everything written afterwards. A rekey replaces every key that protects new data with one
//! wrapped only under the new master key, so that the old master key and any earlier backup
//! open nothing created after it:
//!
//! | What                     | After the rekey                                                       |
//! |--------------------------|-----------------------------------------------------------------------|
//! | master key               | the new one (file or PKCS#11); the key check changes                   |
//! | data keys                | a new active version; every row re-sealed under it; the old versions retired (wrapped key destroyed) |
//! | reuse fingerprints       | a new fingerprint *layer* applied over every stored fingerprint      |
//! | audit MAC key            | a new key from the record after the `master_rekey` record on          |
//! | audit signing key        | replaced as the rekey finishes (an `audit_key_rotate` record with the handover signature); re-wrapped until then |
//!
//! **Fingerprint layers.** A reuse fingerprint is HMAC(root, scope ‖ card); the scope (the
//! caller's principal or reuse group) is not stored with the row, so a stored fingerprint
//! cannot be recomputed from the card. Each rekey instead adds a layer key n and stores
//! layer_n(old fingerprint) = HMAC(layer_n, old fingerprint): computable from the stored value
//! alone, and without layer_n (wrapped only under the new master) nobody can test a card
//! against it. While the pass runs, a reuse lookup asks for either value (`fingerprint IN
//! (new, old)`), so `reuse_existing` keeps returning the same token.
//!
//! **Audit key switch.** The `master_rekey` record is the last one MACed under the old audit
//! key; `audit_key_from` names the first record under the new one. The replaced key is kept,
//! wrapped under the new master (`retired_audit_keys`), so `audit verify` still checks the
//! earlier records: it only ever MACed what its holders could already forge.
//!
//! **Steps, each one transaction on the store's admin path (both stores, via
//! [`crate::store::Storage`]):**
//! 1. `rekey_begin`: re-wrap every kept key under the new master, add the data key version,
//!    the fingerprint layer and the audit key, record [`crate::store::RekeyState`] (new version,
//!    last row id at the switch, cursor) in `meta.rekey`. From here only the new master opens
//!    the vault.
//! 2. `rekey_batch`, repeated: re-seal the rows after the cursor (up to the switch's last
//!    id) and re-layer their fingerprints, moving the cursor in the same transaction. Rows
//!    written after the switch already use the new keys.
//! 3. `rekey_finish`: once no row uses an old version, retire them (the wrapped keys are
//!    overwritten, and the WAL truncated), replace the audit signing key (an old backup holds
//!    the old one, which then signs no checkpoint past the handover) and clear `meta.rekey`.
//!
//! A run killed anywhere resumes with the same command (it opens the vault with the new key
//! when the old one no longer fits). A server running beside it holds the old keys: after
//! step 1 its writes are refused as UNAVAILABLE (it must not seal or MAC with a replaced key)
//! until it is reloaded with the new master key (SIGHUP), after which it serves throughout.

use std::time::Instant;

use super::lifecycle::{yield_to_serving_writes, RewrapProgress, DEFAULT_BATCH};
use super::{Caller, Vault};
use crate::crypto::{MasterKey, VaultId};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct RekeyOptions {
    /// Rows per re-seal transaction.
    pub batch: usize,
    /// Stop after this many re-seal batches, leaving the rekey to be resumed (tests, and an
    /// operator who wants to spread the work).
    pub max_batches: Option<u64>,
}

impl Default for RekeyOptions {
    fn default() -> Self {
        RekeyOptions {
            batch: DEFAULT_BATCH,
            max_batches: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RekeyReport {
    /// The new active data key version.
    pub version: u32,
    /// True when this run continued a rekey an earlier run began.
    pub resumed: bool,
    pub resealed: u64,
    pub batches: u64,
    /// False when the run stopped at `max_batches`; run it again to finish.
    pub finished: bool,
    /// Old data key versions retired (their keys destroyed).
    pub retired: u32,
}

impl Vault {
    /// Begins (or resumes) a rekey to `new` and runs it to the end (or `max_batches`). This
    /// vault adopts the new keys as soon as they exist.
    pub async fn rekey(
        &self,
        caller: &Caller,
        new: &MasterKey,
        opts: &RekeyOptions,
        mut progress: impl FnMut(&RewrapProgress),
    ) -> Result<RekeyReport> {
        let start = Instant::now();
        let location = self.inner.location.clone();
        let header = tokio::task::spawn_blocking(move || location.read_header())
            .await
            .map_err(|e| Error::Internal(format!("read header: {e}")))??;
        let vault_id = VaultId::from_slice(&header.vault_id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = new.derive(&vault_id);
        let mut report = RekeyReport::default();
        let state = match header.layers.rekey {
            Some(state) => {
                // `verify`, not `matches`: a PKCS#11 device fault stays UNAVAILABLE (retry),
                // never a claim that another rekey is in progress.
                if !check.verify(&header.key_check)? {
                    return Err(Error::FailedPrecondition(
                        "a rekey to another master key is in progress: run it again with that \
                         key as the new master key to finish it"
                            .into(),
                    ));
                }
                report.resumed = true;
                state
            }
            None => {
                // Run again after it finished (or a plain rotation to this key): say so.
                if check.verify(&header.key_check)? {
                    return Err(Error::InvalidArgument(
                        "the vault's master key is already this key and no rekey is in \
                         progress: a rekey to it has finished, nothing to do (to cut this key \
                         off, rekey to another new key)"
                            .into(),
                    ));
                }
                self.inner
                    .store
                    .rekey_begin(kwk, check.to_stored()?, caller.clone())
                    .await?
            }
        };
        report.version = state.version;
        // From here only the new master opens the vault: adopt its keys, as SIGHUP does.
        self.reload_master_key(new).await?;
        let total: u64 = self
            .inner
            .store
            .rows_by_version()
            .await?
            .iter()
            .filter(|(v, _)| *v < state.version)
            .map(|(_, n)| n)
            .sum();
        let mut failed = 0u64;
        loop {
            if opts.max_batches.is_some_and(|m| report.batches >= m) {
                report.finished = false;
                return Ok(report);
            }
            let t = Instant::now();
            let out = self
                .inner
                .store
                .rekey_batch(opts.batch.max(1), caller.clone())
                .await?;
            report.batches += 1;
            report.resealed += out.resealed;
            failed += out.failed.len() as u64;
            progress(&RewrapProgress {
                done: report.resealed,
                total,
                failed,
                elapsed: start.elapsed(),
            });
            if !out.more {
                break;
            }
            yield_to_serving_writes(t.elapsed()).await;
        }
        report.retired = self.inner.store.rekey_finish(caller.clone()).await?;
        self.reload_master_key(new).await?;
        report.finished = true;
        Ok(report)
    }
}
