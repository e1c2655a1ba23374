//! What the commands share: the vault options (`--data-dir`, the master key), opening the
//! vault, the CLI error type with its exit codes, and small output helpers.
//!
//! The master key comes from `--master-key-file` / `TOKENVAULT_MASTER_KEY_FILE` or from the
//! `TOKENVAULT_MASTER_KEY` environment variable (base64). There is deliberately no flag that
//! carries the key itself: command lines are visible to every local user. The variable is
//! moved into a zeroizing buffer and scrubbed from the environment at start-up
//! ([`capture_master_key_env`]), and reading a key disables core dumps first.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::crypto::{KeyError, MasterKey};
use crate::error::Error;
use crate::vault::{Micros, Vault, VaultConfig};

/// Environment variable holding the base64 master key, as an alternative to a key file.
pub const MASTER_KEY_ENV: &str = "TOKENVAULT_MASTER_KEY";
pub const DEFAULT_DATA_DIR: &str = "./tokenvault-data";

/// Process exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything not covered below.
    pub const OTHER: u8 = 1;
    /// Bad command line or arguments (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// Master key missing, unreadable, malformed, or not the key of this vault.
    pub const MASTER_KEY: u8 = 3;
    /// No vault where expected, or storage unreadable, unwritable or damaged.
    pub const STORAGE: u8 = 4;
    /// A call to the server failed: cannot connect, or the server returned an error.
    pub const REMOTE: u8 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    MasterKey(String),
    #[error("{0}")]
    Storage(String),
    #[error("{0}")]
    Vault(#[from] Error),
    #[error("cannot reach the server at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("server answered {code}: {message}")]
    Rpc { code: &'static str, message: String },
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::MasterKey(_) => exit::MASTER_KEY,
            CliError::Storage(_) => exit::STORAGE,
            CliError::Vault(e) => match e {
                Error::WrongMasterKey => exit::MASTER_KEY,
                Error::Unavailable(_) | Error::DataLoss(_) => exit::STORAGE,
                _ => exit::OTHER,
            },
            CliError::Connect { .. } | CliError::Rpc { .. } => exit::REMOTE,
            CliError::Other(_) => exit::OTHER,
        }
    }
}

impl From<KeyError> for CliError {
    fn from(e: KeyError) -> Self {
        CliError::MasterKey(e.to_string())
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc {
            code: code_name(s.code()),
            message: s.message().to_owned(),
        }
    }
}

/// gRPC code names as the proto and the audit trail spell them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Where the vault lives and how to unlock it.
#[derive(Args, Clone, Debug)]
pub struct VaultArgs {
    /// Directory holding the vault database.
    #[arg(long, env = "TOKENVAULT_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// File holding the master key (base64 of 32 bytes, mode 0600). Alternatively put the
    /// base64 key itself in the TOKENVAULT_MASTER_KEY environment variable. A vault created
    /// by `serve --dev` uses its own generated key when neither is given.
    #[arg(long, env = "TOKENVAULT_MASTER_KEY_FILE", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// A shared PostgreSQL store, postgres://USER@HOST/DB?sslmode=verify-full&sslrootcert=CA
    /// (the password from PGPASSWORD or a password file, PGPASSFILE or ~/.pgpass; never on
    /// the command line); without it the vault is SQLite in --data-dir.
    #[arg(
        long,
        env = "TOKENVAULT_STORE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub store_url: Option<crate::config::StoreUrl>,
    /// The master key inside an HSM instead: an RFC 7512 PKCS#11 URI naming the module, the
    /// token, the key object and the PIN file, e.g.
    /// `pkcs11:token=tokenvault;object=master?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/tokenvault/pin`.
    #[arg(
        long,
        env = "TOKENVAULT_MASTER_KEY_PKCS11",
        value_name = "URI",
        conflicts_with = "master_key_file"
    )]
    pub master_key_pkcs11: Option<String>,
}

/// `TOKENVAULT_MASTER_KEY` as the process found it.
enum EnvKey {
    Absent,
    NotUnicode,
    Present(zeroize::Zeroizing<String>),
}

static ENV_KEY: std::sync::OnceLock<EnvKey> = std::sync::OnceLock::new();

/// Moves `TOKENVAULT_MASTER_KEY` out of the environment into a zeroizing buffer: its bytes
/// in the process's environment block (what `/proc/PID/environ` shows) are overwritten and
/// the variable removed, so neither that file, a child process nor a later `getenv` sees the
/// key. `cli::main` calls it first thing, while the process is still single-threaded.
pub fn capture_master_key_env() {
    env_master_key();
}

fn env_master_key() -> &'static EnvKey {
    ENV_KEY.get_or_init(|| {
        let Some(value) = std::env::var_os(MASTER_KEY_ENV) else {
            return EnvKey::Absent;
        };
        scrub_env_value(MASTER_KEY_ENV);
        std::env::remove_var(MASTER_KEY_ENV);
        match value.into_string() {
            Ok(text) => EnvKey::Present(zeroize::Zeroizing::new(text)),
            Err(raw) => {
                zeroize::Zeroize::zeroize(&mut raw.into_encoded_bytes());
                EnvKey::NotUnicode
            }
        }
    })
}

/// True when the process started with a non-empty `TOKENVAULT_MASTER_KEY` (captured and
/// removed from the environment at start-up, so `std::env` no longer shows it).
pub fn master_key_env_present() -> bool {
    matches!(env_master_key(), EnvKey::Present(t) if !t.is_empty())
        || matches!(env_master_key(), EnvKey::NotUnicode)
}

/// Overwrites the value of `name` in place in the environment block.
fn scrub_env_value(name: &str) {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: getenv returns null or a pointer to the NUL-terminated value inside the
    // environment block, which is writable process memory; strlen stays within it. Called
    // before other threads exist (see `capture_master_key_env`).
    unsafe {
        let value = libc::getenv(cname.as_ptr());
        if !value.is_null() {
            let len = libc::strlen(value);
            let bytes = std::slice::from_raw_parts_mut(value.cast::<u8>(), len);
            zeroize::Zeroize::zeroize(bytes);
        }
    }
}

/// A `--store-url` as given, for commands without [`VaultArgs`]: an empty one (an empty
/// `TOKENVAULT_STORE_URL`) means none, the vault in the data directory.
pub fn shared_store_url(url: Option<&crate::config::StoreUrl>) -> Option<&str> {
    url.map(|u| &**u).filter(|u| !u.trim().is_empty())
}

impl VaultArgs {
    /// True when a master key source was given (file option or environment).
    pub fn has_master_key_source(&self) -> bool {
        self.master_key_file.is_some()
            || self.master_key_pkcs11.is_some()
            || !matches!(env_master_key(), EnvKey::Absent)
    }

    /// Reads the master key. Disables core dumps first: every command that opens the vault
    /// comes through here before a key is in memory.
    pub fn master_key(&self) -> Result<MasterKey, CliError> {
        crate::hardening::harden_process();
        if let Some(uri) = &self.master_key_pkcs11 {
            if self.master_key_file.is_some() {
                return Err(CliError::Usage(
                    "give the master key once: --master-key-file or --master-key-pkcs11".into(),
                ));
            }
            return Ok(MasterKey::open_pkcs11(uri, false)?);
        }
        if let Some(path) = &self.master_key_file {
            if path.as_os_str().is_empty() {
                return Err(CliError::Usage(
                    "--master-key-file (TOKENVAULT_MASTER_KEY_FILE) is an empty path".into(),
                ));
            }
            return Ok(MasterKey::load_file(path)?);
        }
        match env_master_key() {
            EnvKey::Present(text) => Ok(MasterKey::from_base64(text)?),
            EnvKey::NotUnicode => Err(CliError::MasterKey(format!(
                "{MASTER_KEY_ENV} is not valid base64"
            ))),
            EnvKey::Absent => {
                if let Some(path) = super::dev::dev_master_key(&self.data_dir) {
                    // Only a vault made by `serve --dev` has this; production vaults never
                    // fall back to a key stored beside the data.
                    tracing::warn!(path = %path.display(), "using the development master key");
                    return Ok(MasterKey::load_file(&path)?);
                }
                Err(CliError::MasterKey(format!(
                "no master key: pass --master-key-file FILE, or set TOKENVAULT_MASTER_KEY_FILE \
                 or {MASTER_KEY_ENV}"
                )))
            }
        }
    }

    pub fn config(&self) -> VaultConfig {
        let mut cfg = VaultConfig::new(&self.data_dir);
        cfg.store_url = self.shared_store_url().map(Into::into);
        cfg
    }

    /// The PostgreSQL URL when one was given (an empty one means none).
    pub fn shared_store_url(&self) -> Option<&str> {
        shared_store_url(self.store_url.as_ref())
    }

    /// Opens the existing vault, with a clear message when there is none.
    pub fn open(&self) -> Result<Vault, CliError> {
        self.open_with(self.config())
    }

    /// [`Self::open`] with vault settings beyond the directory (key policy, storage limit);
    /// `config.data_dir` should be this `data_dir`.
    pub fn open_with(&self, config: VaultConfig) -> Result<Vault, CliError> {
        // A shared store says itself when it holds no vault (at the header read).
        if config.store_url.is_none() {
            require_vault(&self.data_dir)?;
        }
        let master = self.master_key()?;
        Ok(Vault::open(config, &master)?)
    }
}

pub fn require_vault(data_dir: &Path) -> Result<(), CliError> {
    check_data_dir(data_dir)?;
    if Vault::exists(data_dir) {
        Ok(())
    } else {
        Err(CliError::Storage(format!(
            "no vault in {}: run `tokenvault init` first (or pass --data-dir)",
            data_dir.display()
        )))
    }
}

/// `--data-dir ""` (or `TOKENVAULT_DATA_DIR=`) is a usage error, never "no vault in :".
pub fn check_data_dir(data_dir: &Path) -> Result<(), CliError> {
    crate::vault::check_data_dir(data_dir)
        .map_err(|_| CliError::Usage("--data-dir (TOKENVAULT_DATA_DIR) is an empty path".into()))
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> Result<(), CliError> {
    check_data_dir(dir)?;
    crate::vault::create_private_dir(dir).map_err(|e| CliError::Storage(e.to_string()))
}

/// RFC 3339 UTC, seconds precision.
pub fn format_time(micros: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| micros.to_string())
}

/// Prints rows as left-aligned columns under `header`.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    println!("{}", render_table(header, rows));
}

/// `header` and `rows` as plain, borderless columns (comfy-table): two spaces between
/// columns, no trailing spaces, no line-wrapping, so `awk`/`cut` keep working on it.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .remove_style(comfy_table::TableComponent::HeaderLines)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied())
        .add_rows(rows.iter().cloned());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
        column.set_cell_alignment(CellAlignment::Left);
    }
    table.trim_fmt()
}

/// A terminal progress bar on standard error: `what [=====>   ] done/total unit ...`.
pub fn progress_bar(what: &str, unit: &str) -> indicatif::ProgressBar {
    let template = format!(
        "{what} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}}/{{human_len}} {unit} ({{percent}}%), {{per_sec}}, ETA {{eta}}, {{msg}}"
    );
    let style = indicatif::ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr())
        .with_style(style)
}

/// Leaves a finished bar on screen and ends its line, so what follows starts on its own.
pub fn finish_bar(bar: &indicatif::ProgressBar) {
    bar.finish();
    eprintln!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_the_header() {
        let rows = vec![
            vec!["1".to_owned(), "active".to_owned(), "x".to_owned()],
            vec!["12".to_owned(), "decrypt-only".to_owned(), String::new()],
        ];
        let text = render_table(&["VERSION", "STATE", "NOTE"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "VERSION  STATE         NOTE", "{text}");
        assert_eq!(lines[1], "1        active        x", "{text}");
        assert_eq!(lines[2], "12       decrypt-only", "{text}");
    }

    #[test]
    fn exit_codes_are_distinct_by_kind() {
        assert_eq!(CliError::Usage(String::new()).exit_code(), exit::USAGE);
        assert_eq!(
            CliError::Vault(Error::WrongMasterKey).exit_code(),
            exit::MASTER_KEY
        );
        assert_eq!(
            CliError::Vault(Error::Unavailable("x".into())).exit_code(),
            exit::STORAGE
        );
        assert_eq!(
            CliError::from(tonic::Status::not_found("x")).exit_code(),
            exit::REMOTE
        );
        assert_eq!(CliError::Vault(Error::NotFound).exit_code(), exit::OTHER);
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
    }
}
