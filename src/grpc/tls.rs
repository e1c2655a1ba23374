//! TLS termination for the gRPC server, with optional mutual TLS, and reload when the files
//! change ([`TlsReloader::watch`]) or on SIGHUP.
//!
//! The server does the TLS handshake itself (tokio-rustls) instead of through tonic's
//! `tls_config`, so that the certificate can be swapped while serving: the current
//! [`rustls::ServerConfig`] sits in a [`TlsReloader`] slot that [`TlsReloader::reload`]
//! replaces; connections accepted afterwards use the new one, established connections keep
//! theirs. A failed reload leaves the old configuration in place.
//!
//! Protocols are TLS 1.2 and 1.3 with rustls' default cipher suites (ring provider). With a
//! client CA, a client must present a certificate chaining to it or the handshake fails.
//! [`cert_identities`] reads the identity (URI SANs, e.g. SPIFFE IDs, then DNS SANs) of a
//! verified client certificate for the service to map to a principal.
//!
//! Nothing here logs key material: errors name files and what was wrong, never contents.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to complete the TLS handshake before it is dropped, so idle
/// connections cannot pin handshake tasks.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond it are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Why a TLS configuration could not be built. Messages name files, never their contents.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Where the server's certificate chain, private key and (for mutual TLS) client CA live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s) client certificates must chain to; `None` = no client
    /// certificates requested.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files and builds a server configuration.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.load_with_expiry().map(|(config, _)| config)
    }

    /// [`TlsFiles::load`] and the serving (leaf) certificate's `notAfter`, Unix seconds.
    pub fn load_with_expiry(&self) -> Result<(Arc<rustls::ServerConfig>, i64), TlsError> {
        let certs = read_certs(&self.cert, "--tls-cert")?;
        let not_after = x509_parser::parse_x509_certificate(&certs[0])
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|_| {
                TlsError(format!(
                    "--tls-cert {}: the first certificate is not valid X.509",
                    self.cert.display()
                ))
            })?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            // Only the I/O error or a fixed text: a PEM parse error can quote a line of the
            // file, and this file is the private key.
            let why = match e {
                rustls_pki_types::pem::Error::Io(io) => io.to_string(),
                _ => "no valid PEM private key (PKCS#8, PKCS#1 or SEC1) in it".to_owned(),
            };
            TlsError(format!("--tls-key {}: {why}", self.key.display()))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_certs(path, "--client-ca")? {
                    roots.add(ca).map_err(|e| {
                        TlsError(format!(
                            "--client-ca {}: not a usable CA certificate: {e}",
                            path.display()
                        ))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError(format!("--client-ca {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsError(format!(
                "--tls-cert {} / --tls-key {}: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(config), not_after))
    }

    /// What identifies the files' current versions without reading them (no key bytes in
    /// memory): device, inode, size, modification and change times of each path, following
    /// symlinks, so a Kubernetes Secret update (an atomic `..data` symlink swap), a rename
    /// into place and an in-place rewrite all change it.
    pub fn stamp(&self) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let one = |p: &Path| {
            std::fs::metadata(p).ok().map(|m| {
                [
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime() as u64,
                    m.mtime_nsec() as u64,
                    m.ctime() as u64,
                    m.ctime_nsec() as u64,
                ]
            })
        };
        FileStamp(vec![
            one(&self.cert),
            one(&self.key),
            self.client_ca.as_deref().and_then(one),
        ])
    }
}

/// See [`TlsFiles::stamp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp(Vec<Option<[u64; 7]>>);

/// How often [`TlsReloader::watch`] looks at the files. A change is loaded once the files
/// have stayed the same for one more interval (debounce: a renewal writing the certificate
/// and the key one after the other is loaded as a pair).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{flag} {}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// The server's current TLS configuration, replaceable while serving.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// `notAfter` of the serving certificate, Unix seconds.
    not_after: std::sync::atomic::AtomicI64,
    /// The files' stamp taken just before the last load attempt (so a change made during
    /// or after it is seen by [`TlsReloader::watch`]).
    tried: std::sync::Mutex<FileStamp>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the paths: the configuration holds the private key.
        f.debug_struct("TlsReloader")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads the files once; fails when they do not make a valid configuration.
    pub fn new(files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let tried = files.stamp();
        let (config, not_after) = files.load_with_expiry()?;
        Ok(Arc::new(TlsReloader {
            files,
            current: RwLock::new(config),
            not_after: not_after.into(),
            tried: std::sync::Mutex::new(tried),
        }))
    }

    /// `notAfter` of the certificate new connections get, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// True when clients must present a certificate from the client CA.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files. On success new connections use them; on failure the previous
    /// configuration stays and the error is returned (and logged).
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.tried.lock().unwrap_or_else(|e| e.into_inner()) = self.files.stamp();
        match self.files.load_with_expiry() {
            Ok((config, not_after)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                self.not_after
                    .store(not_after, std::sync::atomic::Ordering::Relaxed);
                crate::metrics::record_tls_reload(true, not_after);
                tracing::info!(cert = %self.files.cert.display(), not_after, "TLS certificate and key reloaded");
                Ok(())
            }
            Err(e) => {
                crate::metrics::record_tls_reload(false, self.not_after());
                tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate");
                Err(e)
            }
        }
    }

    /// Reloads when the files change, checking every `every`, until the returned task is
    /// aborted: nothing has to signal the process after a renewal. A change is loaded once
    /// the files are unchanged for one more interval; a version that fails to load is tried
    /// once (the old configuration stays) and again only when the files change again.
    /// Also publishes the serving certificate's expiry as a metric.
    pub fn watch(self: &Arc<Self>, every: Duration) -> JoinHandle<()> {
        let me = self.clone();
        let tried = |me: &TlsReloader| me.tried.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut last = tried(&me);
        crate::metrics::set_tls_cert_expiry(me.not_after());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = me.files.stamp();
                // Changed since the last attempt (which SIGHUP may also have made), and
                // unchanged for one interval.
                if now != tried(&me) && now == last {
                    tracing::info!("TLS files changed; reloading");
                    let _ = me.reload();
                }
                last = now;
            }
        })
    }

    /// Reloads on every SIGHUP until the returned task is aborted.
    #[cfg(unix)]
    pub fn reload_on_sighup(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let me = self.clone();
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading TLS files");
                let _ = me.reload();
            }
        }))
    }
}

/// Connections on `listener` after a successful TLS handshake under the configuration of
/// `tls` current at accept time. The stream ends when the accept task (returned) is
/// aborted or the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> (
    ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
    JoinHandle<()>,
) {
    incoming_with_alpn(listener, tls, None)
}

/// [`incoming`] offering the ALPN protocols `alpn` instead of gRPC's `h2` (the proxy
/// listener speaks HTTP/2 and HTTP/1.1 with the same certificates).
pub fn incoming_with_alpn(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    alpn: Option<Vec<Vec<u8>>>,
) -> (
    ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in progress; closing connection");
                continue;
            };
            // Nagle's algorithm delays small gRPC frames by up to 40 ms.
            let _ = stream.set_nodelay(true);
            let config = match &alpn {
                None => tls.current(),
                Some(protocols) => {
                    let mut config = (*tls.current()).clone();
                    config.alpn_protocols.clone_from(protocols);
                    Arc::new(config)
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let _ = tx.send(Ok(tls_stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Identities of a certificate, in the order they are tried against the principals: URI
/// SANs (e.g. `spiffe://example.org/checkout`), then DNS SANs. Empty when the certificate
/// cannot be parsed or has neither.
pub fn cert_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let names = &san.value.general_names;
    let uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = names.iter().filter_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    });
    uris.chain(dns).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_without_contents() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let err = files.load().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn uri_sans_come_before_dns_sans() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example.org".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/svc".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            cert_identities(cert.der()),
            vec!["spiffe://example.org/svc", "svc.example.org"]
        );
    }

    #[test]
    fn garbage_has_no_identities() {
        assert!(cert_identities(b"not a certificate").is_empty());
    }
}
