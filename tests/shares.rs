//! `master-key split|combine`: split knowledge for a master key file (Shamir over GF(256)).
//! Share files are 0600 and name their index and vault; any 3 of 5 rebuild a key that opens
//! the vault; 2 do not; a foreign, repeated or altered share is refused on its own.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tokenvault::crypto::MasterKey;
use tokenvault::vault::{Caller, Vault, VaultConfig};

mod pg;

fn bin() -> Command {
    common::tokenvault_command()
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

/// A copy of `share` at `out` (0600) with one base64 character of its share line changed.
fn altered_copy(share: &Path, out: &Path) -> std::path::PathBuf {
    let body = std::fs::read_to_string(share).unwrap();
    let line = body.lines().find(|l| l.starts_with("share: ")).unwrap();
    let b64 = &line["share: ".len()..];
    let flipped = if b64.as_bytes()[5] == b'A' { 'B' } else { 'A' };
    let mut new_b64 = b64.to_owned();
    new_b64.replace_range(5..6, &flipped.to_string());
    std::fs::write(out, body.replace(b64, &new_b64)).unwrap();
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600)).unwrap();
    out.to_path_buf()
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
    let altered = altered_copy(&shares[0], &dir.join("altered.txt"));
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

/// Reads `serve`'s log lines on a thread; `wait_for` returns the first line containing a text.
struct Log(std::sync::mpsc::Receiver<String>);

impl Log {
    fn wait_for(&self, what: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .0
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {what:?} within 30 s"));
            if line.contains(what) {
                return line;
            }
        }
    }
}

fn listen_addr(line: &str) -> String {
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .unwrap()
        .trim_matches('"');
    format!("http://{addr}")
}

#[test]
fn sealed_start_is_unsealed_by_three_of_five_shares_over_the_socket() {
    use std::io::{BufRead, BufReader, Write};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, key) = init(dir, "vault");
    let admin = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--master-key-file")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let checkout = admin(&["clients", "add", "checkout", "--roles", "tokenize"]);
    let payments = admin(&["clients", "add", "payments", "--roles", "detokenize"]);
    let shares = split(&data, &key, &dir.join("shares"));
    // The key file is gone: only the custodians' shares can open the vault now.
    std::fs::remove_file(&key).unwrap();
    let (other_data, other_key) = init(dir, "other");
    let foreign = split(&other_data, &other_key, &dir.join("foreign"));

    let socket = dir.join("unseal.sock");
    let mut server = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--unseal-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = server.stderr.take().unwrap();
    let _server = Kill(server);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log = Log(rx);
    let addr = listen_addr(&log.wait_for("vault sealed"));
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let client = |key: &str, args: &[&str], stdin: &str| {
        let mut child = bin()
            .args(args)
            .args(["--addr", &addr])
            .env("TOKENVAULT_API_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // Sealed: NOT_SERVING, and every RPC UNAVAILABLE.
    let out = client("", &["health"], "");
    assert!(text(&out).contains("NOT_SERVING"), "{}", text(&out));
    let out = client(&checkout, &["tokenize"], "4111111111111111\n");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("UNAVAILABLE"), "{}", text(&out));
    let out = client(&payments, &["detokenize", "tok_x", "--reason", "r"], "");
    assert!(text(&out).contains("UNAVAILABLE"), "{}", text(&out));

    let unseal = |file: Option<&Path>, stdin: &str| {
        let mut c = bin();
        c.args(["unseal", "--socket"]).arg(&socket);
        if let Some(f) = file {
            c.arg("--share-file").arg(f);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = unseal(Some(&shares[0]), "");
    assert!(text(&out).contains("accepted: 1 of 3"), "{}", text(&out));
    // A foreign share, a repeated one and garbage are refused, each about itself only.
    let out = unseal(Some(&foreign[1]), "");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("not this vault"), "{}", text(&out));
    assert!(!text(&out).contains("1 of 3"), "{}", text(&out));
    let out = unseal(Some(&shares[0]), "");
    assert!(text(&out).contains("already given"), "{}", text(&out));
    let out = unseal(None, "not a share\n");
    assert!(text(&out).contains("refused"), "{}", text(&out));
    // Still sealed.
    let out = client(&checkout, &["tokenize"], "4111111111111111\n");
    assert!(text(&out).contains("UNAVAILABLE"), "{}", text(&out));

    let out = unseal(Some(&shares[2]), "");
    assert!(text(&out).contains("accepted: 2 of 3"), "{}", text(&out));
    // The third share on standard input, never on the command line.
    let share5 = std::fs::read_to_string(&shares[4]).unwrap();
    let out = unseal(None, &share5);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unsealed"), "{}", text(&out));
    log.wait_for("serving");
    assert!(!socket.exists(), "the socket is removed once unsealed");

    let out = client(&checkout, &["tokenize"], "4111111111111111\n");
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = client(
        &payments,
        &["detokenize", &token, "--reason", "after unseal"],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4111111111111111"
    );
    let out = client("", &["health"], "");
    assert!(out.status.success(), "{}", text(&out));

    // Every attempt is in the audit trail, without share material.
    drop(_server);
    let db = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    let rows: Vec<(String, String)> = db
        .prepare("SELECT outcome, reason FROM audit WHERE action = 'Unseal' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 6, "{rows:?}");
    let body = std::fs::read_to_string(&shares[0]).unwrap();
    let secret = body.lines().last().unwrap().trim_start_matches("share: ");
    assert!(rows.iter().all(|(_, r)| !r.contains(secret)), "{rows:?}");
}

/// Sealed start on a shared PostgreSQL store: the header is read through the store, three
/// of five shares unseal it over the socket, and it serves.
#[test]
fn sealed_start_on_postgresql_is_unsealed_by_three_shares() {
    use std::io::{BufRead, BufReader, Write};
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let url = cluster.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("pg.key");
    let run = |args: &[&str], with_key: bool| {
        let mut c = bin();
        c.args(args).args(["--store-url", &url]);
        if with_key {
            c.arg("--master-key-file").arg(&key);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let mut c = bin();
    let out = c
        .args(["init", "--store-url", &url, "--generate-master-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let checkout = run(&["clients", "add", "checkout", "--roles", "tokenize"], true);
    let payments = run(
        &["clients", "add", "payments", "--roles", "detokenize"],
        true,
    );
    let shares: Vec<std::path::PathBuf> = run(
        &[
            "master-key",
            "split",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out-dir",
            dir.join("shares").to_str().unwrap(),
        ],
        true,
    )
    .lines()
    .map(Into::into)
    .collect();
    assert_eq!(shares.len(), 5);
    std::fs::remove_file(&key).unwrap();

    let socket = dir.join("unseal.sock");
    let mut server = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--store-url",
            &url,
        ])
        .arg("--unseal-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = server.stderr.take().unwrap();
    let _server = Kill(server);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log = Log(rx);
    let addr = listen_addr(&log.wait_for("vault sealed"));
    let client = |key: &str, args: &[&str], stdin: &str| {
        let mut child = bin()
            .args(args)
            .args(["--addr", &addr])
            .env("TOKENVAULT_API_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = client(&checkout, &["tokenize"], "4111111111111111\n");
    assert!(text(&out).contains("UNAVAILABLE"), "{}", text(&out));
    for (i, share) in [&shares[0], &shares[2], &shares[4]].into_iter().enumerate() {
        let out = bin()
            .args(["unseal", "--socket"])
            .arg(&socket)
            .arg("--share-file")
            .arg(share)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        if i == 2 {
            assert!(text(&out).contains("unsealed"), "{}", text(&out));
        }
    }
    log.wait_for("serving");
    let out = client(&checkout, &["tokenize"], "4111111111111111\n");
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = client(
        &payments,
        &["detokenize", &token, "--reason", "after unseal"],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4111111111111111"
    );
}

/// `master-key combine --store-url`: the vault id and the key check come from PostgreSQL. Three
/// shares rebuild a key that opens the vault there; two are refused; an altered share rebuilds
/// a wrong key that the database's key check refuses, and no key file is written.
#[test]
fn combine_on_postgresql_checks_the_rebuilt_key_against_the_database() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let url = cluster.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("pg.key");
    let out = bin()
        .args(["init", "--store-url", &url, "--generate-master-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = bin()
        .args(["master-key", "split", "--shares", "5", "--threshold", "3"])
        .args(["--store-url", &url, "--master-key-file"])
        .arg(&key)
        .arg("--out-dir")
        .arg(dir.join("shares"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shares: Vec<std::path::PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(Into::into)
        .collect();
    assert_eq!(shares.len(), 5);
    let combine = |shares: &[&Path], out_key: &Path| {
        let mut c = bin();
        c.args(["master-key", "combine", "--store-url", &url]);
        for s in shares {
            c.arg("--share-file").arg(s);
        }
        c.arg("--out").arg(out_key).output().unwrap()
    };

    let rebuilt = dir.join("rebuilt.key");
    let out = combine(&[&shares[3], &shares[0], &shares[4]], &rebuilt);
    assert!(out.status.success(), "{}", text(&out));
    // The rebuilt key alone (the original is gone) opens the vault in the database.
    std::fs::remove_file(&key).unwrap();
    let out = bin()
        .args(["keys", "list", "--store-url", &url, "--master-key-file"])
        .arg(&rebuilt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let out = combine(&[&shares[1], &shares[2]], &dir.join("two.key"));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!dir.join("two.key").exists());

    let altered = altered_copy(&shares[1], &dir.join("altered.txt"));
    let out = combine(&[&altered, &shares[2], &shares[3]], &dir.join("a.key"));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("does not open this vault"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("a.key").exists());
}
