//! Key lifecycle and data-safety admin operations of the vault: rewrap, retire, revoke,
//! master-key rotation, check, backup and purge. They run from the CLI against the same data
//! directory while a server serves: every write is a short batch on the store's admin path,
//! every change to keys bumps the generation counter that running servers poll.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Caller, KeyPolicy, KeyState, Vault};
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
    /// Files in the data directory that belong to no vault (what interrupted restores left);
    /// the next restore removes them. Reported, not a failure of the check.
    pub leftovers: Vec<String>,
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
    /// Only rows deleted / expired at least this long ago. None: any deleted row, and expired
    /// rows only after [`super::EXPIRED_PURGE_GRACE`] (a forward clock step destroys nothing).
    pub older_than: Option<Duration>,
    pub batch: usize,
}

/// What a purge with given options removes, counted before anything is removed; `purge`
/// removes by exactly these cut-offs.
#[derive(Clone, Debug, Default)]
pub struct PurgePlan {
    /// Tombstoned rows deleted before this time are removed (None: none are).
    pub deleted_before: Option<super::Micros>,
    /// Rows that expired before this time are removed (None: none are).
    pub expired_before: Option<super::Micros>,
    pub deleted: u64,
    pub expired: u64,
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
            let t = Instant::now();
            let out = self.inner.store.rewrap_batch(batch, caller.clone()).await?;
            let Some(last) = out.last_id else { break };
            yield_to_serving_writes(t.elapsed()).await;
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
            // The rewrap below is refused while a rekey runs: the rotation is refused too, in
            // its own transaction, so that the refused command changes nothing.
            KeyState::Active => report.rotated_to = Some(self.rotate(caller, true).await?),
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
            .rotate_master(kwk, check.to_stored()?, caller.clone())
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
        if let Some(dir) = self.location().data_dir() {
            report.leftovers = crate::store::lifecycle::leftovers(dir)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
        }
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
    /// Refused when `out` is inside the data directory: SQLite would take a file named like
    /// `vault.db-journal` for its own, and a backup there is lost with the disk it protects.
    pub async fn backup(&self, caller: &Caller, out: &Path) -> Result<u64> {
        let inside = match self.location().data_dir() {
            Some(dir) => outside_data_dir(out, dir),
            None => Ok(()),
        };
        let r = match inside {
            Ok(()) => self.inner.store.backup_to(out.to_path_buf()).await,
            Err(e) => Err(e),
        };
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

    /// Counts what [`Vault::purge`] with `opts` would remove, and fixes its cut-offs.
    /// Refused (FAILED_PRECONDITION) while the clock is behind the newest recorded time, and
    /// for a duration that does not fit before the clock's epoch (INVALID_ARGUMENT).
    pub async fn purge_plan(&self, opts: &PurgeOptions) -> Result<PurgePlan> {
        if !opts.deleted && !opts.expired {
            return Err(Error::InvalidArgument(
                "choose what to purge: deleted and/or expired tokens".into(),
            ));
        }
        // The newest record, read now: another process may have written since we opened.
        let head = self.audit_head_seq().await?;
        let newest = match head {
            0 => None,
            seq => self.audit_records(seq, 1).await?.first().map(|r| r.at),
        };
        let clock = self.inner.time.clock_now();
        if let Some(newest) = newest.filter(|n| clock < *n) {
            return Err(Error::FailedPrecondition(format!(
                "the clock ({}) is behind the newest recorded time ({}): purge refuses to judge \
                 expiry by a clock that went backwards; fix the clock (NTP) and run it again",
                rfc3339(clock),
                rfc3339(newest)
            )));
        }
        let now = self.now();
        let cutoff = |age: Duration| -> Result<super::Micros> {
            i64::try_from(age.as_micros())
                .ok()
                .and_then(|a| now.checked_sub(a))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "--older-than {}s reaches before any representable time",
                        age.as_secs()
                    ))
                })
        };
        let deleted_before = opts
            .deleted
            .then(|| cutoff(opts.older_than.unwrap_or(Duration::ZERO)))
            .transpose()?;
        let expired_before = opts
            .expired
            .then(|| cutoff(opts.older_than.unwrap_or(super::EXPIRED_PURGE_GRACE)))
            .transpose()?;
        let (deleted, expired) = self
            .inner
            .store
            .purge_count(deleted_before, expired_before)
            .await?;
        Ok(PurgePlan {
            deleted_before,
            expired_before,
            deleted,
            expired,
        })
    }

    /// Removes tombstoned and/or expired rows in batches (see [`Vault::purge_plan`]).
    pub async fn purge(&self, caller: &Caller, opts: &PurgeOptions) -> Result<PurgeReport> {
        let plan = self.purge_plan(opts).await?;
        self.purge_planned(caller, &plan, opts.batch).await
    }

    /// Removes what `plan` counted (and what matched its cut-offs since), in batches.
    pub async fn purge_planned(
        &self,
        caller: &Caller,
        plan: &PurgePlan,
        batch: usize,
    ) -> Result<PurgeReport> {
        let mut report = PurgeReport::default();
        let mut after_id = 0;
        loop {
            let batch = PurgeBatch {
                deleted_before: plan.deleted_before,
                expired_before: plan.expired_before,
                after_id,
                limit: batch.max(1),
            };
            let t = Instant::now();
            let out = self.inner.store.purge_batch(batch, caller.clone()).await?;
            let Some(last) = out.last_id else { break };
            yield_to_serving_writes(t.elapsed()).await;
            after_id = last;
            report.batches += 1;
            report.deleted += out.deleted;
            report.expired += out.expired;
        }
        Ok(report)
    }
}

/// Pause after an admin batch that held the write lock for `held`: a server waiting for the
/// lock polls it with growing sleeps (SQLite's busy handler, up to 25 ms apart in its first
/// 100 ms), and batches back to back would win every race. Admin work gets at most about
/// half of the write lock's time.
pub(super) async fn yield_to_serving_writes(held: Duration) {
    tokio::time::sleep(held.clamp(Duration::from_millis(25), Duration::from_millis(100))).await;
}

fn rfc3339(micros: super::Micros) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{micros} us"))
}

/// Fails unless `out`'s directory (resolved through symlinks) lies outside `data_dir`.
fn outside_data_dir(out: &Path, data_dir: &Path) -> Result<()> {
    if out.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("the backup path is empty".into()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let resolve = |p: &Path| {
        std::fs::canonicalize(p)
            .map_err(|e| Error::InvalidArgument(format!("cannot resolve {}: {e}", p.display())))
    };
    let (dir, data) = (resolve(parent)?, resolve(data_dir)?);
    if dir.starts_with(&data) {
        return Err(Error::InvalidArgument(format!(
            "{} is inside the data directory {}: write backups elsewhere (another disk, ideally)",
            out.display(),
            data_dir.display()
        )));
    }
    Ok(())
}

impl Vault {
    /// Restores the backup at `from` into `data_dir` and reports success only once the
    /// restored vault passed `check --full` and `audit verify`:
    ///
    /// 1. take the data directory's exclusive lock (refused while a server or an admin
    ///    command has the vault open; a server started meanwhile refuses to start), remove
    ///    what interrupted restores left, verify the backup against the master key and copy it
    ///    into a staging directory beside the vault;
    /// 2. open the copy as a vault: every ciphertext must decrypt and the audit chain must
    ///    verify; the restore is recorded in the copy's own trail;
    /// 3. remove any `-wal`/`-shm` beside the target, rename the copy into place, release the
    ///    lock.
    ///
    /// A failure before step 3 leaves the existing vault (if any) as it was.
    pub async fn restore(
        caller: &Caller,
        from: &Path,
        data_dir: &Path,
        master: &MasterKey,
        force: bool,
    ) -> Result<crate::store::lifecycle::RestoreReport> {
        use crate::store::lifecycle::{restore_install, restore_stage};
        // Run in place: the master key is not `Clone`, and a restore is the only thing its
        // (CLI) process does.
        let mut staged = restore_stage(from, data_dir, master, force)?;
        let verified = async {
            let copy = Vault::open(super::VaultConfig::new(&staged.staging), master)?;
            let r = async {
                let check = copy.check(true, 0).await?;
                if !check.ok() {
                    return Err(Error::DataLoss(format!(
                        "the restored copy failed its check ({} integrity problems, {} keyring \
                         problems, {} tokens that do not decrypt); nothing was replaced",
                        check.integrity.len(),
                        check.keyring.len(),
                        check.failed_tokens.len()
                    )));
                }
                let records = match copy.verify_audit().await? {
                    crate::audit::Verification::Ok { records } => records,
                    broken => {
                        return Err(Error::DataLoss(format!(
                            "the restored copy's audit trail does not verify ({}); nothing was \
                             replaced",
                            broken.describe()
                        )))
                    }
                };
                copy.audit_event(caller, "restore", &from.display().to_string())
                    .await?;
                Ok((check.checked, records))
            }
            .await;
            copy.close().await;
            r
        }
        .await;
        match verified {
            Ok((rows, records)) => {
                staged.report.rows_checked = rows;
                staged.report.audit_records = records;
            }
            Err(e) => {
                tokio::task::spawn_blocking(move || staged.discard())
                    .await
                    .map_err(|e| Error::Internal(format!("restore task: {e}")))?;
                return Err(e);
            }
        }
        let d = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || restore_install(staged, &d))
            .await
            .map_err(|e| Error::Internal(format!("restore task: {e}")))?
    }
}
