//! The data directory of the embedded store: how it is checked and created (owner-only, never
//! an empty path, never writable by others).

use std::path::Path;

use crate::error::{Error, Result};

/// Refuses a data directory, or a database file in it, that group or others can write:
/// whoever can write there can swap the database or its WAL under the vault.
pub fn refuse_writable_by_others(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for path in [data_dir.to_path_buf(), super::sqlite::db_path(data_dir)] {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            let (what, fix) = if meta.is_dir() {
                ("data directory", "700")
            } else {
                ("vault database", "600")
            };
            return Err(Error::FailedPrecondition(format!(
                "{what} {} is writable by group or others (mode {mode:o}); refusing to use it. \
                 Run chmod {fix} {}",
                path.display(),
                path.display()
            )));
        }
    }
    Ok(())
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
