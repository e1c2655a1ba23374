//! The crash loop: a real `tokenvault serve` child under concurrent tokenize/detokenize load
//! is SIGKILLed at random moments, again and again. After every kill, `tokenvault check` and
//! `tokenvault audit verify` must pass, and after every restart every token whose Tokenize
//! was acknowledged must detokenize to its card number. Loopback only, bounded in time.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::test_pan;
use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{with_auth, BearerAuth, Client};
use tokenvault::grpc::pb;
use tokenvault::vault::{Caller, Vault, VaultConfig};

const KILLS: usize = 10;
const CLIENTS: usize = 6;

fn bin() -> Command {
    common::tokenvault_command()
}

/// Starts `serve` on an ephemeral port and returns it with the address it bound.
fn start(data: &Path, key: &Path) -> (Child, String) {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen="))
            {
                if line.contains("serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim_matches('"').to_owned());
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server did not report its address");
    (child, addr)
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

fn run_ok(args: &[&str], data: &Path, key: &Path) -> String {
    let out = bin()
        .args(args)
        .arg("--data-dir")
        .arg(data)
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

/// Verifies every acknowledged token against the running server, in batches.
async fn verify_all(c: &mut Client, acked: &[(String, String)]) {
    for chunk in acked.chunks(1000) {
        let req = pb::DetokenizeBatchRequest {
            requests: chunk
                .iter()
                .map(|(t, _)| pb::DetokenizeRequest {
                    token: t.clone(),
                    reason: "crash check".into(),
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
async fn acknowledged_tokens_survive_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let api_key = {
        let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
        let k = vault
            .add_client(
                &Caller::cli(),
                "worker",
                &[Role::Tokenize, Role::Detokenize],
                None,
            )
            .await
            .unwrap();
        vault.close().await;
        k
    };

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let started = Instant::now();
    let mut seed = 0x5eed_u64;
    for round in 0..KILLS {
        let (mut child, addr) = start(&data, &key_file);
        let mut checker = client(&addr, &api_key).await;
        let snapshot = acked.lock().unwrap().clone();
        verify_all(&mut checker, &snapshot).await;

        // Load: each client tokenizes fresh cards and reveals earlier ones until the kill.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let mut cl = client(&addr, &api_key).await;
            let acked = acked.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let pan = test_pan(((round * CLIENTS + c) as u64) * 1_000_000 + i);
                    i += 1;
                    match cl
                        .tokenize(pb::TokenizeRequest {
                            pan: pan.clone(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(resp) => acked.lock().unwrap().push((resp.into_inner().token, pan)),
                        Err(_) => break, // the server died under us: unacknowledged, not counted
                    }
                    let earlier = { acked.lock().unwrap().last().cloned() };
                    if let Some((t, _)) = earlier {
                        if cl
                            .detokenize(pb::DetokenizeRequest {
                                token: t,
                                reason: "load".into(),
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }));
        }
        // Kill at a pseudo-random moment between 50 and 400 ms into the load.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(50 + seed % 350)).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        // With the server dead: the data and the audit chain are intact.
        let check = run_ok(&["check"], &data, &key_file);
        assert!(!check.contains("FAIL"), "{check}");
        run_ok(&["audit", "verify"], &data, &key_file);
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash loop ran too long"
        );
    }
    // One last restart checks the writes of the final round.
    let (mut child, addr) = start(&data, &key_file);
    let mut checker = client(&addr, &api_key).await;
    let all = acked.lock().unwrap().clone();
    verify_all(&mut checker, &all).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        all.len() > KILLS,
        "too little load to prove anything: {} acknowledged writes",
        all.len()
    );
    println!(
        "crash loop: {KILLS} SIGKILLs, {} acknowledged writes checked after each restart",
        all.len()
    );
}
