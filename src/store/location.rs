//! Which store holds a vault: the embedded SQLite database in a data directory (the
//! default), or a shared PostgreSQL database named by a URL. The vault opens, creates and
//! reads the header of a vault only through here, and from then on talks to the
//! [`Storage`] trait alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::postgres::{self, PgShared, PgUrl};
use super::{sqlite, AuditSigningKeyInfo, ClientRow, OpenParams, Storage, VaultHeader};
use crate::error::{Error, Result};
use crate::keyring::{KeyRow, Keyring};
use crate::model::Micros;

#[derive(Clone, Debug)]
pub enum StoreLocation {
    /// `vault.db` in this data directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database; the connection pool is made on first use and shared with the
    /// store opened from here.
    Postgres(Box<PgTarget>),
}

/// A PostgreSQL URL and, once used, its pool. `Debug` never shows the password.
#[derive(Clone)]
pub struct PgTarget {
    url: PgUrl,
    pool_size: usize,
    shared: Arc<std::sync::OnceLock<Arc<PgShared>>>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTarget({:?})", self.url)
    }
}

impl PgTarget {
    fn shared(&self) -> Result<Arc<PgShared>> {
        if let Some(s) = self.shared.get() {
            return Ok(s.clone());
        }
        let s = PgShared::new(&self.url, self.pool_size)?;
        Ok(self.shared.get_or_init(|| s).clone())
    }
}

impl StoreLocation {
    /// SQLite in `data_dir`, unless `url` names a shared database.
    pub fn from_config(
        data_dir: &Path,
        url: Option<&str>,
        pool_size: usize,
    ) -> Result<StoreLocation> {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => Ok(StoreLocation::Sqlite(data_dir.to_path_buf())),
            Some(u) if PgUrl::is_postgres(u) => Ok(StoreLocation::Postgres(Box::new(PgTarget {
                url: PgUrl::parse(u)?,
                pool_size,
                shared: Arc::default(),
            }))),
            Some(_) => Err(Error::InvalidArgument(
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
            StoreLocation::Postgres(_) => None,
        }
    }

    /// True when a vault exists there (a database file; for PostgreSQL, the schema).
    pub fn exists(&self) -> bool {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::db_path(dir).exists(),
            StoreLocation::Postgres(t) => t.shared().map(|s| postgres::exists(&s)).unwrap_or(false),
        }
    }

    /// The vault's identity, read before anything else to check the master key.
    pub fn read_header(&self) -> Result<VaultHeader> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::read_header(dir),
            StoreLocation::Postgres(t) => postgres::read_header(&t.shared()?),
        }
    }

    /// Creates the schema and the vault's header and first data key; refuses an existing vault.
    pub fn create(&self, header: &VaultHeader, wrapped_data_key: &[u8], dev: bool) -> Result<()> {
        match self {
            StoreLocation::Sqlite(dir) => {
                sqlite::create_database(dir, header, wrapped_data_key, dev)
            }
            StoreLocation::Postgres(t) => {
                postgres::create(&t.shared()?, header, wrapped_data_key, dev)
            }
        }
    }

    /// Key rows read once at open, before the store runs.
    pub fn initial_key_rows(&self) -> Result<Vec<KeyRow>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::initial_key_rows(dir),
            StoreLocation::Postgres(t) => postgres::initial_key_rows(&t.shared()?),
        }
    }

    /// Opens the store (applying pending migrations).
    pub fn open(&self, keyring: Arc<Keyring>, params: &OpenParams) -> Result<Arc<dyn Storage>> {
        match self {
            StoreLocation::Sqlite(dir) => {
                Ok(Arc::new(sqlite::SqliteStore::open(dir, keyring, params)?))
            }
            StoreLocation::Postgres(t) => Ok(Arc::new(postgres::PgStore::open(
                t.shared()?,
                keyring,
                params,
            )?)),
        }
    }

    /// Client rows read once after open.
    pub fn initial_clients(&self) -> Result<Vec<ClientRow>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::initial_clients(dir),
            StoreLocation::Postgres(t) => postgres::initial_clients(&t.shared()?),
        }
    }

    /// The newest time the audit trail records, read at open.
    pub fn newest_recorded_time(&self) -> Result<Option<Micros>> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::newest_recorded_time(dir),
            StoreLocation::Postgres(t) => postgres::newest_recorded_time(&t.shared()?),
        }
    }

    /// The vault id (hex) and audit signing keys, read without the master key.
    pub fn read_audit_public_keys(&self) -> Result<(String, Vec<AuditSigningKeyInfo>)> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::read_audit_public_keys(dir),
            StoreLocation::Postgres(t) => postgres::read_audit_public_keys(&t.shared()?),
        }
    }

    /// True when `serve --dev` created the vault.
    pub fn is_dev_vault(&self) -> Result<bool> {
        match self {
            StoreLocation::Sqlite(dir) => sqlite::is_dev_vault(dir),
            StoreLocation::Postgres(t) => postgres::is_dev_vault(&t.shared()?),
        }
    }

    /// This store as one end of a whole-vault copy ([`super::copy`]).
    pub fn copy_endpoint(&self) -> Result<super::copy::Endpoint> {
        match self {
            StoreLocation::Sqlite(dir) => Ok(super::copy::Endpoint::Sqlite(sqlite::db_path(dir))),
            StoreLocation::Postgres(t) => Ok(super::copy::Endpoint::Postgres(t.shared()?)),
        }
    }

    /// The URL of a shared store (password hidden) or the data directory, for messages.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite(dir) => dir.display().to_string(),
            StoreLocation::Postgres(t) => t.url.to_string(),
        }
    }
}
