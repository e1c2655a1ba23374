//! Key lifecycle and data-safety admin operations of the vault: rewrap, retire, revoke,
//! master-key rotation, check, backup and purge. They run from the CLI against the same data
//! directory while a server serves: every write is a short batch on the store's admin path,
//! every change to keys bumps the generation counter that running servers poll.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{now_micros, Caller, KeyPolicy, KeyState, Vault};
use crate::audit::AuditEntry;
use crate::crypto::{MasterKey, VaultId};
use crate::error::{outcome_of, Error, Result};
use crate::store::{PurgeBatch, RewrapBatch};

/// Default rows per rewrap or purge transaction: large enough for throughput, small enough
/// that a serving writer waits only milliseconds for the lock.
pub const DEFAULT_BATCH: usize = 5_000;
/// Rows decrypted by `check` without `--full`.
pub const DEFAULT_SAMPLE: usize = 1_000;

#[derive(Clone, Debug)]
pub struct RewrapOptions {
    pub batch: usize,
    /// Only rows sealed under this version; all older versions when None.
    pub only_version: Option<u32>,
}

impl Default for RewrapOptions {
    fn default() -> Self {
        RewrapOptions {
            batch: DEFAULT_BATCH,
            only_version: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RewrapProgress {
    pub done: u64,
    pub total: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl RewrapProgress {
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.done as f64 / s
        } else {
            0.0
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RewrapReport {
    pub rewrapped: u64,
    /// Tokens left as they were because their ciphertext failed authentication.
    pub failed: Vec<String>,
    pub active_version: u32,
    pub batches: u64,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct RevokeReport {
    pub version: u32,
    /// The new active version when the revoked one was active.
    pub rotated_to: Option<u32>,
    pub rewrapped: u64,
    /// True when the version was already retired (a re-run after completion).
    pub already_retired: bool,
}

#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub full: bool,
    /// `PRAGMA integrity_check` problems.
    pub integrity: Vec<String>,
    /// Keyring inconsistencies (versions referenced by rows but missing or retired, ...).
    pub keyring: Vec<String>,
    pub checked: u64,
    /// Tokens whose ciphertext failed authentication or did not decrypt to a card number.
    pub failed_tokens: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.integrity.is_empty() && self.keyring.is_empty() && self.failed_tokens.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct PurgeOptions {
    pub deleted: bool,
    pub expired: bool,
    /// Only rows deleted / expired at least this long ago.
    pub older_than: Option<Duration>,
    pub batch: usize,
}

#[derive(Clone, Debug, Default)]
pub struct PurgeReport {
    pub deleted: u64,
    pub expired: u64,
    pub batches: u64,
}

impl Vault {
    pub fn key_policy(&self) -> &KeyPolicy {
        self.inner.keyring.policy()
    }

    /// The active version as the database says (another process may have rotated).
    async fn active_version(&self) -> Result<u32> {
        self.inner
            .store
            .key_rows()
            .await?
            .iter()
            .find(|k| k.state == KeyState::Active)
            .map(|k| k.version)
            .ok_or_else(|| Error::Internal("no active key version".into()))
    }

    /// Re-seals every row sealed under a version older than the active one (or only under
    /// `only_version`) with the active version, batch by batch. Resumable: rows already
    /// re-sealed are not selected again.
    pub async fn rewrap(
        &self,
        caller: &Caller,
        opts: &RewrapOptions,
        mut progress: impl FnMut(&RewrapProgress),
    ) -> Result<RewrapReport> {
        let start = Instant::now();
        let below = self.active_version().await?;
        if let Some(v) = opts.only_version {
            if v >= below {
                return Err(Error::FailedPrecondition(format!(
                    "v{v} is not older than the active version v{below}; nothing to rewrap \
                     (use `keys revoke {v}` to replace the active version)"
                )));
            }
        }
        let total: u64 = self
            .inner
            .store
            .rows_by_version()
            .await?
            .iter()
            .filter(|(v, _)| *v < below && opts.only_version.map_or(true, |o| o == *v))
            .map(|(_, n)| n)
            .sum();
        let mut report = RewrapReport {
            active_version: below,
            ..Default::default()
        };
        let mut after_id = 0;
        loop {
            let batch = RewrapBatch {
                below,
                only_version: opts.only_version,
                after_id,
                limit: opts.batch.max(1),
            };
            let out = self.inner.store.rewrap_batch(batch, caller.clone()).await?;
            let Some(last) = out.last_id else { break };
            after_id = last;
            report.batches += 1;
            report.rewrapped += out.rewrapped;
            report.failed.extend(out.failed);
            report.active_version = out.active_version;
            progress(&RewrapProgress {
                done: report.rewrapped,
                total,
                failed: report.failed.len() as u64,
                elapsed: start.elapsed(),
            });
        }
        report.elapsed = start.elapsed();
        self.refresh().await?;
        Ok(report)
    }

    /// Retires a decrypt-only version that no row uses any more; its key is destroyed. False
    /// when it was already retired. Refusals are audited too.
    pub async fn retire_key(&self, caller: &Caller, version: u32) -> Result<bool> {
        let r = self.inner.store.retire_key(version, caller.clone()).await;
        if let Err(e) = &r {
            if !matches!(e, Error::Unavailable(_)) {
                let entry = AuditEntry::new(
                    caller,
                    "key_retire",
                    &format!("key v{version}"),
                    outcome_of(&r),
                    &e.to_string(),
                );
                self.inner.store.append_audit(vec![entry]).await?;
            }
        }
        let retired = r?;
        self.refresh().await?;
        Ok(retired)
    }

    /// For a compromised version: rotates if it is active, re-seals all of its rows, retires
    /// it. Every step is idempotent, so an interrupted run is finished by running it again.
    pub async fn revoke_key(
        &self,
        caller: &Caller,
        version: u32,
        batch: usize,
        progress: impl FnMut(&RewrapProgress),
    ) -> Result<RevokeReport> {
        let rows = self.inner.store.key_rows().await?;
        let row = rows.iter().find(|k| k.version == version).ok_or_else(|| {
            Error::FailedPrecondition(format!("there is no key version {version}"))
        })?;
        let mut report = RevokeReport {
            version,
            ..Default::default()
        };
        match row.state {
            KeyState::Retired => {
                report.already_retired = true;
                return Ok(report);
            }
            KeyState::Active => report.rotated_to = Some(self.rotate_key(caller).await?),
            KeyState::DecryptOnly => {}
        }
        let opts = RewrapOptions {
            batch,
            only_version: Some(version),
        };
        let rewrap = self.rewrap(caller, &opts, progress).await?;
        report.rewrapped = rewrap.rewrapped;
        if !rewrap.failed.is_empty() {
            return Err(Error::DataLoss(format!(
                "{} tokens under v{version} failed authentication and were not re-sealed, so \
                 v{version} stays usable for them: {}",
                rewrap.failed.len(),
                rewrap.failed.join(", ")
            )));
        }
        self.retire_key(caller, version).await?;
        Ok(report)
    }

    /// Re-wraps every stored key under the new master key in one transaction. Afterwards
    /// only `new` opens this database; the data keys are unchanged, so the old master and an
    /// older copy of the database still open them. Close this vault afterwards: it holds the
    /// old master's wrapping key and will refuse to create key versions.
    pub async fn rotate_master(&self, caller: &Caller, new: &MasterKey) -> Result<u32> {
        let id = self.inner.store.vault_id().await?;
        let id = VaultId::from_slice(&id)
            .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;
        let (kwk, check) = new.derive(&id);
        let n = self
            .inner
            .store
            .rotate_master(kwk, check.0.to_vec(), caller.clone())
            .await?;
        Ok(n)
    }

    /// Integrity check, keyring consistency and decryption of a sample (or every row).
    pub async fn check(&self, full: bool, sample: usize) -> Result<CheckReport> {
        let mut report = CheckReport {
            full,
            ..Default::default()
        };
        report.integrity = self.inner.store.integrity_check().await?;
        let keys = self.inner.store.key_rows().await?;
        let active = keys.iter().filter(|k| k.state == KeyState::Active).count();
        if active != 1 {
            report.keyring.push(format!(
                "{active} active key versions (expected exactly one)"
            ));
        }
        for (version, rows) in self.inner.store.rows_by_version().await? {
            match keys.iter().find(|k| k.version == version) {
                None => report.keyring.push(format!(
                    "{rows} tokens use v{version}, which does not exist"
                )),
                Some(k) if k.state == KeyState::Retired => report
                    .keyring
                    .push(format!("{rows} tokens use v{version}, which is retired")),
                Some(_) => {}
            }
        }
        self.refresh().await?;
        let snapshot = self.inner.keyring.snapshot();
        let verify = |rows: &[crate::store::SealedRow], report: &mut CheckReport| {
            for row in rows {
                report.checked += 1;
                let ok = snapshot
                    .get(row.key_version)
                    .and_then(|key| {
                        key.open(
                            row.row_format,
                            &row.token,
                            &row.bound_meta,
                            &row.nonce,
                            &row.ciphertext,
                        )
                        .ok()
                    })
                    .is_some_and(|digits| {
                        std::str::from_utf8(&digits)
                            .is_ok_and(|t| crate::card::Pan::parse(t).is_ok())
                    });
                if !ok {
                    report.failed_tokens.push(row.token.clone());
                }
            }
        };
        if full {
            let mut after = 0;
            loop {
                let rows = self.inner.store.sealed_rows(after, DEFAULT_BATCH).await?;
                let Some(last) = rows.last() else { break };
                after = last.id;
                verify(&rows, &mut report);
            }
        } else {
            let rows = self.inner.store.sample_sealed_rows(sample).await?;
            verify(&rows, &mut report);
        }
        Ok(report)
    }

    /// A consistent online snapshot to `out` (a new file); audited. Returns its size.
    pub async fn backup(&self, caller: &Caller, out: &Path) -> Result<u64> {
        let r = self.inner.store.backup_to(out.to_path_buf()).await;
        let entry = AuditEntry::new(
            caller,
            "backup",
            &out.display().to_string(),
            outcome_of(&r),
            "",
        );
        self.inner.store.append_audit(vec![entry]).await?;
        r
    }

    /// Removes tombstoned and/or expired rows in batches.
    pub async fn purge(&self, caller: &Caller, opts: &PurgeOptions) -> Result<PurgeReport> {
        if !opts.deleted && !opts.expired {
            return Err(Error::InvalidArgument(
                "choose what to purge: deleted and/or expired tokens".into(),
            ));
        }
        let cutoff = now_micros() - opts.older_than.map(|d| d.as_micros() as i64).unwrap_or(0);
        let mut report = PurgeReport::default();
        let mut after_id = 0;
        loop {
            let batch = PurgeBatch {
                deleted_before: opts.deleted.then_some(cutoff),
                expired_before: opts.expired.then_some(cutoff),
                after_id,
                limit: opts.batch.max(1),
            };
            let out = self.inner.store.purge_batch(batch, caller.clone()).await?;
            let Some(last) = out.last_id else { break };
            after_id = last;
            report.batches += 1;
            report.deleted += out.deleted;
            report.expired += out.expired;
        }
        Ok(report)
    }
}
