//! `tokenvault.v1.AdminService` over real connections (issue 16): every admin operation
//! with an admin identity over mutual TLS (certificates generated here with rcgen), refusals
//! without the role, refusals of API keys alone when certificates are required, and the
//! audit trail naming the principal of every admin call. Everything on 127.0.0.1, ephemeral
//! ports, bounded waits.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::Code;

use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::admin::AdminRpc;
use tokenvault::grpc::client::{
    admin_with_auth, tls_endpoint, with_auth, AdminClient, BearerAuth, Client, ClientTlsFiles,
};
use tokenvault::grpc::pb;
use tokenvault::grpc::server::{serve, ServerConfig};
use tokenvault::grpc::tls::{TlsFiles, TlsReloader};
use tokenvault::vault::{Caller, Vault, VaultConfig};

const ROOT: &str = "root";
/// A second admin, for dual control.
const SECOND: &str = "second";
const KEYS: &str = "keys";
const CLIENTS: &str = "clients";
const AUDITOR: &str = "auditor";
const CHECKOUT: &str = "checkout";

fn id(name: &str) -> String {
    format!("spiffe://example.org/{name}")
}

/// Principals of the fixture: all bound to a certificate identity.
const PRINCIPALS: [(&str, &[Role]); 6] = [
    (ROOT, &[Role::Admin]),
    (SECOND, &[Role::Admin]),
    (KEYS, &[Role::KeysAdmin]),
    (CLIENTS, &[Role::ClientsAdmin]),
    (AUDITOR, &[Role::Auditor]),
    (CHECKOUT, &[Role::Tokenize, Role::Info, Role::Delete]),
];

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

fn tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct AdminServer {
    dir: TempDir,
    ca: Option<Ca>,
    master: MasterKey,
    vault: Vault,
    addr: SocketAddr,
    keys: Vec<(&'static str, String)>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<tokenvault::error::Result<()>>>,
}

impl AdminServer {
    /// With `mutual`, a TLS server whose CA also issues client certificates; otherwise
    /// plaintext (API keys only).
    async fn start(mutual: bool, require_cert_for_admin: bool) -> AdminServer {
        AdminServer::start_dual(mutual, require_cert_for_admin, None).await
    }

    async fn start_dual(
        mutual: bool,
        require_cert_for_admin: bool,
        dual_control: Option<Duration>,
    ) -> AdminServer {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate();
        let vault = Vault::create(VaultConfig::new(dir.path().join("data")), &master).unwrap();
        let mut keys = Vec::new();
        for (name, roles) in PRINCIPALS {
            let key = vault
                .add_client(&Caller::cli(), name, roles, Some(&id(name)))
                .await
                .unwrap();
            keys.push((name, key));
        }
        AdminServer::serve_on(
            dir,
            master,
            vault,
            keys,
            mutual,
            require_cert_for_admin,
            dual_control,
        )
        .await
    }

    /// Serves `vault` (in `dir`/data) whose principals' keys are `keys`.
    async fn serve_on(
        dir: TempDir,
        master: MasterKey,
        vault: Vault,
        keys: Vec<(&'static str, String)>,
        mutual: bool,
        require_cert_for_admin: bool,
        dual_control: Option<Duration>,
    ) -> AdminServer {
        let ca = mutual.then(|| Ca::new("tokenvault admin test CA"));
        let tls = ca.as_ref().map(|ca| {
            let (cert, key) = ca.server_cert();
            TlsReloader::new(TlsFiles {
                cert: write(dir.path(), "server.pem", &cert),
                key: write(dir.path(), "server.key", &key),
                client_ca: Some(write(dir.path(), "client-ca.pem", &ca.pem)),
            })
            .unwrap()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = ServerConfig {
            tls,
            require_cert_for_admin,
            dual_control,
            ..ServerConfig::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, vault.clone(), cfg, async {
            let _ = rx.await;
        }));
        AdminServer {
            dir,
            ca,
            master,
            vault,
            addr,
            keys,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    fn key(&self, name: &str) -> &str {
        &self.keys.iter().find(|(n, _)| *n == name).unwrap().1
    }

    async fn channel(&self, cert_of: Option<Option<&str>>) -> tonic::transport::Channel {
        let timeout = Duration::from_secs(10);
        let fut = async {
            match &self.ca {
                Some(ca) => {
                    let t = tag();
                    let cert = cert_of.map(|name| ca.client_cert(name.map(id).as_deref()));
                    let files = ClientTlsFiles {
                        ca: Some(write(self.dir.path(), &format!("{t}-ca.pem"), &ca.pem)),
                        cert: cert
                            .as_ref()
                            .map(|(c, _)| write(self.dir.path(), &format!("{t}-c.pem"), c)),
                        key: cert
                            .as_ref()
                            .map(|(_, k)| write(self.dir.path(), &format!("{t}-k.pem"), k)),
                        domain: None,
                    };
                    tls_endpoint(&format!("https://{}", self.addr), &files)
                        .unwrap()
                        .connect()
                        .await
                        .unwrap()
                }
                None => tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .expect("connect in time")
    }

    /// An admin client presenting the certificate of `name` (mutual TLS), no API key.
    async fn admin_by_cert(&self, name: &str) -> AdminClient {
        admin_with_auth(
            self.channel(Some(Some(name))).await,
            BearerAuth::new(None).unwrap(),
        )
    }

    /// An admin client sending `key`, presenting the certificate of `cert` if given.
    async fn admin_with(&self, cert: Option<Option<&str>>, key: Option<&str>) -> AdminClient {
        admin_with_auth(self.channel(cert).await, BearerAuth::new(key).unwrap())
    }

    async fn data_client(&self, name: &str) -> Client {
        let cert = self.ca.is_some().then_some(Some(name));
        with_auth(
            self.channel(cert).await,
            BearerAuth::new(self.ca.is_none().then(|| self.key(name))).unwrap(),
        )
    }

    async fn records(&self) -> Vec<tokenvault::audit::AuditRecord> {
        self.vault.audit_records(1, 1_000_000).await.unwrap()
    }

    /// Stops the server; returns its directory and master key for a later look.
    async fn stop(mut self) -> (TempDir, MasterKey) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
        (self.dir, self.master)
    }
}

async fn tokenize(client: &mut Client, n: u64) -> String {
    client
        .tokenize(pb::TokenizeRequest {
            pan: common::test_pan(n),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Bounded: a test never hangs on a call.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("call finished in time")
}

#[tokio::test]
async fn every_admin_operation_works_for_an_admin_over_mutual_tls() {
    let server = AdminServer::start(true, true).await;
    let mut data = server.data_client(CHECKOUT).await;
    let mut tokens = Vec::new();
    for n in 0..5 {
        tokens.push(tokenize(&mut data, n).await);
    }
    let mut admin = server.admin_by_cert(ROOT).await;

    // Status.
    let status = within(admin.get_status(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.version, tokenvault::VERSION);
    assert_eq!(status.store, "sqlite");
    assert!(!status.sealed && status.healthy);
    assert_eq!(status.keys.len(), 1);
    assert_eq!(status.keys[0].encryptions, 5);
    assert!(status.uptime.is_some());

    // Keys: list, rotate, rewrap with streamed progress, retire, revoke.
    let keys = within(admin.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].rows, 5);
    let rotated = within(admin.rotate_key(pb::RotateKeyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.active_version, 2);
    let mut stream = within(admin.rewrap_keys(pb::RewrapKeysRequest {
        batch: 1,
        from_version: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    let mut progress = Vec::new();
    let mut result = None;
    while let Some(msg) = within(stream.next()).await {
        match msg.unwrap().event.unwrap() {
            pb::rewrap_keys_response::Event::Progress(p) => progress.push(p),
            pb::rewrap_keys_response::Event::Result(r) => result = Some(r),
        }
    }
    let result = result.expect("the stream ends with the result");
    assert_eq!(result.rewrapped, 5);
    assert_eq!(result.active_version, 2);
    assert!(result.failed_tokens.is_empty());
    assert!(!progress.is_empty(), "progress was streamed");
    assert!(progress.iter().all(|p| p.total == 5 && p.done <= 5));
    assert!(progress.windows(2).all(|w| w[0].done <= w[1].done));
    let retired = within(admin.retire_key(pb::RetireKeyRequest { version: 1 }))
        .await
        .unwrap()
        .into_inner();
    assert!(retired.retired);
    let revoked = within(admin.revoke_key(pb::RevokeKeyRequest {
        version: 2,
        batch: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(revoked.rotated_to, 3);
    assert_eq!(revoked.rewrapped, 5);
    // Retiring the active version is a clear error, and changes nothing.
    let err = within(admin.retire_key(pb::RetireKeyRequest { version: 3 }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Clients: add (key shown once, and it works), list, revoke.
    let added = within(admin.add_client(pb::AddClientRequest {
        name: "reporting".into(),
        roles: vec!["info".into()],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(added.api_key.starts_with("tvk_"));
    let listed = within(admin.list_clients(pb::ListClientsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let reporting = listed
        .clients
        .iter()
        .find(|c| c.name == "reporting")
        .unwrap();
    assert_eq!(reporting.roles, vec!["info".to_owned()]);
    assert!(reporting.revoked_at.is_none());
    assert!(
        !format!("{listed:?}").contains(&added.api_key[4..]),
        "keys are never listed"
    );
    let revoked = within(admin.revoke_client(pb::RevokeClientRequest {
        name: "reporting".into(),
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(revoked.revoked);

    // Check, purge.
    let check = within(admin.check(pb::CheckRequest {
        full: true,
        sample: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(check.ok, "{check:?}");
    assert_eq!(check.rows_checked, 5);
    data.delete_token(pb::DeleteTokenRequest {
        token: tokens[0].clone(),
    })
    .await
    .unwrap();
    let purge = pb::PurgeRequest {
        deleted: true,
        older_than: Some(prost_types::Duration::default()),
        dry_run: true,
        ..Default::default()
    };
    let dry = within(admin.purge(purge)).await.unwrap().into_inner();
    assert!(dry.dry_run);
    assert_eq!(dry.deleted_to_remove, 1);
    let done = within(admin.purge(pb::PurgeRequest {
        dry_run: false,
        ..purge
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(done.deleted_removed, 1);

    // Backup streamed to the caller: the bytes restore into a working vault.
    let mut stream = within(admin.backup(pb::BackupRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut total = None;
    while let Some(msg) = within(stream.next()).await {
        let msg = msg.unwrap();
        if total.is_none() {
            total = Some(msg.total_bytes);
        }
        bytes.extend_from_slice(&msg.data);
    }
    assert_eq!(total, Some(bytes.len() as u64));
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    let restore_dir = tempfile::tempdir().unwrap();
    let file = restore_dir.path().join("backup.db");
    std::fs::write(&file, &bytes).unwrap();
    let report = Vault::restore(
        &Caller::cli(),
        &file,
        &restore_dir.path().join("data"),
        &server.master,
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.tokens, 4);
    // No scratch copy of the backup is left on the server's side.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("tokenvault-backup-")
        })
        .filter(|e| std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Audit: verify, tail, export.
    let verified = within(admin.verify_audit(pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    let tail = within(admin.tail_audit(pb::TailAuditRequest { lines: 3 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tail.records.len(), 3);
    assert_eq!(tail.records[2].action, "admin_verify_audit");
    assert_eq!(tail.records[2].principal, ROOT);
    let mut stream = within(admin.export_audit(pb::ExportAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(msg) = within(stream.next()).await {
        lines.extend(msg.unwrap().lines);
    }
    let records = server.records().await;
    // Everything up to the export's own record (written before the first page).
    assert!(
        lines.len() + 1 >= records.len() - 1,
        "{} {}",
        lines.len(),
        records.len()
    );
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["event"]["sequence"].is_u64(), "{line}");
    }
    // Filtered export: only this action.
    let mut stream = within(admin.export_audit(pb::ExportAuditRequest {
        action: "admin_rotate_key".into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let mut filtered = Vec::new();
    while let Some(msg) = within(stream.next()).await {
        filtered.extend(msg.unwrap().lines);
    }
    assert_eq!(filtered.len(), 1);

    // The trail names the principal of every admin call, one record per method.
    let records = server.records().await;
    for rpc in AdminRpc::ALL {
        if matches!(
            rpc,
            AdminRpc::ListAdminRequests | AdminRpc::ApproveAdminRequest
        ) {
            continue; // dual control: see dual_control_needs_a_second_admin_within_the_window
        }
        let r = records
            .iter()
            .find(|r| r.action == rpc.audit_action())
            .unwrap_or_else(|| panic!("{rpc:?} not audited"));
        assert_eq!(r.principal, ROOT, "{rpc:?}");
        assert_ne!(r.peer, "local");
    }
    // And the domain records of the changes carry the admin too, not a local OS user.
    for action in ["key_rotate", "client_add", "client_revoke", "backup"] {
        let r = records
            .iter()
            .rev()
            .find(|r| r.action == action)
            .unwrap_or_else(|| panic!("no {action} record"));
        assert_eq!(r.principal, ROOT, "{action}");
    }
    // Nothing a card number looks like, anywhere in what the admin saw.
    for line in &lines {
        for n in 0..5 {
            assert!(!line.contains(&common::test_pan(n)), "{line}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn admin_calls_are_refused_without_the_role_and_audited() {
    let server = AdminServer::start(true, true).await;

    // A data-plane principal with a perfectly good certificate.
    let mut checkout = server.admin_by_cert(CHECKOUT).await;
    let err = within(checkout.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = within(checkout.get_status(pb::GetStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The auditor reads the trail and nothing else.
    let mut auditor = server.admin_by_cert(AUDITOR).await;
    within(auditor.tail_audit(pb::TailAuditRequest { lines: 5 }))
        .await
        .unwrap();
    within(auditor.verify_audit(pb::VerifyAuditRequest::default()))
        .await
        .unwrap();
    for status in [
        within(auditor.rotate_key(pb::RotateKeyRequest {}))
            .await
            .map(|_| ()),
        within(auditor.list_clients(pb::ListClientsRequest {}))
            .await
            .map(|_| ()),
        within(auditor.backup(pb::BackupRequest {}))
            .await
            .map(|_| ()),
    ] {
        assert_eq!(status.unwrap_err().code(), Code::PermissionDenied);
    }

    // Keys admins manage keys, not clients.
    let mut keys = server.admin_by_cert(KEYS).await;
    within(keys.rotate_key(pb::RotateKeyRequest {}))
        .await
        .unwrap();
    let err = within(keys.add_client(pb::AddClientRequest {
        name: "x".into(),
        roles: vec!["detokenize".into()],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = within(keys.purge(pb::PurgeRequest {
        deleted: true,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A clients admin adds data-plane clients, but cannot mint (or remove) admins.
    let mut clients = server.admin_by_cert(CLIENTS).await;
    within(clients.add_client(pb::AddClientRequest {
        name: "reporting".into(),
        roles: vec!["info".into()],
        ..Default::default()
    }))
    .await
    .unwrap();
    for roles in [vec!["admin"], vec!["info", "keys-admin"], vec!["auditor"]] {
        let err = within(clients.add_client(pb::AddClientRequest {
            name: "escalate".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            cert_identity: id(CLIENTS) + "-2",
            ..Default::default()
        }))
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{roles:?}");
    }
    let err = within(clients.revoke_client(pb::RevokeClientRequest { name: ROOT.into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let names: Vec<String> = server
        .vault
        .list_clients()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.revoked_at.is_none())
        .map(|c| c.name)
        .collect();
    assert!(!names.contains(&"escalate".to_owned()));
    assert!(names.contains(&ROOT.to_owned()));

    // A certificate of the CA that is bound to nobody.
    let mut stranger = server.admin_with(Some(Some("stranger")), None).await;
    let err = within(stranger.get_status(pb::GetStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Refusals are in the trail with the principal that was refused.
    let records = server.records().await;
    let refused = |principal: &str, action: &str, outcome: &str| {
        records
            .iter()
            .any(|r| r.principal == principal && r.action == action && r.outcome == outcome)
    };
    assert!(refused(CHECKOUT, "admin_list_keys", "PERMISSION_DENIED"));
    assert!(refused(AUDITOR, "admin_rotate_key", "PERMISSION_DENIED"));
    assert!(refused(KEYS, "admin_add_client", "PERMISSION_DENIED"));
    assert!(refused(CLIENTS, "admin_add_client", "PERMISSION_DENIED"));
    assert!(refused("anonymous", "admin_get_status", "UNAUTHENTICATED"));
    server.stop().await;
}

#[tokio::test]
async fn an_api_key_alone_is_refused_when_certificates_are_required() {
    // Plaintext, certificates required for admin (the default outside --dev).
    let server = AdminServer::start(false, true).await;
    let mut by_key = server.admin_with(None, Some(server.key(ROOT))).await;
    let err = within(by_key.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("certificate"), "{}", err.message());
    let err = within(by_key.rotate_key(pb::RotateKeyRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        server.vault.list_keys().await.unwrap().len(),
        1,
        "nothing rotated"
    );
    // The data plane is unaffected: API keys still work there.
    let mut data = server.data_client(CHECKOUT).await;
    tokenize(&mut data, 1).await;
    let records = server.records().await;
    assert!(records.iter().any(|r| r.principal == ROOT
        && r.action == "admin_rotate_key"
        && r.outcome == "UNAUTHENTICATED"));
    server.stop().await;

    // Mutual TLS: a CA certificate bound to nobody does not make an admin key acceptable,
    // nor does a data-plane principal's certificate with the admin's key.
    let server = AdminServer::start(true, true).await;
    let mut unbound = server.admin_with(Some(None), Some(server.key(ROOT))).await;
    let err = within(unbound.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut mixed = server
        .admin_with(Some(Some(CHECKOUT)), Some(server.key(ROOT)))
        .await;
    let err = within(mixed.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // The admin's own certificate, with or without its key, is accepted.
    let mut both = server
        .admin_with(Some(Some(ROOT)), Some(server.key(ROOT)))
        .await;
    within(both.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap();
    server.stop().await;

    // With --require-cert-for-admin=false (as in --dev) the key alone is enough.
    let server = AdminServer::start(false, false).await;
    let mut by_key = server.admin_with(None, Some(server.key(ROOT))).await;
    within(by_key.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap();
    let mut nobody = server.admin_with(None, None).await;
    let err = within(nobody.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Still no admin rights for a data-plane key.
    let mut data_key = server.admin_with(None, Some(server.key(CHECKOUT))).await;
    let err = within(data_key.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn bad_admin_input_is_a_clear_error_and_changes_nothing() {
    let server = AdminServer::start(true, true).await;
    let mut admin = server.admin_by_cert(ROOT).await;
    let before = server.vault.list_clients().await.unwrap().len();
    for req in [
        pb::AddClientRequest {
            name: "x".into(),
            roles: vec!["superuser".into()],
            ..Default::default()
        },
        pb::AddClientRequest {
            name: "x".into(),
            roles: vec![],
            ..Default::default()
        },
        pb::AddClientRequest {
            name: "bad name with spaces".into(),
            roles: vec!["info".into()],
            ..Default::default()
        },
        pb::AddClientRequest {
            name: "x".into(),
            roles: vec!["info".into()],
            detokenize_rate: f64::INFINITY,
            ..Default::default()
        },
    ] {
        let err = within(admin.add_client(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let err = within(admin.add_client(pb::AddClientRequest {
        name: ROOT.into(),
        roles: vec!["info".into()],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(server.vault.list_clients().await.unwrap().len(), before);
    let err = within(admin.purge(pb::PurgeRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = within(admin.tail_audit(pb::TailAuditRequest { lines: u32::MAX }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = within(admin.verify_audit(pb::VerifyAuditRequest {
        public_keys: vec!["nonsense".into()],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut rewrap = within(admin.rewrap_keys(pb::RewrapKeysRequest {
        batch: 0,
        from_version: 7,
    }))
    .await
    .unwrap()
    .into_inner();
    let err = within(rewrap.next()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Refused outcomes are audited with their code.
    let records = server.records().await;
    assert!(records
        .iter()
        .any(|r| r.action == "admin_add_client" && r.outcome == "INVALID_ARGUMENT"));
    server.stop().await;
}

#[tokio::test]
async fn init_creates_the_first_admin_so_a_fresh_vault_is_administered_remotely() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    for var in [
        "TOKENVAULT_DATA_DIR",
        "TOKENVAULT_MASTER_KEY_FILE",
        "TOKENVAULT_MASTER_KEY",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    let root_id = id(ROOT);
    let out = cmd
        .current_dir(dir.path())
        .args([
            "init",
            "--data-dir",
            "data",
            "--generate-master-key",
            "master.key",
        ])
        .args(["--admin", ROOT, "--admin-cert-identity", &root_id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = text
        .lines()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("tvk_")))
        .expect("the admin key is printed")
        .to_owned();
    assert_eq!(text.matches("tvk_").count(), 1, "printed once");

    let master = MasterKey::load_file(&dir.path().join("master.key")).unwrap();
    let vault = Vault::open(VaultConfig::new(dir.path().join("data")), &master).unwrap();
    let clients = vault.list_clients().await.unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].name, ROOT);
    assert_eq!(clients[0].roles, vec![Role::Admin]);
    assert_eq!(clients[0].cert_identity.as_deref(), Some(root_id.as_str()));

    let server =
        AdminServer::serve_on(dir, master, vault, vec![(ROOT, key)], true, true, None).await;
    let mut admin = server.admin_by_cert(ROOT).await;
    within(admin.list_keys(pb::ListKeysRequest {}))
        .await
        .unwrap();
    // The admin brings in everyone else remotely; the master key never left the server.
    let added = within(admin.add_client(pb::AddClientRequest {
        name: CHECKOUT.into(),
        roles: vec!["tokenize".into()],
        cert_identity: id(CHECKOUT),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(added.api_key.starts_with("tvk_"));
    let mut data = server.data_client(CHECKOUT).await;
    tokenize(&mut data, 7).await;
    server.stop().await;

    // A bad admin name is a usage error before anything is created.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .env_remove("TOKENVAULT_MASTER_KEY")
        .current_dir(dir.path())
        .args(["init", "--data-dir", "data", "--generate-master-key", "k"])
        .args(["--admin", "bad name"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.path().join("data").exists());
    assert!(!dir.path().join("k").exists());
}

/// Runs the binary off the async runtime (the server shares it); returns stdout, asserting
/// success.
async fn cli(cwd: &Path, args: Vec<String>) -> String {
    let cwd = cwd.to_owned();
    let shown = args.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"));
        for var in [
            "TOKENVAULT_DATA_DIR",
            "TOKENVAULT_MASTER_KEY_FILE",
            "TOKENVAULT_MASTER_KEY",
            "TOKENVAULT_ADDR",
            "TOKENVAULT_API_KEY",
            "TOKENVAULT_TLS_CA",
            "TOKENVAULT_CLIENT_TLS_CERT",
            "TOKENVAULT_CLIENT_TLS_KEY",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd.current_dir(&cwd).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown:?}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn the_cli_prints_the_same_in_remote_and_local_mode() {
    let server = AdminServer::start(true, true).await;
    let dir = server.dir.path().to_owned();
    server
        .master
        .write_new_file(&dir.join("master.key"))
        .unwrap();
    let ca = server.ca.as_ref().unwrap();
    write(&dir, "trust.pem", &ca.pem);
    let (cert, key) = ca.client_cert(Some(&id(ROOT)));
    write(&dir, "root.pem", &cert);
    write(&dir, "root.key", &key);
    let mut data = server.data_client(CHECKOUT).await;
    let mut tokens = Vec::new();
    for n in 0..3 {
        tokens.push(tokenize(&mut data, n).await);
    }
    server.vault.rotate_key(&Caller::cli()).await.unwrap();

    let remote = |cmd: &[&str]| {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "--addr",
                &format!("https://{}", server.addr),
                "--tls-ca",
                "trust.pem",
                "--tls-cert",
                "root.pem",
                "--tls-key",
                "root.key",
            ]
            .map(String::from),
        );
        args
    };
    let local = |cmd: &[&str]| {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(["--data-dir", "data", "--master-key-file", "master.key"].map(String::from));
        args
    };
    for cmd in [
        &["keys", "list"][..],
        &["clients", "list"],
        &["clients", "list", "--json"],
        &["audit", "verify"],
        &["audit", "verify", "--json"],
        &["check", "--full"],
        &["check", "--full", "--json"],
    ] {
        // Remote first: its audit record precedes the walk, so the local verification
        // right after walks the same trail.
        let by_server = cli(&dir, remote(cmd)).await;
        let by_database = cli(&dir, local(cmd)).await;
        assert_eq!(by_server, by_database, "{cmd:?}");
        assert!(!by_server.is_empty(), "{cmd:?}");
    }
    // Sanity: the remote run did go through the server (its audit records say so).
    let records = server.records().await;
    for action in [
        "admin_list_keys",
        "admin_list_clients",
        "admin_verify_audit",
        "admin_check",
    ] {
        assert!(
            records
                .iter()
                .any(|r| r.action == action && r.principal == ROOT),
            "{action}"
        );
    }

    // Remote changes print what local ones print.
    let out = cli(&dir, remote(&["keys", "rotate"])).await;
    assert_eq!(out, "active data key is now version 3\n");
    let out = cli(&dir, remote(&["keys", "rewrap", "--batch", "1", "--json"])).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rewrapped"], 3);
    assert_eq!(v["active_version"], 3);
    let out = cli(
        &dir,
        remote(&["clients", "add", "reporting", "--roles", "info"]),
    )
    .await;
    assert!(
        out.trim().starts_with("tvk_") && out.lines().count() == 1,
        "{out}"
    );
    let out = cli(&dir, remote(&["clients", "revoke", "reporting"])).await;
    assert_eq!(out, "revoked reporting\n");
    let out = cli(&dir, remote(&["audit", "tail", "-n", "2"])).await;
    assert!(
        out.contains("admin_revoke_client") && out.contains(ROOT),
        "{out}"
    );
    let exported = cli(
        &dir,
        remote(&["audit", "export", "--action", "admin_rotate_key"]),
    )
    .await;
    assert_eq!(exported.lines().count(), 1, "{exported}");
    data.delete_token(pb::DeleteTokenRequest {
        token: tokens[0].clone(),
    })
    .await
    .unwrap();
    let purge = ["purge", "--deleted", "--older-than", "0s", "--json"];
    let out = cli(&dir, remote(&[&purge[..], &["--dry-run"]].concat())).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deleted_to_remove"], 1, "{out}");
    let out = cli(&dir, remote(&[&purge[..], &["--yes"]].concat())).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deleted_removed"], 1, "{out}");
    let out = cli(&dir, remote(&["backup", "--out", "remote.db"])).await;
    assert!(out.starts_with("backup written to remote.db ("), "{out}");
    assert!(std::fs::read(dir.join("remote.db"))
        .unwrap()
        .starts_with(b"SQLite format 3\0"));
    server.stop().await;
}

fn key_state(keys: &[tokenvault::vault::KeyVersionInfo], v: u32) -> tokenvault::vault::KeyState {
    keys.iter().find(|k| k.version == v).unwrap().state
}

#[tokio::test]
async fn dual_control_needs_a_second_admin_within_the_window() {
    use tokenvault::vault::KeyState;
    let server = AdminServer::start_dual(true, true, Some(Duration::from_secs(3600))).await;
    let mut data = server.data_client(CHECKOUT).await;
    tokenize(&mut data, 1).await;
    let mut root = server.admin_by_cert(ROOT).await;
    let mut second = server.admin_by_cert(SECOND).await;

    // A revocation becomes a request; nothing happens yet.
    let pending = within(root.revoke_key(pb::RevokeKeyRequest {
        version: 1,
        batch: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    let id = pending.pending_request_id.clone();
    assert!(id.starts_with("req_"), "{pending:?}");
    // Review finding: a tokenize-only client joining a reuse group is a card oracle on that
    // group's tokens: it waits for a second admin too, and gets no key yet.
    let grouped = within(root.add_client(pb::AddClientRequest {
        name: "grouped".into(),
        roles: vec!["tokenize".into()],
        reuse_group: "checkout-group".into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(grouped.api_key.is_empty(), "{grouped:?}");
    assert!(
        grouped.pending_request_id.starts_with("req_"),
        "{grouped:?}"
    );
    assert!(server
        .vault
        .list_clients()
        .await
        .unwrap()
        .iter()
        .all(|c| c.name != "grouped"));
    let keys = server.vault.list_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(key_state(&keys, 1), KeyState::Active);

    // The requester cannot approve its own request.
    let err = within(root.approve_admin_request(pb::ApproveAdminRequestRequest { id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        key_state(&server.vault.list_keys().await.unwrap(), 1),
        KeyState::Active
    );

    // A keys admin may not approve a client, nor an auditor anything.
    let mut auditor = server.admin_by_cert(AUDITOR).await;
    let err =
        within(auditor.approve_admin_request(pb::ApproveAdminRequestRequest { id: id.clone() }))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A second admin approves, and the revocation runs.
    let approved =
        within(second.approve_admin_request(pb::ApproveAdminRequestRequest { id: id.clone() }))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(approved.request.as_ref().unwrap().requester, ROOT);
    assert_eq!(approved.request.as_ref().unwrap().approver, SECOND);
    match approved.outcome.unwrap() {
        pb::approve_admin_request_response::Outcome::RevokeKey(k) => {
            assert_eq!(k.rotated_to, 2);
            assert_eq!(k.rewrapped, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        key_state(&server.vault.list_keys().await.unwrap(), 1),
        KeyState::Retired
    );
    // Once only.
    let err =
        within(second.approve_admin_request(pb::ApproveAdminRequestRequest { id: id.clone() }))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A client that may detokenize is a request too; one that may not is added at once.
    let direct = within(root.add_client(pb::AddClientRequest {
        name: "reporting".into(),
        roles: vec!["info".into()],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(direct.api_key.starts_with("tvk_") && direct.pending_request_id.is_empty());
    let pending = within(root.add_client(pb::AddClientRequest {
        name: "payments".into(),
        roles: vec!["detokenize".into()],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(pending.api_key.is_empty());
    let client_id = pending.pending_request_id;
    let names = |clients: Vec<tokenvault::vault::ClientInfo>| {
        clients.into_iter().map(|c| c.name).collect::<Vec<_>>()
    };
    assert!(!names(server.vault.list_clients().await.unwrap()).contains(&"payments".to_owned()));
    // A new admin would let one person approve their own requests: a request too.
    let sock_puppet = within(root.add_client(pb::AddClientRequest {
        name: "root-too".into(),
        roles: vec!["admin".into()],
        cert_identity: "spiffe://example.org/root-too".into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(sock_puppet.api_key.is_empty() && !sock_puppet.pending_request_id.is_empty());
    assert!(!names(server.vault.list_clients().await.unwrap()).contains(&"root-too".to_owned()));
    let mut keys_admin = server.admin_by_cert(KEYS).await;
    let err = within(
        keys_admin.approve_admin_request(pb::ApproveAdminRequestRequest {
            id: client_id.clone(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a keys admin may not add clients"
    );
    let listed = within(second.list_admin_requests(pb::ListAdminRequestsRequest {}))
        .await
        .unwrap()
        .into_inner();
    // The revocation, the reuse-group client and the detokenize client requests.
    assert_eq!(listed.requests.len(), 4);
    assert!(listed
        .requests
        .iter()
        .any(|r| r.id == client_id && r.approver.is_empty()));
    let mut clients_admin = server.admin_by_cert(CLIENTS).await;
    let approved = within(
        clients_admin.approve_admin_request(pb::ApproveAdminRequestRequest {
            id: client_id.clone(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    match approved.outcome.unwrap() {
        pb::approve_admin_request_response::Outcome::AddClient(c) => {
            assert!(c.api_key.starts_with("tvk_"));
            assert!(
                !format!("{c:?}").contains(&c.api_key[4..]),
                "Debug redacts the key"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(names(server.vault.list_clients().await.unwrap()).contains(&"payments".to_owned()));

    // Both principals are in the trail: the request, the refused self-approval, the approval.
    let records = server.records().await;
    let has = |principal: &str, action: &str, subject: &str, outcome: &str| {
        records.iter().any(|r| {
            r.principal == principal
                && r.action == action
                && r.subject == subject
                && r.outcome == outcome
        })
    };
    assert!(has(ROOT, "admin_request", &id, "OK"));
    assert!(has(ROOT, "admin_approve_request", &id, "PERMISSION_DENIED"));
    assert!(has(SECOND, "admin_approve", &id, "OK"));
    assert!(has(SECOND, "admin_approve_request", &id, "OK"));
    assert!(has(CLIENTS, "admin_approve", &client_id, "OK"));
    let (dir, master) = server.stop().await;

    // Requests are persisted in the vault.
    let vault = Vault::open(VaultConfig::new(dir.path().join("data")), &master).unwrap();
    let rows = vault.admin_requests().await.unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows.iter().filter(|r| r.approver.is_some()).count(), 2);
    vault.close().await;
}

#[tokio::test]
async fn an_expired_request_cannot_be_approved() {
    use tokenvault::vault::KeyState;
    let server = AdminServer::start_dual(true, true, Some(Duration::from_millis(1))).await;
    let mut root = server.admin_by_cert(ROOT).await;
    let mut second = server.admin_by_cert(SECOND).await;
    let id = within(root.revoke_key(pb::RevokeKeyRequest {
        version: 1,
        batch: 0,
    }))
    .await
    .unwrap()
    .into_inner()
    .pending_request_id;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = within(second.approve_admin_request(pb::ApproveAdminRequestRequest { id }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(
        key_state(&server.vault.list_keys().await.unwrap(), 1),
        KeyState::Active
    );
    server.stop().await;
}

#[tokio::test]
async fn the_cli_requests_and_a_second_admin_approves() {
    let server = AdminServer::start_dual(true, true, Some(Duration::from_secs(3600))).await;
    let dir = server.dir.path().to_owned();
    let ca = server.ca.as_ref().unwrap();
    write(&dir, "trust.pem", &ca.pem);
    for name in [ROOT, SECOND] {
        let (cert, key) = ca.client_cert(Some(&id(name)));
        write(&dir, &format!("{name}.pem"), &cert);
        write(&dir, &format!("{name}.key"), &key);
    }
    let as_admin = |name: &str, cmd: &[&str]| {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--addr".to_owned(),
            format!("https://{}", server.addr),
            "--tls-ca".to_owned(),
            "trust.pem".to_owned(),
            "--tls-cert".to_owned(),
            format!("{name}.pem"),
            "--tls-key".to_owned(),
            format!("{name}.key"),
        ]);
        args
    };
    let out = cli(&dir, as_admin(ROOT, &["keys", "revoke", "1"])).await;
    let req = out.trim().to_owned();
    assert!(req.starts_with("req_") && out.lines().count() == 1, "{out}");
    let out = cli(&dir, as_admin(SECOND, &["admin", "requests"])).await;
    assert!(
        out.contains(&req) && out.contains("revoke_key") && out.contains(ROOT),
        "{out}"
    );
    let out = cli(&dir, as_admin(SECOND, &["admin", "approve", &req])).await;
    assert!(
        out.starts_with(&format!("approved {req} of {ROOT}")),
        "{out}"
    );
    let keys = server.vault.list_keys().await.unwrap();
    assert_eq!(key_state(&keys, 1), tokenvault::vault::KeyState::Retired);
    server.stop().await;
}
