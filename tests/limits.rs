//! Abuse limits and process hardening: the per-principal detokenize rate limit
//! (RESOURCE_EXHAUSTED, audited, recovers as the bucket refills; batch items count one by
//! one; a principal's own rate beats the server default), the cap on audit records of
//! anonymous refusals, the server-side request timeout, the refusal to serve plaintext on a
//! non-loopback address, the master key file permission check, and core dumps disabled in a
//! serving `tokenvault serve` process. Bounded waits, ephemeral loopback ports.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestServer, CHECKOUT, PAYMENTS};
use tokenvault::auth::Role;
use tokenvault::grpc::client::Client;
use tokenvault::grpc::pb;
use tokenvault::grpc::server::ServerConfig;
use tokenvault::ratelimit::Rate;
use tokenvault::vault::Caller;

async fn tokenize(server: &TestServer, pan: &str) -> String {
    let mut c = server.client(CHECKOUT).await;
    c.tokenize(pb::TokenizeRequest {
        pan: pan.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

async fn detokenize(c: &mut Client, token: &str) -> Result<String, tonic::Status> {
    c.detokenize(pb::DetokenizeRequest {
        token: token.into(),
        reason: "limits test".into(),
    })
    .await
    .map(|r| r.into_inner().pan)
}

async fn detokenize_batch(c: &mut Client, token: &str, n: usize) -> Result<(), tonic::Status> {
    let requests = (0..n)
        .map(|_| pb::DetokenizeRequest {
            token: token.into(),
            reason: "limits test".into(),
        })
        .collect();
    c.detokenize_batch(pb::DetokenizeBatchRequest { requests })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn detokenize_rate_limit_refuses_then_recovers() {
    let server = TestServer::start_with(ServerConfig {
        detokenize_rate: Some(Rate { per_second: 5.0 }),
        ..ServerConfig::default()
    })
    .await;
    let pan = common::test_pan(1);
    let token = tokenize(&server, &pan).await;
    let mut payments = server.client(PAYMENTS).await;

    // A full bucket holds one second's worth: 5 reveals.
    for _ in 0..5 {
        assert_eq!(detokenize(&mut payments, &token).await.unwrap(), pan);
    }
    let status = detokenize(&mut payments, &token).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(!status.message().contains(&pan));

    // Audited as a refusal of this principal.
    let records = server.vault.audit_records(1, 10_000).await.unwrap();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == "RESOURCE_EXHAUSTED")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].principal, PAYMENTS);
    assert_eq!(refused[0].action, "detokenize");

    // Recovers as the bucket refills (5/s: a reveal within about 200 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match detokenize(&mut payments, &token).await {
            Ok(p) => {
                assert_eq!(p, pan);
                break;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("did not recover: {s:?}"),
        }
    }

    // Batch items count one by one: right after a reveal, 5 items do not fit...
    let status = detokenize_batch(&mut payments, &token, 5)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    // ...but once the bucket is full again they do (a whole second's worth).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    detokenize_batch(&mut payments, &token, 5).await.unwrap();

    // Tokenize is not limited.
    for i in 0..20 {
        tokenize(&server, &common::test_pan(100 + i)).await;
    }
}

#[tokio::test]
async fn a_principals_own_rate_beats_the_default() {
    let server = TestServer::start_with(ServerConfig {
        detokenize_rate: Some(Rate { per_second: 2.0 }),
        ..ServerConfig::default()
    })
    .await;
    let key = server
        .vault
        .add_client_limited(
            &Caller::cli(),
            "bulk",
            &[Role::Detokenize],
            None,
            Some(50.0),
        )
        .await
        .unwrap();
    let token = tokenize(&server, &common::test_pan(2)).await;
    let mut bulk = server.client_with_key(Some(&key)).await;
    for _ in 0..20 {
        detokenize(&mut bulk, &token).await.unwrap();
    }
    // The default still applies to everyone else, in a bucket of their own.
    let mut payments = server.client(PAYMENTS).await;
    detokenize(&mut payments, &token).await.unwrap();
    detokenize(&mut payments, &token).await.unwrap();
    let status = detokenize(&mut payments, &token).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
}

#[tokio::test]
async fn anonymous_refusals_are_audited_only_up_to_a_rate() {
    let server = TestServer::start_with(ServerConfig {
        anonymous_audit_rate: Rate { per_second: 3.0 },
        ..ServerConfig::default()
    })
    .await;
    let started = Instant::now();
    let mut anon = server.client_with_key(Some("tvk_nope_nope")).await;
    for _ in 0..40 {
        let status = detokenize(&mut anon, "tok_x").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let audited = server
        .vault
        .audit_records(1, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.outcome == "UNAUTHENTICATED")
        .count();
    // A bucket of 3 plus what refilled meanwhile; every request was refused regardless.
    let bound = 3 + (elapsed * 3.0).ceil() as usize;
    assert!(
        audited >= 3 && audited <= bound,
        "{audited} audited, bound {bound}"
    );
    assert!(audited < 40);
}

#[tokio::test]
async fn server_side_request_timeout_applies() {
    // 1 ms: far less than a 2,000-card batch takes (encryption and a commit), far more than
    // a tokio timer tick, so the server cuts the request off.
    let server = TestServer::start_with(ServerConfig {
        request_timeout: Some(Duration::from_millis(1)),
        ..ServerConfig::default()
    })
    .await;
    let mut c = server.client(CHECKOUT).await;
    let requests = (0..2000)
        .map(|i| pb::TokenizeRequest {
            pan: common::test_pan(10_000 + i),
            ..Default::default()
        })
        .collect();
    let status = c
        .tokenize_batch(pb::TokenizeBatchRequest { requests })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn concurrency_limit_per_connection_still_serves_parallel_calls() {
    let server = TestServer::start_with(ServerConfig {
        concurrency_limit_per_connection: Some(2),
        ..ServerConfig::default()
    })
    .await;
    let c = server.client(CHECKOUT).await;
    let calls = (0..16).map(|i| {
        let mut c = c.clone();
        async move {
            c.tokenize(pb::TokenizeRequest {
                pan: common::test_pan(200 + i),
                ..Default::default()
            })
            .await
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(30), join_all(calls))
        .await
        .expect("calls queued behind the limit finish");
    assert!(results.iter().all(Result::is_ok));
}

async fn join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn tokenvault() -> std::process::Command {
    common::tokenvault_command()
}

#[test]
fn plaintext_on_a_non_loopback_address_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokenvault()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without TLS"),
        "{stderr}"
    );
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    // Refused before the vault was even looked at (no vault exists there: that would be
    // a storage error, exit 4), hence before any socket was bound.
    assert!(!stderr.contains("no vault"), "{stderr}");
}

/// A vault in `dir` with its master key file; returns (data dir, key file).
async fn make_vault(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let key_file = dir.join("master.key");
    let master = tokenvault::crypto::MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let vault =
        tokenvault::vault::Vault::create(tokenvault::vault::VaultConfig::new(&data), &master)
            .unwrap();
    vault.close().await;
    (data, key_file)
}

#[cfg(unix)]
#[tokio::test]
async fn serve_refuses_a_master_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (data, key_file) = make_vault(dir.path()).await;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tokenvault()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn serving_process_has_core_dumps_disabled() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (data, key_file) = make_vault(dir.path()).await;
    let mut child = tokenvault()
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("\"message\":\"serving\"") {
                let _ = tx.send(());
            }
        }
    });
    let serving = rx.recv_timeout(Duration::from_secs(30));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    serving.expect("server did not report serving in time");
    let limits = limits.unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max core file size  <soft>  <hard>  bytes"
    assert_eq!(&fields[4..6], &["0", "0"], "{line}");
}
