//! An operator having a bad day: restore racing a starting server, stale WAL files, absurd
//! purge durations, backups written into the data directory, what killed runs leave behind,
//! empty paths, a FIFO where the master key should be, and a clock that steps. Each test
//! failed on the `main` that issue 13 was filed against.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::test_pan;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{
    now_micros, Caller, Clock, PurgeOptions, TokenizeRequest, Vault, VaultConfig,
};

fn bin() -> Command {
    common::tokenvault_command()
}

/// Runs an admin command against `data` with the key file `key`.
fn admin(args: &[&str], data: &Path, key: &Path) -> Output {
    bin()
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .output()
        .expect("run tokenvault")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn req(n: u64, expires_at: Option<i64>) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(&test_pan(n)).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at,
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

/// A new vault in `dir/data` with its key in `dir/master.key`.
fn new_vault(dir: &Path) -> (Vault, PathBuf, PathBuf) {
    new_vault_with(dir, |_| {})
}

fn new_vault_with(dir: &Path, tune: impl FnOnce(&mut VaultConfig)) -> (Vault, PathBuf, PathBuf) {
    let key = dir.join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key).unwrap();
    let data = dir.join("data");
    let mut cfg = VaultConfig::new(&data);
    tune(&mut cfg);
    (Vault::create(cfg, &master).unwrap(), data, key)
}

fn open(data: &Path, key: &Path) -> Vault {
    Vault::open(VaultConfig::new(data), &MasterKey::load_file(key).unwrap()).unwrap()
}

async fn tokenize_n(vault: &Vault, from: u64, n: u64, expires_at: Option<i64>) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = from;
    while i < from + n {
        let k = (from + n - i).min(5000);
        let reqs = (i..i + k).map(|j| req(j, expires_at)).collect();
        for r in vault.tokenize_batch(&caller(), reqs).await.unwrap() {
            out.push(r.unwrap().token);
        }
        i += k;
    }
    out
}

fn token_rows(data: &Path) -> i64 {
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap()
}

/// Holds an `flock` on `data/vault.lock` the way another tokenvault process would.
struct ForeignLock(#[allow(dead_code)] std::fs::File);

impl ForeignLock {
    fn take(data: &Path, op: libc::c_int) -> ForeignLock {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(data.join("vault.lock"))
            .unwrap();
        // SAFETY: valid descriptor.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) }, 0);
        ForeignLock(f)
    }
}

/// Starts `serve` on an ephemeral loopback port; returns the child and, if it came up, its
/// address (None when it exited first).
fn start_serve(
    data: &Path,
    key: &Path,
) -> (Child, Option<String>, std::sync::mpsc::Receiver<String>) {
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
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (log_tx, log_rx) = std::sync::mpsc::channel();
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
            let _ = log_tx.send(line);
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).ok();
    (child, addr, log_rx)
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------------------------------
// 1. restore and the directory lock

/// `serve` (and every admin command) refuses to start while a restore holds the data
/// directory, instead of acknowledging writes into files about to be replaced.
#[tokio::test]
async fn serve_and_admin_commands_refuse_while_a_restore_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 10, None).await;
    vault.close().await;
    drop(vault);

    let restore = ForeignLock::take(&data, libc::LOCK_EX);
    let (mut child, addr, _log) = start_serve(&data, &key);
    if addr.is_some() {
        kill(&mut child);
        panic!("serve started while a restore held the data directory");
    }
    let status =
        wait_exit(&mut child, Duration::from_secs(20)).expect("serve neither served nor exited");
    assert!(!status.success());
    let out = admin(&["check"], &data, &key);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("restore"), "{}", text(&out));
    drop(restore);

    // Once the restore is gone, it starts.
    let (mut child, addr, _log) = start_serve(&data, &key);
    assert!(
        addr.is_some(),
        "serve did not start after the restore finished"
    );
    kill(&mut child);
}

/// Restore refuses while any tokenvault process has the directory open, even one that holds
/// no SQLite connection at the moment (a server between its lock and its first query).
#[tokio::test]
async fn restore_refuses_while_the_vault_is_open_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 100, None).await;
    let out_file = dir.path().join("b.db");
    vault.backup(&Caller::cli(), &out_file).await.unwrap();
    vault.close().await;
    drop(vault);

    let server = ForeignLock::take(&data, libc::LOCK_SH);
    let from = out_file.to_str().unwrap();
    let out = admin(&["restore", "--from", from, "--force"], &data, &key);
    assert!(
        !out.status.success(),
        "restore ran under a live vault: {}",
        text(&out)
    );
    assert!(text(&out).contains("in use"), "{}", text(&out));
    drop(server);
    let out = admin(&["restore", "--from", from, "--force"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
}

/// The race of issue 13 end to end: while `restore --force` of a large backup runs, "servers"
/// keep starting every 600 ms (as systemd's `Restart=on-failure` would), tokenizing and
/// stopping. A start that begins once the restore's copy exists in the data directory must
/// either be refused or keep its acknowledged token after the restore. (A start that wins the
/// race before the restore locks the directory makes the restore fail "in use"; it is retried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_acknowledged_during_a_restore_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 30_000, None).await;
    let out_file = dir.path().join("big.db");
    vault.backup(&Caller::cli(), &out_file).await.unwrap();
    vault.close().await;
    drop(vault);
    let master = MasterKey::load_file(&key).unwrap();
    let copying = |data: &Path| {
        std::fs::read_dir(data).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".vault.db.restore-") || n.starts_with(".restore-")
        })
    };
    let (mut during, mut refused, mut n) = (Vec::new(), 0, 1_000_000);
    let mut restored = false;
    for _attempt in 0..10 {
        let mut restore = bin()
            .args(["restore", "--force", "--from"])
            .arg(&out_file)
            .arg("--data-dir")
            .arg(&data)
            .arg("--master-key-file")
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Starts come every 600 ms, the first 200 ms after the restore began.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = loop {
            if let Some(st) = restore.try_wait().unwrap() {
                break st;
            }
            let began_while_copying = copying(&data);
            match Vault::open(VaultConfig::new(&data), &master) {
                Ok(v) => {
                    if let Ok(t) = v.tokenize(&caller(), req(n, None)).await {
                        if began_while_copying {
                            during.push(t.token);
                        }
                    }
                    n += 1;
                    v.close().await;
                }
                Err(_) => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(600)).await;
        };
        let out = restore.wait_with_output().unwrap();
        if status.success() {
            restored = true;
            break;
        }
        eprintln!("restore attempt: {}", text(&out));
        assert!(text(&out).contains("in use"), "{}", text(&out));
    }
    assert!(restored, "restore never got the directory");
    let v = open(&data, &key);
    let mut lost = 0;
    for t in &during {
        if v.detokenize(&caller(), t.clone(), "check".into())
            .await
            .is_err()
        {
            lost += 1;
        }
    }
    v.close().await;
    eprintln!(
        "{} tokens acknowledged by starts during the copy, {refused} starts refused",
        during.len()
    );
    assert_eq!(
        lost, 0,
        "{lost} tokens acknowledged during the restore were lost"
    );
    assert!(
        refused > 0,
        "no start fell into the restore (the test did not test anything)"
    );
}

// ------------------------------------------------------------------------------------------
// 2. stale WAL and verification

/// After `rm vault.db` with its WAL left behind, restoring an older backup must not combine
/// the two: the restored vault holds exactly the backup's tokens and passes its checks.
#[tokio::test]
async fn restore_never_replays_a_wal_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    let old = tokenize_n(&vault, 0, 400, None).await;
    let backup = dir.path().join("old.db");
    vault.backup(&Caller::cli(), &backup).await.unwrap();
    let backup_rows = 400;
    // Newer history, in the WAL.
    tokenize_n(&vault, 10_000, 600, None).await;
    let wal = std::fs::read(data.join("vault.db-wal")).unwrap();
    assert!(wal.len() > 32 * 1024, "the WAL holds the newer history");
    vault.close().await;
    drop(vault);
    // The operator's bad day: the database goes, its WAL stays.
    std::fs::remove_file(data.join("vault.db")).unwrap();
    std::fs::write(data.join("vault.db-wal"), &wal).unwrap();

    let out = admin(
        &["restore", "--from", backup.to_str().unwrap()],
        &data,
        &key,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        token_rows(&data),
        backup_rows,
        "the restored vault mixed in a stale WAL"
    );
    let out = admin(&["check", "--full"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    let out = admin(&["audit", "verify"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    let v = open(&data, &key);
    for t in old.iter().take(50) {
        v.detokenize(&caller(), t.clone(), "check".into())
            .await
            .unwrap();
    }
    v.close().await;
}

/// Restore reports success only after the restored copy passed `check --full` and
/// `audit verify`; a backup with a broken audit chain or an altered ciphertext replaces
/// nothing.
#[tokio::test]
async fn restore_verifies_the_copy_before_reporting_success() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 50, None).await;
    let good = dir.path().join("good.db");
    vault.backup(&Caller::cli(), &good).await.unwrap();
    vault.close().await;
    drop(vault);
    let rows_before = token_rows(&data);

    // An audit record edited inside the backup (the SQLite file itself is sound).
    let bad_audit = dir.path().join("bad-audit.db");
    std::fs::copy(&good, &bad_audit).unwrap();
    rusqlite::Connection::open(&bad_audit)
        .unwrap()
        .execute("UPDATE audit SET reason = 'edited' WHERE seq = 3", [])
        .unwrap();
    // A ciphertext altered inside the backup.
    let bad_row = dir.path().join("bad-row.db");
    std::fs::copy(&good, &bad_row).unwrap();
    {
        let c = rusqlite::Connection::open(&bad_row).unwrap();
        let mut ct: Vec<u8> = c
            .query_row("SELECT ciphertext FROM tokens WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        ct[2] ^= 1;
        c.execute("UPDATE tokens SET ciphertext = ?1 WHERE id = 7", [ct])
            .unwrap();
    }
    let target = dir.path().join("fresh");
    for bad in [&bad_audit, &bad_row] {
        let out = admin(
            &["restore", "--force", "--from", bad.to_str().unwrap()],
            &data,
            &key,
        );
        assert!(
            !out.status.success(),
            "a damaged backup was restored: {}",
            text(&out)
        );
        let out = admin(&["restore", "--from", bad.to_str().unwrap()], &target, &key);
        assert!(
            !out.status.success(),
            "a damaged backup was restored: {}",
            text(&out)
        );
        assert!(!target.join("vault.db").exists());
    }
    assert_eq!(token_rows(&data), rows_before, "the live vault was touched");
    let out = admin(
        &["restore", "--json", "--from", good.to_str().unwrap()],
        &target,
        &key,
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows_checked"], 50);
    assert!(report["audit_records"].as_u64().unwrap() > 0);
}

// ------------------------------------------------------------------------------------------
// 3. purge arithmetic and confirmation

#[tokio::test]
async fn purge_with_an_absurd_age_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    // Valid for another day.
    let tomorrow = now_micros() + 86_400_000_000;
    tokenize_n(&vault, 0, 500, Some(tomorrow)).await;
    let err = vault
        .purge(
            &caller(),
            &PurgeOptions {
                deleted: true,
                expired: true,
                older_than: Some(Duration::from_secs(999_999_999 * 86_400)),
                batch: 100,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(token_rows(&data), 500);
    vault.close().await;
    drop(vault);

    for age in ["999999999d", "18446744073709551615s", "36501d"] {
        let out = admin(
            &["purge", "--expired", "--yes", "--older-than", age],
            &data,
            &key,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert_eq!(
            token_rows(&data),
            500,
            "purge --older-than {age} deleted live tokens"
        );
    }
}

#[tokio::test]
async fn purge_shows_what_it_will_remove_and_needs_yes_without_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    let tokens = tokenize_n(&vault, 0, 20, None).await;
    for t in &tokens[..5] {
        vault.delete(&caller(), t.clone()).await.unwrap();
    }
    vault.close().await;
    drop(vault);

    let out = admin(&["purge", "--deleted", "--dry-run"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("would remove 5 deleted tokens"),
        "{}",
        text(&out)
    );
    assert_eq!(token_rows(&data), 20);
    // No terminal, no --yes: refused, with what it would have removed.
    let out = admin(&["purge", "--deleted"], &data, &key);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("5 deleted tokens") && text(&out).contains("--yes"),
        "{}",
        text(&out)
    );
    assert_eq!(token_rows(&data), 20);
    let out = admin(&["purge", "--deleted", "--yes"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(token_rows(&data), 15);
}

// ------------------------------------------------------------------------------------------
// 7, 8. backup files: never inside the data directory; nothing left behind

#[tokio::test]
async fn backup_into_the_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 10, None).await;
    vault.close().await;
    drop(vault);
    let link = dir.path().join("link-to-data");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    for out_path in [
        data.join("vault.db-journal"),
        data.join("sub-backup.db"),
        link.join("x.db"),
    ] {
        let out = admin(
            &["backup", "--out", out_path.to_str().unwrap()],
            &data,
            &key,
        );
        assert!(
            !out.status.success(),
            "backup into {} accepted",
            out_path.display()
        );
        assert!(
            text(&out).contains("inside the data directory"),
            "{}",
            text(&out)
        );
        assert!(!out_path.exists());
    }
    let out = admin(&["check", "--full"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(token_rows(&data), 10);
}

/// What killed backups and restores leave (ciphertext copies) is owner-only, listed by
/// `check`, and removed by the next run.
#[tokio::test]
async fn leftovers_of_killed_backups_and_restores_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 10, None).await;
    vault.close().await;
    drop(vault);
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let out_file = backups.join("nightly.db");
    // As a backup killed half-way leaves it (same name pattern, not locked by anyone).
    let partial = backups.join(".nightly.db.partial-1764000000000000");
    std::fs::write(&partial, b"half a snapshot").unwrap();
    let unrelated = backups.join(".other.db.partial-1764000000000000");
    std::fs::write(&unrelated, b"another backup's").unwrap();
    let out = admin(
        &["backup", "--out", out_file.to_str().unwrap()],
        &data,
        &key,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!partial.exists(), "the dead partial file was left behind");
    assert!(
        unrelated.exists(),
        "a partial file of another --out was removed"
    );
    assert_eq!(
        std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // As killed restores leave them: the old temp-file name and a staging directory.
    let old_style = data.join(".vault.db.restore-1764000000000000");
    std::fs::write(&old_style, b"a restore's copy").unwrap();
    let staging = data.join(".restore-1764000000000001");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("vault.db"), b"a restore's copy").unwrap();
    let out = admin(&["check"], &data, &key);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains(".vault.db.restore-1764000000000000") && t.contains(".restore-1764000000000001"),
        "check does not mention the leftovers: {t}"
    );
    let out = admin(
        &["restore", "--force", "--from", out_file.to_str().unwrap()],
        &data,
        &key,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !old_style.exists() && !staging.exists(),
        "restore left the leftovers"
    );
    // Nothing else of the restore is left beside the vault either.
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

// ------------------------------------------------------------------------------------------
// 9, 10. odd paths

#[test]
fn empty_data_dir_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    MasterKey::generate().write_new_file(&key).unwrap();
    // `--data-dir ""` (flag or environment) is refused by the parser.
    let out = bin()
        .current_dir(dir.path())
        .args(["check", "--data-dir", "", "--master-key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "[storage]\ndata_dir = \"\"\n").unwrap();
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("data_dir"), "{}", text(&out));
    // `serve` with that file: refused before anything is created, not "no vault in".
    let out = bin()
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--master-key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("data_dir is empty"), "{}", text(&out));
    assert!(Vault::open(VaultConfig::new(""), &MasterKey::generate()).is_err());
}

/// A FIFO at the master-key path: SIGHUP must not wedge the server, and SIGTERM still stops it.
#[test]
fn fifo_master_key_on_sighup_does_not_stop_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (data, key) = rt.block_on(async {
        let (vault, data, key) = new_vault(dir.path());
        vault.close().await;
        (data, key)
    });
    let (mut child, addr, _log) = start_serve(&data, &key);
    assert!(addr.is_some(), "serve did not start");
    std::fs::remove_file(&key).unwrap();
    let c_path = std::ffi::CString::new(key.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(8));
    if status.is_none() {
        kill(&mut child);
        panic!("serve did not exit on SIGTERM after a SIGHUP with a FIFO as master key");
    }
}

// ------------------------------------------------------------------------------------------
// 11. the clock

/// Vault time never runs backwards, so a clock stepping back does not revive an expired token;
/// a clock stepping forward expires tokens early but purge destroys none of them within the
/// grace period; purge refuses while the clock is behind the newest recorded time; audit
/// times stay in sequence order.
#[tokio::test]
async fn clock_steps_neither_revive_nor_destroy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::stepped();
    let c = clock.clone();
    let (vault, data, _key) = new_vault_with(dir.path(), move |cfg| cfg.clock = c);
    let hour = 3_600_000_000i64;

    // Step back: a token that expired stays expired.
    let soon = vault.now() + 300_000;
    let short = tokenize_n(&vault, 0, 1, Some(soon)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        vault.detokenize(&caller(), short.clone(), "x".into()).await,
        Err(Error::NotFound)
    ));
    clock.set_step(-hour);
    assert!(
        matches!(
            vault.detokenize(&caller(), short.clone(), "x".into()).await,
            Err(Error::NotFound)
        ),
        "a clock stepping back revived an expired token"
    );
    // ... and purge refuses to judge expiry by it.
    let expired_opts = PurgeOptions {
        deleted: true,
        expired: true,
        older_than: Some(Duration::ZERO),
        batch: 10,
    };
    let err = vault.purge(&caller(), &expired_opts).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("behind"), "{err}");
    assert_eq!(token_rows(&data), 1);
    // Audit times never go backwards, whatever the clock does.
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    let ats: Vec<i64> = conn
        .prepare("SELECT at FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        ats.windows(2).all(|w| w[0] <= w[1]),
        "audit times out of order"
    );
    clock.set_step(0);
    vault.close().await;
    drop(vault);

    // Step forward (a fresh vault, since vault time does not forget): tokens expire early,
    // and are not destroyed by a default purge.
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::stepped();
    let c = clock.clone();
    let (vault, data, _key) = new_vault_with(dir.path(), move |cfg| cfg.clock = c);
    let in_an_hour = vault.now() + hour;
    let live = tokenize_n(&vault, 0, 20, Some(in_an_hour)).await;
    clock.set_step(3 * hour);
    assert!(matches!(
        vault
            .detokenize(&caller(), live[0].clone(), "x".into())
            .await,
        Err(Error::NotFound)
    ));
    let default_opts = PurgeOptions {
        deleted: false,
        expired: true,
        older_than: None,
        batch: 10,
    };
    let r = vault.purge(&caller(), &default_opts).await.unwrap();
    assert_eq!(
        r.expired, 0,
        "a forward clock step let purge destroy live tokens"
    );
    assert_eq!(token_rows(&data), 20);
    vault.close().await;
}

/// `audit export --since-seq N` resumes by sequence number, whatever the clock did.
#[tokio::test]
async fn audit_export_resumes_by_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, data, key) = new_vault(dir.path());
    tokenize_n(&vault, 0, 5, None).await;
    let head = vault.audit_head_seq().await.unwrap();
    vault.close().await;
    drop(vault);
    let out = admin(
        &["audit", "export", "--since-seq", &(head - 2).to_string()],
        &data,
        &key,
    );
    assert!(out.status.success(), "{}", text(&out));
    let seqs: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["sequence"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![head - 1, head]);
}

// ------------------------------------------------------------------------------------------
// 6. long admin work

async fn vault_needing_rewrap(dir: &Path, rows: u64) -> (PathBuf, PathBuf) {
    let (vault, data, key) = new_vault(dir);
    tokenize_n(&vault, 0, rows, None).await;
    vault.rotate_key(&Caller::cli()).await.unwrap();
    vault.close().await;
    (data, key)
}

fn rewrap_child(data: &Path, key: &Path) -> Child {
    bin()
        .args(["keys", "rewrap", "--batch", "1000000", "--data-dir"])
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `keys rewrap --batch 1000000` no longer holds the write lock for the whole table: every
/// admin transaction ends within its time budget, so serving writes wait milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_rewrap_batch_does_not_stall_serving_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key) = vault_needing_rewrap(dir.path(), 60_000).await;
    let mut cfg = VaultConfig::new(&data);
    cfg.busy_timeout = Duration::from_secs(5);
    let server = Vault::open(cfg, &MasterKey::load_file(&key).unwrap()).unwrap();
    let mut child = rewrap_child(&data, &key);
    let (mut worst, mut n, mut writes) = (Duration::ZERO, 2_000_000u64, 0);
    while child.try_wait().unwrap().is_none() {
        let t = Instant::now();
        server.tokenize(&caller(), req(n, None)).await.unwrap();
        worst = worst.max(t.elapsed());
        n += 1;
        writes += 1;
    }
    assert!(child.wait().unwrap().success());
    let v1: i64 = rusqlite::Connection::open(data.join("vault.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM tokens WHERE key_version = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v1, 0, "rewrap did not finish");
    eprintln!("{writes} serving writes during the rewrap, worst latency {worst:?}");
    assert!(
        worst < Duration::from_millis(1000),
        "a serving write waited {worst:?} for an admin batch"
    );
    server.close().await;
}

/// Ctrl-Z (SIGTSTP) on a rewrap stops it between batches, never inside a transaction: the
/// server keeps writing (and so revealing) while the rewrap is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_z_on_a_rewrap_does_not_stop_the_vault() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key) = vault_needing_rewrap(dir.path(), 60_000).await;
    let mut cfg = VaultConfig::new(&data);
    cfg.busy_timeout = Duration::from_secs(2);
    let server = Vault::open(cfg, &MasterKey::load_file(&key).unwrap()).unwrap();
    let mut child = rewrap_child(&data, &key);
    let pid = child.id() as libc::pid_t;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTSTP) };
    // Wait until it is stopped (state T in /proc).
    let stopped = {
        let start = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
            if state == Some('T') {
                break true;
            }
            if start.elapsed() > Duration::from_secs(5) || child.try_wait().unwrap().is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let r = if stopped {
        let t = Instant::now();
        let r = server.tokenize(&caller(), req(3_000_000, None)).await;
        Some((r.map(|_| ()), t.elapsed()))
    } else {
        None
    };
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(child.wait().unwrap().success());
    server.close().await;
    if let Some((r, took)) = r {
        assert!(
            r.is_ok(),
            "the vault stopped with its rewrap: {:?}",
            r.err()
        );
        assert!(took < Duration::from_secs(1), "a write waited {took:?}");
    } else {
        eprintln!("rewrap finished before it could be stopped");
    }
}

/// `reuse_existing` and the reveal judge expiry by the vault's time, like the lookup does: a
/// token the vault calls expired is never handed out again, and one it calls live reveals.
#[tokio::test]
async fn reuse_and_reveal_judge_expiry_by_vault_time() {
    let minute = 60_000_000i64;
    // Clock ahead of the system clock: the token expired by vault time is not reused.
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::stepped();
    let c = clock.clone();
    let (vault, _data, _key) = new_vault_with(dir.path(), move |cfg| cfg.clock = c);
    let reusing = |expires_at| TokenizeRequest {
        reuse_existing: true,
        ..req(7, expires_at)
    };
    let first = vault
        .tokenize(&caller(), reusing(Some(vault.now() + 30 * minute)))
        .await
        .unwrap();
    clock.set_step(60 * minute);
    assert!(matches!(
        vault
            .detokenize(&caller(), first.token.clone(), "x".into())
            .await,
        Err(Error::NotFound)
    ));
    let again = vault.tokenize(&caller(), reusing(None)).await.unwrap();
    assert!(
        again.created && again.token != first.token,
        "reuse_existing returned a token the vault calls expired"
    );
    vault
        .detokenize(&caller(), again.token, "x".into())
        .await
        .expect("the token reuse_existing returned must reveal");
    vault.close().await;
    drop(vault);

    // Clock behind the vault's newest record: vault time holds still, so a token it calls
    // live reveals even after the system clock passed its expiry.
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::stepped();
    let c = clock.clone();
    let (vault, _data, _key) = new_vault_with(dir.path(), move |cfg| cfg.clock = c);
    vault.tokenize(&caller(), req(1, None)).await.unwrap();
    clock.set_step(-60 * minute);
    let soon = vault.now() + 200_000;
    let t = vault
        .tokenize(&caller(), reusing(Some(soon)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        vault.now() < soon,
        "vault time moved with the stepped-back clock"
    );
    vault
        .detokenize(&caller(), t.token.clone(), "x".into())
        .await
        .expect("a token live by vault time must reveal");
    let again = vault.tokenize(&caller(), reusing(None)).await.unwrap();
    assert_eq!(
        again.token, t.token,
        "a token live by vault time must be reused"
    );
    vault.close().await;
}

/// Ctrl-Z right after destroying rewrap batches: the stopped process's own checkpointer (which
/// keeps retrying `wal_checkpoint(TRUNCATE)` after every destroying commit, holding the write
/// lock while it waits) is quiesced before the stop, so the server still writes at once. A
/// reader on an old snapshot keeps every TRUNCATE waiting, which makes a stop inside one likely
/// on each of the many stops below unless the safe point waits it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_z_after_a_destroying_batch_leaves_no_checkpoint_holding_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key) = vault_needing_rewrap(dir.path(), 60_000).await;
    let mut cfg = VaultConfig::new(&data);
    cfg.busy_timeout = Duration::from_secs(2);
    let server = Vault::open(cfg, &MasterKey::load_file(&key).unwrap()).unwrap();
    let reader = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    let mut child = bin()
        .args(["keys", "rewrap", "--batch", "500", "--data-dir"])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')').next().unwrap_or("").trim().chars().next()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut stops, mut worst, mut n) = (0, Duration::ZERO, 4_000_000u64);
    while stops < 12 && child.try_wait().unwrap().is_none() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTSTP) };
        let start = Instant::now();
        while state() != Some('T') && start.elapsed() < Duration::from_secs(5) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if state() == Some('T') {
            stops += 1;
            let t = Instant::now();
            let r = server.tokenize(&caller(), req(n, None)).await;
            n += 1;
            worst = worst.max(t.elapsed());
            if let Err(e) = r {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                let _ = child.wait();
                panic!("a write failed while the rewrap was stopped (stop {stops}): {e}");
            }
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(reader);
    assert!(child.wait().unwrap().success());
    server.close().await;
    eprintln!("{stops} stops after destroying batches; worst write while stopped {worst:?}");
    assert!(
        stops >= 3,
        "only {stops} stops landed before the rewrap finished"
    );
    assert!(
        worst < Duration::from_secs(1),
        "a write waited {worst:?} while the rewrap was stopped"
    );
}
