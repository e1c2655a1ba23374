//! Key lifecycle and data safety against a real vault directory. The "server" is one `Vault`
//! serving concurrent traffic; the admin operation runs on a second `Vault::open` of the same
//! directory, which is what the CLI does from another process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{
    now_micros, Caller, KeyState, PurgeOptions, RewrapOptions, TokenizeRequest, Vault, VaultConfig,
};

const PANS: [&str; 4] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
];

fn req(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at: None,
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

/// A new vault and a file holding its master key (so the key can be loaded again).
fn new_vault(dir: &Path) -> (Vault, std::path::PathBuf) {
    let key = MasterKey::generate();
    let path = dir.with_extension(format!("{}.key", now_micros()));
    key.write_new_file(&path).unwrap();
    (Vault::create(VaultConfig::new(dir), &key).unwrap(), path)
}

fn open(dir: &Path, key: &Path) -> Vault {
    Vault::open(VaultConfig::new(dir), &MasterKey::load_file(key).unwrap()).unwrap()
}

async fn tokenize_n(vault: &Vault, n: usize) -> Vec<(Token, &'static str)> {
    let reqs = (0..n).map(|i| req(PANS[i % PANS.len()])).collect();
    let results = vault.tokenize_batch(&caller(), reqs).await.unwrap();
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| (r.unwrap().token, PANS[i % PANS.len()]))
        .collect()
}

async fn assert_all_detokenize(vault: &Vault, tokens: &[(Token, &str)]) {
    for chunk in tokens.chunks(500) {
        let items = chunk
            .iter()
            .map(|(t, _)| (t.clone(), "check".to_owned()))
            .collect();
        let results = vault.detokenize_batch(&caller(), items).await.unwrap();
        for ((t, pan), r) in chunk.iter().zip(results) {
            let r = r.unwrap_or_else(|e| panic!("token {} failed: {e}", t.as_str()));
            assert_eq!(r.pan.expose_digits(), *pan);
        }
    }
}

/// Tokenize + detokenize in a loop until stopped; counts failures, keeps acknowledged tokens.
struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    acked: Arc<Mutex<Vec<(Token, &'static str)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(vault: &Vault, workers: usize) -> Traffic {
        let t = Traffic {
            stop: Arc::default(),
            failures: Arc::default(),
            ops: Arc::default(),
            acked: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (vault, stop, failures, ops, acked) = (
                vault.clone(),
                t.stop.clone(),
                t.failures.clone(),
                t.ops.clone(),
                t.acked.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let pan = PANS[w % PANS.len()];
                while !stop.load(Ordering::Relaxed) {
                    match vault.tokenize(&caller(), req(pan)).await {
                        Ok(t) => {
                            acked.lock().unwrap().push((t.token.clone(), pan));
                            match vault.detokenize(&caller(), t.token, "traffic".into()).await {
                                Ok(r) if r.pan.expose_digits() == pan => {}
                                _ => {
                                    failures.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Traffic { tasks, ..t }
    }

    async fn stop(self) -> (u64, u64, Vec<(Token, &'static str)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (
            self.failures.load(Ordering::Relaxed),
            self.ops.load(Ordering::Relaxed),
            acked,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_and_rewrap_under_concurrent_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (server, key) = new_vault(&db);
    let mut tokens = tokenize_n(&server, 3000).await;
    let traffic = Traffic::start(&server, 4);

    let admin = open(&db, &key);
    assert_eq!(admin.rotate_key(&Caller::cli()).await.unwrap(), 2);
    let mut progress_calls = 0;
    let opts = RewrapOptions {
        batch: 400,
        only_version: None,
    };
    let report = admin
        .rewrap(&Caller::cli(), &opts, |_| progress_calls += 1)
        .await
        .unwrap();
    assert!(report.failed.is_empty());
    assert!(report.rewrapped >= 3000, "rewrapped {}", report.rewrapped);
    assert!(progress_calls >= 8);
    // Resumable / idempotent: a second run finds nothing left.
    assert_eq!(
        admin
            .rewrap(&Caller::cli(), &opts, |_| {})
            .await
            .unwrap()
            .rewrapped,
        0
    );
    admin.close().await;

    let (failures, ops, acked) = traffic.stop().await;
    assert_eq!(failures, 0, "{failures} of {ops} requests failed");
    assert!(ops > 0);
    tokens.extend(acked);
    assert_all_detokenize(&server, &tokens).await;
    let keys = server.list_keys().await.unwrap();
    assert_eq!(keys[0].rows, 0, "v1 still seals rows");
    assert_eq!(keys[1].state, KeyState::Active);
    // Each re-seal counted against the active version.
    assert!(keys[1].encryptions >= report.rewrapped);
    server.close().await;
}

#[tokio::test]
async fn retire_is_refused_while_in_use_then_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (server, key) = new_vault(&db);
    let tokens = tokenize_n(&server, 50).await;
    let admin = open(&db, &key);
    let err = admin.retire_key(&Caller::cli(), 1).await.err().unwrap();
    assert!(
        matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("active"),
        "{err}"
    );
    admin.rotate_key(&Caller::cli()).await.unwrap();
    let err = admin.retire_key(&Caller::cli(), 1).await.err().unwrap();
    assert!(err.to_string().contains("50 tokens"), "{err}");
    admin
        .rewrap(&Caller::cli(), &RewrapOptions::default(), |_| {})
        .await
        .unwrap();
    assert!(admin.retire_key(&Caller::cli(), 1).await.unwrap());
    assert!(
        !admin.retire_key(&Caller::cli(), 1).await.unwrap(),
        "second retire is a no-op"
    );
    assert!(admin.retire_key(&Caller::cli(), 9).await.is_err());
    admin.close().await;

    assert_all_detokenize(&server, &tokens).await;
    let keys = server.list_keys().await.unwrap();
    assert_eq!(keys[0].state, KeyState::Retired);
    // The retired key is destroyed, not just flagged.
    let conn = rusqlite::Connection::open(db.join("vault.db")).unwrap();
    let wrapped: Vec<u8> = conn
        .query_row("SELECT wrapped FROM data_keys WHERE version = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(wrapped.is_empty());
    let actions: Vec<String> = conn
        .prepare(
            "SELECT action || ':' || outcome FROM audit WHERE action = 'key_retire' ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key_retire:FAILED_PRECONDITION",
            "key_retire:FAILED_PRECONDITION",
            "key_retire:OK",
            "key_retire:FAILED_PRECONDITION"
        ]
    );
    server.close().await;
    // Reopening works without the retired key.
    let again = open(&db, &key);
    assert_all_detokenize(&again, &tokens).await;
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_active_version_end_to_end_and_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (server, key) = new_vault(&db);
    let tokens = tokenize_n(&server, 200).await;
    let admin = open(&db, &key);
    let r = admin
        .revoke_key(&Caller::cli(), 1, 64, |_| {})
        .await
        .unwrap();
    assert_eq!(r.rotated_to, Some(2));
    assert_eq!(r.rewrapped, 200);
    assert!(!r.already_retired);
    let again = admin
        .revoke_key(&Caller::cli(), 1, 64, |_| {})
        .await
        .unwrap();
    assert!(again.already_retired);
    admin.close().await;
    // The serving vault never seals under the revoked version and still reads everything.
    let t = server.tokenize(&caller(), req(PANS[0])).await.unwrap();
    assert_eq!(t.info.key_version, 2);
    assert_all_detokenize(&server, &tokens).await;
    let keys = server.list_keys().await.unwrap();
    assert_eq!((keys[0].state, keys[0].rows), (KeyState::Retired, 0));
    server.close().await;
}

#[tokio::test]
async fn rotate_master_then_old_key_refused_new_key_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (vault, old_key) = new_vault(&db);
    vault.rotate_key(&caller()).await.unwrap();
    let mut tokens = tokenize_n(&vault, 10).await;
    vault.close().await;
    drop(vault);
    let new_path = dir.path().join("new.key");
    MasterKey::generate().write_new_file(&new_path).unwrap();
    let admin = open(&db, &old_key);
    let before: Vec<u8> = {
        let conn = rusqlite::Connection::open(db.join("vault.db")).unwrap();
        conn.query_row(
            "SELECT ciphertext FROM tokens ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        admin
            .rotate_master(&Caller::cli(), &MasterKey::load_file(&new_path).unwrap())
            .await
            .unwrap(),
        2
    );
    // The vault that still holds the old master refuses to create key versions.
    assert!(matches!(
        admin.rotate_key(&Caller::cli()).await,
        Err(Error::FailedPrecondition(_))
    ));
    admin.close().await;
    drop(admin);

    let err = Vault::open(
        VaultConfig::new(&db),
        &MasterKey::load_file(&old_key).unwrap(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "{err}");
    let vault = open(&db, &new_path);
    assert_all_detokenize(&vault, &tokens).await;
    tokens.extend(tokenize_n(&vault, 5).await);
    vault.rotate_key(&caller()).await.unwrap();
    assert_all_detokenize(&vault, &tokens).await;
    vault.close().await;
    // No data row was re-encrypted.
    let conn = rusqlite::Connection::open(db.join("vault.db")).unwrap();
    let after: Vec<u8> = conn
        .query_row(
            "SELECT ciphertext FROM tokens ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(before, after);
}

#[tokio::test]
async fn automatic_rotation_by_max_encryptions_survives_reopen_and_covers_rewrap() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let key = MasterKey::generate();
    let key_path = dir.path().join("m.key");
    key.write_new_file(&key_path).unwrap();
    let mut cfg = VaultConfig::new(&db);
    cfg.key_policy.max_encryptions = 5;
    let vault = Vault::create(cfg.clone(), &key).unwrap();
    let mut tokens = tokenize_n(&vault, 12).await;
    let versions = vault.list_keys().await.unwrap().len();
    assert!(versions >= 3, "{versions}");
    vault.close().await;
    drop(vault);

    let vault = Vault::open(cfg.clone(), &MasterKey::load_file(&key_path).unwrap()).unwrap();
    tokens.extend(tokenize_n(&vault, 4).await);
    // Rewrap seals too, so it rotates when the active version reaches its limit.
    let r = vault
        .rewrap(
            &Caller::cli(),
            &RewrapOptions {
                batch: 3,
                only_version: None,
            },
            |_| {},
        )
        .await
        .unwrap();
    assert!(r.failed.is_empty() && r.rewrapped > 0);
    let keys = vault.list_keys().await.unwrap();
    for k in &keys {
        assert!(
            k.encryptions <= 5,
            "v{} sealed {} PANs",
            k.version,
            k.encryptions
        );
        assert_eq!(k.max_encryptions, 5);
    }
    assert!(keys.len() > versions);
    assert_all_detokenize(&vault, &tokens).await;
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_write_load_restores_every_acknowledged_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (server, key) = new_vault(&db);
    let mut tokens = tokenize_n(&server, 1000).await;
    let traffic = Traffic::start(&server, 3);
    // Let some traffic be acknowledged before the snapshot (bounded poll).
    for _ in 0..200 {
        if traffic.acked.lock().unwrap().len() >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked_before: Vec<_> = traffic.acked.lock().unwrap().clone();
    assert!(!acked_before.is_empty());
    let admin = open(&db, &key);
    let out = dir.path().join("snap.tvbak");
    let bytes = admin.backup(&Caller::cli(), &out).await.unwrap();
    assert!(bytes > 0);
    assert!(
        admin.backup(&Caller::cli(), &out).await.is_err(),
        "an existing backup file is never overwritten"
    );
    admin.close().await;
    let (failures, _, _) = traffic.stop().await;
    assert_eq!(failures, 0);
    tokens.extend(acked_before);

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let master = MasterKey::load_file(&key).unwrap();
    // Wrong master key: refused before anything is written.
    let target = dir.path().join("restored");
    let err = Vault::restore(&caller(), &out, &target, &MasterKey::generate(), false)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "{err}");
    assert!(!target.join("vault.db").exists());
    // The live vault is in use: refused even with force; without force, refused because it exists.
    assert!(Vault::restore(&caller(), &out, &db, &master, false)
        .await
        .is_err());
    let err = Vault::restore(&caller(), &out, &db, &master, true)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("in use"), "{err}");

    let report = Vault::restore(&caller(), &out, &target, &master, false)
        .await
        .unwrap();
    assert!(report.tokens >= tokens.len() as u64);
    let restored = open(&target, &key);
    assert_all_detokenize(&restored, &tokens).await;
    assert!(restored.check(true, 0).await.unwrap().ok());
    restored.close().await;
    drop(restored);
    server.close().await;
    drop(server);
    // Once nothing has it open, --force replaces the original vault with the backup.
    let report = Vault::restore(&caller(), &out, &db, &master, true)
        .await
        .unwrap();
    assert!(report.replaced_existing);
    let again = open(&db, &key);
    assert_all_detokenize(&again, &tokens).await;
    again.close().await;
}

#[tokio::test]
async fn check_names_the_token_whose_ciphertext_was_altered() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (vault, _) = new_vault(&db);
    let tokens = tokenize_n(&vault, 30).await;
    let r = vault.check(true, 0).await.unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.checked, 30);
    let victim = tokens[17].0.as_str().to_owned();
    let conn = rusqlite::Connection::open(db.join("vault.db")).unwrap();
    let mut ct: Vec<u8> = conn
        .query_row(
            "SELECT ciphertext FROM tokens WHERE token = ?1",
            [&victim],
            |r| r.get(0),
        )
        .unwrap();
    ct[3] ^= 0x40;
    conn.execute(
        "UPDATE tokens SET ciphertext = ?2 WHERE token = ?1",
        rusqlite::params![victim, ct],
    )
    .unwrap();
    let r = vault.check(true, 0).await.unwrap();
    assert!(!r.ok());
    assert_eq!(r.failed_tokens, vec![victim.clone()]);
    assert!(r.integrity.is_empty() && r.keyring.is_empty());
    let sample = vault.check(false, 1000).await.unwrap();
    assert_eq!(sample.failed_tokens, vec![victim]);
    // A row pointing at a version that does not exist is a keyring inconsistency.
    conn.execute("UPDATE tokens SET key_version = 7 WHERE id = 1", [])
        .unwrap();
    let r = vault.check(false, 10).await.unwrap();
    assert!(
        r.keyring.iter().any(|m| m.contains("v7")),
        "{:?}",
        r.keyring
    );
    for pan in PANS {
        assert!(!format!("{r:?}").contains(pan));
    }
    vault.close().await;
}

#[tokio::test]
async fn purge_removes_what_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v");
    let (vault, _) = new_vault(&db);
    let tokens = tokenize_n(&vault, 10).await;
    for (t, _) in &tokens[..3] {
        assert!(vault.delete(&caller(), t.clone()).await.unwrap());
    }
    let mut expiring = Vec::new();
    for _ in 0..2 {
        let mut r = req(PANS[1]);
        r.expires_at = Some(now_micros() + 200_000);
        expiring.push(vault.tokenize(&caller(), r).await.unwrap().token);
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let count = || {
        let conn = rusqlite::Connection::open(db.join("vault.db")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert_eq!(count(), 12);
    let opts = |deleted, expired, older_than| PurgeOptions {
        deleted,
        expired,
        older_than,
        batch: 2,
    };
    assert!(vault
        .purge(&caller(), &opts(false, false, None))
        .await
        .is_err());
    let r = vault
        .purge(
            &caller(),
            &opts(true, true, Some(Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    assert_eq!((r.deleted, r.expired), (0, 0));
    let r = vault
        .purge(&caller(), &opts(true, false, None))
        .await
        .unwrap();
    assert_eq!((r.deleted, r.expired), (3, 0));
    assert_eq!(count(), 9);
    // Expired rows wait out a grace period unless an age is given.
    let r = vault
        .purge(&caller(), &opts(false, true, None))
        .await
        .unwrap();
    assert_eq!((r.deleted, r.expired), (0, 0));
    let r = vault
        .purge(&caller(), &opts(false, true, Some(Duration::ZERO)))
        .await
        .unwrap();
    assert_eq!((r.deleted, r.expired), (0, 2));
    assert_eq!(count(), 7);
    assert_all_detokenize(&vault, &tokens[3..]).await;
    vault.close().await;
}

#[tokio::test]
async fn a_running_vault_adopts_a_rotated_master_key_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let (server, old_key) = new_vault(&data);
    let old = tokenize_n(&server, 4).await;

    // The CLI rotates the master key, then a data key under the new master.
    let new_key = dir.path().join("new.key");
    MasterKey::generate().write_new_file(&new_key).unwrap();
    let cli = open(&data, &old_key);
    cli.rotate_master(&caller(), &MasterKey::load_file(&new_key).unwrap())
        .await
        .unwrap();
    cli.close().await;
    let cli = open(&data, &new_key);
    cli.rotate_key(&caller()).await.unwrap();
    let fresh = tokenize_n(&cli, 4).await;
    cli.close().await;

    // The server still holds the old master: versions it knew keep working, the new one
    // cannot be unwrapped yet.
    assert_all_detokenize(&server, &old).await;
    let err = server
        .detokenize(&caller(), fresh[0].0.clone(), String::new())
        .await
        .unwrap_err();
    // Not lost: unavailable until this process holds the new master key.
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    // ...and tokenize is refused rather than sealed under a version that is no longer active.
    let refused = server.tokenize(&caller(), req(PANS[0])).await.unwrap_err();
    assert!(matches!(refused, Error::Unavailable(_)), "{refused}");

    // A wrong key is refused and changes nothing; the rotated one is adopted.
    let wrong = server
        .reload_master_key(&MasterKey::generate())
        .await
        .unwrap_err();
    assert!(matches!(wrong, Error::WrongMasterKey), "{wrong}");
    let stale = server
        .reload_master_key(&MasterKey::load_file(&old_key).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(stale, Error::WrongMasterKey), "{stale}");
    server
        .reload_master_key(&MasterKey::load_file(&new_key).unwrap())
        .await
        .unwrap();

    assert_all_detokenize(&server, &old).await;
    assert_all_detokenize(&server, &fresh).await;
    // New versions the server itself creates are wrapped under the new master.
    server.rotate_key(&caller()).await.unwrap();
    let newest = tokenize_n(&server, 4).await;
    server.close().await;
    let reopened = open(&data, &new_key);
    assert_all_detokenize(&reopened, &newest).await;
    reopened.close().await;
}
