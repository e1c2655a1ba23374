//! What is destroyed is gone (issue 11, item 4): within 5 s of a delete, a purge or a key
//! revocation finishing, no byte of a destroyed ciphertext remains in any file of the data
//! directory (`vault.db`, `-wal`, `-shm`). The tests read the ciphertexts from the database
//! with rusqlite, destroy them through the vault, and scan every file for them. Live
//! ciphertexts must still be found, so a scan that finds nothing cannot pass by accident.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{now_micros, Caller, PurgeOptions, TokenizeRequest, Vault, VaultConfig};

/// The bound of the requirement.
const DEADLINE: Duration = Duration::from_secs(5);

fn pan(n: u64) -> Pan {
    let payload = format!("411111{n:09}");
    let check = tokenvault::card::luhn_check_digit(payload.as_bytes());
    Pan::parse(&format!("{payload}{}", check as char)).unwrap()
}

fn req(n: u64, expires_at: Option<i64>) -> TokenizeRequest {
    TokenizeRequest {
        pan: pan(n),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at,
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

async fn tokenize(vault: &Vault, from: u64, n: u64, expires_at: Option<i64>) -> Vec<Token> {
    let reqs = (from..from + n).map(|i| req(i, expires_at)).collect();
    vault
        .tokenize_batch(&caller(), reqs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().token)
        .collect()
}

/// The encrypted part of each token's stored ciphertext (without the GCM tag: with the key
/// and the nonce, that alone decrypts), read with a connection of our own.
fn ciphertexts(data_dir: &Path, tokens: &[Token]) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open(data_dir.join("vault.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let out = tokens
        .iter()
        .map(|t| {
            let ct: Vec<u8> = conn
                .query_row(
                    "SELECT ciphertext FROM tokens WHERE token = ?1",
                    [t.as_str()],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(ct.len() > 16);
            ct[..ct.len() - 16].to_vec()
        })
        .collect();
    drop(conn);
    out
}

/// Every file of the data directory with its contents.
fn files(data_dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            // A file may vanish between listing and reading (the WAL on close).
            let bytes = std::fs::read(&path).ok()?;
            Some((path, bytes))
        })
        .collect()
}

/// Which of `needles` occur in `hay`, in one pass: a window is compared only when its first
/// two bytes start some needle (the tests run unoptimised, and the files are megabytes).
fn occurrences(hay: &[u8], needles: &[Vec<u8>]) -> Vec<bool> {
    let mut by_prefix: std::collections::HashMap<[u8; 2], Vec<usize>> = Default::default();
    let mut first = vec![false; 1 << 16];
    for (i, n) in needles.iter().enumerate() {
        let p = [n[0], n[1]];
        first[u16::from_be_bytes(p) as usize] = true;
        by_prefix.entry(p).or_default().push(i);
    }
    let mut hit = vec![false; needles.len()];
    for at in 0..hay.len().saturating_sub(1) {
        if !first[u16::from_be_bytes([hay[at], hay[at + 1]]) as usize] {
            continue;
        }
        for &i in &by_prefix[&[hay[at], hay[at + 1]]] {
            let n = &needles[i];
            if hay.len() - at >= n.len() && &hay[at..at + n.len()] == n.as_slice() {
                hit[i] = true;
            }
        }
    }
    hit
}

/// How many of `cts` occur in some file of the data directory, with the files they are in.
fn found(data_dir: &Path, cts: &[Vec<u8>]) -> (usize, Vec<String>) {
    let mut any = vec![false; cts.len()];
    let mut where_ = Vec::new();
    for (path, bytes) in files(data_dir) {
        let hits = occurrences(&bytes, cts);
        if hits.iter().any(|h| *h) {
            where_.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
        for (a, h) in any.iter_mut().zip(hits) {
            *a |= h;
        }
    }
    (any.iter().filter(|h| **h).count(), where_)
}

/// Polls until none of `destroyed` is in any file; panics after [`DEADLINE`].
async fn assert_gone_within_deadline(data_dir: &Path, destroyed: &[Vec<u8>], what: &str) {
    let start = Instant::now();
    loop {
        let (n, files) = found(data_dir, destroyed);
        if n == 0 {
            eprintln!("{what}: gone from every file after {:?}", start.elapsed());
            return;
        }
        if start.elapsed() > DEADLINE {
            let sizes: Vec<(String, u64)> = std::fs::read_dir(data_dir)
                .unwrap()
                .filter_map(|e| {
                    let e = e.ok()?;
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().ok()?.len(),
                    ))
                })
                .collect();
            panic!(
                "{what}: {n} of {} destroyed ciphertexts still in {files:?} {:?} after the \
                 operation finished (files: {sizes:?})",
                destroyed.len(),
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_all_present(data_dir: &Path, live: &[Vec<u8>], what: &str) {
    let (n, _) = found(data_dir, live);
    assert_eq!(n, live.len(), "{what}: the scan must find live ciphertexts");
}

fn new_vault(dir: &Path) -> (Vault, MasterKey, PathBuf) {
    let master = MasterKey::generate();
    let data = dir.join("data");
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    (vault, master, data)
}

/// Tokenize and reveal traffic until stopped: readers and the writer stay busy, as on a
/// serving vault, while the destroyed bytes must still vanish.
fn traffic(vault: &Vault, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let vault = vault.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = vault
                .tokenize(&caller(), req(900_000 + n, None))
                .await
                .unwrap()
                .token;
            vault
                .detokenize(&caller(), t, "traffic".into())
                .await
                .unwrap();
            n += 1;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ciphertexts_leave_every_file_within_5s_under_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _, data) = new_vault(dir.path());
    let tokens = tokenize(&vault, 0, 400, None).await;
    let cts = ciphertexts(&data, &tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&vault, stop.clone());
    let mut destroyed = Vec::new();
    let mut live = Vec::new();
    for (i, (t, ct)) in tokens.iter().zip(&cts).enumerate() {
        if i % 2 == 0 {
            assert!(vault.delete(&caller(), t.clone()).await.unwrap());
            destroyed.push(ct.clone());
        } else {
            live.push(ct.clone());
        }
    }
    assert_gone_within_deadline(&data, &destroyed, "DeleteToken").await;
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    assert_all_present(&data, &live, "DeleteToken");
    vault.close().await;
}

/// Tokenize without a pause from `tasks` tasks: the writer always has the next group queued,
/// so the prober copies frames back (PASSIVE) while the writer must truncate after deletes.
fn write_load(
    vault: &Vault,
    stop: Arc<AtomicBool>,
    tasks: u64,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..tasks)
        .map(|k| {
            let (vault, stop) = (vault.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    vault
                        .tokenize(&caller(), req(2_000_000 + k * 1_000_000 + n, None))
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ciphertexts_leave_every_file_within_5s_under_full_write_load() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _, data) = new_vault(dir.path());
    let tokens = tokenize(&vault, 0, 200, None).await;
    let cts = ciphertexts(&data, &tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let load = write_load(&vault, stop.clone(), 32);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut destroyed, mut live) = (Vec::new(), Vec::new());
    for (i, (t, ct)) in tokens.iter().zip(&cts).enumerate() {
        if i % 2 == 0 {
            assert!(vault.delete(&caller(), t.clone()).await.unwrap());
            destroyed.push(ct.clone());
        } else {
            live.push(ct.clone());
        }
    }
    assert_gone_within_deadline(&data, &destroyed, "DeleteToken under full write load").await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for task in load {
        written += task.await.unwrap();
    }
    assert!(written > 0);
    assert_all_present(&data, &live, "DeleteToken under full write load");
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_ciphertexts_leave_every_file_within_5s() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, master, data) = new_vault(dir.path());
    let expiring = tokenize(&vault, 0, 200, Some(now_micros() + 300_000)).await;
    let staying = tokenize(&vault, 1_000, 100, None).await;
    let (expiring, staying) = (ciphertexts(&data, &expiring), ciphertexts(&data, &staying));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The purge runs from a second handle, as `tokenvault purge` does from another process.
    let admin = Vault::open(VaultConfig::new(&data), &master).unwrap();
    let report = admin
        .purge(
            &Caller::cli(),
            &PurgeOptions {
                deleted: true,
                expired: true,
                // Expired at all: without an age, purge keeps a day's grace (clock steps).
                older_than: Some(Duration::ZERO),
                batch: 64,
            },
        )
        .await
        .unwrap();
    assert_eq!(report.expired, 200);
    admin.close().await;
    assert_gone_within_deadline(&data, &expiring, "purge --expired").await;
    assert_all_present(&data, &staying, "purge --expired");
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_resealed_ciphertexts_leave_every_file_within_5s() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, master, data) = new_vault(dir.path());
    let tokens = tokenize(&vault, 0, 300, None).await;
    let under_v1 = ciphertexts(&data, &tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&vault, stop.clone());

    // `keys revoke 1` from another handle while the first one serves.
    let admin = Vault::open(VaultConfig::new(&data), &master).unwrap();
    let report = admin
        .revoke_key(&Caller::cli(), 1, 50, |_| {})
        .await
        .unwrap();
    assert!(report.rewrapped >= 300, "{report:?}");
    admin.close().await;
    assert_gone_within_deadline(&data, &under_v1, "keys revoke 1").await;
    let under_v2 = ciphertexts(&data, &tokens);
    assert_all_present(&data, &under_v2, "keys revoke 1");

    // The re-sealed ciphertexts go the same way when their key is revoked in turn.
    let admin = Vault::open(VaultConfig::new(&data), &master).unwrap();
    admin
        .revoke_key(&Caller::cli(), 2, 50, |_| {})
        .await
        .unwrap();
    admin.close().await;
    assert_gone_within_deadline(&data, &under_v2, "keys revoke 2").await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_all_present(&data, &ciphertexts(&data, &tokens), "keys revoke 2");
    for (t, _) in tokens.iter().zip(0..3) {
        vault
            .detokenize(&caller(), t.clone(), "after revoke".into())
            .await
            .unwrap();
    }
    vault.close().await;
}

/// A process killed after its destroying commit and before the WAL was truncated leaves the
/// old bytes in the WAL; the next open truncates it before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_destroy_and_truncate_is_cleaned_up_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, master, data) = new_vault(dir.path());
    tokenize(&vault, 0, 10, None).await;
    vault.close().await;
    drop(vault);

    // The state a killed writer leaves: frames holding ciphertexts, then frames of the
    // commit that destroyed them, never checkpointed.
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.pragma_update(None, "secure_delete", true).unwrap();
    let blobs: Vec<Vec<u8>> = (0..50u8)
        .map(|i| {
            [i ^ 0xa5; 32]
                .iter()
                .enumerate()
                .map(|(j, b)| b ^ (j as u8 * 7))
                .collect()
        })
        .collect();
    for (i, blob) in blobs.iter().enumerate() {
        conn.execute(
            "INSERT INTO tokens(token, key_version, nonce, ciphertext, format, brand, \
             pan_length, bin, last4, created_at) VALUES (?1, 1, zeroblob(12), ?2, 1, 2, 16, \
             '411111', '1111', 0)",
            rusqlite::params![format!("tok_crash{i}"), blob],
        )
        .unwrap();
    }
    conn.execute(
        "UPDATE tokens SET nonce = NULL, ciphertext = NULL, deleted_at = 1 \
         WHERE token LIKE 'tok_crash%'",
        [],
    )
    .unwrap();
    let crashed = dir.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&crashed, std::fs::Permissions::from_mode(0o700)).unwrap();
    for name in ["vault.db", "vault.db-wal", "vault.db-shm"] {
        std::fs::copy(data.join(name), crashed.join(name)).unwrap();
    }
    drop(conn);
    let (n, _) = found(&crashed, &blobs);
    assert_eq!(
        n,
        blobs.len(),
        "the crashed state holds the destroyed bytes"
    );

    let reopened = Vault::open(VaultConfig::new(&crashed), &master).unwrap();
    assert_gone_within_deadline(&crashed, &blobs, "reopen after a crash").await;
    reopened.close().await;
}

/// The same through the server: DeleteToken over gRPC by a principal holding only `delete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_token_over_grpc_leaves_no_ciphertext_in_any_file() {
    use tokenvault::grpc::pb;
    let mut server = common::TestServer::start().await;
    let mut checkout = server.client(common::CHECKOUT).await;
    let mut deleter = server.client(common::DELETER).await;
    let mut tokens = Vec::new();
    for n in 0..60 {
        let resp = checkout
            .tokenize(pb::TokenizeRequest {
                pan: common::test_pan(n),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push(Token::parse(&resp.token).unwrap());
    }
    let data = server.data_dir();
    let cts = ciphertexts(&data, &tokens);
    for t in &tokens[..30] {
        let del = deleter
            .delete_token(pb::DeleteTokenRequest {
                token: t.as_str().to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(del.deleted);
    }
    assert_gone_within_deadline(&data, &cts[..30], "DeleteToken over gRPC").await;
    assert_all_present(&data, &cts[30..], "DeleteToken over gRPC");
    server.shutdown().await;
}
