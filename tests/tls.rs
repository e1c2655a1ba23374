//! TLS and mutual TLS over real connections, with certificates generated here (rcgen): the
//! handshake refuses clients without a certificate from the client CA, certificate
//! identities map to principals and their roles, API keys keep working over TLS, unknown
//! identities are UNAUTHENTICATED, and certificates reload (in-process and on SIGHUP to a
//! `tokenvault serve` child) without dropping the server. Everything on 127.0.0.1, ephemeral
//! ports, bounded waits.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{tls_endpoint, with_auth, BearerAuth, Client, ClientTlsFiles};
use tokenvault::grpc::pb;
use tokenvault::grpc::server::{serve, ServerConfig};
use tokenvault::grpc::tls::{cert_identities, TlsFiles, TlsReloader};
use tokenvault::vault::{Caller, Vault, VaultConfig};

const CHECKOUT_ID: &str = "spiffe://example.org/checkout";
const PAYMENTS_ID: &str = "spiffe://example.org/payments";
const STRANGER_ID: &str = "spiffe://example.org/stranger";
/// A principal with no certificate identity: API key only.
const KEYONLY: &str = "keyonly";

/// A test certificate authority.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A leaf certificate and its key, both PEM.
    fn issue(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, "leaf");
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_cert(&self) -> (String, String) {
        self.issue(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client_cert(&self, uri: Option<&str>) -> (String, String) {
        let sans = uri
            .map(|u| vec![SanType::URI(u.try_into().unwrap())])
            .unwrap_or_default();
        self.issue(sans, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Files for a client: trusts `ca_pem`, presents `cert` if given.
fn client_files(
    dir: &Path,
    tag: &str,
    ca_pem: &str,
    cert: Option<&(String, String)>,
) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(write(dir, &format!("{tag}-trust.pem"), ca_pem)),
        cert: cert.map(|(c, _)| write(dir, &format!("{tag}-cert.pem"), c)),
        key: cert.map(|(_, k)| write(dir, &format!("{tag}-key.pem"), k)),
        domain: None,
    }
}

struct TlsServer {
    dir: TempDir,
    ca: Ca,
    vault: Vault,
    addr: SocketAddr,
    reloader: Arc<TlsReloader>,
    keys: Vec<(&'static str, String)>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<tokenvault::error::Result<()>>>,
}

impl TlsServer {
    /// A server with a certificate from a fresh CA; with `mutual`, that CA is also the
    /// client CA.
    async fn start(mutual: bool, require_both: bool) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tokenvault test CA");
        let (cert, key) = ca.server_cert();
        let files = TlsFiles {
            cert: write(dir.path(), "server.pem", &cert),
            key: write(dir.path(), "server.key", &key),
            client_ca: mutual.then(|| write(dir.path(), "client-ca.pem", &ca.pem)),
        };
        let reloader = TlsReloader::new(files).unwrap();

        let vault = Vault::create(
            VaultConfig::new(dir.path().join("data")),
            &MasterKey::generate(),
        )
        .unwrap();
        let mut keys = Vec::new();
        for (name, roles, id) in [
            (
                "checkout",
                &[Role::Tokenize, Role::Info][..],
                Some(CHECKOUT_ID),
            ),
            (
                "payments",
                &[Role::Detokenize, Role::Info][..],
                Some(PAYMENTS_ID),
            ),
            (KEYONLY, &[Role::Tokenize][..], None),
        ] {
            let key = vault
                .add_client(&Caller::cli(), name, roles, id)
                .await
                .unwrap();
            keys.push((name, key));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = ServerConfig {
            tls: Some(reloader.clone()),
            require_client_cert_and_key: require_both,
            ..ServerConfig::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, vault.clone(), cfg, async {
            let _ = rx.await;
        }));
        TlsServer {
            dir,
            ca,
            vault,
            addr,
            reloader,
            keys,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    fn key(&self, name: &str) -> &str {
        &self.keys.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A client trusting this server's CA, presenting `cert`, sending `api_key`.
    async fn client(
        &self,
        cert: Option<&(String, String)>,
        api_key: Option<&str>,
    ) -> Result<Client, String> {
        let tag = format!("c{}", rand_tag());
        let files = client_files(self.dir.path(), &tag, &self.ca.pem, cert);
        connect(&self.url(), &files, api_key).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// Audit records with outcome `outcome`.
    async fn audited(&self, outcome: &str) -> Vec<tokenvault::audit::AuditRecord> {
        self.vault
            .audit_records(1, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.outcome == outcome)
            .collect()
    }
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn connect(
    url: &str,
    files: &ClientTlsFiles,
    api_key: Option<&str>,
) -> Result<Client, String> {
    let channel = tls_endpoint(url, files)?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    Ok(with_auth(channel, BearerAuth::new(api_key).unwrap()))
}

async fn tokenize(client: &mut Client, pan: &str) -> Result<String, tonic::Status> {
    client
        .tokenize(pb::TokenizeRequest {
            pan: pan.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().token)
}

/// Connecting and calling fails somewhere in transport (handshake), never reaching the
/// service (which would answer with an authentication or authorisation status).
async fn assert_refused_in_handshake(url: &str, files: &ClientTlsFiles) {
    match connect(url, files, None).await {
        Err(_) => {}
        Ok(mut client) => {
            // TLS 1.3: the client finishes before the server has judged its certificate, so
            // the refusal shows on the first call.
            let status = tokenize(&mut client, &common::test_pan(1))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown
                ),
                "expected a transport failure, got {status:?}"
            );
        }
    }
}

#[tokio::test]
async fn handshake_refuses_missing_and_foreign_client_certificates() {
    let server = TlsServer::start(true, false).await;
    let dir = server.dir.path();

    // No client certificate at all.
    let none = client_files(dir, "none", &server.ca.pem, None);
    assert_refused_in_handshake(&server.url(), &none).await;

    // A certificate with a bound identity, but from another CA.
    let other = Ca::new("some other CA");
    let foreign = other.client_cert(Some(CHECKOUT_ID));
    let files = client_files(dir, "foreign", &server.ca.pem, Some(&foreign));
    assert_refused_in_handshake(&server.url(), &files).await;

    // Neither reached the service: nothing was audited as refused.
    assert!(server.audited("UNAUTHENTICATED").await.is_empty());

    // A plaintext client gets nowhere either.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c = with_auth(channel, BearerAuth::new(Some(server.key(KEYONLY))).unwrap());
        assert!(tokenize(&mut c, &common::test_pan(2)).await.is_err());
    }

    // And the server still serves a proper client.
    let good = server.ca.client_cert(Some(CHECKOUT_ID));
    let mut c = server.client(Some(&good), None).await.unwrap();
    tokenize(&mut c, &common::test_pan(3)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn certificate_identity_maps_to_the_principal_and_its_roles() {
    let server = TlsServer::start(true, false).await;
    let checkout = server.ca.client_cert(Some(CHECKOUT_ID));
    let payments = server.ca.client_cert(Some(PAYMENTS_ID));
    assert_eq!(cert_identities(&pem_der(&checkout.0)), vec![CHECKOUT_ID]);

    // No API key: the certificate alone identifies the caller.
    let mut c = server.client(Some(&checkout), None).await.unwrap();
    let pan = common::test_pan(10);
    let token = tokenize(&mut c, &pan).await.unwrap();

    // checkout may not reveal.
    let denied = c
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let mut p = server.client(Some(&payments), None).await.unwrap();
    let revealed = p
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "settle".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.pan, pan);

    // The trail names the principals, with the peer address of the TLS connection.
    let records = server.vault.audit_records(1, 1000).await.unwrap();
    let tok = records.iter().find(|r| r.action == "tokenize").unwrap();
    assert_eq!(tok.principal, "checkout");
    assert!(tok.peer.starts_with("127.0.0.1:"), "{}", tok.peer);
    let det = records
        .iter()
        .find(|r| r.action == "detokenize" && r.outcome == "OK")
        .unwrap();
    assert_eq!(det.principal, "payments");
    let refused = records
        .iter()
        .find(|r| r.outcome == "PERMISSION_DENIED")
        .unwrap();
    assert_eq!(refused.principal, "checkout");
    server.stop().await;
}

#[tokio::test]
async fn unknown_identity_is_unauthenticated_and_audited() {
    let server = TlsServer::start(true, false).await;
    let stranger = server.ca.client_cert(Some(STRANGER_ID));
    let mut c = server.client(Some(&stranger), None).await.unwrap();
    let status = tokenize(&mut c, &common::test_pan(20)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(!status.message().contains("stranger"));

    // Even with a valid API key: a certificate that names nobody is not overridden by a key.
    let mut c = server
        .client(Some(&stranger), Some(server.key(KEYONLY)))
        .await
        .unwrap();
    let status = tokenize(&mut c, &common::test_pan(21)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let refusals = server.audited("UNAUTHENTICATED").await;
    assert_eq!(refusals.len(), 2);
    assert!(refusals
        .iter()
        .all(|r| r.principal == "anonymous" && r.action == "tokenize"));
    server.stop().await;
}

#[tokio::test]
async fn api_keys_work_over_tls() {
    // Server-side TLS only: clients authenticate by API key.
    let server = TlsServer::start(false, false).await;
    let mut c = server
        .client(None, Some(server.key(KEYONLY)))
        .await
        .unwrap();
    tokenize(&mut c, &common::test_pan(30)).await.unwrap();
    let mut anon = server.client(None, None).await.unwrap();
    let status = tokenize(&mut anon, &common::test_pan(31))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    server.stop().await;

    // Mutual TLS with a certificate that carries no identity: the API key decides; a key of
    // a different principal than the certificate's is refused.
    let server = TlsServer::start(true, false).await;
    let anonymous_cert = server.ca.client_cert(None);
    let mut c = server
        .client(Some(&anonymous_cert), Some(server.key(KEYONLY)))
        .await
        .unwrap();
    tokenize(&mut c, &common::test_pan(32)).await.unwrap();
    let checkout = server.ca.client_cert(Some(CHECKOUT_ID));
    let mut c = server
        .client(Some(&checkout), Some(server.key("payments")))
        .await
        .unwrap();
    let status = tokenize(&mut c, &common::test_pan(33)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut c = server
        .client(Some(&checkout), Some(server.key("checkout")))
        .await
        .unwrap();
    tokenize(&mut c, &common::test_pan(34)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_deployment_can_require_certificate_and_key() {
    let server = TlsServer::start(true, true).await;
    let checkout = server.ca.client_cert(Some(CHECKOUT_ID));
    let mut cert_only = server.client(Some(&checkout), None).await.unwrap();
    let status = tokenize(&mut cert_only, &common::test_pan(40))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let no_identity = server.ca.client_cert(None);
    let mut key_only = server
        .client(Some(&no_identity), Some(server.key(KEYONLY)))
        .await
        .unwrap();
    let status = tokenize(&mut key_only, &common::test_pan(41))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let mut both = server
        .client(Some(&checkout), Some(server.key("checkout")))
        .await
        .unwrap();
    tokenize(&mut both, &common::test_pan(42)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections() {
    let server = TlsServer::start(false, false).await;
    let key = server.key(KEYONLY).to_owned();
    let mut before = server.client(None, Some(&key)).await.unwrap();
    tokenize(&mut before, &common::test_pan(50)).await.unwrap();

    // New certificate from a new CA, swapped in place, then reloaded.
    let ca2 = Ca::new("second CA");
    let (cert, k) = ca2.server_cert();
    write(server.dir.path(), "server.pem", &cert);
    write(server.dir.path(), "server.key", &k);
    server.reloader.reload().unwrap();

    // New connections see the new certificate: trusting only the old CA fails...
    let old_trust = client_files(server.dir.path(), "old", &server.ca.pem, None);
    assert!(
        probe(&server.url(), &old_trust, &key).await.is_err(),
        "old CA still accepted after reload"
    );
    // ...trusting the new one works.
    let new_trust = client_files(server.dir.path(), "new", &ca2.pem, None);
    probe(&server.url(), &new_trust, &key).await.unwrap();
    // The established connection keeps serving.
    tokenize(&mut before, &common::test_pan(51)).await.unwrap();

    // A broken file fails the reload and keeps the current certificate.
    write(server.dir.path(), "server.pem", "not a certificate");
    assert!(server.reloader.reload().is_err());
    probe(&server.url(), &new_trust, &key).await.unwrap();
    server.stop().await;
}

/// One tokenize over a fresh connection.
async fn probe(url: &str, files: &ClientTlsFiles, key: &str) -> Result<(), String> {
    let mut c = connect(url, files, Some(key)).await?;
    tokenize(&mut c, &common::test_pan(99))
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A `tokenvault serve` child process; killed on drop if still running.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tokenvault serve` with `extra` args on 127.0.0.1:0 and waits (bounded) for its
/// "serving" log line, which carries the bound address.
fn spawn_serve(data_dir: &Path, key_file: &Path, extra: &[&str]) -> Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .arg("--master-key-file")
        .arg(key_file)
        .args(extra)
        .env_remove("TOKENVAULT_MASTER_KEY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "serving" {
                    let _ = tx.send(v["listen"].as_str().unwrap_or("").to_owned());
                }
            }
        }
    });
    let listen = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server did not report serving in time");
    Child {
        child,
        addr: listen.parse().unwrap(),
    }
}

#[tokio::test]
async fn sighup_reloads_a_serving_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let api_key = vault
        .add_client(&Caller::cli(), KEYONLY, &[Role::Tokenize], None)
        .await
        .unwrap();
    vault.close().await;

    let ca1 = Ca::new("first CA");
    let (c1, k1) = ca1.server_cert();
    let cert = write(dir.path(), "server.pem", &c1);
    let key = write(dir.path(), "server.key", &k1);
    let child = spawn_serve(
        &data,
        &key_file,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://{}", child.addr);
    let trust1 = client_files(dir.path(), "t1", &ca1.pem, None);
    let mut before = connect(&url, &trust1, Some(&api_key)).await.unwrap();
    tokenize(&mut before, &common::test_pan(60)).await.unwrap();

    let ca2 = Ca::new("second CA");
    let (c2, k2) = ca2.server_cert();
    write(dir.path(), "server.pem", &c2);
    write(dir.path(), "server.key", &k2);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.child.id() as i32, libc::SIGHUP) },
        0
    );

    let trust2 = client_files(dir.path(), "t2", &ca2.pem, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe(&url, &trust2, &api_key).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("reload not seen: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(probe(&url, &trust1, &api_key).await.is_err());
    // The process survived the signal and the old connection still works.
    tokenize(&mut before, &common::test_pan(61)).await.unwrap();

    // The CLI's client commands speak TLS too.
    let ca2_file = write(dir.path(), "ca2.pem", &ca2.pem);
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["health", "--addr", &url, "--tls-ca"])
        .arg(&ca2_file)
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");
    let tokenized = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["tokenize", "--addr", &url, "--tls-ca"])
        .arg(&ca2_file)
        .env("TOKENVAULT_API_KEY", &api_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(common::test_pan(62).as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(tokenized.status.success(), "{tokenized:?}");
    assert!(String::from_utf8_lossy(&tokenized.stdout).starts_with("tok_"));
    drop(child);
}

/// GET `path` on a plain-HTTP listener; the whole response (status line to body).
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            return body;
        }
        assert!(Instant::now() < deadline, "metrics listener not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The expiry gauge's value in an exposition, if present.
fn cert_expiry(exposition: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with("tokenvault_tls_certificate_expiry_timestamp_seconds "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A renewal (cert-manager rewriting a Secret, certbot replacing files) signals nobody: the
/// server must notice changed files by itself, keep the old pair while the new files are
/// broken or half-written, and publish the serving certificate's expiry.
#[tokio::test]
async fn changed_files_reload_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let api_key = vault
        .add_client(&Caller::cli(), KEYONLY, &[Role::Tokenize], None)
        .await
        .unwrap();
    vault.close().await;

    let ca1 = Ca::new("first CA");
    let (c1, k1) = ca1.server_cert();
    let cert = write(dir.path(), "server.pem", &c1);
    let key = write(dir.path(), "server.key", &k1);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let child = spawn_serve(
        &data,
        &key_file,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--metrics-listen",
            &metrics_addr.to_string(),
        ],
    );
    let url = format!("https://{}", child.addr);
    let trust1 = client_files(dir.path(), "t1", &ca1.pem, None);
    probe(&url, &trust1, &api_key).await.unwrap();
    let expiry1 = cert_expiry(&http_get(metrics_addr, "/metrics").await)
        .expect("no certificate expiry metric");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry1 > now, "expiry {expiry1} not in the future");

    // A broken certificate (a half-written renewal) is refused; the old pair keeps serving.
    write(
        dir.path(),
        "server.pem",
        "-----BEGIN CERTIFICATE-----\ntruncated",
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    probe(&url, &trust1, &api_key)
        .await
        .expect("a broken file replaced the serving certificate");

    // The renewal lands the way a Secret update does: new files renamed into place.
    let ca2 = Ca::new("second CA");
    let (c2, k2) = ca2.server_cert();
    let staged = write(dir.path(), "server.pem.new", &c2);
    std::fs::rename(&staged, &cert).unwrap();
    let staged = write(dir.path(), "server.key.new", &k2);
    std::fs::rename(&staged, &key).unwrap();
    let trust2 = client_files(dir.path(), "t2", &ca2.pem, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match probe(&url, &trust2, &api_key).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("changed files not reloaded: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert!(probe(&url, &trust1, &api_key).await.is_err());
    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(cert_expiry(&metrics).is_some(), "{metrics}");
    assert!(
        metrics.contains(r#"tokenvault_tls_reloads_total{outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tokenvault_tls_reloads_total{outcome="error"} 1"#),
        "{metrics}"
    );
    drop(child);
}
