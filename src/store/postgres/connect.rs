//! Connecting to PostgreSQL: the URL (with `sslmode`/`sslrootcert` handled here, through
//! rustls), the password (from the URL, else `PGPASSWORD`, else a libpq password file:
//! `PGPASSFILE` or `~/.pgpass`; never logged or shown), the `application_name`, and a
//! bounded connection pool.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::error::{Error, Result};

/// How long opening a connection or waiting for a free one may take before UNAVAILABLE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL store URL, parsed. `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    tls: TlsMode,
    /// The URL without its password, for messages.
    shown: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TlsMode {
    Disable,
    /// `require`, `verify-ca` and `verify-full` all verify the server's certificate and
    /// name through rustls against `sslrootcert`: a TLS connection that does not is no
    /// protection against the network this is meant for.
    Verify {
        root_cert: std::path::PathBuf,
    },
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The URL with its password hidden, read the way tokio-postgres reads it: the userinfo is
/// everything up to the *first* `@` of the whole URL (so a password may hold `/`, `?` or
/// `:`, as base64 ones do), and query keys are percent-decoded before they are matched
/// (`?pass%77ord=` is `password`). When in doubt, more is hidden, never less.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "postgres://***".into();
    };
    let mut out = format!("{scheme}://");
    let after = match rest.split_once('@') {
        Some((userinfo, after)) => {
            let (user, has_password) = match userinfo.split_once(':') {
                Some((user, _)) => (user, true),
                None => (userinfo, false),
            };
            // A "user" holding `/`, `?` or `=` is a URL without userinfo that has an `@`
            // further on (the parser still takes all of it as the user name): hide it all.
            if user.contains(['/', '?', '=', '&']) {
                out.push_str("***@");
            } else {
                out.push_str(user);
                out.push_str(if has_password { ":***@" } else { "@" });
            }
            after
        }
        None => rest,
    };
    let (authority, tail) = match after.find(['/', '?']) {
        Some(i) => after.split_at(i),
        None => (after, ""),
    };
    // A second `@` in the authority: a password with an unencoded `@`, whose remainder the
    // parser would take for the host; hide up to the last one.
    match authority.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str("***@");
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    // Query parameters may carry a password too (`?password=`).
    match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(path);
            out.push('?');
            out.push_str(&q.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// A query key tokio-postgres would read as `password` (it percent-decodes keys).
fn is_password_key(key: &str) -> bool {
    percent_decode(key).trim().eq_ignore_ascii_case("password")
}

/// `%XX` decoded (a malformed escape is kept as is), as tokio-postgres decodes URL parts.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the query of a store URL starts: the first `?` after the userinfo (which ends at
/// the URL's first `@`, as tokio-postgres parses it), not one inside a password.
fn query_start(url: &str) -> Option<usize> {
    let from = url
        .find("://")
        .map(|i| i + 3)
        .and_then(|s| url[s..].find('@').map(|j| s + j + 1))
        .unwrap_or(0);
    url[from..].find('?').map(|i| from + i)
}

impl PgUrl {
    pub fn is_postgres(url: &str) -> bool {
        url.starts_with("postgres://") || url.starts_with("postgresql://")
    }

    pub fn parse(url: &str) -> Result<PgUrl> {
        let shown = redact(url);
        let bad = |why: &str| Error::InvalidArgument(format!("store URL {shown}: {why}"));
        if !Self::is_postgres(url) {
            return Err(bad("must start with postgres:// or postgresql://"));
        }
        // tokio-postgres knows neither `sslrootcert` nor the verify modes: take them out.
        let (base, query) = match query_start(url) {
            Some(i) => (&url[..i], &url[i + 1..]),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let (mut sslmode, mut root) = (None::<String>, None::<String>);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            // Keys as tokio-postgres reads them (`ssl%6dode` is `sslmode`).
            match percent_decode(k).as_str() {
                "sslmode" => sslmode = Some(v.to_string()),
                "sslrootcert" => root = Some(v.to_string()),
                _ => kept.push(kv),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rebuilt)
            .map_err(|_| bad("not a valid PostgreSQL connection URL"))?;
        let tls = match sslmode.as_deref() {
            None | Some("disable") => TlsMode::Disable,
            Some("require") | Some("verify-ca") | Some("verify-full") => {
                let root_cert = root.ok_or_else(|| {
                    bad("sslmode needs sslrootcert=FILE (the CA that signed the server's certificate)")
                })?;
                TlsMode::Verify {
                    root_cert: root_cert.into(),
                }
            }
            Some("prefer") | Some("allow") => {
                return Err(bad(
                    "sslmode=prefer/allow may silently fall back to plain text; use \
                     verify-full (or disable on a Unix socket or loopback)",
                ))
            }
            Some(_) => return Err(bad("unknown sslmode")),
        };
        // Plain text by default only where nothing crosses a network: a Unix socket or
        // loopback, as for the gRPC listener. Elsewhere the password, wrapped keys,
        // ciphertexts and the audit trail would travel in clear and could be altered on the
        // way, so plain text there must be asked for (`sslmode=disable`, e.g. a private
        // network of containers).
        if sslmode.is_none() {
            let local = config.get_hosts().iter().all(|h| match h {
                tokio_postgres::config::Host::Unix(_) => true,
                tokio_postgres::config::Host::Tcp(name) => {
                    name == "localhost"
                        || name
                            .trim_matches(|c| c == '[' || c == ']')
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
            });
            if !local {
                return Err(bad(
                    "a database that is not on a Unix socket or loopback needs TLS: add                      sslmode=verify-full&sslrootcert=FILE",
                ));
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("tokenvault");
        }
        if config.get_user().is_none() {
            if let Ok(u) = std::env::var("PGUSER").or_else(|_| std::env::var("USER")) {
                config.user(u);
            }
        }
        // As libpq: the URL's password, else PGPASSWORD, else the password file.
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            } else if let Some((file, named)) = password_file_path() {
                match password_from_file(&file, &config) {
                    Ok(Some(p)) => {
                        config.password(p.as_str());
                    }
                    Ok(None) => {}
                    // `~/.pgpass` merely lying around (this store may not need a password at
                    // all): ignored with a warning, as libpq does. A file PGPASSFILE names was
                    // meant to be used: its error stops the start.
                    Err(e) if !named => tracing::warn!(error = %e, "password file ignored"),
                    Err(e) => return Err(e),
                }
            }
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        Ok(PgUrl { config, tls, shown })
    }

    /// A bounded pool of connections; nothing connects until the first use.
    pub fn pool(&self, max_size: usize) -> Result<Pool> {
        let mgr_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            TlsMode::Disable => {
                Manager::from_config(self.config.clone(), tokio_postgres::NoTls, mgr_config)
            }
            TlsMode::Verify { root_cert } => {
                let tls = tls_connector(root_cert)?;
                Manager::from_config(self.config.clone(), tls, mgr_config)
            }
        };
        Pool::builder(manager)
            .max_size(max_size.max(1))
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    // Every statement the vault prepares looks rows up by a unique key or
                    // takes whole groups as arrays: a generic plan is as good as a custom
                    // one. Without this the server re-plans `= ANY($1)` and the `unnest`
                    // inserts on every execution (its generic estimate assumes ten array
                    // elements), which was 30% of its CPU under detokenize load.
                    // PostgreSQL < 12 lacks the setting: it just plans as before.
                    match client
                        .simple_query("SET plan_cache_mode = force_generic_plan")
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e)
                            if e.code()
                                == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(deadpool_postgres::HookError::Backend(e)),
                    }
                })
            }))
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Internal(format!("database pool: {e}")))
    }
}

fn tls_connector(root_cert: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(root_cert).map_err(|e| {
        Error::FailedPrecondition(format!("sslrootcert {}: {e}", root_cert.display()))
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| {
            Error::FailedPrecondition(format!("sslrootcert {}: {e}", root_cert.display()))
        })?;
        roots
            .add(cert)
            .map_err(|e| Error::FailedPrecondition(format!("sslrootcert: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "sslrootcert {} holds no certificate",
            root_cert.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Maps a database error: a lost or refused connection (the database restarting, a network
/// fault) is UNAVAILABLE so clients retry elsewhere; a full disk is RESOURCE_EXHAUSTED.
/// Messages never carry the URL or the password (tokio-postgres never puts them there).
pub fn map_err(e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY {
            return Error::ResourceExhausted("the database is out of space".into());
        }
        if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || *code == SqlState::QUERY_CANCELED
            || code.code().starts_with("08")
        {
            return Error::Unavailable(format!("database: {}", db.message()));
        }
        // 28xxx: the login was refused (a wrong or rotated password, pg_hba): retry elsewhere.
        if *code == SqlState::INSUFFICIENT_PRIVILEGE || code.code().starts_with("28") {
            return Error::Unavailable(format!("database: {}", db.message()));
        }
        return Error::Internal(format!("database: {} ({})", db.message(), code.code()));
    }
    // No server error: the connection itself failed or closed, or the server asked for
    // something the configuration lacks ("invalid configuration: password missing"). The
    // causes tokio-postgres chains never hold the URL or the password.
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    Error::Unavailable(format!("database connection: {why}"))
}

pub fn map_pool_err(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => map_err(e),
        other => Error::Unavailable(format!("database connection: {other}")),
    }
}

/// The password file libpq would read, and whether `PGPASSFILE` named it: `PGPASSFILE`, else
/// `~/.pgpass`.
fn password_file_path() -> Option<(std::path::PathBuf, bool)> {
    match std::env::var_os("PGPASSFILE") {
        Some(p) if !p.is_empty() => Some((p.into(), true)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| (std::path::Path::new(&h).join(".pgpass"), false)),
    }
}

/// The password of the first line of a libpq password file
/// (`hostname:port:database:username:password`, `*` matching anything, `\:` and `\\`
/// escaped) that matches this connection. No file: None. A file others may read (any
/// group or other permission bit) or that is not a regular file is refused, as libpq
/// refuses to use it, but with an error rather than a warning: a password left readable is
/// worth stopping for. Errors name the file, never a line of it.
fn password_from_file(
    path: &std::path::Path,
    config: &tokio_postgres::Config,
) -> Result<Option<zeroize::Zeroizing<String>>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::FailedPrecondition(format!(
                "password file {}: {e}",
                path.display()
            )))
        }
    };
    if !meta.is_file() {
        return Err(Error::FailedPrecondition(format!(
            "password file {} is not a plain file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::FailedPrecondition(format!(
            "password file {} has mode {mode:04o}: others could read it; chmod 0600 it",
            path.display()
        )));
    }
    // Every line of the file is a secret: wiped when dropped.
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        Error::FailedPrecondition(format!("password file {}: {e}", path.display()))
    })?);
    let host = match config.get_hosts().first() {
        // libpq matches a Unix socket (the default directory or any other) as `localhost`.
        Some(tokio_postgres::config::Host::Unix(_)) | None => "localhost".to_string(),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    let db = config.get_dbname().unwrap_or(user);
    Ok(match_password_line(&text, [&host, &port, db, user]))
}

/// The first matching line's password (see [`password_from_file`]). Every field is built in
/// a zeroizing buffer sized for its whole line up front (never reallocated, so no copy of a
/// password is left behind), the other lines' passwords included.
fn match_password_line(text: &str, want: [&str; 4]) -> Option<zeroize::Zeroizing<String>> {
    use zeroize::Zeroizing;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let field = || Zeroizing::new(String::with_capacity(line.len()));
        // Split on unescaped `:` into at most five fields, unescaping as we go.
        let mut fields = Vec::with_capacity(5);
        fields.push(field());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        fields.last_mut()?.push(n);
                    }
                }
                ':' if fields.len() < 5 => fields.push(field()),
                c => fields.last_mut()?.push(c),
            }
        }
        if fields.len() != 5 {
            continue;
        }
        let matches = fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f.as_str() == "*" || f.as_str() == w);
        if matches {
            return fields.pop();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        for url in [
            "postgres://vault:s3cr3t-pw@db.example:5432/vault?sslmode=disable",
            "postgresql://vault@127.0.0.1/vault?password=s3cr3t-pw",
        ] {
            let u = PgUrl::parse(url).unwrap();
            assert!(!format!("{u:?} {u}").contains("s3cr3t-pw"), "{u:?}");
        }
        let e = PgUrl::parse("postgres://vault:s3cr3t-pw@db.example/vault").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-pw"));
        let e = PgUrl::parse("postgres://vault:s3cr3t-pw@db/vault?sslmode=bogus").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-pw"));
    }

    /// Review finding: the userinfo ends at the URL's first `@` (a password may hold `/`,
    /// `?`, `:`), and query keys are percent-decoded, as tokio-postgres reads them.
    #[test]
    fn the_password_never_shows_however_it_is_spelt() {
        for (url, password) in [
            (
                "postgres://svc:s3cr3t-pw/x@127.0.0.1/vault",
                Some("s3cr3t-pw/x"),
            ),
            (
                "postgres://svc:s3/cr3t-pw@127.0.0.1/vault",
                Some("s3/cr3t-pw"),
            ),
            (
                "postgres://svc:s3?cr3t-pw@127.0.0.1/vault",
                Some("s3?cr3t-pw"),
            ),
            (
                "postgres://svc:s3cr3t/pw?x=1@127.0.0.1/vault?sslmode=disable",
                Some("s3cr3t/pw?x=1"),
            ),
            (
                "postgres://svc:a:s3cr3t-pw@127.0.0.1/vault",
                Some("a:s3cr3t-pw"),
            ),
            (
                "postgres://svc@127.0.0.1/vault?pass%77ord=s3cr3t-pw",
                Some("s3cr3t-pw"),
            ),
            ("postgres://svc@127.0.0.1/vault?PASSWORD=s3cr3t-pw", None),
            (
                "postgres://svc@127.0.0.1/vault?%70assword=s3cr3t-pw",
                Some("s3cr3t-pw"),
            ),
        ] {
            let shown = redact(url);
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("cr3t-pw"),
                "{shown}"
            );
            // The parser's view: the password is exactly what was hidden. (A key it does
            // not know, `PASSWORD`, is refused, and the refusal hides it too.)
            let text = match PgUrl::parse(url) {
                Ok(u) => {
                    assert_eq!(
                        u.config.get_password(),
                        password.map(str::as_bytes),
                        "{url}"
                    );
                    format!("{u:?} {u}")
                }
                Err(e) => {
                    assert!(password.is_none(), "{url}: {e}");
                    e.to_string()
                }
            };
            assert!(!text.contains("cr3t"), "{text}");
        }
        // The user and host still show.
        assert_eq!(
            redact("postgres://svc:pa/ss@db.example:5432/vault?sslmode=disable"),
            "postgres://svc:***@db.example:5432/vault?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://svc@db/vault?pass%77ord=x&application_name=a"),
            "postgres://svc@db/vault?pass%77ord=***&application_name=a"
        );
        // An unencoded `@` inside the password: its tail never shows as the "host".
        let shown = redact("postgres://svc:p@s3cr3t-pw@db/vault");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        // No userinfo but an `@` further on: the parser's "user name" is hidden whole.
        let shown = redact("postgres://db/vault?password=s3cr3t-pw&application_name=a@b");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        // Errors show the redacted URL too.
        let e = PgUrl::parse("postgres://svc:s3cr3t/pw@db/vault?sslmode=bogus").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        // A percent-encoded `sslmode` key is the same key.
        assert!(PgUrl::parse("postgres://db.example/v?ssl%6dode=disable").is_ok());
    }

    #[test]
    fn tls_modes() {
        assert!(PgUrl::parse("postgres://db/v?sslmode=verify-full").is_err());
        assert!(PgUrl::parse("postgres://db/v?sslmode=prefer").is_err());
        let u = PgUrl::parse("postgres://db/v?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            u.tls,
            TlsMode::Verify {
                root_cert: "/ca.pem".into()
            }
        );
        assert_eq!(u.config.get_application_name(), Some("tokenvault"));
        // Review finding: no silent plain text across a network.
        assert!(PgUrl::parse("postgres://db.example/v").is_err());
        assert!(PgUrl::parse("postgres://10.0.0.5/v").is_err());
        assert!(PgUrl::parse("postgres://db.example/v?sslmode=disable").is_ok());
        assert!(PgUrl::parse("postgres://127.0.0.1:5432/v").is_ok());
        assert!(PgUrl::parse("postgres://[::1]:5432/v").is_ok());
        assert!(PgUrl::parse("postgres://localhost/v").is_ok());
        assert!(PgUrl::parse("postgres:///v?host=/run/postgresql").is_ok());
    }

    #[test]
    fn password_file_lines_match_like_libpq() {
        let text = "# comment\n\
                    db.example:5432:other:vault:wrong-db\n\
                    db.example:*:vault:vault:p\\:w\\\\d\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            match_password_line(text, ["db.example", "5432", "vault", "vault"])
                .as_deref()
                .map(String::as_str),
            Some("p:w\\d")
        );
        assert_eq!(
            match_password_line(text, ["db.example", "5432", "other", "vault"])
                .as_deref()
                .map(String::as_str),
            Some("wrong-db")
        );
        assert_eq!(
            match_password_line(text, ["elsewhere", "1", "x", "y"])
                .as_deref()
                .map(String::as_str),
            Some("fallback")
        );
        assert!(match_password_line("a:b:c:d\n", ["a", "b", "c", "d"]).is_none());
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "127.0.0.1:5433:vault:svc:s3cr3t-pw\n").unwrap();
        let config: tokio_postgres::Config = "postgres://svc@127.0.0.1:5433/vault".parse().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = password_from_file(&file, &config).unwrap_err();
            assert!(matches!(e, Error::FailedPrecondition(_)), "{mode:o}");
            assert!(e.to_string().contains("chmod 0600"), "{e}");
            assert!(!e.to_string().contains("s3cr3t-pw"));
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                password_from_file(&file, &config)
                    .unwrap()
                    .as_deref()
                    .map(String::as_str),
                Some("s3cr3t-pw")
            );
        }
        // Another port: no line matches, no password.
        let other: tokio_postgres::Config = "postgres://svc@127.0.0.1/vault".parse().unwrap();
        assert_eq!(password_from_file(&file, &other).unwrap(), None);
        // No file: none, no error. A directory: refused.
        assert_eq!(
            password_from_file(&dir.path().join("none"), &config).unwrap(),
            None
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(password_from_file(dir.path(), &config).is_err());
    }
}
