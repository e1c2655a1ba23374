//! Storage faults against a real server: a full disk, a database locked by another process,
//! a damaged database file, and wrong or missing master keys. Each promise in the README's
//! "Guarantees" has a test here that fails if the promise breaks.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokenvault::grpc::pb;
use tokenvault::grpc::server::ServerConfig;
use tokenvault::vault::{Caller, PurgeOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn tokenize_req(pan: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        pan: pan.into(),
        ..Default::default()
    }
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut h = HealthClient::new(server.channel().await);
    let resp = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    resp.into_inner().status()
}

/// Polls `f` until it returns true, for at most `limit`.
async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn token_rows(server: &TestServer) -> i64 {
    server
        .db()
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn full_storage_refuses_tokenize_keeps_detokenize_and_recovers_after_purge() {
    let mut server = TestServer::start_with_vault(ServerConfig::default(), |v| {
        v.max_storage_bytes = Some(4 * 1024 * 1024);
    })
    .await;
    let mut checkout = server.client(CHECKOUT).await;
    let mut payments = server.client(PAYMENTS).await;

    // The first tokens expire soon: purging them later is how space gets freed.
    let expiry = std::time::SystemTime::now() + Duration::from_secs(3);
    let expires_at = Some(prost_types::Timestamp::from(expiry));
    let mut tokens = Vec::new();
    let mut n = 0;
    let exhausted = loop {
        let short_lived = n < 4000;
        let batch = pb::TokenizeBatchRequest {
            requests: (0..500)
                .map(|i| pb::TokenizeRequest {
                    pan: test_pan(n + i),
                    expires_at: if short_lived { expires_at } else { None },
                    ..Default::default()
                })
                .collect(),
        };
        n += 500;
        let results = checkout
            .tokenize_batch(batch)
            .await
            .unwrap()
            .into_inner()
            .results;
        let mut full = None;
        for r in results {
            match r.outcome.unwrap() {
                pb::tokenize_batch_result::Outcome::Success(ok) if !short_lived => {
                    tokens.push(ok.token)
                }
                pb::tokenize_batch_result::Outcome::Success(_) => {}
                pb::tokenize_batch_result::Outcome::Error(e) => full = Some(e),
            }
        }
        if let Some(e) = full {
            break e;
        }
        assert!(n < 100_000, "the storage limit never took effect");
    };
    assert_eq!(
        exhausted.code,
        Code::ResourceExhausted as i32,
        "{}",
        exhausted.message
    );

    // Single tokenize: RESOURCE_EXHAUSTED, not INTERNAL, not a hang; nothing partial stored.
    // The limit counts the WAL, which a checkpoint can shrink a moment after the batch was
    // refused, so a few more may fit: keep filling until a single tokenize is refused.
    let mut extra = 0u64;
    let err = loop {
        let rows = token_rows(&server);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            checkout.tokenize(tokenize_req(&test_pan(999_999 + extra))),
        )
        .await
        .expect("tokenize hung on a full store");
        match r {
            Err(err) => {
                assert_eq!(token_rows(&server), rows, "a refused tokenize stored a row");
                break err;
            }
            Ok(_) => {
                extra += 1;
                assert!(extra < 5_000, "single tokenizes never reached the limit");
            }
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(!has_digit_run(err.message(), 12));

    // Reveals still work: their audit records use the headroom kept for them.
    for t in tokens.iter().take(20) {
        let r = payments
            .detokenize(pb::DetokenizeRequest {
                token: t.clone(),
                reason: "charge".into(),
            })
            .await;
        assert!(
            r.is_ok(),
            "detokenize failed on a full store: {:?}",
            r.err()
        );
    }

    // Free space as an operator would: once the short-lived tokens expired, purge them with
    // a second handle on the live vault (what the CLI does).
    let wait = expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let admin = server.reopen_second();
    let opts = PurgeOptions {
        deleted: false,
        expired: true,
        older_than: Some(Duration::ZERO),
        batch: 1000,
    };
    let report = admin.purge(&Caller::cli(), &opts).await.unwrap();
    assert_eq!(report.expired, 4000);
    admin.close().await;
    // Without a restart, tokenize works again, once the WAL the purge wrote (which counts
    // against the limit) has been checkpointed and reset.
    let mut n = 1_000_001;
    assert!(
        eventually(Duration::from_secs(5), async || {
            n += 1;
            checkout.tokenize(tokenize_req(&test_pan(n))).await.is_ok()
        })
        .await,
        "tokenize did not recover after purge"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn locked_database_is_unavailable_not_serving_and_recovers() {
    let mut server = TestServer::start_with_vault(ServerConfig::default(), |v| {
        v.busy_timeout = Duration::from_millis(200);
    })
    .await;
    let mut checkout = server.client(CHECKOUT).await;
    checkout.tokenize(tokenize_req(&test_pan(1))).await.unwrap();
    assert_eq!(health(&server).await, ServingStatus::Serving);

    // Another process takes the write lock and keeps it.
    let locker = server.db();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = checkout
        .tokenize(tokenize_req(&test_pan(2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(!has_digit_run(err.message(), 12));
    assert!(
        eventually(Duration::from_secs(5), async || health(&server).await
            == ServingStatus::NotServing)
        .await,
        "health stayed SERVING while storage was locked"
    );

    locker.execute_batch("ROLLBACK").unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || health(&server).await
            == ServingStatus::Serving)
        .await,
        "health did not recover"
    );
    checkout.tokenize(tokenize_req(&test_pan(3))).await.unwrap();
    server.shutdown().await;
}

// ---- the binary refuses to start on bad storage or bad keys ----

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    c.env_remove("TOKENVAULT_MASTER_KEY")
        .env_remove("TOKENVAULT_MASTER_KEY_FILE")
        .env_remove("TOKENVAULT_DATA_DIR")
        .env_remove("RUST_LOG");
    c
}

/// Runs `serve` on an ephemeral loopback port and expects it to refuse to start.
fn serve_refuses(
    data: &std::path::Path,
    key_args: &[&str],
    envs: &[(&str, &str)],
) -> (i32, String) {
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(key_args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "serve started: {stderr}");
    assert!(!stderr.contains("serving"), "serve bound a port: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn init_vault(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let key = dir.join("master.key");
    let out = bin()
        .args(["init", "--data-dir"])
        .arg(&data)
        .arg("--generate-master-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (data, key)
}

fn write_mode(path: &std::path::Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn wrong_or_missing_master_keys_are_refused_each_with_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _key) = init_vault(dir.path());
    let db = data.join("vault.db");
    let before = std::fs::read(&db).unwrap();

    let other = dir.path().join("other.key");
    tokenvault::crypto::MasterKey::generate()
        .write_new_file(&other)
        .unwrap();
    let open = dir.path().join("open.key");
    write_mode(&open, &std::fs::read(&other).unwrap(), 0o644);
    let empty = dir.path().join("empty.key");
    write_mode(&empty, b"", 0o600);
    let short = dir.path().join("short.key");
    write_mode(&short, b"AAAAAAAAAAAAAAAAAAAAAA==\n", 0o600);
    let missing = dir.path().join("missing.key");

    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "wrong key",
            vec!["--master-key-file", other.to_str().unwrap()],
            vec![],
            "master key does not match",
        ),
        (
            "readable by others",
            vec!["--master-key-file", open.to_str().unwrap()],
            vec![],
            "chmod 600",
        ),
        (
            "missing file",
            vec!["--master-key-file", missing.to_str().unwrap()],
            vec![],
            "does not exist",
        ),
        (
            "empty file",
            vec!["--master-key-file", empty.to_str().unwrap()],
            vec![],
            "empty",
        ),
        (
            "wrong length",
            vec!["--master-key-file", short.to_str().unwrap()],
            vec![],
            "wrong length",
        ),
        (
            "wrong length (env)",
            vec![],
            vec![("TOKENVAULT_MASTER_KEY", "AAAA")],
            "wrong length",
        ),
    ];
    let mut messages = std::collections::HashSet::new();
    for (name, args, envs, expect) in cases {
        let (code, stderr) = serve_refuses(&data, &args, &envs);
        assert_eq!(code, 3, "{name}: exit code {code}: {stderr}");
        assert!(stderr.contains(expect), "{name}: {stderr}");
        messages.insert(stderr.lines().last().unwrap_or_default().to_owned());
        assert_eq!(
            std::fs::read(&db).unwrap(),
            before,
            "{name}: database bytes changed"
        );
    }
    assert!(
        messages.len() >= 5,
        "messages are not distinct: {messages:?}"
    );
}

#[test]
fn garbage_or_truncated_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key) = init_vault(dir.path());
    let db = data.join("vault.db");
    let key = key.to_str().unwrap().to_owned();
    let original = std::fs::read(&db).unwrap();

    for (name, bytes) in [
        (
            "garbage",
            b"this is not a database, just bytes that happen to be here".repeat(100),
        ),
        ("truncated", original[..original.len().min(1000)].to_vec()),
    ] {
        std::fs::write(&db, &bytes).unwrap();
        let _ = std::fs::remove_file(data.join("vault.db-wal"));
        let _ = std::fs::remove_file(data.join("vault.db-shm"));
        let (code, stderr) = serve_refuses(&data, &["--master-key-file", &key], &[]);
        assert_ne!(code, 0, "{name}");
        assert!(
            stderr.contains("damaged")
                || stderr.contains("not a tokenvault database")
                || stderr.contains("not a database"),
            "{name}: unclear message: {stderr}"
        );
        assert_eq!(
            std::fs::read(&db).unwrap(),
            bytes,
            "{name}: the damaged file was modified"
        );
    }
}
