//! Disk space: what the vault counts against its storage limit, the free-space floor below
//! which tokenize is refused, and the reserve file that lets a vault closed on a full disk open
//! again.
//!
//! - **Counted:** the database's pages in use, plus every other file in the data directory
//!   (the WAL, its index, what interrupted restores left), by allocated size. The reserve file
//!   is not counted: it is there to be given back.
//! - **Free-space floor:** whatever the limit, tokenize is refused while the filesystem has
//!   less than [`LOW_SPACE_BYTES`] available, so reveals (whose audit records must commit)
//!   keep working when something else fills the disk.
//! - **Reserve:** `vault.reserve` ([`RESERVE_BYTES`] of real blocks) is created when there is
//!   room. Opening the vault with less than [`RESERVE_BYTES`] free, or a write failing for lack
//!   of space, deletes it, so SQLite can map its index and write the WAL: the vault opens, and
//!   `purge` can free space. It comes back once there is room again.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::lock::LOCK_FILE;
use super::sqlite::DB_FILE;

/// File name of the reserve inside the data directory.
pub const RESERVE_FILE: &str = "vault.reserve";
/// Size of the reserve file.
pub const RESERVE_BYTES: u64 = 4 << 20;
/// Tokenize is refused while the filesystem has less than this available.
pub const LOW_SPACE_BYTES: u64 = 8 << 20;

/// Bytes available to this process on the filesystem holding `dir`; None if unknown.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn allocated(meta: &std::fs::Metadata) -> u64 {
    // Blocks actually allocated (a sparse file costs what it holds), at least its length
    // for filesystems that report no blocks.
    (meta.blocks().saturating_mul(512)).max(if meta.blocks() == 0 { meta.len() } else { 0 })
}

/// Allocated bytes of everything in `data_dir` except the database file itself (counted by
/// pages in use), the reserve and the lock file; one level of subdirectories included.
pub fn other_bytes(data_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return 0;
    };
    let mut total = 0u64;
    for e in entries.flatten() {
        let name = e.file_name();
        if name == DB_FILE || name == RESERVE_FILE || name == LOCK_FILE {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if let Ok(inner) = std::fs::read_dir(e.path()) {
                for f in inner.flatten() {
                    if let Ok(m) = f.metadata() {
                        total = total.saturating_add(allocated(&m));
                    }
                }
            }
        } else {
            total = total.saturating_add(allocated(&meta));
        }
    }
    total
}

/// Deletes the reserve; true when there was one.
pub fn release_reserve(data_dir: &Path) -> bool {
    let released = std::fs::remove_file(data_dir.join(RESERVE_FILE)).is_ok();
    if released {
        tracing::warn!(
            dir = %data_dir.display(),
            "storage is (nearly) full: released the vault's {} MiB reserve so it keeps working; \
             free space (tokenvault purge, or elsewhere on the disk)",
            RESERVE_BYTES >> 20
        );
    }
    released
}

/// Before opening: with less than the reserve's size available, give the reserve back so
/// SQLite can create its index and write the WAL.
pub fn release_reserve_if_low(data_dir: &Path) {
    if free_bytes(data_dir).is_some_and(|f| f < RESERVE_BYTES) {
        release_reserve(data_dir);
    }
}

/// (Re)creates the reserve when it is missing and the disk has room for it and the floor.
pub fn ensure_reserve(data_dir: &Path) {
    let path = data_dir.join(RESERVE_FILE);
    if path.exists() || !data_dir.join(DB_FILE).exists() {
        return;
    }
    if !free_bytes(data_dir).is_some_and(|f| f >= RESERVE_BYTES + LOW_SPACE_BYTES) {
        return;
    }
    let tmp = data_dir.join(format!(".{RESERVE_FILE}.new"));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // Real blocks (not a sparse file): the point is that they can be given back.
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..(RESERVE_BYTES >> 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}
