//! `master-key split|combine`: split knowledge for a master key file (Shamir over GF(256)).
//! Share files are 0600 and name their index and vault; any 3 of 5 rebuild a key that opens
//! the vault; 2 do not; a foreign, repeated or altered share is refused on its own.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tokenvault::crypto::MasterKey;
use tokenvault::vault::{Caller, Vault, VaultConfig};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    for var in [
        "TOKENVAULT_DATA_DIR",
        "TOKENVAULT_MASTER_KEY_FILE",
        "TOKENVAULT_MASTER_KEY",
        "TOKENVAULT_MASTER_KEY_PKCS11",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c.stdin(Stdio::null());
    c
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn init(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join(name);
    let key = dir.join(format!("{name}.key"));
    let out = bin()
        .args(["init", "--data-dir"])
        .arg(&data)
        .arg("--generate-master-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (data, key)
}

fn split(data: &Path, key: &Path, out_dir: &Path) -> Vec<std::path::PathBuf> {
    let out = bin()
        .args([
            "master-key",
            "split",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--data-dir",
        ])
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .arg("--out-dir")
        .arg(out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(Into::into)
        .collect()
}

fn combine(data: &Path, shares: &[&Path], out_key: &Path) -> Output {
    let mut c = bin();
    c.args(["master-key", "combine", "--data-dir"]).arg(data);
    for s in shares {
        c.arg("--share-file").arg(s);
    }
    c.arg("--out").arg(out_key).output().unwrap()
}

#[tokio::test]
async fn three_of_five_shares_rebuild_the_key_and_fewer_or_foreign_ones_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, key) = init(dir, "vault");
    let vault = Vault::open(
        VaultConfig::new(&data),
        &MasterKey::load_file(&key).unwrap(),
    )
    .unwrap();
    let token = vault
        .tokenize(
            &Caller::cli(),
            tokenvault::vault::TokenizeRequest {
                pan: tokenvault::card::Pan::parse("4111111111111111").unwrap(),
                format: tokenvault::token::TokenFormat::Opaque,
                reuse_existing: false,
                expires_at: None,
            },
        )
        .await
        .unwrap()
        .token;
    let vault_hex = vault.audit_vault_id().await.unwrap();
    vault.close().await;
    drop(vault);

    let shares = split(&data, &key, &dir.join("shares"));
    assert_eq!(shares.len(), 5);
    let key_text = std::fs::read_to_string(&key).unwrap();
    for (i, path) in shares.iter().enumerate() {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
        let body = std::fs::read_to_string(path).unwrap();
        assert!(body.contains(&format!("index: {}", i + 1)), "{body}");
        assert!(body.contains(&format!("vault: {vault_hex}")), "{body}");
        assert!(
            !body.contains(key_text.trim()),
            "a share never holds the key"
        );
    }

    // Any three rebuild it; the rebuilt key opens the vault and reveals the card.
    let rebuilt = dir.join("rebuilt.key");
    let out = combine(&data, &[&shares[4], &shares[1], &shares[2]], &rebuilt);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::metadata(&rebuilt).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let vault = Vault::open(
        VaultConfig::new(&data),
        &MasterKey::load_file(&rebuilt).unwrap(),
    )
    .unwrap();
    let revealed = vault
        .detokenize(&Caller::cli(), token, "share test".into())
        .await
        .unwrap();
    assert_eq!(revealed.pan.expose_digits(), "4111111111111111");
    vault.close().await;

    // Two are not enough.
    let out = combine(&data, &[&shares[0], &shares[3]], &dir.join("two.key"));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("2 shares given, 3 needed"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("two.key").exists());

    // A share of another vault is refused, naming only itself.
    let (other_data, other_key) = init(dir, "other");
    let foreign = split(&other_data, &other_key, &dir.join("foreign"));
    let out = combine(
        &data,
        &[&shares[0], &foreign[1], &shares[2]],
        &dir.join("f.key"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(msg.contains("not this vault"), "{msg}");
    assert!(!msg.contains(&vault_hex), "{msg}");

    // An altered share rebuilds a wrong key, which the vault's key check refuses.
    let altered = dir.join("altered.txt");
    let body = std::fs::read_to_string(&shares[0]).unwrap();
    let line = body.lines().find(|l| l.starts_with("share: ")).unwrap();
    let b64 = &line["share: ".len()..];
    let flipped = if b64.as_bytes()[5] == b'A' { 'B' } else { 'A' };
    let mut new_b64 = b64.to_owned();
    new_b64.replace_range(5..6, &flipped.to_string());
    std::fs::write(&altered, body.replace(b64, &new_b64)).unwrap();
    std::fs::set_permissions(&altered, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = combine(
        &data,
        &[&altered, &shares[1], &shares[2]],
        &dir.join("a.key"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("does not open this vault"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("a.key").exists());
}
