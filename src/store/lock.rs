//! The data directory's lock file, `vault.lock`: which processes may have the vault open.
//!
//! Every process that opens the vault (`serve`, every admin command, `backup` until its file is
//! renamed into place) holds an `flock` on it *shared* for as long as its vault is open.
//! `restore` holds it *exclusively* for its whole run, from before it looks at the target to
//! after the restored database is in place, so a server started meanwhile (systemd's
//! `Restart=on-failure`) refuses to start instead of acknowledging writes into files that are
//! about to be replaced. Neither side waits: a conflict is an immediate, clear error.
//!
//! `flock` locks belong to the open file description and vanish with the process, so a
//! killed holder never leaves the directory locked.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File name of the lock inside the data directory.
pub const LOCK_FILE: &str = "vault.lock";

/// A held lock on a data directory; released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
    exclusive: bool,
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        // A planted symlink must not make us create or lock a file elsewhere.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            Error::Unavailable(format!("cannot open the lock file {}: {e}", path.display()))
        })
}

/// Tries `flock(op | LOCK_NB)`; Ok(false) when another process holds a conflicting lock.
fn try_flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: the descriptor is open for the duration of the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

impl DirLock {
    /// What every process that opens the vault holds. Refused while a restore runs.
    pub fn shared(data_dir: &Path) -> Result<DirLock> {
        let path = data_dir.join(LOCK_FILE);
        let file = open_lock_file(&path)?;
        match try_flock(&file, libc::LOCK_SH) {
            Ok(true) => Ok(DirLock {
                _file: file,
                path,
                exclusive: false,
            }),
            Ok(false) => Err(Error::Unavailable(format!(
                "a restore is replacing the vault in {}; start again once it has finished",
                data_dir.display()
            ))),
            Err(e) => Err(Error::Unavailable(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// What `restore` holds: refused while anything else has the vault open.
    pub fn exclusive(data_dir: &Path) -> Result<DirLock> {
        let path = data_dir.join(LOCK_FILE);
        let file = open_lock_file(&path)?;
        match try_flock(&file, libc::LOCK_EX) {
            Ok(true) => Ok(DirLock {
                _file: file,
                path,
                exclusive: true,
            }),
            Ok(false) => Err(Error::Unavailable(format!(
                "the vault at {} is in use (stop the server and other tokenvault commands first)",
                data_dir.display()
            ))),
            Err(e) => Err(Error::Unavailable(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_coexist_and_exclude_the_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirLock::shared(dir.path()).unwrap();
        let b = DirLock::shared(dir.path()).unwrap();
        let err = DirLock::exclusive(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop((a, b));
        let x = DirLock::exclusive(dir.path()).unwrap();
        assert!(x.is_exclusive());
        let err = DirLock::shared(dir.path()).unwrap_err();
        assert!(err.to_string().contains("restore"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(x.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(x);
        DirLock::shared(dir.path()).unwrap();
    }
}
