//! `tokenvault store migrate` both ways and `backup` of a PostgreSQL store into the portable
//! snapshot format, against a throwaway PostgreSQL cluster (see `pg/mod.rs`): after each,
//! the same master key opens the copy and every token detokenizes unchanged.

mod common;

mod pg;

use std::path::Path;
use std::process::Command;

use tokenvault::auth::Role;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

fn bin() -> Command {
    common::tokenvault_command()
}

fn run(args: &[&str], key: &Path) -> (bool, String) {
    let out = bin()
        .args(args)
        .arg("--master-key-file")
        .arg(key)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sqlite_cfg(dir: &Path) -> VaultConfig {
    VaultConfig::new(dir)
}

fn pg_cfg(url: &str, dir: &Path) -> VaultConfig {
    let mut cfg = VaultConfig::new(dir.join("unused"));
    cfg.store_url = Some(url.into());
    cfg
}

const PANS: [&str; 3] = ["4111111111111111", "5555555555554444", "378282246310005"];

/// A vault with history: tokens under two key versions, a deleted one, a client, audit.
async fn populate(cfg: VaultConfig, key: &MasterKey) -> Vec<(Token, &'static str)> {
    let vault = Vault::create(cfg, key).unwrap();
    let caller = Caller::new("test", "local");
    let mut out = Vec::new();
    for (i, pan) in PANS.iter().cycle().take(30).enumerate() {
        if i == 15 {
            vault.rotate_key(&caller).await.unwrap();
        }
        let t = vault
            .tokenize(
                &caller,
                TokenizeRequest {
                    pan: Pan::parse(pan).unwrap(),
                    format: TokenFormat::Opaque,
                    reuse_existing: false,
                    expires_at: None,
                },
            )
            .await
            .unwrap();
        out.push((t.token, *pan));
    }
    let gone = out.pop().unwrap();
    vault.delete(&caller, gone.0).await.unwrap();
    vault
        .add_client(&caller, "app", &[Role::Tokenize], None)
        .await
        .unwrap();
    vault.close().await;
    out
}

async fn all_detokenize(cfg: VaultConfig, key: &MasterKey, tokens: &[(Token, &str)]) {
    let vault = Vault::open(cfg, key).unwrap();
    for (t, pan) in tokens {
        let r = vault
            .detokenize(&Caller::new("test", "local"), t.clone(), "check".into())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), *pan);
    }
    assert!(vault.verify_audit().await.unwrap().is_ok());
    assert_eq!(vault.list_clients().await.unwrap().len(), 1);
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_and_back() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    let key = MasterKey::generate();
    key.write_new_file(&key_file).unwrap();
    let data = dir.path().join("data");
    let tokens = populate(sqlite_cfg(&data), &key).await;

    // SQLite → PostgreSQL.
    let url = cluster.create_db();
    let (ok, out) = run(
        &[
            "store",
            "migrate",
            "--data-dir",
            data.to_str().unwrap(),
            "--to",
            &url,
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("30 tokens") && out.contains("chain verified"),
        "{out}"
    );
    all_detokenize(pg_cfg(&url, dir.path()), &key, &tokens).await;

    // A non-empty target is refused, changing nothing.
    let (ok, out) = run(
        &[
            "store",
            "migrate",
            "--data-dir",
            data.to_str().unwrap(),
            "--to",
            &url,
        ],
        &key_file,
    );
    assert!(!ok && out.contains("already holds a vault"), "{out}");

    // PostgreSQL → SQLite.
    let back = dir.path().join("back");
    let (ok, out) = run(
        &[
            "store",
            "migrate",
            "--store-url",
            &url,
            "--to",
            back.to_str().unwrap(),
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    all_detokenize(sqlite_cfg(&back), &key, &tokens).await;
    // The copies still hold no card number in clear.
    let bytes = std::fs::read(tokenvault::store::sqlite::db_path(&back)).unwrap();
    for pan in PANS {
        assert!(!bytes.windows(pan.len()).any(|w| w == pan.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backup_restores_into_sqlite() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    let key = MasterKey::generate();
    key.write_new_file(&key_file).unwrap();
    let url = cluster.create_db();
    let tokens = populate(pg_cfg(&url, dir.path()), &key).await;
    let backup = dir.path().join("vault.backup");
    let (ok, out) = run(
        &[
            "backup",
            "--store-url",
            &url,
            "--out",
            backup.to_str().unwrap(),
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    let restored = dir.path().join("restored");
    let (ok, out) = run(
        &[
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    all_detokenize(sqlite_cfg(&restored), &key, &tokens).await;
}

/// `restore --store-url`: a backup of a SQLite vault restored into an empty PostgreSQL
/// database (verified, copied, proven); every token detokenizes there with the same master
/// key. A database that already holds a vault is refused, with or without --force, and the
/// vault in it is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backup_restores_into_postgres() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    let key = MasterKey::generate();
    key.write_new_file(&key_file).unwrap();
    let src = dir.path().join("src");
    let tokens = populate(sqlite_cfg(&src), &key).await;
    let backup = dir.path().join("vault.backup");
    let (ok, out) = run(
        &[
            "backup",
            "--data-dir",
            src.to_str().unwrap(),
            "--out",
            backup.to_str().unwrap(),
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    let url = cluster.create_db();
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--store-url",
            &url,
        ];
        args.extend_from_slice(extra);
        run(&args, &key_file)
    };
    let (ok, out) = restore(&[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("restored vault") && out.contains("postgres://"),
        "{out}"
    );
    all_detokenize(pg_cfg(&url, dir.path()), &key, &tokens).await;
    let head = {
        let v = Vault::open(pg_cfg(&url, dir.path()), &key).unwrap();
        let h = v.audit_head_seq().await.unwrap();
        v.close().await;
        h
    };
    for extra in [&[][..], &["--force"][..]] {
        let (ok, out) = restore(extra);
        assert!(!ok, "a second restore into a vault: {out}");
        assert!(out.contains("empty"), "{out}");
    }
    let v = Vault::open(pg_cfg(&url, dir.path()), &key).unwrap();
    assert_eq!(
        v.audit_head_seq().await.unwrap(),
        head,
        "the refused restores changed nothing"
    );
    v.close().await;
    all_detokenize(pg_cfg(&url, dir.path()), &key, &tokens).await;
}

/// A rekeyed vault (fingerprint layer, replaced audit key) migrates with what the rekey
/// added: the copy opens with the new key, verifies its chain across the switch, and
/// `reuse_existing` still finds the tokens made before the rekey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekeyed_vault_migrates_to_postgres() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = MasterKey::generate();
    let caller = Caller::new("test", "local");
    let reuse = |pan: &str| TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: true,
        expires_at: None,
    };
    let vault = Vault::create(sqlite_cfg(&data), &old).unwrap();
    let before = vault.tokenize(&caller, reuse(PANS[0])).await.unwrap().token;
    let new = MasterKey::generate();
    let opts = tokenvault::vault::RekeyOptions::default();
    assert!(
        vault
            .rekey(&caller, &new, &opts, |_| {})
            .await
            .unwrap()
            .finished
    );
    vault.close().await;
    let key_file = dir.path().join("new.key");
    new.write_new_file(&key_file).unwrap();
    let url = cluster.create_db();
    let (ok, out) = run(
        &[
            "store",
            "migrate",
            "--data-dir",
            data.to_str().unwrap(),
            "--to",
            &url,
        ],
        &key_file,
    );
    assert!(ok, "{out}");
    let copy = Vault::open(pg_cfg(&url, dir.path()), &new).unwrap();
    assert_eq!(
        copy.tokenize(&caller, reuse(PANS[0])).await.unwrap().token,
        before
    );
    let v = copy.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    copy.close().await;
}
