//! Several replicas of the real `tokenvault serve` binary on one PostgreSQL database (a
//! throwaway cluster, see `pg/mod.rs`): tokens cross replicas, `audit verify` passes after
//! concurrent load, kill -9 of one replica loses nothing acknowledged, and a database
//! restart makes requests fail fast with UNAVAILABLE and health NOT_SERVING, after which the
//! replicas recover by themselves. Loopback only, bounded in time.

mod common;
mod pg;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::test_pan;
use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{with_auth, BearerAuth, Client};
use tokenvault::grpc::pb;
use tokenvault::vault::{Caller, Vault, VaultConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn bin() -> Command {
    common::tokenvault_command()
}

struct Replica {
    child: Child,
    addr: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` against the shared store on an ephemeral port.
fn start(url: &str, key: &Path, unused_dir: &Path) -> Replica {
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--log-level", "info"])
        .arg("--store-url")
        .arg(url)
        .arg("--data-dir")
        .arg(unused_dir)
        .arg("--master-key-file")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving") {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim_matches('"').to_owned());
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replica did not report its address");
    Replica { child, addr }
}

async fn client(addr: &str, key: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    with_auth(channel, BearerAuth::new(Some(key)).unwrap())
}

async fn health(addr: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(resp.into_inner().status())
}

fn cli_ok(args: &[&str], url: &str, key: &Path) -> String {
    let out = bin()
        .args(args)
        .arg("--store-url")
        .arg(url)
        .arg("--master-key-file")
        .arg(key)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tokenvault {args:?} failed: {text}");
    text
}

/// `init --store-url` through the CLI, then a worker client.
async fn init(url: &str, dir: &Path) -> (std::path::PathBuf, String) {
    let key_file = dir.join("master.key");
    let out = bin()
        .args(["init", "--store-url", url, "--generate-master-key"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("created vault in postgres://"), "{stdout}");
    let master = MasterKey::load_file(&key_file).unwrap();
    let mut cfg = VaultConfig::new(dir.join("unused"));
    cfg.store_url = Some(url.into());
    let vault = Vault::open(cfg, &master).unwrap();
    let api_key = vault
        .add_client(
            &Caller::cli(),
            "worker",
            &[Role::Tokenize, Role::Detokenize],
            None,
        )
        .await
        .unwrap();
    vault.close().await;
    (key_file, api_key)
}

async fn verify_all(c: &mut Client, acked: &[(String, String)]) {
    for chunk in acked.chunks(500) {
        let req = pb::DetokenizeBatchRequest {
            requests: chunk
                .iter()
                .map(|(t, _)| pb::DetokenizeRequest {
                    token: t.clone(),
                    reason: "replica check".into(),
                })
                .collect(),
        };
        let results = c
            .detokenize_batch(req)
            .await
            .expect("detokenize batch")
            .into_inner()
            .results;
        for ((token, pan), r) in chunk.iter().zip(results) {
            match r.outcome.unwrap() {
                pb::detokenize_batch_result::Outcome::Success(ok) => {
                    assert_eq!(&ok.pan, pan, "token {token} revealed another card")
                }
                pb::detokenize_batch_result::Outcome::Error(e) => {
                    panic!("acknowledged token {token} lost: {}", e.message)
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_vault_and_survive_a_sigkill() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let url = cluster.create_db();
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("no-data-dir");
    let (key_file, api_key) = init(&url, dir.path()).await;
    let mut replicas: Vec<Option<Replica>> = (0..3)
        .map(|_| Some(start(&url, &key_file, &unused)))
        .collect();
    let addrs: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().addr.clone())
        .collect();

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..6usize {
        // Tokenize through one replica, reveal through the next.
        let mut writer = client(&addrs[c % 3], &api_key).await;
        let mut reader = client(&addrs[(c + 1) % 3], &api_key).await;
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pan = test_pan(c as u64 * 1_000_000 + i);
                i += 1;
                let Ok(resp) = writer
                    .tokenize(pb::TokenizeRequest {
                        pan: pan.clone(),
                        ..Default::default()
                    })
                    .await
                else {
                    break; // its replica was killed: unacknowledged, not counted
                };
                let token = resp.into_inner().token;
                acked.lock().unwrap().push((token.clone(), pan.clone()));
                match reader
                    .detokenize(pb::DetokenizeRequest {
                        token,
                        reason: "cross-replica".into(),
                    })
                    .await
                {
                    Ok(r) => assert_eq!(
                        r.into_inner().pan,
                        pan,
                        "another replica revealed another card"
                    ),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // kill -9 of replica 0 under load.
    let mut victim = replicas[0].take().unwrap();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    drop(victim);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("load task stuck")
            .expect("load task failed");
    }
    let all = acked.lock().unwrap().clone();
    assert!(all.len() > 50, "too little load: {}", all.len());
    // Everything acknowledged, by any replica, is there through a survivor.
    let mut checker = client(&addrs[1], &api_key).await;
    verify_all(&mut checker, &all).await;
    drop(replicas);
    // With every replica stopped: one unbroken trail, and the data decrypts.
    let verify = cli_ok(&["audit", "verify"], &url, &key_file);
    assert!(verify.to_lowercase().contains("ok"), "{verify}");
    let check = cli_ok(&["check"], &url, &key_file);
    assert!(!check.contains("FAIL"), "{check}");
    println!(
        "replicas: {} acknowledged tokens across 3 replicas (one SIGKILLed) all detokenize",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_is_unavailable_then_recovers() {
    let Some(cluster) = pg::private_cluster() else {
        return;
    };
    let url = cluster.create_db();
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("no-data-dir");
    let (key_file, api_key) = init(&url, dir.path()).await;
    let replica = start(&url, &key_file, &unused);
    let mut c = client(&replica.addr, &api_key).await;
    let token = c
        .tokenize(pb::TokenizeRequest {
            pan: test_pan(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(health(&replica.addr).await, Some(ServingStatus::Serving));

    cluster.stop_immediate();
    let started = Instant::now();
    let err = c
        .tokenize(pb::TokenizeRequest {
            pan: test_pan(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "not fast");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&replica.addr).await != Some(ServingStatus::NotServing) {
        assert!(
            Instant::now() < deadline,
            "health stayed SERVING without a database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c
            .detokenize(pb::DetokenizeRequest {
                token: token.clone(),
                reason: "after restart".into(),
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().pan, test_pan(1));
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&replica.addr).await != Some(ServingStatus::Serving) {
        assert!(Instant::now() < deadline, "health did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(replica);
    cli_ok(&["audit", "verify"], &url, &key_file);
}
