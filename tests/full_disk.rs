//! Full disks, on a real small filesystem: a tmpfs mounted with `size=` (needs root, as in CI
//! containers; without the privilege to mount, the tests say so and do nothing, except under
//! CI=true, where they fail).
//!
//! - The storage limit counts everything the vault writes (WAL included) and keeps real
//!   headroom: filled to the refusal, every reveal still commits its audit record.
//! - With no limit, a disk filled by someone else still leaves reveals working.
//! - A vault closed on a full disk opens again, and the README's recovery procedure
//!   (`check`, `audit verify`, `purge`, then free space) works.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::test_pan;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let opts = c(&format!("size={mib}m,mode=0700"));
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                c("tmpfs").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EPERM),
                "mounting a tmpfs failed: {e}"
            );
            // In CI nothing may be skipped for lack of a component: there it fails.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the full-disk tests as root (mounting a tmpfs failed: {e})"
            );
            eprintln!(
                "SKIPPED: no privilege to mount a tmpfs ({e}); run as root to test full disks"
            );
            return None;
        }
        Some(Tmpfs { _dir: dir, path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

fn req(n: u64) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(&test_pan(n)).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at: None,
    }
}

/// Tokenizes batches of 500 until an item is refused; returns the tokens stored and the
/// refusal. A failed batch (the disk filled under a commit) is returned as the refusal too.
async fn fill(vault: &Vault, limit: u64) -> (Vec<Token>, Error) {
    let mut tokens = Vec::new();
    let mut n = 0;
    loop {
        assert!(n < limit, "tokenize was never refused");
        match vault
            .tokenize_batch(&caller(), (n..n + 500).map(req).collect())
            .await
        {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(t) => tokens.push(t.token),
                        Err(e) => return (tokens, e),
                    }
                }
            }
            Err(e) => return (tokens, e),
        }
        n += 500;
    }
}

/// Reveals `tokens` one by one (each its own audit commit); returns how many failed.
async fn reveal_all(vault: &Vault, tokens: &[Token]) -> usize {
    let mut failed = 0;
    for t in tokens {
        if vault
            .detokenize(&caller(), t.clone(), "charge".into())
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    failed
}

fn spread(tokens: &[Token], n: usize) -> Vec<Token> {
    let step = (tokens.len() / n).max(1);
    tokens.iter().step_by(step).take(n).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_limit_counts_the_wal_and_keeps_reveals_working_on_a_small_disk() {
    let Some(fs) = Tmpfs::mount(24) else { return };
    let master = MasterKey::generate();
    let mut cfg = VaultConfig::new(fs.path.join("data"));
    // The operator sets the limit to the size of the disk.
    cfg.max_storage_bytes = Some(24 << 20);
    let vault = Vault::create(cfg, &master).unwrap();
    let (tokens, refusal) = fill(&vault, 400_000).await;
    assert!(
        matches!(refusal, Error::ResourceExhausted(_)),
        "tokenize failed with {refusal} instead of RESOURCE_EXHAUSTED"
    );
    assert!(tokens.len() > 10_000, "only {} tokens fit", tokens.len());
    let sample = spread(&tokens, 400);
    let failed = reveal_all(&vault, &sample).await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} reveals failed on a full vault",
        sample.len()
    );
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_someone_else_leaves_reveals_working() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let master = MasterKey::generate();
    let data = fs.path.join("data");
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let tokens = {
        let mut t = Vec::new();
        for b in 0..4 {
            for r in vault
                .tokenize_batch(&caller(), (b * 500..(b + 1) * 500).map(req).collect())
                .await
                .unwrap()
            {
                t.push(r.unwrap().token);
            }
        }
        t
    };
    // Another program fills the disk to the last byte.
    let _filler = fill_disk(&fs.path);
    // Tokenize is refused (the disk is full), reveals keep working.
    tokio::time::sleep(Duration::from_millis(300)).await;
    match vault.tokenize(&caller(), req(9_999_999)).await {
        Err(Error::ResourceExhausted(_)) => {}
        other => panic!("tokenize on a full disk: {:?}", other.map(|t| t.token)),
    }
    let failed = reveal_all(&vault, &spread(&tokens, 300)).await;
    assert_eq!(failed, 0, "{failed} reveals failed on a full disk");
    vault.close().await;
}

/// Takes every free byte of the filesystem in one `fallocate`, as another program filling the
/// disk would, and returns the file's path. One call, not a loop of writes: the vault's
/// prober gives its reserve back when it sees the disk nearly full, and a filler still
/// writing then would eat the reserve too (the race that once failed this test in CI).
fn fill_disk(dir: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let path = dir.join("filler");
    let f = std::fs::File::create(&path).unwrap();
    // tmpfs allocates all or nothing: a failure means the vault wrote in between, so measure
    // again and retry; the first success has taken every free page.
    for _ in 0..50 {
        let free = tokenvault::store::space::free_bytes(dir).expect("statvfs");
        if free == 0 {
            return path; // full already
        }
        // SAFETY: a valid open descriptor; mode 0 allocates [0, free).
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, free as libc::off_t) } == 0 {
            f.sync_all().unwrap();
            return path;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fallocate: {e}");
    }
    panic!("could not take the disk's free space in one step");
}

fn bin() -> Command {
    common::tokenvault_command()
}

fn admin(args: &[&str], data: &Path, key: &Path) -> Output {
    bin()
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The README's recovery procedure for a vault closed on a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_closed_on_a_full_disk_opens_again_and_recovers() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let key = fs.path.join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key).unwrap();
    let data = fs.path.join("data");
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let mut tokens = Vec::new();
    for b in 0..4 {
        for r in vault
            .tokenize_batch(&caller(), (b * 500..(b + 1) * 500).map(req).collect())
            .await
            .unwrap()
        {
            tokens.push(r.unwrap().token);
        }
    }
    for t in &tokens[..500] {
        vault.delete(&caller(), t.clone()).await.unwrap();
    }
    // Let the reserve appear, as it does on a vault that has been running for a second.
    let start = Instant::now();
    while !data.join("vault.reserve").exists() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    vault.close().await;
    drop(vault);
    let filler = fill_disk(&fs.path);

    // The procedure: check, audit verify, purge what may go, then free space.
    for args in [
        vec!["check"],
        vec!["audit", "verify"],
        vec!["purge", "--deleted", "--yes"],
    ] {
        let out = admin(&args, &data, &key);
        assert!(
            out.status.success(),
            "{args:?} on a full disk: {}",
            text(&out)
        );
    }
    let vault = Vault::open(VaultConfig::new(&data), &master).expect("open on a full disk");
    assert_eq!(reveal_all(&vault, &tokens[500..700]).await, 0);
    std::fs::remove_file(filler).unwrap();
    let start = Instant::now();
    loop {
        match vault.tokenize(&caller(), req(7_777_777)).await {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("tokenize did not recover once space was freed: {e}"),
        }
    }
    vault.close().await;
}
