//! Admin processes and key material (issue 11, item 9), against the real binary: every
//! command that opens the vault disables core dumps before the master key is read; the key
//! in `TOKENVAULT_MASTER_KEY` leaves the process environment; the dev key fallback needs a
//! vault that `serve --dev` created; group- or other-writable data is refused; and
//! `keys rotate-master` says what the old master key can still open.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tokenvault(cwd: &Path) -> Command {
    let mut cmd = common::tokenvault_command();
    cmd.current_dir(cwd);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A vault in `dir/data` with its key in `dir/k`.
fn init(dir: &Path) {
    assert_ok(
        &tokenvault(dir)
            .args(["init", "--data-dir", "data", "--generate-master-key", "k"])
            .output()
            .unwrap(),
    );
}

fn admin(dir: &Path, args: &[&str]) -> Output {
    tokenvault(dir)
        .args(args)
        .args(["--data-dir", "data", "--master-key-file", "k"])
        .output()
        .unwrap()
}

fn core_limit_of(pid: u32) -> Option<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))?;
    line.split_whitespace().nth(4).map(str::to_owned)
}

#[test]
fn every_admin_command_disables_core_dumps_before_reading_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    let key = std::fs::read(dir.join("k")).unwrap();
    let fifo = dir.join("key.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

    let backup = dir.join("b.db");
    let commands: Vec<Vec<&str>> = vec![
        vec!["check", "--full"],
        vec!["keys", "rewrap"],
        vec!["keys", "revoke", "1"],
        vec!["purge", "--deleted"],
        vec!["audit", "verify"],
        vec!["clients", "list"],
        vec!["backup", "--out", backup.to_str().unwrap()],
    ];
    for args in commands {
        let mut cmd = tokenvault(dir);
        cmd.args(&args)
            .args(["--data-dir", "data", "--master-key-file"])
            .arg(&fifo)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Start with core dumps allowed, so the child's own hardening is what is seen.
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: libc::RLIM_INFINITY,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        // The child now blocks opening the key FIFO: by then core dumps must be off.
        let start = Instant::now();
        let mut limit = core_limit_of(pid);
        while limit.as_deref() != Some("0") && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
            limit = core_limit_of(pid);
        }
        let hardened = limit.as_deref() == Some("0");
        // Hand over the key, so the command finishes either way.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .unwrap()
            .write_all(&key)
            .unwrap();
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            hardened,
            "{args:?}: core file size limit {limit:?} while reading the master key"
        );
        assert!(status.success(), "{args:?}: {status:?} {err}");
    }
}

#[test]
fn the_open_path_disables_core_dumps_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    // Undo whatever this process inherited, so the open path has something to do.
    // SAFETY: plain integer arguments / a valid struct.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
    }
    assert_eq!(tokenvault::hardening::dumpable(), Some(true));
    let args = tokenvault::cli::common::VaultArgs {
        data_dir: dir.join("data"),
        master_key_file: Some(dir.join("k")),
        store_url: None,
        master_key_pkcs11: None,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let vault = args.open().unwrap();
        vault.close().await;
    });
    assert_eq!(tokenvault::hardening::dumpable(), Some(false));
    assert_eq!(tokenvault::hardening::core_limit(), Some(0));
}

#[test]
fn the_master_key_variable_leaves_the_process_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    let key = std::fs::read_to_string(dir.join("k")).unwrap();
    let key = key.trim();
    let log = dir.join("serve.log");
    let mut child = tokenvault(dir)
        .args(["serve", "--data-dir", "data", "--listen", "127.0.0.1:0"])
        .env("TOKENVAULT_MASTER_KEY", key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("serving") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let limit = core_limit_of(pid);
    let _ = child.kill();
    let _ = child.wait();
    let environ = text(&environ);
    assert!(
        !environ.contains(key),
        "the master key is readable in /proc/{pid}/environ"
    );
    assert_eq!(limit.as_deref(), Some("0"));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(key));
}

#[test]
fn the_dev_key_fallback_needs_a_vault_serve_dev_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    // A production vault with a key file and dev credentials planted beside its data.
    let data = dir.join("data");
    std::fs::copy(dir.join("k"), data.join("master.key")).unwrap();
    std::fs::set_permissions(
        data.join("master.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(data.join("dev-credentials"), "checkout=tvk_a_b\n").unwrap();
    std::fs::set_permissions(
        data.join("dev-credentials"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = tokenvault(dir)
        .args(["clients", "list", "--data-dir", "data"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("--master-key-file"),
        "{}",
        text(&out.stderr)
    );
    // `serve --dev` does not adopt it either.
    let out = tokenvault(dir)
        .args([
            "serve",
            "--dev",
            "--data-dir",
            "data",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("serve --dev"),
        "{}",
        text(&out.stderr)
    );
    // With its key given, it opens as always.
    assert_ok(&admin(dir, &["clients", "list"]));
}

#[test]
fn data_or_key_writable_by_group_or_others_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    let set = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    assert_ok(&admin(dir, &["clients", "list"]));
    for (path, open, closed, fix) in [
        (dir.join("data"), 0o770, 0o700, "chmod 700"),
        (dir.join("data"), 0o702, 0o700, "chmod 700"),
        (dir.join("data/vault.db"), 0o620, 0o600, "chmod 600"),
        (dir.join("data/vault.db"), 0o666, 0o600, "chmod 600"),
        (dir.join("k"), 0o620, 0o600, "chmod 600"),
    ] {
        set(&path, open);
        let out = admin(dir, &["clients", "list"]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{} mode {open:o} accepted",
            path.display()
        );
        assert!(
            err.contains("group or others") && err.contains(fix),
            "{} mode {open:o}: {err}",
            path.display()
        );
        set(&path, closed);
    }
    assert_ok(&admin(dir, &["clients", "list"]));
}

#[test]
fn rotate_master_says_the_old_master_and_an_old_backup_still_open_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    assert_ok(&admin(dir, &["backup", "--out", "before.db"]));
    tokenvault::crypto::MasterKey::generate()
        .write_new_file(&dir.join("k2"))
        .unwrap();
    let out = admin(
        dir,
        &["keys", "rotate-master", "--new-master-key-file", "k2"],
    );
    assert_ok(&out);
    let said = text(&out.stdout);
    assert!(
        said.contains("OLD master key") && said.contains("backup"),
        "rotate-master does not say what the old key still opens: {said}"
    );
    // And it is true: the old master key opens the backup taken before the rotation.
    let out = tokenvault(dir)
        .args(["restore", "--from", "before.db", "--data-dir", "restored"])
        .args(["--master-key-file", "k"])
        .output()
        .unwrap();
    assert_ok(&out);
}
