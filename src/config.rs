//! The server's configuration: one TOML file, environment variables and flags.
//!
//! Precedence, highest first: **flag > environment variable > file > built-in default**.
//! Clap already merges a flag with its environment variable into one `Option` (a flag wins
//! over its variable), so the whole rule is two steps:
//!
//! ```text
//! let cfg = Config::load(file)?            // defaults, then the file (unknown keys are errors)
//!     .overlay(&overrides);                // then whatever flags/env gave (Some wins)
//! cfg.validate()?;
//! ```
//!
//! [`ConfigArgs`] is a ready-made set of clap options (each with its `TOKENVAULT_…`
//! variable) that produces the [`Overrides`]; `tokenvault config check` uses it.
//!
//! The file never holds a secret. The master key comes from `storage.master_key_file` (or the
//! `TOKENVAULT_MASTER_KEY` environment variable, which is never printed), and API keys belong
//! to clients, not to the server.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Environment variable naming the configuration file (same as `--config`).
pub const CONFIG_ENV: &str = "TOKENVAULT_CONFIG";
/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory (as the CLI's `--data-dir`).
pub const DEFAULT_DATA_DIR: &str = "./tokenvault-data";
/// Default and largest batch sizes (as `serve --max-batch-items`).
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 10_000;
pub const MAX_BATCH_ITEMS_LIMIT: usize = 1_000_000;
/// Default encryptions per data-key version (2^30) and the hard ceiling (2^32, NIST SP
/// 800-38D for random 96-bit nonces).
pub const DEFAULT_KEY_MAX_ENCRYPTIONS: u64 = 1 << 30;
pub const KEY_MAX_ENCRYPTIONS_LIMIT: u64 = 1 << 32;
/// Default maximum age of the active data key.
pub const DEFAULT_KEY_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);
/// Default server-side deadline of one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `serve --max-concurrent-per-connection`.
pub const DEFAULT_CONCURRENCY_PER_CONNECTION: usize = 64;
/// Smallest storage limit that makes sense (SQLite needs a few pages for its schema).
pub const MIN_STORAGE_BYTES: u64 = 1 << 20;

/// Shown instead of a secret value.
pub const REDACTED: &str = "<redacted>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {detail}")]
    Read { path: String, detail: String },
    /// A syntax error, a wrong type or an unknown key; the message names the key and line.
    #[error("configuration file {path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration. Every section and key is optional in the file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub storage: StorageSection,
    pub store: StoreSection,
    pub tls: TlsSection,
    pub limits: LimitsSection,
    pub key_rotation: KeyRotationSection,
    pub logging: LoggingSection,
    pub metrics: MetricsSection,
    pub audit: AuditSection,
    /// The detokenizing forward proxy (see [`crate::proxy`]).
    pub proxy: crate::proxy::config::ProxySection,
    pub admin: AdminSection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// gRPC listen address, HOST:PORT. A non-loopback address requires TLS.
    pub listen: String,
    /// Lock the process memory (`serve --mlock`).
    pub mlock: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: DEFAULT_LISTEN.into(),
            mlock: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub data_dir: PathBuf,
    /// File holding the base64 master key (mode 0600). Alternatively the key itself in the
    /// `TOKENVAULT_MASTER_KEY` environment variable; never in this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
    /// RFC 7512 URI of a master key inside a PKCS#11 token (an HSM), instead of a file:
    /// `pkcs11:token=…;object=…?module-path=…&pin-source=file:…` (the PIN stays in its file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_pkcs11: Option<String>,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            data_dir: DEFAULT_DATA_DIR.into(),
            master_key_file: None,
            master_key_pkcs11: None,
        }
    }
}

/// A store URL as given (flag, environment variable, file, `store migrate --to`). It may
/// carry a password (`user:secret@`, `?password=`), so its `Debug` shows it redacted: a
/// configuration or argument struct printed with `{:?}` (a log line, a panic, an error) never
/// shows the password. The text itself goes only to the connection.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(String);

impl StoreUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL for messages: a PostgreSQL URL without its password; anything else (a
    /// directory) as is.
    pub fn redacted(&self) -> String {
        if crate::store::postgres::PgUrl::is_postgres(&self.0) {
            crate::store::postgres::connect::redact(&self.0)
        } else {
            self.0.clone()
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl std::ops::Deref for StoreUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for StoreUrl {
    fn from(s: String) -> Self {
        StoreUrl(s)
    }
}

impl From<&str> for StoreUrl {
    fn from(s: &str) -> Self {
        StoreUrl(s.to_owned())
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(StoreUrl(s.to_owned()))
    }
}

/// `[store]`: a shared PostgreSQL store instead of SQLite in `storage.data_dir`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `postgres://USER@HOST/DB?sslmode=verify-full&sslrootcert=CA`; the password comes
    /// from `PGPASSWORD` or a password file, `PGPASSFILE`/`~/.pgpass` (keep it out of this file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<StoreUrl>,
}

/// TLS server certificate and key (PEM), and for mutual TLS the CA that signs client
/// certificates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With mutual TLS, require both a bound client certificate and the client's API key.
    pub require_cert_and_key: bool,
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest number of items in one batch request.
    pub max_batch_items: usize,
    /// Server-wide default detokenize rate per principal, e.g. `100/s`, `6000/m`; unset means
    /// unlimited unless the principal has its own rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detokenize_rate: Option<String>,
    /// Server-wide default budget of `reuse_existing` lookups per principal, e.g. `100/s`;
    /// unset means 100/s. Every item counts, hits and misses alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_rate: Option<String>,
    /// Server-side deadline of one request, e.g. `30s`; `0s` means no limit.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Requests in flight on one connection; 0 means no limit.
    pub max_concurrent_per_connection: usize,
    /// Largest size of the vault database in bytes (SQLite `max_page_count`); unset means
    /// unlimited. Beyond it tokenize answers RESOURCE_EXHAUSTED. An integer or e.g. `"10GiB"`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_byte_size"
    )]
    pub max_storage_bytes: Option<u64>,
    /// WAL size past which the writer resets it, so the WAL stays bounded under any load;
    /// unset: 64 MiB (or 1/16 of `max_storage_bytes`). An integer or e.g. `"256MiB"`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_byte_size"
    )]
    pub max_wal_bytes: Option<u64>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_batch_items: DEFAULT_MAX_BATCH_ITEMS,
            detokenize_rate: None,
            reuse_rate: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_concurrent_per_connection: DEFAULT_CONCURRENCY_PER_CONNECTION,
            max_storage_bytes: None,
            max_wal_bytes: None,
        }
    }
}

/// When the writer rotates to a new data key on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyRotationSection {
    /// Encryptions per data-key version before rotation (at most 2^32).
    pub max_encryptions: u64,
    /// Age of the active version before rotation, e.g. `90d`; `never` turns it off.
    #[serde(with = "optional_duration_text")]
    pub max_age: Option<Duration>,
}

impl Default for KeyRotationSection {
    fn default() -> Self {
        KeyRotationSection {
            max_encryptions: DEFAULT_KEY_MAX_ENCRYPTIONS,
            max_age: Some(DEFAULT_KEY_MAX_AGE),
        }
    }
}

impl KeyRotationSection {
    /// The vault's key policy.
    pub fn key_policy(&self) -> crate::vault::KeyPolicy {
        crate::vault::KeyPolicy {
            max_encryptions: self.max_encryptions,
            max_age: self.max_age,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Log filter such as `info` or `tokenvault=debug`. `--log-level` (env
    /// `TOKENVAULT_LOG_LEVEL`) and then `RUST_LOG` take precedence; unset means `info`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    pub format: LogFormat,
    /// One INFO line per answered request ("rpc finished"). Off by default: the audit trail
    /// and the metrics record every request, and a line per request cost 11% of throughput;
    /// the lines are then at DEBUG. Failed and refused requests are logged at INFO either way.
    pub access: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Prometheus listen address (HTTP, `/metrics`); unset means no metrics listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// File the server appends signed audit checkpoints to (one JSON line each, at least
    /// once a second while records are written, and at shutdown); unset means none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_file: Option<PathBuf>,
}

/// `[admin]`: the remote admin service (issue 16).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `keys revoke` and `clients add` of a client with `detokenize` need a second admin's
    /// approval (`tokenvault admin approve ID`).
    pub dual_control: bool,
    /// How long a request may wait for its approval.
    #[serde(with = "duration_text")]
    pub approval_window: Duration,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            dual_control: false,
            approval_window: Duration::from_secs(3600),
        }
    }
}

/// Values from flags and environment variables (already merged by clap, flag first).
/// `None` leaves the file's (or the default) value in place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<String>,
    pub mlock: Option<bool>,
    pub access_log: Option<bool>,
    pub data_dir: Option<PathBuf>,
    pub store_url: Option<StoreUrl>,
    pub master_key_file: Option<PathBuf>,
    pub master_key_pkcs11: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub require_cert_and_key: Option<bool>,
    pub max_batch_items: Option<usize>,
    pub max_concurrent_per_connection: Option<usize>,
    pub detokenize_rate: Option<String>,
    pub reuse_rate: Option<String>,
    pub request_timeout: Option<Duration>,
    pub max_storage_bytes: Option<u64>,
    pub max_wal_bytes: Option<u64>,
    pub key_max_encryptions: Option<u64>,
    /// `Some(None)` turns age-based rotation off (`never`).
    pub key_max_age: Option<Option<Duration>>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub metrics_listen: Option<SocketAddr>,
    pub audit_checkpoint_file: Option<PathBuf>,
    pub proxy_listen: Option<String>,
}

impl Config {
    /// Defaults, then the file when one is given. Unknown keys, wrong types and bad
    /// durations are errors naming the key (and line).
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        match file {
            None => Ok(Config::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                Config::from_toml(&text).map_err(|detail| ConfigError::Parse {
                    path: path.display().to_string(),
                    detail,
                })
            }
        }
    }

    /// Parses TOML text; the error is the parser's message (naming the key and line).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies flags and environment variables over the file and defaults.
    pub fn overlay(mut self, o: &Overrides) -> Config {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        fn set_some<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                slot.clone_from(value);
            }
        }
        set(&mut self.server.listen, &o.listen);
        set(&mut self.server.mlock, &o.mlock);
        set(&mut self.logging.access, &o.access_log);
        set(&mut self.tls.require_cert_and_key, &o.require_cert_and_key);
        set(
            &mut self.limits.max_concurrent_per_connection,
            &o.max_concurrent_per_connection,
        );
        set(&mut self.storage.data_dir, &o.data_dir);
        if let Some(url) = &o.store_url {
            // An empty value (TOKENVAULT_STORE_URL=) means SQLite.
            self.store.url = (!url.trim().is_empty()).then(|| url.clone());
        }
        set_some(&mut self.storage.master_key_file, &o.master_key_file);
        set_some(&mut self.storage.master_key_pkcs11, &o.master_key_pkcs11);
        set_some(&mut self.tls.cert, &o.tls_cert);
        set_some(&mut self.tls.key, &o.tls_key);
        set_some(&mut self.tls.client_ca, &o.client_ca);
        set(&mut self.limits.max_batch_items, &o.max_batch_items);
        set_some(&mut self.limits.detokenize_rate, &o.detokenize_rate);
        set_some(&mut self.limits.reuse_rate, &o.reuse_rate);
        set(&mut self.limits.request_timeout, &o.request_timeout);
        set_some(&mut self.limits.max_storage_bytes, &o.max_storage_bytes);
        set_some(&mut self.limits.max_wal_bytes, &o.max_wal_bytes);
        set(
            &mut self.key_rotation.max_encryptions,
            &o.key_max_encryptions,
        );
        set(&mut self.key_rotation.max_age, &o.key_max_age);
        set_some(&mut self.logging.level, &o.log_level);
        set(&mut self.logging.format, &o.log_format);
        set_some(&mut self.metrics.listen, &o.metrics_listen);
        set_some(&mut self.audit.checkpoint_file, &o.audit_checkpoint_file);
        set_some(&mut self.proxy.listen, &o.proxy_listen);
        self
    }

    /// Checks the values against each other, without touching the filesystem. Returns
    /// warnings (things that work but deserve a look); errors are [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        self.check(true)
    }

    /// [`Config::validate`] without the rule that a non-loopback `server.listen` needs TLS:
    /// for `serve`, which applies it to the resolved address itself (and lets `--dev` listen
    /// in plaintext anywhere, with a warning); see `cli::serve::check_transport`.
    pub fn validate_except_transport(&self) -> Result<Vec<String>, ConfigError> {
        self.check(false)
    }

    fn check(&self, transport: bool) -> Result<Vec<String>, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut warnings = Vec::new();

        // An empty path would silently mean "the current directory" (or nothing at all).
        if self.storage.data_dir.as_os_str().is_empty() {
            return bad(
                "storage.data_dir is empty: give a directory such as /var/lib/tokenvault".into(),
            );
        }
        for (name, path) in [
            ("storage.master_key_file", &self.storage.master_key_file),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(format!("{name} is an empty path"));
            }
        }
        let listen_ip = match listen_host_port(&self.server.listen) {
            Some((host, _)) => host.parse::<IpAddr>().ok(),
            None => {
                return bad(format!(
                    "server.listen = {:?}: expected HOST:PORT",
                    self.server.listen
                ))
            }
        };
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return bad("tls.cert is set but tls.key is not".into()),
            (None, Some(_)) => return bad("tls.key is set but tls.cert is not".into()),
            _ => {}
        }
        if self.tls.client_ca.is_some() && !self.tls.enabled() {
            return bad("tls.client_ca (mutual TLS) needs tls.cert and tls.key".into());
        }
        if transport && !self.tls.enabled() {
            match listen_ip {
                Some(ip) if !ip.is_loopback() => {
                    return bad(format!(
                        "server.listen = {}: a non-loopback address requires TLS (tls.cert and \
                         tls.key); card data never crosses a network in clear",
                        self.server.listen
                    ))
                }
                None => warnings.push(format!(
                    "server.listen = {}: a host name; `serve` refuses it without TLS unless it \
                     resolves to loopback only",
                    self.server.listen
                )),
                _ => {}
            }
        }
        if !(1..=MAX_BATCH_ITEMS_LIMIT).contains(&self.limits.max_batch_items) {
            return bad(format!(
                "limits.max_batch_items = {}: expected 1 to {MAX_BATCH_ITEMS_LIMIT}",
                self.limits.max_batch_items
            ));
        }
        if let Some(rate) = &self.limits.detokenize_rate {
            if let Err(e) = crate::ratelimit::Rate::parse(rate) {
                return bad(format!("limits.detokenize_rate = {rate:?}: {e}"));
            }
        }
        if let Some(rate) = &self.limits.reuse_rate {
            if let Err(e) = crate::ratelimit::Rate::parse(rate) {
                return bad(format!("limits.reuse_rate = {rate:?}: {e}"));
            }
        }
        if self.tls.require_cert_and_key && self.tls.client_ca.is_none() {
            return bad("tls.require_cert_and_key needs tls.client_ca (mutual TLS)".into());
        }
        if self.limits.request_timeout.is_zero() {
            warnings
                .push("limits.request_timeout = 0s: requests have no server-side deadline".into());
        }
        if let Some(bytes) = self.limits.max_storage_bytes {
            if bytes < MIN_STORAGE_BYTES {
                return bad(format!(
                    "limits.max_storage_bytes = {bytes}: at least {MIN_STORAGE_BYTES} (1 MiB)"
                ));
            }
        }
        if let Some(bytes) = self.limits.max_wal_bytes {
            if bytes < MIN_STORAGE_BYTES {
                return bad(format!(
                    "limits.max_wal_bytes = {bytes}: at least {MIN_STORAGE_BYTES} (1 MiB)"
                ));
            }
        }
        let enc = self.key_rotation.max_encryptions;
        if enc == 0 || enc > KEY_MAX_ENCRYPTIONS_LIMIT {
            return bad(format!(
                "key_rotation.max_encryptions = {enc}: expected 1 to 2^32 ({KEY_MAX_ENCRYPTIONS_LIMIT}), \
                 the NIST SP 800-38D bound for random GCM nonces"
            ));
        }
        match self.key_rotation.max_age {
            Some(d) if d.is_zero() => {
                return bad("key_rotation.max_age must be more than 0 (or \"never\")".into())
            }
            None => warnings.push(
                "key_rotation.max_age = never: data keys rotate only by encryption count or by \
                 hand (PCI DSS 3.6.4 expects a defined cryptoperiod)"
                    .into(),
            ),
            _ => {}
        }
        if let Some(level) = &self.logging.level {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
                return bad(format!("logging.level = {level:?}: {e}"));
            }
        }
        if let Some(metrics) = self.metrics.listen {
            if listen_host_port(&self.server.listen)
                .and_then(|(h, p)| Some((h.parse::<IpAddr>().ok()?, p)))
                .is_some_and(|(ip, port)| {
                    port == metrics.port()
                        && (ip == metrics.ip()
                            || ip.is_unspecified()
                            || metrics.ip().is_unspecified())
                })
            {
                return bad(format!(
                    "metrics.listen = {metrics} collides with server.listen = {}",
                    self.server.listen
                ));
            }
        }
        warnings.extend(
            self.proxy
                .check(self.tls.enabled(), transport)
                .map_err(ConfigError::Invalid)?,
        );
        Ok(warnings)
    }

    /// The vault settings this configuration describes.
    pub fn vault_config(&self) -> crate::vault::VaultConfig {
        let mut v = crate::vault::VaultConfig::new(&self.storage.data_dir);
        v.store_url = self.store.url.clone();
        v.key_policy = self.key_rotation.key_policy();
        v.max_storage_bytes = self.limits.max_storage_bytes;
        v.max_wal_bytes = self.limits.max_wal_bytes;
        v
    }

    /// The effective configuration as TOML, followed by a `[secrets]` table that says which
    /// secret sources are set without showing them.
    pub fn render(&self, secrets: &Secrets) -> String {
        // Never show a password that was put in the store URL.
        let mut shown = self.clone();
        shown.store.url = shown
            .store
            .url
            .as_deref()
            .map(|u| crate::store::postgres::connect::redact(u).into());
        let mut text =
            toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("\n{secrets}"));
        text
    }
}

/// Which secrets the environment provides. Holds only whether each is set, never a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    /// `TOKENVAULT_MASTER_KEY` is set.
    pub master_key_env: bool,
    /// `TOKENVAULT_API_KEY` is set (a client setting; a server does not need it).
    pub api_key_env: bool,
}

impl Secrets {
    pub fn from_env() -> Secrets {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        Secrets {
            // Read from where start-up moved it (it is no longer in the environment).
            master_key_env: crate::cli::common::master_key_env_present(),
            api_key_env: set("TOKENVAULT_API_KEY"),
        }
    }
}

impl fmt::Display for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |set: bool| if set { REDACTED } else { "unset" };
        writeln!(f, "[secrets]")?;
        writeln!(
            f,
            "master_key = {:?}  # TOKENVAULT_MASTER_KEY",
            show(self.master_key_env)
        )?;
        writeln!(
            f,
            "api_key = {:?}  # TOKENVAULT_API_KEY",
            show(self.api_key_env)
        )
    }
}

/// `HOST:PORT` or `[V6]:PORT` split into host and port.
fn listen_host_port(listen: &str) -> Option<(String, u16)> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = listen.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && !host.contains(char::is_whitespace)).then(|| (host.to_owned(), port))
}

/// The one duration grammar of every flag and configuration key: humantime's, e.g. `90d`,
/// `12h`, `30m`, `45s`, `500ms`, `2w`, `1.5s`, `1h 30m`. A unit is required, so a bare `90`
/// in a file is never silently read as seconds when days were meant.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    humantime::parse_duration(t).map_err(|e| {
        format!("{t:?}: {e}; expected a duration such as 90d, 12h, 30m, 1.5s or 500ms")
    })
}

/// A bare number of seconds (`30`, `1.5`, as the flags have always taken) or a duration
/// with a unit ([`parse_duration`]).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bare = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    if bare {
        // Still humantime's grammar (and range checks), just with the unit spelled out.
        return parse_duration(&format!("{t}s"));
    }
    parse_duration(t)
}

/// A byte size: a raw integer (`10737418240`) or a number with a unit (`10GiB`, `512 MiB`,
/// `1.5GB`; binary units are powers of 1024, decimal ones of 1000), parsed by bytesize.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{t:?}: {e}; expected bytes such as 10737418240, 10GiB or 512MiB"))
}

/// `never` (or `off`) or a duration.
pub fn parse_optional_duration(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "never" | "off" | "none" => Ok(None),
        t => parse_duration(t).map(Some),
    }
}

/// The shortest exact text for a duration: `90d`, `36h`, `1500ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    for (unit, len) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s % len == 0 {
            return format!("{}{unit}", s / len);
        }
    }
    format!("{s}s")
}

mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// `max_storage_bytes` and friends: an integer or a string with a unit in the file; written
/// back as the integer so `config check` output stays a valid file for older builds.
mod optional_byte_size {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(b: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_u64(*b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Some(n)),
            Raw::Text(t) => parse_byte_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

mod optional_duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("never"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        parse_optional_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A key age limit given on the command line: a duration or `never` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxAge(pub Option<Duration>);

impl MaxAge {
    pub fn parse(text: &str) -> Result<MaxAge, String> {
        parse_optional_duration(text).map(MaxAge)
    }
}

/// The configuration options as flags, each with its environment variable. Everything is
/// optional: what is not given falls through to the file and then the defaults.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long = "config", env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT [file: server.listen].
    #[arg(long, env = "TOKENVAULT_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Directory holding the vault database [file: storage.data_dir].
    #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A shared PostgreSQL store instead of SQLite in the data directory; the password from
    /// PGPASSWORD or PGPASSFILE/~/.pgpass [file: store.url].
    #[arg(
        long,
        env = "TOKENVAULT_STORE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub store_url: Option<StoreUrl>,
    /// File holding the master key [file: storage.master_key_file].
    #[arg(long, env = "TOKENVAULT_MASTER_KEY_FILE", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// PKCS#11 URI of the master key in an HSM [file: storage.master_key_pkcs11].
    #[arg(
        long,
        env = "TOKENVAULT_MASTER_KEY_PKCS11",
        value_name = "URI",
        conflicts_with = "master_key_file"
    )]
    pub master_key_pkcs11: Option<String>,
    /// TLS certificate chain, PEM [file: tls.cert].
    #[arg(long, env = "TOKENVAULT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM [file: tls.key].
    #[arg(long, env = "TOKENVAULT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates for client certificates (mutual TLS), PEM [file: tls.client_ca].
    #[arg(long, env = "TOKENVAULT_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Require both a client certificate bound to a client and that client's API key
    /// (`--require-cert-and-key` or `=false`) [file: tls.require_cert_and_key].
    #[arg(
        long,
        env = "TOKENVAULT_REQUIRE_CERT_AND_KEY",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_cert_and_key: Option<bool>,
    /// Largest number of items in one batch request, 1 to 1000000
    /// [file: limits.max_batch_items].
    #[arg(long, env = "TOKENVAULT_MAX_BATCH_ITEMS", value_name = "N", value_parser = parse_batch_items)]
    pub max_batch_items: Option<usize>,
    /// Requests in flight on one connection; 0 = no limit
    /// [file: limits.max_concurrent_per_connection].
    #[arg(
        long,
        env = "TOKENVAULT_MAX_CONCURRENT_PER_CONNECTION",
        value_name = "N"
    )]
    pub max_concurrent_per_connection: Option<usize>,
    /// Default detokenize rate per principal, e.g. 100/s [file: limits.detokenize_rate].
    #[arg(long, env = "TOKENVAULT_DETOKENIZE_RATE", value_name = "RATE")]
    pub detokenize_rate: Option<String>,
    /// Default budget of `reuse_existing` lookups per principal, every item counted;
    /// default 100/s [file: limits.reuse_rate].
    #[arg(long, env = "TOKENVAULT_REUSE_RATE", value_name = "RATE")]
    pub reuse_rate: Option<String>,
    /// Server-side deadline of one request: seconds, or e.g. 30s, 500ms; 0 = no limit
    /// [file: limits.request_timeout].
    #[arg(long, env = "TOKENVAULT_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = parse_timeout)]
    pub request_timeout: Option<Duration>,
    /// Largest database size: bytes, or e.g. 10GiB, 512MiB [file: limits.max_storage_bytes].
    #[arg(long, env = "TOKENVAULT_MAX_STORAGE_BYTES", value_name = "BYTES", value_parser = parse_byte_size)]
    pub max_storage_bytes: Option<u64>,
    /// WAL size past which the writer resets it: bytes, or e.g. 256MiB; default 64MiB
    /// [file: limits.max_wal_bytes].
    #[arg(long, env = "TOKENVAULT_MAX_WAL_BYTES", value_name = "BYTES", value_parser = parse_byte_size)]
    pub max_wal_bytes: Option<u64>,
    /// Encryptions per data-key version before rotation [file: key_rotation.max_encryptions].
    #[arg(long, env = "TOKENVAULT_KEY_MAX_ENCRYPTIONS", value_name = "N")]
    pub key_max_encryptions: Option<u64>,
    /// Age of a data key before rotation, e.g. 90d, or `never` [file: key_rotation.max_age].
    #[arg(long, env = "TOKENVAULT_KEY_MAX_AGE", value_name = "DURATION", value_parser = MaxAge::parse)]
    pub key_max_age: Option<MaxAge>,
    /// Prometheus metrics listen address (plain HTTP, `/metrics`); off unless set
    /// [file: metrics.listen].
    #[arg(long, env = "TOKENVAULT_METRICS_LISTEN", value_name = "HOST:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Append signed audit checkpoints to this file (ship it off the host) [file:
    /// audit.checkpoint_file].
    #[arg(long, env = "TOKENVAULT_AUDIT_CHECKPOINT_FILE", value_name = "FILE")]
    pub audit_checkpoint_file: Option<PathBuf>,
    /// Listen address of the detokenizing forward proxy, HOST:PORT (HTTP/1.1 and HTTP/2; TLS
    /// as for gRPC); routes come from the file's [[proxy.routes]] [file: proxy.listen].
    #[arg(long, env = "TOKENVAULT_PROXY_LISTEN", value_name = "HOST:PORT")]
    pub proxy_listen: Option<String>,
    /// Lock the process memory so keys and card numbers are never swapped out (needs
    /// CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; warns when it cannot); `--mlock` or
    /// `--mlock=false` [file: server.mlock].
    #[arg(
        long,
        env = "TOKENVAULT_MLOCK",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub mlock: Option<bool>,
    /// Log every answered request at INFO ("rpc finished"); otherwise successful requests
    /// are logged at DEBUG; `--access-log` or `--access-log=false` [file: logging.access].
    #[arg(
        long,
        env = "TOKENVAULT_ACCESS_LOG",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub access_log: Option<bool>,
}

/// `--max-batch-items`: 1 to [`MAX_BATCH_ITEMS_LIMIT`].
pub fn parse_batch_items(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_ITEMS_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number from 1 to {MAX_BATCH_ITEMS_LIMIT}"
        )),
    }
}

impl ConfigArgs {
    /// The overrides these options carry. `--log-level`/`--log-format` are global options of
    /// the CLI and are passed in by the caller (`None` when not given).
    pub fn overrides(&self, log_level: Option<String>, log_format: Option<LogFormat>) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            store_url: self.store_url.clone(),
            master_key_file: self.master_key_file.clone(),
            master_key_pkcs11: self.master_key_pkcs11.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            client_ca: self.client_ca.clone(),
            max_batch_items: self.max_batch_items,
            max_concurrent_per_connection: self.max_concurrent_per_connection,
            mlock: self.mlock,
            access_log: self.access_log,
            require_cert_and_key: self.require_cert_and_key,
            detokenize_rate: self.detokenize_rate.clone(),
            reuse_rate: self.reuse_rate.clone(),
            request_timeout: self.request_timeout,
            max_storage_bytes: self.max_storage_bytes,
            max_wal_bytes: self.max_wal_bytes,
            key_max_encryptions: self.key_max_encryptions,
            key_max_age: self.key_max_age.map(|a| a.0),
            log_level,
            log_format,
            metrics_listen: self.metrics_listen,
            audit_checkpoint_file: self.audit_checkpoint_file.clone(),
            proxy_listen: self.proxy_listen.clone(),
        }
    }

    /// File, then these options: the effective configuration (not yet validated).
    pub fn resolve(
        &self,
        log_level: Option<String>,
        log_format: Option<LogFormat>,
    ) -> Result<Config, ConfigError> {
        Ok(Config::load(self.config.as_deref())?.overlay(&self.overrides(log_level, log_format)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [server]
        listen = "0.0.0.0:50051"
        [storage]
        data_dir = "/var/lib/tokenvault"
        master_key_file = "/etc/tokenvault/master.key"
        [tls]
        cert = "/etc/tokenvault/tls/tls.crt"
        key = "/etc/tokenvault/tls/tls.key"
        client_ca = "/etc/tokenvault/tls/ca.crt"
        [limits]
        max_batch_items = 500
        detokenize_rate = "100/s"
        request_timeout = "10s"
        max_storage_bytes = 10737418240
        [key_rotation]
        max_encryptions = 1000000
        max_age = "30d"
        [logging]
        level = "info,tokenvault=debug"
        format = "json"
        [metrics]
        listen = "0.0.0.0:9464"
        [audit]
        checkpoint_file = "/var/lib/tokenvault/audit-checkpoints.jsonl"
    "#;

    #[test]
    fn defaults_without_a_file() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.server.listen, DEFAULT_LISTEN);
        assert_eq!(cfg.limits.max_batch_items, DEFAULT_MAX_BATCH_ITEMS);
        assert_eq!(cfg.key_rotation.max_age, Some(DEFAULT_KEY_MAX_AGE));
        assert_eq!(cfg.metrics.listen, None, "metrics are off by default");
        assert!(cfg.validate().unwrap().is_empty());
        let (ours, vaults) = (
            cfg.key_rotation.key_policy(),
            crate::vault::KeyPolicy::default(),
        );
        assert_eq!(ours.max_encryptions, vaults.max_encryptions);
        assert_eq!(ours.max_age, vaults.max_age, "defaults match the vault's");
    }

    #[test]
    fn full_file_parses_and_validates() {
        let cfg = Config::from_toml(FULL).unwrap();
        assert_eq!(cfg.server.listen, "0.0.0.0:50051");
        assert_eq!(cfg.limits.request_timeout, Duration::from_secs(10));
        assert_eq!(cfg.limits.max_storage_bytes, Some(10 << 30));
        assert_eq!(
            cfg.key_rotation.max_age,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(cfg.logging.format, LogFormat::Json);
        assert_eq!(cfg.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(
            cfg.audit.checkpoint_file.as_deref(),
            Some(Path::new("/var/lib/tokenvault/audit-checkpoints.jsonl"))
        );
        let flag = cfg.clone().overlay(&Overrides {
            audit_checkpoint_file: Some("/elsewhere/cp.jsonl".into()),
            ..Overrides::default()
        });
        assert_eq!(
            flag.audit.checkpoint_file.as_deref(),
            Some(Path::new("/elsewhere/cp.jsonl")),
            "flag or env wins over the file"
        );
        assert!(cfg.validate().unwrap().is_empty());
        // What is printed parses back to the same configuration.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), cfg);
        let v = cfg.vault_config();
        assert_eq!(v.max_storage_bytes, Some(10 << 30));
        assert_eq!(v.key_policy.max_encryptions, 1_000_000);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        for (text, key) in [
            ("lisen = \"x\"", "lisen"),
            ("[server]\nlisten_addr = \"127.0.0.1:1\"", "listen_addr"),
            ("[tls]\ncertificate = \"a\"", "certificate"),
            ("[limits]\nmax_batch = 5", "max_batch"),
            ("[storage]\nmaster_key = \"c2VjcmV0\"", "master_key"),
            ("[metrics]\nport = 9000", "port"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(
                err.contains(&format!("unknown field `{key}`")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn bad_values_are_errors_that_name_the_key() {
        let err = Config::from_toml("[key_rotation]\nmax_age = \"90 dayz\"").unwrap_err();
        assert!(err.contains("max_age"), "{err}");
        let err = Config::from_toml("[limits]\nmax_storage_bytes = \"huge\"").unwrap_err();
        assert!(err.contains("max_storage_bytes"), "{err}");
        let err = Config::from_toml("[limits]\nmax_batch_items = \"many\"").unwrap_err();
        assert!(err.contains("max_batch_items"), "{err}");
        let err = Config::from_toml("[metrics]\nlisten = \"nowhere\"").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn precedence_flag_env_over_file_over_default() {
        // File over default.
        let file = Config::from_toml(
            "[server]\nlisten = \"127.0.0.1:6000\"\n[limits]\nmax_batch_items = 50\n",
        )
        .unwrap();
        assert_eq!(file.server.listen, "127.0.0.1:6000");
        assert_eq!(file.limits.request_timeout, DEFAULT_REQUEST_TIMEOUT);

        // Flag/env over file; unset overrides leave the file's values alone.
        let over = Overrides {
            max_batch_items: Some(7),
            key_max_age: Some(None),
            metrics_listen: Some("127.0.0.1:9464".parse().unwrap()),
            log_format: Some(LogFormat::Json),
            ..Overrides::default()
        };
        let cfg = file.clone().overlay(&over);
        assert_eq!(cfg.server.listen, "127.0.0.1:6000", "file value kept");
        assert_eq!(cfg.limits.max_batch_items, 7, "override wins over file");
        assert_eq!(cfg.key_rotation.max_age, None, "override can turn age off");
        assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(cfg.logging.format, LogFormat::Json);
        assert_eq!(
            cfg.key_rotation.max_encryptions, DEFAULT_KEY_MAX_ENCRYPTIONS,
            "default kept"
        );
        assert_eq!(
            file.overlay(&Overrides::default()).limits.max_batch_items,
            50
        );
    }

    #[test]
    fn clap_merges_flag_over_env_into_the_overrides() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: ConfigArgs,
        }
        // No environment involved here (the binary test covers env); the flag parsers:
        let t = T::try_parse_from([
            "t",
            "--listen",
            "127.0.0.1:7",
            "--key-max-age",
            "never",
            "--request-timeout",
            "1500ms",
            "--metrics-listen",
            "127.0.0.1:9464",
        ])
        .unwrap();
        let o = t.c.overrides(None, None);
        assert_eq!(o.listen.as_deref(), Some("127.0.0.1:7"));
        assert_eq!(o.key_max_age, Some(None));
        assert_eq!(o.request_timeout, Some(Duration::from_millis(1500)));
        assert!(T::try_parse_from(["t", "--key-max-age", "soon"]).is_err());
        assert!(T::try_parse_from(["t", "--metrics-listen", "x"]).is_err());
    }

    #[test]
    fn validation() {
        let with = |text: &str| Config::from_toml(text).unwrap().validate();
        let err = |text: &str| with(text).unwrap_err().to_string();
        assert!(err("[server]\nlisten = \"0.0.0.0:50051\"").contains("requires TLS"));
        assert!(err("[server]\nlisten = \"nonsense\"").contains("HOST:PORT"));
        assert!(err("[tls]\ncert = \"c\"").contains("tls.key"));
        assert!(err("[tls]\nkey = \"k\"").contains("tls.cert"));
        assert!(err("[tls]\nclient_ca = \"ca\"").contains("mutual TLS"));
        assert!(err("[limits]\nmax_batch_items = 0").contains("max_batch_items"));
        assert!(err("[limits]\ndetokenize_rate = \"fast\"").contains("detokenize_rate"));
        assert!(err("[limits]\nreuse_rate = \"fast\"").contains("reuse_rate"));
        assert!(err("[limits]\nmax_storage_bytes = 10").contains("max_storage_bytes"));
        assert!(with("[limits]\nrequest_timeout = \"0s\"").unwrap()[0]
            .contains("no server-side deadline"));
        assert!(
            err("[tls]\ncert = \"c\"\nkey = \"k\"\nrequire_cert_and_key = true")
                .contains("client_ca")
        );
        assert!(err("[key_rotation]\nmax_encryptions = 0").contains("max_encryptions"));
        assert!(err("[key_rotation]\nmax_encryptions = 4294967297").contains("2^32"));
        assert!(err("[logging]\nlevel = \"info,=x=y\"").contains("logging.level"));
        assert!(err("[metrics]\nlisten = \"127.0.0.1:50051\"").contains("collides"));
        assert!(with("[server]\nlisten = \"localhost:50051\"").unwrap()[0].contains("host name"));
        assert!(with("[key_rotation]\nmax_age = \"never\"").unwrap()[0].contains("never"));
        assert!(with("[server]\nlisten = \"[::1]:50051\"")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration(" 2w ").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        // One grammar (humantime's) for every flag and key: fractions and compounds too.
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        for bad in [
            "",
            "d",
            "90",
            "-1s",
            "1.5.2s",
            "5 parsecs",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_timeout("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_timeout("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_timeout(".").is_err());
        assert_eq!(parse_optional_duration("never").unwrap(), None);
        assert_eq!(parse_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_timeout("250ms").unwrap(), Duration::from_millis(250));
        for d in ["90d", "36h", "30s", "1500ms", "2w", "90m"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn byte_sizes_with_units_and_raw_integers() {
        for (text, bytes) in [
            ("10737418240", 10u64 << 30),
            ("10GiB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("512MiB", 512 << 20),
            ("2GB", 2_000_000_000),
        ] {
            assert_eq!(parse_byte_size(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "ten", "10 parsecs", "-1GiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
        let file = |v: &str| Config::from_toml(&format!("[limits]\nmax_storage_bytes = {v}"));
        for v in ["10737418240", "\"10GiB\"", "\"10737418240\""] {
            assert_eq!(
                file(v).unwrap().limits.max_storage_bytes,
                Some(10 << 30),
                "{v}"
            );
        }
        assert!(file("\"lots\"").is_err());
        // Units still meet the floor.
        let small = file("\"1KiB\"").unwrap();
        assert!(small.validate().is_err());
        // Written back as the integer: the rendered file reads the same everywhere.
        let text = file("\"10GiB\"").unwrap().render(&Secrets::default());
        assert!(text.contains("max_storage_bytes = 10737418240"), "{text}");
    }

    #[test]
    fn render_redacts_secrets() {
        let cfg = Config::default();
        let text = cfg.render(&Secrets {
            master_key_env: true,
            api_key_env: false,
        });
        assert!(text.contains("master_key = \"<redacted>\""), "{text}");
        assert!(text.contains("api_key = \"unset\""), "{text}");
        assert!(text.contains("[server]"), "{text}");
        // The printed text is itself a valid configuration file apart from [secrets].
        let body = text.split("[secrets]").next().unwrap();
        assert_eq!(Config::from_toml(body).unwrap(), cfg);
    }
}
