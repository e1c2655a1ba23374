//! `tokenvault serve` with a configuration file and Prometheus metrics, end to end: the file's
//! values are used, an environment variable beats the file and a flag beats both, and
//! `/metrics` (on its own listener) counts requests and group commits without ever showing a
//! card number, token or API key.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::test_pan;
use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{with_auth, BearerAuth, Client};
use tokenvault::grpc::pb;
use tokenvault::vault::{Caller, Vault, VaultConfig};

/// The binary with no inherited tokenvault or log settings.
fn tokenvault(cwd: &Path) -> Command {
    let mut cmd = common::tokenvault_command();
    cmd.current_dir(cwd);
    cmd
}

/// A vault with a master key file and one tokenize client; returns (data dir, key file,
/// API key).
async fn make_vault(dir: &Path) -> (PathBuf, PathBuf, String) {
    let data = dir.join("data");
    let key_file = dir.join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let api_key = vault
        .add_client(
            &Caller::cli(),
            "checkout",
            &[Role::Tokenize, Role::Info],
            None,
        )
        .await
        .unwrap();
    vault.close().await;
    (data, key_file, api_key)
}

/// A port nobody listens on right now (bind, read, release).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Spawns `cmd` (a `serve` command line) and waits for its "serving" line.
    fn start(mut cmd: Command) -> Server {
        let mut child = cmd
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.push_str(&line);
                log.push('\n');
                if line.contains("serving") {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                    {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Ok(addr.trim_matches('"').to_owned()));
                        }
                    }
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(log));
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => Server { child, addr },
            Ok(Err(log)) => {
                let _ = child.wait();
                panic!("serve exited before serving:\n{log}")
            }
            Err(_) => {
                let _ = child.kill();
                panic!("serve did not report serving in time")
            }
        }
    }

    async fn client(&self, api_key: &str) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        with_auth(channel, BearerAuth::new(Some(api_key)).unwrap())
    }
}

fn batch(n: u64) -> pb::TokenizeBatchRequest {
    pb::TokenizeBatchRequest {
        requests: (0..n)
            .map(|i| pb::TokenizeRequest {
                pan: test_pan(1000 + i),
                ..Default::default()
            })
            .collect(),
    }
}

/// Plain HTTP GET of `/metrics`; the body.
fn scrape(port: u16) -> String {
    let mut last_err = None;
    for _ in 0..100 {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).unwrap();
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                return text;
            }
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no metrics listener on {port}: {last_err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_a_config_file_serves_metrics_without_card_data() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key_file, api_key) = make_vault(dir.path()).await;
    let metrics_port = free_port();
    // Everything from the file: listen address, vault, limits, metrics.
    let config = dir.path().join("tokenvault.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = {data:?}\nmaster_key_file = {key_file:?}\n\
             [limits]\nmax_batch_items = 3\nrequest_timeout = \"20s\"\nreuse_rate = \"1/s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = tokenvault(dir.path());
    cmd.args(["serve", "--config"]).arg(&config);
    let server = Server::start(cmd);
    let mut client = server.client(&api_key).await;

    let pan = test_pan(42);
    let token = client
        .tokenize(pb::TokenizeRequest {
            pan: pan.clone(),
            ..Default::default()
        })
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    // The file's batch limit (3) is in force.
    let refused = client.tokenize_batch(batch(4)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("limit of 3"), "{refused:?}");
    // The file's reuse budget (1/s) is in force: two reuse items never fit.
    let mut two = batch(2);
    for r in &mut two.requests {
        r.reuse_existing = true;
    }
    let limited = client.tokenize_batch(two).await.unwrap_err();
    assert_eq!(
        limited.code(),
        tonic::Code::ResourceExhausted,
        "{limited:?}"
    );
    // A request without credentials.
    let mut anonymous = with_auth(
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        BearerAuth::new(None).unwrap(),
    );
    let unauthenticated = anonymous
        .get_token_info(pb::GetTokenInfoRequest {
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    let text = scrape(metrics_port);
    for needle in [
        r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Tokenize",grpc_code="OK"} 1"#,
        r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="TokenizeBatch",grpc_code="InvalidArgument"} 1"#,
        r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="GetTokenInfo",grpc_code="Unauthenticated"} 1"#,
        r#"tokenvault_rate_limit_rejections_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="TokenizeBatch"} 1"#,
        r#"tokenvault_rate_limit_rejections_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Detokenize"} 0"#,
        r#"tokenvault_grpc_request_duration_seconds_count{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Tokenize"} 1"#,
        "# TYPE tokenvault_store_group_commit_items histogram",
        "tokenvault_store_group_commit_items_count",
        "tokenvault_store_commit_duration_seconds_bucket",
        r#"tokenvault_store_commits_total{outcome="ok"}"#,
        // Refreshed from a background task (at start, then every few seconds).
        "tokenvault_key_active_version 1",
        r#"tokenvault_key_encryption_limit{version="1"} 1073741824"#,
        "tokenvault_audit_records_total ",
        "tokenvault_tokens_stored ",
        r#"tokenvault_key_encryptions_total{version="1"} "#,
        r#"tokenvault_key_age_seconds{version="1"} "#,
        "tokenvault_key_max_age_seconds ",
        "tokenvault_storage_bytes ",
        "tokenvault_build_info{",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    for secret in [pan.as_str(), token.as_str(), api_key.as_str(), "checkout"] {
        assert!(
            !text.contains(secret),
            "{secret:?} in the exposition:\n{text}"
        );
    }
    // The gRPC port does not serve the exposition, nor the metrics port gRPC.
    assert_ne!(server.addr, format!("127.0.0.1:{metrics_port}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key_file, api_key) = make_vault(dir.path()).await;
    let config = dir.path().join("tokenvault.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = {data:?}\nmaster_key_file = {key_file:?}\n\
             [limits]\nmax_batch_items = 3\n"
        ),
    )
    .unwrap();

    // (environment, flags) -> the batch limit in force.
    let cases: [(Option<&str>, &[&str], u64); 3] = [
        (None, &[], 3),
        (Some("4"), &[], 4),
        (Some("4"), &["--max-batch-items", "5"], 5),
    ];
    for (env, flags, limit) in cases {
        let mut cmd = tokenvault(dir.path());
        // The file named by TOKENVAULT_CONFIG.
        cmd.arg("serve")
            .args(flags)
            .env("TOKENVAULT_CONFIG", &config);
        if let Some(v) = env {
            cmd.env("TOKENVAULT_MAX_BATCH_ITEMS", v);
        }
        let server = Server::start(cmd);
        let mut client = server.client(&api_key).await;
        let ok = client.tokenize_batch(batch(limit)).await;
        assert!(ok.is_ok(), "{env:?} {flags:?}: {ok:?}");
        let refused = client.tokenize_batch(batch(limit + 1)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains(&format!("limit of {limit}")),
            "{env:?} {flags:?}: {refused:?}"
        );
    }
}

#[test]
fn serve_refuses_a_bad_config_file_before_doing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenvault.toml");
    std::fs::write(&config, "[limits]\nmax_bach_items = 3\n").unwrap();
    let out = tokenvault(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown field `max_bach_items`"),
        "{stderr}"
    );

    // A metrics address that collides with the gRPC one is refused too.
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:50999\"\n[metrics]\nlisten = \"127.0.0.1:50999\"\n",
    )
    .unwrap();
    let out = tokenvault(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("collides"));
    assert!(!dir.path().join("tokenvault-data").exists());
}
