//! Key lifecycle and data-safety operations of the SQLite store: rewrap in bounded batches,
//! retire, master-key rotation, the integrity queries behind `check`, online backup and
//! restore, and purge.
//!
//! Writes run through the writer's admin path ([`SqliteStore::admin`]): each batch is one
//! immediate transaction that the writer runs between two groups of serving traffic, with its
//! audit record in the same transaction. Batches select by `id > cursor ... ORDER BY id`, so a
//! run is one pass over the table and an interrupted run simply starts again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::lock::DirLock;
use super::sqlite::{
    bump_generation, db_path, load_key_rows, mark_destroyed, rotate_in_tx, SqliteStore,
    BUSY_TIMEOUT, DB_FILE,
};
use super::{migrations, StoreFuture};
use crate::audit::AuditEntry;
use crate::crypto::{KeyPurpose, KeyWrappingKey, MasterKey, VaultId};
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::model::{now_micros, Caller, KeyPolicy, KeyState, Micros};

/// One rewrap batch: rows sealed under a version below `below` (and equal to
/// `only_version` when given), after row id `after_id`, at most `limit`.
#[derive(Clone, Debug)]
pub struct RewrapBatch {
    pub below: u32,
    pub only_version: Option<u32>,
    pub after_id: i64,
    pub limit: usize,
}

#[derive(Clone, Debug, Default)]
pub struct RewrapOutcome {
    /// Rows re-sealed under the active version.
    pub rewrapped: u64,
    /// Tokens whose ciphertext failed authentication or whose key is unavailable; left as is.
    pub failed: Vec<String>,
    /// Id of the last row looked at; None when the batch found nothing (the run is done).
    pub last_id: Option<i64>,
    /// The active version the rows were sealed under (the last one, if it rotated).
    pub active_version: u32,
}

/// One purge batch. A cut-off of None leaves that kind of row alone.
#[derive(Clone, Debug)]
pub struct PurgeBatch {
    /// Remove tombstoned rows deleted before this time.
    pub deleted_before: Option<Micros>,
    /// Remove rows that expired before this time.
    pub expired_before: Option<Micros>,
    pub after_id: i64,
    pub limit: usize,
}

#[derive(Clone, Debug, Default)]
pub struct PurgeOutcome {
    pub deleted: u64,
    pub expired: u64,
    pub last_id: Option<i64>,
}

/// A row holding a ciphertext, for `check`.
#[derive(Clone, Debug)]
pub struct SealedRow {
    pub id: i64,
    pub token: String,
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// `crypto::ROW_FORMAT_*` the row says it was sealed in.
    pub row_format: u32,
    /// `store::canonical_meta` of the stored columns, for the AAD.
    pub bound_meta: Vec<u8>,
}

/// The columns [`sealed_row`] reads, in its order.
macro_rules! sealed_cols {
    () => {
        "id, token, key_version, nonce, ciphertext, format, brand, pan_length, bin, last4, \
         created_at, expires_at, row_format"
    };
}

fn store_err<T>(r: rusqlite::Result<T>) -> Result<T> {
    r.map_err(Error::from)
}

/// Longest an admin transaction may hold the write lock: a batch stops at this budget (or its
/// row limit, whichever comes first) and the next batch resumes after its last row, so
/// serving writes never wait longer than about this for an admin command.
pub const ADMIN_TX_BUDGET: Duration = Duration::from_millis(50);
/// Rows read per step inside an admin transaction, so a large `--batch` is never read whole
/// before the time budget is looked at.
const ADMIN_CHUNK: usize = 256;

pub(super) fn rewrap_batch(
    store: &SqliteStore,
    b: RewrapBatch,
    caller: Caller,
) -> StoreFuture<RewrapOutcome> {
    store.admin(move |tx, keyring, st| {
        // A re-seal under the rekey's new key would skip the row's fingerprint re-layering.
        if rekey_state(tx)?.is_some() {
            return Err(Error::FailedPrecondition(REWRAP_DURING_REKEY.into()));
        }
        let started = std::time::Instant::now();
        // NOT INDEXED: walk the rowid range; the key_version index would sort every batch.
        // A full rewrap also upgrades rows of an older row format under the active version.
        let mut select = tx.prepare_cached(concat!(
            "SELECT ",
            sealed_cols!(),
            " FROM tokens NOT INDEXED WHERE id > ?1 AND ciphertext IS NOT NULL AND \
             (CASE WHEN ?3 IS NULL THEN key_version < ?2 OR row_format < ?5 \
             ELSE key_version = ?3 AND key_version < ?2 END) ORDER BY id LIMIT ?4"
        ))?;
        let mut out = RewrapOutcome {
            active_version: st.active_version,
            ..Default::default()
        };
        let mut update = tx.prepare_cached(
            "UPDATE tokens SET key_version = ?2, nonce = ?3, ciphertext = ?4, row_format = ?5 \
             WHERE id = ?1",
        )?;
        let mut snapshot = keyring.snapshot();
        let (mut cursor, mut seen) = (b.after_id, 0usize);
        while seen < b.limit && started.elapsed() < ADMIN_TX_BUDGET {
            let want = (b.limit - seen).min(ADMIN_CHUNK);
            let rows = select
                .query_map(
                    params![
                        cursor,
                        b.below,
                        b.only_version,
                        want as i64,
                        crate::crypto::ROW_FORMAT
                    ],
                    sealed_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let Some(last) = rows.last() else { break };
            cursor = last.id;
            out.last_id = Some(last.id);
            seen += rows.len();
            for row in &rows {
                // Each re-seal draws a nonce under the active key: it counts like a tokenize.
                if keyring.needs_rotation(st.active_count, 1, st.active_created, now_micros()) {
                    rotate_in_tx(tx, keyring, st)?;
                    snapshot = keyring.snapshot();
                }
                let Some(old) = snapshot.get(row.key_version) else {
                    out.failed.push(row.token.clone());
                    continue;
                };
                let Ok(plain) = old.open(
                    row.row_format,
                    &row.token,
                    &row.bound_meta,
                    &row.nonce,
                    &row.ciphertext,
                ) else {
                    out.failed.push(row.token.clone());
                    continue;
                };
                // The new seal binds the same token and metadata, the new version, in the
                // current row format (a format-1 row binds its metadata from here on).
                let sealed = snapshot.active.seal(&row.token, &row.bound_meta, &plain);
                let version = snapshot.active.version();
                update.execute(params![
                    row.id,
                    version,
                    &sealed.nonce[..],
                    sealed.ciphertext,
                    crate::crypto::ROW_FORMAT
                ])?;
                st.active_count += 1;
                *st.counts.entry(version).or_insert(0) += 1;
                out.rewrapped += 1;
                out.active_version = version;
            }
            if rows.len() < want {
                break;
            }
        }
        if out.rewrapped > 0 {
            // The old ciphertexts were overwritten: truncate them out of the WAL too.
            mark_destroyed(tx)?;
        }
        if out.rewrapped > 0 || !out.failed.is_empty() {
            st.audit.push(AuditEntry::new(
                &caller,
                "key_rewrap",
                &format!("key v{}", out.active_version),
                if out.failed.is_empty() {
                    "OK"
                } else {
                    "DATA_LOSS"
                },
                &format!(
                    "{} rows re-sealed, {} failed",
                    out.rewrapped,
                    out.failed.len()
                ),
            ));
        }
        Ok(out)
    })
}

/// False when `version` was already retired.
pub(super) fn retire_key(store: &SqliteStore, version: u32, caller: Caller) -> StoreFuture<bool> {
    store.admin(move |tx, _keyring, st| {
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM data_keys WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()?;
        match state.as_deref().and_then(KeyState::parse) {
            None => {
                return Err(Error::FailedPrecondition(format!(
                    "there is no key version {version}"
                )))
            }
            Some(KeyState::Active) => {
                return Err(Error::FailedPrecondition(format!(
                    "v{version} is the active version: rotate first, or use `keys revoke {version}`"
                )))
            }
            Some(KeyState::Retired) => return Ok(false),
            Some(KeyState::DecryptOnly) => {}
        }
        let rows: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tokens WHERE key_version = ?1 AND ciphertext IS NOT NULL",
            [version],
            |r| r.get(0),
        )?;
        if rows > 0 {
            return Err(Error::FailedPrecondition(format!(
                "{rows} tokens are still sealed under v{version}; run `tokenvault keys rewrap` first"
            )));
        }
        // Crypto-shred: with no row left under it, the wrapped key has no reason to exist.
        tx.execute(
            "UPDATE data_keys SET state = 'retired', wrapped = x'' WHERE version = ?1",
            [version],
        )?;
        mark_destroyed(tx)?;
        bump_generation(tx)?;
        st.audit.push(AuditEntry::new(
            &caller,
            "key_retire",
            &format!("key v{version}"),
            "OK",
            "",
        ));
        Ok(true)
    })
}

/// Re-wraps every stored key under `new_kwk` and stores `new_check`, in one transaction.
pub(super) fn rotate_master(
    store: &SqliteStore,
    new_kwk: KeyWrappingKey,
    new_check: Vec<u8>,
    caller: Caller,
) -> StoreFuture<u32> {
    store.admin(move |tx, keyring, st| {
        let meta = |key: &str| -> Result<Vec<u8>> {
            store_err(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)))
        };
        // A plain re-wrap would leave the rekey's state naming keys it did not wrap.
        if rekey_state(tx)?.is_some() {
            return Err(Error::FailedPrecondition(REKEY_IN_PROGRESS.into()));
        }
        let old_check = meta("key_check")?;
        if crate::crypto::ct_eq(&old_check, &new_check) {
            return Err(Error::InvalidArgument(
                "the new master key is the vault's current master key".into(),
            ));
        }
        let fingerprint = meta("wrapped_fingerprint_key")?;
        if !keyring.master_opens(&fingerprint)? {
            return Err(Error::FailedPrecondition(
                "the master key was rotated by another process meanwhile".into(),
            ));
        }
        let audit = meta("wrapped_audit_key")?;
        let mut rewrapped = 0u32;
        for row in load_key_rows(tx)? {
            if row.state == KeyState::Retired {
                continue;
            }
            let w = keyring.rewrap_under(&new_kwk, &row.wrapped, KeyPurpose::Data(row.version))?;
            tx.execute(
                "UPDATE data_keys SET wrapped = ?2 WHERE version = ?1",
                params![row.version, w],
            )?;
            rewrapped += 1;
        }
        // The audit signing key (only the active one still has its private half).
        let signing: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT id, wrapped FROM audit_signing_keys WHERE wrapped IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, wrapped) in signing {
            let w =
                keyring.rewrap_under(&new_kwk, &wrapped, KeyPurpose::AuditSigning(id as u32))?;
            tx.execute(
                "UPDATE audit_signing_keys SET wrapped = ?2 WHERE id = ?1",
                params![id, w],
            )?;
        }
        let fingerprint = keyring.rewrap_under(&new_kwk, &fingerprint, KeyPurpose::Fingerprint)?;
        let audit = keyring.rewrap_under(&new_kwk, &audit, KeyPurpose::Audit)?;
        // What earlier rekeys added: fingerprint layers and replaced audit keys.
        for (k, f) in [
            (
                "fingerprint_layers",
                Keyring::rewrap_layers as fn(&Keyring, &KeyWrappingKey, &[u8]) -> Result<Vec<u8>>,
            ),
            ("retired_audit_keys", Keyring::rewrap_retired_audit),
        ] {
            if let Some(v) = meta_opt(tx, k)? {
                meta_set(tx, k, &f(keyring, &new_kwk, &v)?)?;
            }
        }
        for (k, v) in [
            ("wrapped_fingerprint_key", &fingerprint),
            ("wrapped_audit_key", &audit),
            ("key_check", &new_check),
        ] {
            tx.execute("UPDATE meta SET value = ?2 WHERE key = ?1", params![k, v])?;
        }
        // The keys wrapped under the old master are overwritten: out of the WAL with them.
        mark_destroyed(tx)?;
        bump_generation(tx)?;
        st.audit.push(AuditEntry::new(
            &caller,
            "master_rotate",
            "master key",
            "OK",
            &format!(
                "{} data keys, fingerprint and audit key re-wrapped",
                rewrapped
            ),
        ));
        Ok(rewrapped)
    })
}

pub(super) fn vault_id(store: &SqliteStore) -> StoreFuture<Vec<u8>> {
    store.read(|conn| {
        store_err(
            conn.query_row("SELECT value FROM meta WHERE key = 'vault_id'", [], |r| {
                r.get(0)
            }),
        )
    })
}

pub(super) fn rows_by_version(store: &SqliteStore) -> StoreFuture<Vec<(u32, u64)>> {
    store.read(|conn| {
        let mut stmt = conn.prepare_cached(
            "SELECT key_version, COUNT(*) FROM tokens WHERE ciphertext IS NOT NULL \
             GROUP BY key_version ORDER BY key_version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u64))
        })?;
        store_err(rows.collect())
    })
}

fn sealed_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SealedRow> {
    let (row_format, bound_meta) = super::sqlite::binding_from_row(r, 5)?;
    Ok(SealedRow {
        id: r.get(0)?,
        token: r.get(1)?,
        key_version: r.get::<_, i64>(2)? as u32,
        nonce: r.get(3)?,
        ciphertext: r.get(4)?,
        row_format,
        bound_meta,
    })
}

pub(super) fn sealed_rows(
    store: &SqliteStore,
    after_id: i64,
    limit: usize,
) -> StoreFuture<Vec<SealedRow>> {
    store.read(move |conn| {
        let mut stmt = conn.prepare_cached(concat!(
            "SELECT ",
            sealed_cols!(),
            " FROM tokens NOT INDEXED WHERE id > ?1 AND ciphertext IS NOT NULL \
             ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after_id, limit as i64], sealed_row)?;
        store_err(rows.collect())
    })
}

pub(super) fn sample_sealed_rows(store: &SqliteStore, n: usize) -> StoreFuture<Vec<SealedRow>> {
    store.read(move |conn| {
        let mut stmt = conn.prepare_cached(concat!(
            "SELECT ",
            sealed_cols!(),
            " FROM tokens WHERE id IN \
             (SELECT id FROM tokens WHERE ciphertext IS NOT NULL ORDER BY random() LIMIT ?1) \
             ORDER BY id"
        ))?;
        let rows = stmt.query_map([n as i64], sealed_row)?;
        store_err(rows.collect())
    })
}

fn integrity_messages(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let msgs: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(msgs.into_iter().filter(|m| m != "ok").collect())
}

/// `PRAGMA integrity_check` messages; empty when the database is sound.
pub(super) fn integrity_check(store: &SqliteStore) -> StoreFuture<Vec<String>> {
    store.read(integrity_messages)
}

pub(super) fn purge_count(
    store: &SqliteStore,
    deleted_before: Option<Micros>,
    expired_before: Option<Micros>,
) -> StoreFuture<(u64, u64)> {
    store.read(move |conn| {
        let (deleted, expired): (i64, i64) = conn.query_row(
            "SELECT \
             COUNT(*) FILTER (WHERE ?1 IS NOT NULL AND deleted_at IS NOT NULL AND deleted_at < ?1), \
             COUNT(*) FILTER (WHERE ?2 IS NOT NULL AND deleted_at IS NULL \
                              AND expires_at IS NOT NULL AND expires_at < ?2) \
             FROM tokens",
            params![deleted_before, expired_before],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((deleted as u64, expired as u64))
    })
}

pub(super) fn purge_batch(
    store: &SqliteStore,
    b: PurgeBatch,
    caller: Caller,
) -> StoreFuture<PurgeOutcome> {
    store.admin(move |tx, _keyring, st| {
        let started = std::time::Instant::now();
        let mut select = tx.prepare_cached(
            "SELECT id, deleted_at IS NOT NULL FROM tokens NOT INDEXED WHERE id > ?1 AND ( \
             (?2 IS NOT NULL AND deleted_at IS NOT NULL AND deleted_at < ?2) OR \
             (?3 IS NOT NULL AND deleted_at IS NULL AND expires_at IS NOT NULL AND expires_at < ?3)) \
             ORDER BY id LIMIT ?4",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM tokens WHERE id = ?1")?;
        let mut out = PurgeOutcome::default();
        let (mut cursor, mut seen) = (b.after_id, 0usize);
        while seen < b.limit && started.elapsed() < ADMIN_TX_BUDGET {
            let want = (b.limit - seen).min(ADMIN_CHUNK);
            let rows = select
                .query_map(
                    params![cursor, b.deleted_before, b.expired_before, want as i64],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?)),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let Some(last) = rows.last() else { break };
            cursor = last.0;
            out.last_id = Some(last.0);
            seen += rows.len();
            for (id, tombstone) in &rows {
                delete.execute([id])?;
                if *tombstone {
                    out.deleted += 1;
                } else {
                    out.expired += 1;
                }
            }
            if rows.len() < want {
                break;
            }
        }
        if out.deleted + out.expired > 0 {
            mark_destroyed(tx)?;
            st.audit.push(AuditEntry::new(
                &caller,
                "purge",
                "tokens",
                "OK",
                &format!("{} deleted, {} expired rows removed", out.deleted, out.expired),
            ));
        }
        Ok(out)
    })
}

/// Creates `path` empty with owner-only permissions; refuses to overwrite.
fn create_private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", path.display())))
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::Unavailable(format!("cannot sync {}: {e}", path.display())))
}

fn fsync_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fsync_file(dir)
}

/// Infix of a backup's temporary file beside `--out`: `.NAME.partial-<time>`.
const PARTIAL: &str = "partial";
/// Prefix of a restore's staging directory inside the data directory.
pub const RESTORE_STAGING_PREFIX: &str = ".restore-";
/// What restores before the staging directory left behind: `.vault.db.restore-<time>`.
const OLD_RESTORE_PREFIX: &str = ".vault.db.restore-";

fn temp_beside(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}-{}", now_micros()))
}

/// Removes the `.NAME.partial-*` files that killed backups to `out` left beside it. A partial
/// file is locked (`flock`) by the backup writing it, so one still being written is skipped.
fn remove_dead_partials(out: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.{PARTIAL}-", name.to_string_lossy());
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        if try_lock_exclusive(&file) && std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed the partial file of an interrupted backup");
            removed.push(path);
        }
    }
    removed
}

fn try_lock_exclusive(file: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Files and directories in `data_dir` that interrupted restores (or anything else) left
/// beside the vault: copies of ciphertexts that belong to no vault. `check` lists them.
pub fn leftovers(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(RESTORE_STAGING_PREFIX)
                || name.starts_with(OLD_RESTORE_PREFIX)
                || name.contains(&format!(".{PARTIAL}-"))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Copies the database behind `src` into a new file at `dest` (owner-only, single file in
/// rollback-journal mode, fsynced), through the online backup API in one step, so the copy is
/// one consistent snapshot. Returns its size. The file is `flock`ed while it is written, so a
/// later run can tell a dead partial file from one being written.
fn backup_into(src: &Connection, dest: &Path) -> Result<u64> {
    let guard = create_private_file(dest)?;
    try_lock_exclusive(&guard);
    let result = (|| -> Result<u64> {
        let mut dst = Connection::open(dest)?;
        {
            let backup = rusqlite::backup::Backup::new(src, &mut dst)?;
            // -1: all pages in one step, under one read transaction of the source, so the
            // copy is one snapshot however much the server writes meanwhile.
            let mut tries = 0;
            loop {
                match backup.step(-1)? {
                    rusqlite::backup::StepResult::Done => break,
                    rusqlite::backup::StepResult::More => {}
                    _ if tries < 500 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    _ => return Err(Error::Unavailable("the vault stayed locked".into())),
                }
            }
        }
        let _: String = dst.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
        let problems = integrity_messages(&dst)?;
        if !problems.is_empty() {
            return Err(Error::DataLoss(format!(
                "the backup copy failed its integrity check: {}",
                problems.join("; ")
            )));
        }
        drop(dst);
        fsync_file(dest)?;
        Ok(std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    drop(guard);
    result
}

/// Writes a snapshot of the live database to `out` (temp file + fsync + rename). Partial
/// files of earlier, killed backups to the same `out` are removed first.
pub(super) fn backup_to(store: &SqliteStore, out: PathBuf) -> StoreFuture<u64> {
    store.read(move |conn| {
        if out.exists() {
            return Err(Error::AlreadyExists(format!(
                "{} already exists",
                out.display()
            )));
        }
        remove_dead_partials(&out);
        let tmp = temp_beside(&out, PARTIAL);
        let size = backup_into(conn, &tmp)?;
        std::fs::rename(&tmp, &out).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Unavailable(format!("cannot move the backup to {}: {e}", out.display()))
        })?;
        fsync_dir(&out)?;
        Ok(size)
    })
}

/// What a restore found in the backup and did.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub vault_id: String,
    pub key_versions: usize,
    pub tokens: u64,
    pub replaced_existing: bool,
    pub bytes: u64,
    /// Ciphertexts decrypted by the full check of the restored copy.
    pub rows_checked: u64,
    /// Audit records whose chain was verified in the restored copy.
    pub audit_records: u64,
    /// Files of the previous vault (WAL, shared-memory index) or of interrupted restores
    /// that were removed so they can never be combined with the restored database.
    pub removed: Vec<String>,
}

/// Fails with Unavailable when another connection (a server, a CLI of an older tokenvault
/// that does not take the directory lock) has the database open. A database too damaged to
/// open is not "in use": replacing it is what restore is for.
fn ensure_not_in_use(db: &Path) -> Result<()> {
    let in_use = || {
        Error::Unavailable(format!(
            "the vault at {} is in use (stop the server and other tokenvault commands first)",
            db.display()
        ))
    };
    let busy = |e: &rusqlite::Error| {
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked)
        )
    };
    let Ok(conn) = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return Ok(());
    };
    conn.busy_timeout(Duration::from_millis(200))?;
    // Exclusive locking mode takes the database file's exclusive lock and keeps it; any
    // other open WAL connection holds a shared lock, so this fails while one exists.
    if let Err(e) = conn.query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| {
        r.get::<_, String>(0)
    }) {
        return if busy(&e) { Err(in_use()) } else { Ok(()) };
    }
    match conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;") {
        Err(e) if busy(&e) => Err(in_use()),
        _ => Ok(()),
    }
}

/// A verified backup copied into a staging directory inside the data directory, with the
/// directory's exclusive lock held until [`restore_install`] put it in place (or it is dropped).
pub struct StagedRestore {
    lock: DirLock,
    /// Directory holding the copy as `vault.db`: open it as a vault to verify it.
    pub staging: PathBuf,
    pub report: RestoreReport,
}

impl StagedRestore {
    /// Removes the staging directory (the copy failed verification or the restore stopped).
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.staging);
        drop(self.lock);
    }
}

/// First half of a restore. Takes the data directory's exclusive lock (refused while a
/// server or an admin command has the vault open), removes what interrupted restores left,
/// verifies the backup at `from` (integrity, schema, master key, every wrapped key) and copies
/// it into a staging directory. Nothing outside the staging directory changes yet.
pub fn restore_stage(
    from: &Path,
    data_dir: &Path,
    master: &MasterKey,
    force: bool,
) -> Result<StagedRestore> {
    super::datadir::check_data_dir(data_dir)?;
    let src = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", from.display())))?;
    src.busy_timeout(BUSY_TIMEOUT)?;
    let problems = integrity_messages(&src)?;
    if !problems.is_empty() {
        return Err(Error::DataLoss(format!(
            "the backup failed its integrity check: {}",
            problems.join("; ")
        )));
    }
    if migrations::check_not_newer(&src)? < 1 {
        return Err(Error::FailedPrecondition(format!(
            "{} is not a tokenvault backup",
            from.display()
        )));
    }
    let meta = |key: &str| -> Result<Vec<u8>> {
        src.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::FailedPrecondition(format!("backup metadata `{key}` is missing")))
    };
    let vault_id = VaultId::from_slice(&meta("vault_id")?)
        .ok_or_else(|| Error::DataLoss("vault id has the wrong length".into()))?;
    let (kwk, check) = master.derive(&vault_id);
    if !check.matches(&meta("key_check")?) {
        return Err(Error::WrongMasterKey);
    }
    let key_rows = load_key_rows(&src)?;
    // Unwraps every usable key: an altered wrapped key fails here, before anything changes.
    let header = super::VaultHeader {
        vault_id: vault_id.0.to_vec(),
        key_check: meta("key_check")?,
        wrapped_fingerprint_key: meta("wrapped_fingerprint_key")?,
        wrapped_audit_key: meta("wrapped_audit_key")?,
        layers: super::KeyLayers::from_meta(|key| {
            Ok(src
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })?,
    };
    Keyring::new(kwk, &header, &key_rows, KeyPolicy::default())?;
    let tokens: i64 = src.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))?;

    super::datadir::create_private_dir(data_dir)?;
    // Held from here until the restored database is in place: nothing opens the vault between.
    let lock = DirLock::exclusive(data_dir)?;
    let target = db_path(data_dir);
    let replaced_existing = target.exists();
    if replaced_existing {
        if !force {
            return Err(Error::AlreadyExists(format!(
                "a vault already exists at {}; pass --force to replace it",
                data_dir.display()
            )));
        }
        ensure_not_in_use(&target)?;
    }
    let mut removed = Vec::new();
    // With the exclusive lock held, no other restore is running: whatever staging data is
    // here was left by one that was killed.
    for path in leftovers(data_dir) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let ours = name.as_deref().is_some_and(|n| {
            n.starts_with(RESTORE_STAGING_PREFIX) || n.starts_with(OLD_RESTORE_PREFIX)
        });
        if !ours {
            continue;
        }
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            tracing::info!(path = %path.display(), "removed what an interrupted restore left");
            removed.push(path.display().to_string());
        }
    }
    let staging = data_dir.join(format!("{RESTORE_STAGING_PREFIX}{}", now_micros()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", staging.display())))?;
    }
    let bytes = match backup_into(&src, &db_path(&staging)) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    Ok(StagedRestore {
        lock,
        staging,
        report: RestoreReport {
            vault_id: vault_id.to_hex(),
            key_versions: key_rows.len(),
            tokens: tokens as u64,
            replaced_existing,
            bytes,
            removed,
            ..Default::default()
        },
    })
}

/// Second half of a restore, once the staged copy was verified and closed: makes it one
/// self-contained file, removes every `-wal`/`-shm` beside the target (a WAL the restore did
/// not write must never be replayed onto the restored database), and renames the copy into
/// place. The exclusive lock is released only after that.
pub fn restore_install(staged: StagedRestore, data_dir: &Path) -> Result<RestoreReport> {
    let StagedRestore {
        lock,
        staging,
        mut report,
    } = staged;
    let result = (|| -> Result<()> {
        let copy = db_path(&staging);
        {
            let conn = Connection::open_with_flags(
                &copy,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            // Checkpoints and removes the copy's own WAL: one file, nothing beside it.
            let _: String = conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            if staging.join(format!("{DB_FILE}{suffix}")).exists() {
                return Err(Error::Internal(format!(
                    "the restored copy still has a {suffix} file"
                )));
            }
        }
        fsync_file(&copy)?;
        for suffix in ["-wal", "-shm", "-journal"] {
            let p = data_dir.join(format!("{DB_FILE}{suffix}"));
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| {
                    Error::Unavailable(format!("cannot remove {}: {e}", p.display()))
                })?;
                report.removed.push(p.display().to_string());
            }
        }
        let target = db_path(data_dir);
        std::fs::rename(&copy, &target).map_err(|e| {
            Error::Unavailable(format!("cannot move the restored vault into place: {e}"))
        })?;
        fsync_dir(&target)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    drop(lock);
    result.map(|()| report)
}

// ---------------------------------------------------------------------------------------
// `keys rotate-master --rekey` (the design is in `crate::vault::rekey`)

fn meta_opt(tx: &Connection, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

fn meta_set(tx: &Connection, key: &str, value: &[u8]) -> Result<()> {
    tx.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(super) fn rekey_state(tx: &Connection) -> Result<Option<super::RekeyState>> {
    match meta_opt(tx, "rekey")? {
        None => Ok(None),
        Some(v) => super::RekeyState::decode(&v)
            .map(Some)
            .ok_or_else(|| Error::DataLoss("vault metadata `rekey` is malformed".into())),
    }
}

/// Why a rewrap is refused while a rekey runs (both stores): the rekey re-seals every row
/// itself, and a row a rewrap moved under the new key would keep its old fingerprint layer.
pub(crate) const REWRAP_DURING_REKEY: &str = "a rekey is in progress: it re-seals every row \
     itself; finish it with `keys rotate-master --rekey` and the same new master key first";

/// Why `rekey_finish` is refused by a process still holding the replaced keys (both stores).
pub(crate) const REKEY_NEW_KEYS: &str = "this process does not hold the rekey's new keys: \
     open the vault with the new master key";

/// Why a plain `rotate-master` is refused while a rekey runs (both stores).
pub(crate) const REKEY_IN_PROGRESS: &str = "a rekey is in progress: finish it with `keys \
     rotate-master --rekey` and the same new master key before a plain master rotation";

fn no_rekey() -> Error {
    Error::FailedPrecondition("no rekey is in progress".into())
}

pub(super) fn rekey_begin(
    store: &SqliteStore,
    new_kwk: KeyWrappingKey,
    new_check: Vec<u8>,
    caller: Caller,
) -> StoreFuture<super::RekeyState> {
    store.admin(move |tx, keyring, st| {
        if rekey_state(tx)?.is_some() {
            return Err(Error::FailedPrecondition(
                "a rekey is already in progress: run `keys rotate-master --rekey` again with \
                 the new master key to finish it"
                    .into(),
            ));
        }
        let meta = |key: &str| -> Result<Vec<u8>> {
            store_err(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)))
        };
        if crate::crypto::ct_eq(&meta("key_check")?, &new_check) {
            return Err(Error::InvalidArgument(
                "the new master key is the vault's current master key".into(),
            ));
        }
        let fingerprint = meta("wrapped_fingerprint_key")?;
        if !keyring.master_opens(&fingerprint)? {
            return Err(Error::FailedPrecondition(
                "the master key was rotated by another process meanwhile".into(),
            ));
        }
        // Every key the vault keeps, re-wrapped under the new master only.
        for row in load_key_rows(tx)? {
            if row.state == KeyState::Retired {
                continue;
            }
            let w = keyring.rewrap_under(&new_kwk, &row.wrapped, KeyPurpose::Data(row.version))?;
            tx.execute(
                "UPDATE data_keys SET wrapped = ?2 WHERE version = ?1",
                params![row.version, w],
            )?;
        }
        let signing: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT id, wrapped FROM audit_signing_keys WHERE wrapped IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, wrapped) in signing {
            let w =
                keyring.rewrap_under(&new_kwk, &wrapped, KeyPurpose::AuditSigning(id as u32))?;
            tx.execute(
                "UPDATE audit_signing_keys SET wrapped = ?2 WHERE id = ?1",
                params![id, w],
            )?;
        }
        let fingerprint = keyring.rewrap_under(&new_kwk, &fingerprint, KeyPurpose::Fingerprint)?;
        let mut layers =
            keyring.rewrap_layers(&new_kwk, &meta_opt(tx, "fingerprint_layers")?.unwrap_or_default())?;
        let layer = (layers.len() / crate::crypto::WRAPPED_KEY_LEN) as u32 + 1;
        layers.extend(crate::keyring::new_wrapped_key(
            &new_kwk,
            KeyPurpose::FingerprintLayer(layer),
        )?);
        // The new data key version, wrapped only under the new master.
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
            params![
                version,
                crate::keyring::new_wrapped_key(&new_kwk, KeyPurpose::Data(version))?,
                now
            ],
        )?;
        st.active_version = version;
        st.active_count = 0;
        st.active_created = now;
        // The audit key switch, recorded in the chain: this record is the last one MACed
        // under the old key; the next one is the first under the new key.
        st.audit.push(AuditEntry::new(
            &caller,
            "master_rekey",
            "master key",
            "OK",
            &format!(
                "new master key; data key v{version} and fingerprint layer {layer} created; \
                 records after this one are MACed under a new audit key"
            ),
        ));
        st.audit_key_switch = true;
        let new_from = st.audit_seq + st.audit.len() as u64 + 1;
        let old_from =
            super::sqlite::audit_key_from(meta_opt(tx, "audit_key_from")?)?;
        let mut retired = keyring.rewrap_retired_audit(
            &new_kwk,
            &meta_opt(tx, "retired_audit_keys")?.unwrap_or_default(),
        )?;
        retired.extend_from_slice(&old_from.to_be_bytes());
        retired.extend(keyring.rewrap_as(
            &new_kwk,
            &meta("wrapped_audit_key")?,
            KeyPurpose::Audit,
            KeyPurpose::RetiredAudit(old_from),
        )?);
        let audit = crate::keyring::new_wrapped_key(&new_kwk, KeyPurpose::Audit)?;
        let end_id: i64 =
            tx.query_row("SELECT COALESCE(MAX(id), 0) FROM tokens", [], |r| r.get(0))?;
        let state = super::RekeyState {
            version,
            end_id,
            cursor: 0,
        };
        for (k, v) in [
            ("key_check", &new_check),
            ("wrapped_fingerprint_key", &fingerprint),
            ("fingerprint_layers", &layers),
            ("wrapped_audit_key", &audit),
            ("retired_audit_keys", &retired),
            ("audit_key_from", &new_from.to_be_bytes().to_vec()),
            ("rekey", &state.encode()),
        ] {
            meta_set(tx, k, v)?;
        }
        mark_destroyed(tx)?;
        bump_generation(tx)?;
        Ok(state)
    })
}

pub(super) fn rekey_batch(
    store: &SqliteStore,
    limit: usize,
    caller: Caller,
) -> StoreFuture<super::RekeyOutcome> {
    store.admin(move |tx, keyring, st| {
        let started = std::time::Instant::now();
        let mut state = rekey_state(tx)?.ok_or_else(no_rekey)?;
        let fingerprints = keyring.fingerprints();
        if fingerprints.relayer(&[0; 32]).is_none()
            || keyring.snapshot().get(state.version).is_none()
        {
            return Err(Error::FailedPrecondition(REKEY_NEW_KEYS.into()));
        }
        let mut select = tx.prepare_cached(concat!(
            "SELECT ",
            sealed_cols!(),
            // Old versions only: ids are reused (no AUTOINCREMENT), so a row written after
            // the switch may sit at an id <= end_id; it already has the new keys and layer,
            // and layering its fingerprint again would make reuse miss it.
            ", fingerprint FROM tokens WHERE id > ?1 AND id <= ?2 AND ciphertext IS NOT NULL \
             AND key_version < ?4 ORDER BY id LIMIT ?3"
        ))?;
        let mut update = tx.prepare_cached(
            "UPDATE tokens SET key_version = ?2, nonce = ?3, ciphertext = ?4, row_format = ?5, \
             fingerprint = ?6 WHERE id = ?1",
        )?;
        let mut out = super::RekeyOutcome {
            more: true,
            ..Default::default()
        };
        let mut snapshot = keyring.snapshot();
        let mut seen = 0usize;
        while seen < limit && started.elapsed() < ADMIN_TX_BUDGET {
            let want = (limit - seen).min(ADMIN_CHUNK);
            let rows = select
                .query_map(
                    params![state.cursor, state.end_id, want as i64, state.version],
                    |r| Ok((sealed_row(r)?, r.get::<_, Option<Vec<u8>>>(13)?)),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            seen += rows.len();
            for (row, fp) in &rows {
                state.cursor = row.id;
                if keyring.needs_rotation(st.active_count, 1, st.active_created, now_micros()) {
                    rotate_in_tx(tx, keyring, st)?;
                    snapshot = keyring.snapshot();
                }
                let fp = match fp.as_deref().map(<[u8; 32]>::try_from) {
                    None => None,
                    Some(Ok(f)) => fingerprints.relayer(&f).map(|f| f.to_vec()),
                    Some(Err(_)) => {
                        return Err(Error::DataLoss(format!(
                            "token {} has a malformed fingerprint",
                            row.token
                        )))
                    }
                };
                let plain = snapshot.get(row.key_version).and_then(|old| {
                    old.open(
                        row.row_format,
                        &row.token,
                        &row.bound_meta,
                        &row.nonce,
                        &row.ciphertext,
                    )
                    .ok()
                });
                let Some(plain) = plain else {
                    // Left sealed as it was (the finish refuses while it is); its
                    // fingerprint still moves on, so reuse keeps finding it.
                    out.failed.push(row.token.clone());
                    tx.execute(
                        "UPDATE tokens SET fingerprint = ?2 WHERE id = ?1",
                        params![row.id, fp],
                    )?;
                    continue;
                };
                let sealed = snapshot.active.seal(&row.token, &row.bound_meta, &plain);
                let version = snapshot.active.version();
                update.execute(params![
                    row.id,
                    version,
                    &sealed.nonce[..],
                    sealed.ciphertext,
                    crate::crypto::ROW_FORMAT,
                    fp
                ])?;
                st.active_count += 1;
                *st.counts.entry(version).or_insert(0) += 1;
                out.resealed += 1;
            }
            if rows.len() < want {
                out.more = false;
                break;
            }
        }
        meta_set(tx, "rekey", &state.encode())?;
        if out.resealed > 0 {
            mark_destroyed(tx)?;
        }
        if out.resealed > 0 || !out.failed.is_empty() {
            st.audit.push(AuditEntry::new(
                &caller,
                "master_rekey_reseal",
                &format!("key v{}", st.active_version),
                if out.failed.is_empty() {
                    "OK"
                } else {
                    "DATA_LOSS"
                },
                &format!(
                    "{} rows re-sealed, {} failed",
                    out.resealed,
                    out.failed.len()
                ),
            ));
        }
        Ok(out)
    })
}

pub(super) fn rekey_finish(store: &SqliteStore, caller: Caller) -> StoreFuture<u32> {
    store.admin(move |tx, keyring, st| {
        let state = rekey_state(tx)?.ok_or_else(no_rekey)?;
        if keyring.snapshot().get(state.version).is_none() {
            return Err(Error::FailedPrecondition(REKEY_NEW_KEYS.into()));
        }
        let left: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tokens WHERE id > ?1 AND id <= ?2 AND ciphertext IS NOT NULL \
             AND key_version < ?3",
            params![state.cursor, state.end_id, state.version],
            |r| r.get(0),
        )?;
        if left > 0 {
            return Err(Error::FailedPrecondition(format!(
                "{left} rows are not re-sealed yet; run `keys rotate-master --rekey` again"
            )));
        }
        let old: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tokens WHERE key_version < ?1 AND ciphertext IS NOT NULL",
            [state.version],
            |r| r.get(0),
        )?;
        if old > 0 {
            return Err(Error::DataLoss(format!(
                "{old} tokens failed authentication and could not be re-sealed, so the old \
                 data keys stay usable for them; investigate with `tokenvault check --full`"
            )));
        }
        // Crypto-shred: the old data keys open no row any more.
        let retired = tx.execute(
            "UPDATE data_keys SET state = 'retired', wrapped = x'' \
             WHERE version < ?1 AND state != 'retired'",
            [state.version],
        )?;
        tx.execute("DELETE FROM meta WHERE key = 'rekey'", [])?;
        mark_destroyed(tx)?;
        bump_generation(tx)?;
        st.audit.push(AuditEntry::new(
            &caller,
            "master_rekey_done",
            "master key",
            "OK",
            &format!(
                "every row re-sealed under v{}; {retired} old data keys destroyed",
                state.version
            ),
        ));
        // The old master and an earlier backup still open the signing key: replace it, so
        // they cannot sign a checkpoint over the chain from here on.
        super::sqlite::rotate_signing_in_tx(tx, keyring, st, &caller)?;
        Ok(retired as u32)
    })
}
