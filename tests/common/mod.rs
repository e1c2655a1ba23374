//! Shared fixture of the gRPC integration tests: a vault in a temporary directory with known
//! principals, served on an ephemeral loopback port, and clients that send each principal's
//! API key. No fixed ports and no sleeps: the listener is bound before the server starts,
//! so clients can connect at once.

#![allow(dead_code)] // each test binary uses a different part of the fixture

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{with_auth, BearerAuth, Client};
use tokenvault::grpc::server::{serve, ServerConfig};
use tokenvault::vault::{Caller, Vault, VaultConfig};

pub const CHECKOUT: &str = "checkout";
pub const PAYMENTS: &str = "payments";
pub const DELETER: &str = "deleter";
/// Holds only `info`: may describe tokens and nothing else.
pub const AUDITOR: &str = "auditor";

/// Principals the fixture creates, with their roles.
pub const PRINCIPALS: [(&str, &[Role]); 4] = [
    (CHECKOUT, &[Role::Tokenize, Role::Info]),
    (PAYMENTS, &[Role::Detokenize, Role::Info]),
    (DELETER, &[Role::Delete]),
    (AUDITOR, &[Role::Info]),
];

pub struct TestServer {
    pub dir: TempDir,
    pub master: MasterKey,
    /// The server's vault (a clone shares its store).
    pub vault: Vault,
    pub addr: SocketAddr,
    /// API key of each principal in [`PRINCIPALS`], in that order.
    pub keys: Vec<(&'static str, String)>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<tokenvault::error::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(cfg: ServerConfig) -> TestServer {
        TestServer::start_with_vault(cfg, |_| {}).await
    }

    /// A server whose vault configuration `tune` adjusts (storage limits, timeouts).
    pub async fn start_with_vault(
        cfg: ServerConfig,
        tune: impl FnOnce(&mut VaultConfig),
    ) -> TestServer {
        TestServer::start_in(&std::env::temp_dir(), cfg, tune).await
    }

    /// As [`TestServer::start_with_vault`], with the data directory under `parent` (a
    /// filesystem the test controls).
    pub async fn start_in(
        parent: &std::path::Path,
        cfg: ServerConfig,
        tune: impl FnOnce(&mut VaultConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let master = MasterKey::generate();
        let mut vcfg = VaultConfig::new(dir.path().join("data"));
        tune(&mut vcfg);
        let vault = Vault::create(vcfg, &master).expect("create vault");
        let mut keys = Vec::new();
        for (name, roles) in PRINCIPALS {
            let key = vault
                .add_client(&Caller::cli(), name, roles, None)
                .await
                .expect("add client");
            keys.push((name, key));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, vault.clone(), cfg, async {
            let _ = rx.await;
        }));
        TestServer {
            dir,
            master,
            vault,
            addr,
            keys,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    pub fn key(&self, principal: &str) -> &str {
        &self
            .keys
            .iter()
            .find(|(n, _)| *n == principal)
            .expect("known principal")
            .1
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A client authenticated as `principal`.
    pub async fn client(&self, principal: &str) -> Client {
        self.client_with_key(Some(self.key(principal))).await
    }

    /// A client sending `key` verbatim as its API key, or no credentials at all.
    pub async fn client_with_key(&self, key: Option<&str>) -> Client {
        with_auth(
            self.channel().await,
            BearerAuth::new(key).expect("header-safe key"),
        )
    }

    /// Signals shutdown and waits for the server to drain and close the vault.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server result");
        }
    }

    /// Opens the vault again (after `shutdown`), as a restarted server would.
    pub fn reopen(&self) -> Vault {
        Vault::open(VaultConfig::new(self.data_dir()), &self.master).expect("reopen vault")
    }

    /// A second handle on the live vault, as an admin CLI process would open it.
    pub fn reopen_second(&self) -> Vault {
        Vault::open(VaultConfig::new(self.data_dir()), &self.master).expect("open second handle")
    }

    pub fn db(&self) -> rusqlite::Connection {
        let path = tokenvault::store::sqlite::db_path(&self.data_dir());
        let conn = rusqlite::Connection::open(path).expect("open db");
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }
}

/// A Luhn-valid 16-digit Visa-range test number derived from `n`.
pub fn test_pan(n: u64) -> String {
    let payload = format!("411111{n:09}");
    let check = tokenvault::card::luhn_check_digit(payload.as_bytes());
    format!("{payload}{}", check as char)
}

/// True when `text` contains a run of `min` or more digits (what a leaked PAN looks like).
pub fn has_digit_run(text: &str, min: usize) -> bool {
    let mut run = 0;
    for c in text.chars() {
        if c.is_ascii_digit() {
            run += 1;
            if run >= min {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

/// The tokenvault binary, with none of the test runner's `TOKENVAULT_*` settings nor
/// `RUST_LOG` (a developer's shell must not change what a test runs against) and stdin
/// closed. A test sets what it needs on the returned command.
pub fn tokenvault_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOKENVAULT_") {
            c.env_remove(name);
        }
    }
    c.env_remove("RUST_LOG").stdin(Stdio::null());
    c
}
