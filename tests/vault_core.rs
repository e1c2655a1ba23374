//! The vault core against a real SQLite file: durability-facing behaviour of tokenize,
//! detokenize, rotation, reuse, delete and expiry, without gRPC.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{now_micros, Caller, KeyState, TokenizeRequest, Vault, VaultConfig};

const PANS: [&str; 4] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
];

fn req(pan: &str, format: TokenFormat, reuse: bool) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format,
        reuse_existing: reuse,
        expires_at: None,
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

fn new_vault(dir: &std::path::Path) -> (Vault, MasterKey) {
    let key = MasterKey::generate();
    let vault = Vault::create(VaultConfig::new(dir), &key).unwrap();
    let bytes = key_copy(&key, dir);
    (vault, bytes)
}

/// Writes the key to a file and reads it back, the way an operator supplies it.
fn key_copy(key: &MasterKey, dir: &std::path::Path) -> MasterKey {
    let path = dir.join(format!("master-{}.key", now_micros()));
    key.write_new_file(&path).unwrap();
    MasterKey::load_file(&path).unwrap()
}

#[tokio::test]
async fn tokenize_detokenize_round_trip_all_formats() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    for pan in PANS {
        for format in [
            TokenFormat::Opaque,
            TokenFormat::PanShaped,
            TokenFormat::PanShapedKeepBin,
        ] {
            let t = vault
                .tokenize(&caller(), req(pan, format, false))
                .await
                .unwrap();
            assert!(t.created);
            assert_eq!(t.info.format, format);
            assert_eq!(t.info.last4, &pan[pan.len() - 4..]);
            assert_ne!(t.token.as_str(), pan);
            let r = vault
                .detokenize(&caller(), t.token.clone(), "test".into())
                .await
                .unwrap();
            assert_eq!(r.pan.expose_digits(), pan);
            assert_eq!(r.info, t.info);
        }
    }
    vault.close().await;
}

#[tokio::test]
async fn reopen_keeps_tokens_and_wrong_master_key_is_refused_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, key) = new_vault(dir.path());
    let t = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    vault.close().await;
    drop(vault);

    let db = dir.path().join("vault.db");
    let before = std::fs::read(&db).unwrap();
    let err = Vault::open(VaultConfig::new(dir.path()), &MasterKey::generate())
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "{err}");
    assert_eq!(err.to_string(), "master key does not match this vault");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "database bytes changed"
    );

    let vault = Vault::open(VaultConfig::new(dir.path()), &key).unwrap();
    let r = vault
        .detokenize(&caller(), t.token, String::new())
        .await
        .unwrap();
    assert_eq!(r.pan.expose_digits(), PANS[0]);
    vault.close().await;
}

#[tokio::test]
async fn open_twice_runs_no_migration_again_and_create_refuses_existing() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, key) = new_vault(dir.path());
    vault.close().await;
    drop(vault);
    for _ in 0..2 {
        let v = Vault::open(VaultConfig::new(dir.path()), &key).unwrap();
        v.close().await;
    }
    let conn = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, tokenvault::store::migrations::LATEST);
    assert!(Vault::create(VaultConfig::new(dir.path()), &key).is_err());
}

#[tokio::test]
async fn database_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    for name in ["vault.db", "vault.db-wal", "vault.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
    }
    vault.close().await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, key) = new_vault(dir.path());
    vault.close().await;
    drop(vault);
    let conn = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let err = Vault::open(VaultConfig::new(dir.path()), &key)
        .err()
        .unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[tokio::test]
async fn rotate_then_old_and_new_tokens_detokenize() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let old = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    assert_eq!(old.info.key_version, 1);
    assert_eq!(vault.rotate_key(&caller()).await.unwrap(), 2);
    let new = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap();
    assert_eq!(new.info.key_version, 2);
    let keys = vault.list_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].state, KeyState::DecryptOnly);
    assert_eq!(keys[1].state, KeyState::Active);
    assert_eq!((keys[0].encryptions, keys[0].rows), (1, 1));
    assert_eq!((keys[1].encryptions, keys[1].rows), (1, 1));
    for (t, pan) in [(old, PANS[0]), (new, PANS[1])] {
        let r = vault
            .detokenize(&caller(), t.token, String::new())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), pan);
    }
}

#[tokio::test]
async fn encryption_limit_rotates_before_it_is_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let mut cfg = VaultConfig::new(dir.path());
    cfg.key_policy.max_encryptions = 3;
    let vault = Vault::create(cfg, &key).unwrap();
    let reqs = (0..10)
        .map(|_| req(PANS[2], TokenFormat::Opaque, false))
        .collect();
    let results = vault.tokenize_batch(&caller(), reqs).await.unwrap();
    let mut tokens = Vec::new();
    for r in results {
        tokens.push(r.unwrap());
    }
    let keys = vault.list_keys().await.unwrap();
    assert!(
        keys.len() >= 4,
        "expected rotations, got {} versions",
        keys.len()
    );
    for k in &keys {
        assert!(
            k.encryptions <= 3,
            "v{} sealed {} PANs",
            k.version,
            k.encryptions
        );
    }
    for t in tokens {
        assert_eq!(
            vault
                .detokenize(&caller(), t.token, String::new())
                .await
                .unwrap()
                .pan
                .expose_digits(),
            PANS[2]
        );
    }
}

#[tokio::test]
async fn reuse_existing_under_concurrency_yields_one_token() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let v = vault.clone();
        tasks.push(tokio::spawn(async move {
            v.tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, true))
                .await
                .unwrap()
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let t = t.await.unwrap();
        created += t.created as usize;
        tokens.insert(t.token.into_string());
    }
    assert_eq!(tokens.len(), 1);
    assert_eq!(created, 1);
    // Another format is another token; without reuse, always a new one.
    let shaped = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::PanShaped, true))
        .await
        .unwrap();
    assert!(!tokens.contains(shaped.token.as_str()));
    let fresh = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap();
    assert!(fresh.created && !tokens.contains(fresh.token.as_str()));
}

#[tokio::test]
async fn delete_destroys_the_ciphertext_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let t = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(vault.delete(&caller(), t.token.clone()).await.unwrap());
    assert!(!vault.delete(&caller(), t.token.clone()).await.unwrap());
    assert!(matches!(
        vault
            .detokenize(&caller(), t.token.clone(), String::new())
            .await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        vault.info(&caller(), t.token.clone()).await,
        Err(Error::NotFound)
    ));
    let conn = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    let (ct, fp): (Option<Vec<u8>>, Option<Vec<u8>>) = conn
        .query_row(
            "SELECT ciphertext, fingerprint FROM tokens WHERE token = ?1",
            [t.token.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(ct.is_none() && fp.is_none());
    // reuse_existing does not resurrect a deleted token.
    let again = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(again.created);
    assert_ne!(again.token, t.token);
}

#[tokio::test]
async fn expired_tokens_are_not_found_and_past_expiry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let mut r = req(PANS[3], TokenFormat::Opaque, false);
    r.expires_at = Some(now_micros() + 300_000);
    let t = vault.tokenize(&caller(), r).await.unwrap();
    assert!(vault
        .detokenize(&caller(), t.token.clone(), String::new())
        .await
        .is_ok());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(matches!(
        vault
            .detokenize(&caller(), t.token.clone(), String::new())
            .await,
        Err(Error::NotFound)
    ));
    let mut past = req(PANS[3], TokenFormat::Opaque, false);
    past.expires_at = Some(now_micros() - 1);
    assert!(matches!(
        vault.tokenize(&caller(), past).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn swapped_or_altered_ciphertext_is_data_loss_never_another_card() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let a = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let b = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let c = vault
        .tokenize(&caller(), req(PANS[2], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    // Move b's nonce and ciphertext onto a's row.
    conn.execute(
        "UPDATE tokens SET nonce = (SELECT nonce FROM tokens WHERE token = ?2), \
         ciphertext = (SELECT ciphertext FROM tokens WHERE token = ?2) WHERE token = ?1",
        [a.token.as_str(), b.token.as_str()],
    )
    .unwrap();
    // Flip one byte of c's ciphertext.
    let mut ct: Vec<u8> = conn
        .query_row(
            "SELECT ciphertext FROM tokens WHERE token = ?1",
            [c.token.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    ct[0] ^= 1;
    conn.execute(
        "UPDATE tokens SET ciphertext = ?2 WHERE token = ?1",
        rusqlite::params![c.token.as_str(), ct],
    )
    .unwrap();
    for t in [a.token, c.token] {
        let err = vault
            .detokenize(&caller(), t, String::new())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::DataLoss(_)), "{err}");
    }
    assert_eq!(
        vault
            .detokenize(&caller(), b.token, String::new())
            .await
            .unwrap()
            .pan
            .expose_digits(),
        PANS[1]
    );
}

#[tokio::test]
async fn api_keys_authenticate_and_revocation_applies() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = new_vault(dir.path());
    let key = vault
        .add_client(
            &caller(),
            "checkout",
            &[tokenvault::auth::Role::Tokenize],
            None,
        )
        .await
        .unwrap();
    assert!(key.starts_with("tvk_"));
    let p = vault.authenticate_api_key(&key).unwrap();
    assert_eq!(p.name, "checkout");
    let mut wrong = key.clone();
    // A different last character (a key that already ends in 'x' would stay valid).
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'x' { 'y' } else { 'x' });
    assert!(vault.authenticate_api_key(&wrong).is_err());
    assert!(vault.authenticate_api_key("").is_err());
    assert!(vault.revoke_client(&caller(), "checkout").await.unwrap());
    assert!(vault.authenticate_api_key(&key).is_err());
    let clients = vault.list_clients().await.unwrap();
    assert!(clients[0].revoked_at.is_some());
    // The database holds only a hash of the secret.
    let conn = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    let dump: Vec<u8> = conn
        .query_row("SELECT key_hash FROM clients", [], |r| r.get(0))
        .unwrap();
    assert!(!String::from_utf8_lossy(&dump).contains(key.rsplit('_').next().unwrap()));
}

/// A writer that collects everything the tracing subscriber prints.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_pan_in_trace_output_of_a_full_cycle() {
    let capture = Capture::default();
    let sink = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (vault, _) = new_vault(dir.path());
            vault.rotate_key(&caller()).await.unwrap();
            for pan in PANS {
                for f in [
                    TokenFormat::Opaque,
                    TokenFormat::PanShaped,
                    TokenFormat::PanShapedKeepBin,
                ] {
                    let t = vault.tokenize(&caller(), req(pan, f, true)).await.unwrap();
                    vault
                        .detokenize(&caller(), t.token.clone(), "r".into())
                        .await
                        .unwrap();
                    vault.info(&caller(), t.token.clone()).await.unwrap();
                    vault.delete(&caller(), t.token).await.unwrap();
                }
            }
            let _ = Token::parse(PANS[0]);
            vault.close().await;
        });
    });
    let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        !out.is_empty(),
        "the subscriber captured nothing; the test would prove nothing"
    );
    for pan in PANS {
        assert!(!out.contains(pan), "a PAN reached the trace output");
        assert!(
            !out.contains(&pan[..pan.len() - 4]),
            "a PAN prefix reached the trace output"
        );
    }
}
