//! Which store holds a vault: the embedded SQLite database in a data directory (the
//! default), or a shared PostgreSQL database named by a URL. The vault opens, creates and
//! reads the header of a vault only through here, and from then on talks to the
//! [`Storage`] trait alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{sqlite, ClientRow, OpenParams, Storage, VaultHeader};
use crate::error::Result;
use crate::keyring::{KeyRow, Keyring};
use crate::model::Micros;

#[derive(Clone, Debug)]
pub enum StoreLocation {
    /// `vault.db` in this data directory.
    Sqlite(PathBuf),
}

impl StoreLocation {
    /// SQLite in `data_dir`, unless `url` names a shared database.
    pub fn from_config(data_dir: &Path, url: Option<&str>) -> Result<StoreLocation> {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => Ok(StoreLocation::Sqlite(data_dir.to_path_buf())),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Err(crate::error::Error::FailedPrecondition(
                    "PostgreSQL stores are not supported by this build".into(),
                ))
            }
            Some(_) => Err(crate::error::Error::InvalidArgument(
                "the store URL must start with postgres:// or postgresql://".into(),
            )),
        }
    }

    pub fn sqlite(data_dir: impl Into<PathBuf>) -> StoreLocation {
        StoreLocation::Sqlite(data_dir.into())
    }

    /// The data directory of an embedded store; None for a shared database.
    pub fn data_dir(&self) -> Option<&Path> {
        match self {
            StoreLocation::Sqlite(dir) => Some(dir),
        }
    }

    /// True when a vault exists there (a database file; for PostgreSQL, the schema).
    pub fn exists(&self) -> bool {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::db_path(dir).exists(),
        }
    }

    /// The vault's identity, read before anything else to check the master key.
    pub fn read_header(&self) -> Result<VaultHeader> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::read_header(dir),
        }
    }

    /// Creates the schema and the vault's header and first data key; refuses an existing vault.
    pub fn create(&self, header: &VaultHeader, wrapped_data_key: &[u8], dev: bool) -> Result<()> {
        match self {
            StoreLocation::Sqlite(dir) => {
                sqlite::create_database(dir, header, wrapped_data_key, dev)
            }
        }
    }

    /// Key rows read once at open, before the store runs.
    pub fn initial_key_rows(&self) -> Result<Vec<KeyRow>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::initial_key_rows(dir),
        }
    }

    /// Opens the store (applying pending migrations).
    pub fn open(&self, keyring: Arc<Keyring>, params: &OpenParams) -> Result<Arc<dyn Storage>> {
        match self {
            StoreLocation::Sqlite(dir) => {
                Ok(Arc::new(sqlite::SqliteStore::open(dir, keyring, params)?))
            }
        }
    }

    /// Client rows read once after open.
    pub fn initial_clients(&self) -> Result<Vec<ClientRow>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::initial_clients(dir),
        }
    }

    /// The newest time the audit trail records, read at open.
    pub fn newest_recorded_time(&self) -> Result<Option<Micros>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::newest_recorded_time(dir),
        }
    }
}
