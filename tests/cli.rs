//! Smoke tests of the `tokenvault` binary: admin commands on a fresh vault, exit codes, and
//! `serve --dev` end to end with the client commands.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary with no inherited tokenvault settings, run in `cwd`.
fn tokenvault(cwd: &Path) -> Command {
    let mut cmd = common::tokenvault_command();
    cmd.current_dir(cwd);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run tokenvault")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_clients_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("master.key");

    let out = run(tokenvault(dir)
        .args(["init", "--data-dir", "data", "--generate-master-key"])
        .arg(&key));
    assert_ok(&out);
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);

    let admin = |args: &[&str]| {
        let mut cmd = tokenvault(dir);
        cmd.args(args)
            .args(["--data-dir", "data"])
            .arg("--master-key-file")
            .arg(&key);
        run(&mut cmd)
    };

    let out = admin(&["clients", "add", "checkout", "--roles", "tokenize,info"]);
    assert_ok(&out);
    let api_key = stdout(&out).trim().to_owned();
    assert!(api_key.starts_with("tvk_"), "{api_key}");
    assert_eq!(stdout(&out).lines().count(), 1, "only the key on stdout");

    let out = admin(&["clients", "list", "--json"]);
    assert_ok(&out);
    let clients: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(clients[0]["name"], "checkout");
    assert_eq!(clients[0]["roles"], serde_json::json!(["tokenize", "info"]));
    assert!(!stdout(&out).contains(&api_key), "keys are never listed");

    // A shared reuse scope and an own reuse budget (issue 11.1).
    let out = admin(&[
        "clients",
        "add",
        "shop-web",
        "--roles",
        "tokenize",
        "--reuse-group",
        "shop",
        "--reuse-rate",
        "500/s",
    ]);
    assert_ok(&out);
    let out = admin(&["clients", "list", "--json"]);
    let clients: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let web = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "shop-web")
        .unwrap();
    assert_eq!(web["reuse_group"], "shop");
    assert_eq!(web["reuse_rate"], 500.0);
    assert!(clients[0]["reuse_group"].is_null());
    let out = admin(&[
        "clients",
        "add",
        "y",
        "--roles",
        "tokenize",
        "--reuse-rate",
        "fast",
    ]);
    assert_eq!(out.status.code(), Some(2), "a bad rate is a usage error");

    let out = admin(&["keys", "list", "--json"]);
    assert_ok(&out);
    let keys: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(keys[0]["version"], 1);
    assert_eq!(keys[0]["state"], "active");

    let out = admin(&["keys", "rotate"]);
    assert_ok(&out);
    let out = admin(&["keys", "list"]);
    assert_ok(&out);
    let table = stdout(&out);
    assert!(table.starts_with("VERSION"), "{table}");
    assert!(
        table.contains("decrypt-only") && table.contains("active"),
        "{table}"
    );

    let out = admin(&["clients", "revoke", "checkout"]);
    assert_ok(&out);
    let out = admin(&["clients", "revoke", "checkout"]);
    assert_eq!(out.status.code(), Some(1));

    let out = admin(&["clients", "add", "x", "--roles", "superuser"]);
    assert_eq!(out.status.code(), Some(2), "unknown role is a usage error");

    // A second init over the same directory is refused.
    let out = admin(&["init"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out =
        run(tokenvault(dir).args(["init", "--data-dir", "data", "--generate-master-key", "k"]));
    assert_ok(&out);

    // No master key at all.
    let out = run(tokenvault(dir).args(["keys", "list", "--data-dir", "data"]));
    assert_eq!(out.status.code(), Some(3));
    // A well-formed key that is not this vault's.
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let out = run(tokenvault(dir)
        .args(["keys", "list", "--data-dir", "data"])
        .env("TOKENVAULT_MASTER_KEY", wrong));
    assert_eq!(out.status.code(), Some(3));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(wrong));
    // No vault in the directory.
    let out = run(tokenvault(dir).args([
        "keys",
        "list",
        "--data-dir",
        "nowhere",
        "--master-key-file",
        "k",
    ]));
    assert_eq!(out.status.code(), Some(4));
    // Plaintext on a non-loopback address is refused outside --dev.
    let out = run(tokenvault(dir).args([
        "serve",
        "--data-dir",
        "data",
        "--master-key-file",
        "k",
        "--listen",
        "0.0.0.0:0",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"));
    // Client command without a server.
    let mut cmd = tokenvault(dir);
    cmd.args(["tokenize", "--addr", "http://127.0.0.1:1"])
        .env("TOKENVAULT_API_KEY", "tvk_a_b")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"4111111111111111\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("4111111111111111"));
}

/// Stops the child on drop so a failing test leaves no server behind.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// `serve --dev` in `cwd`, logging everything down to trace level into `log`.
    fn start_dev(cwd: &Path, log: &Path) -> Server {
        let log = std::fs::File::create(log).unwrap();
        let mut child = tokenvault(cwd)
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "trace",
            ])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Server { child, lines }
    }

    /// Banner lines up to its closing rule.
    fn banner(&self) -> Vec<String> {
        let mut banner = Vec::new();
        let mut rules = 0;
        while rules < 3 {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("banner within 30 s");
            if line.starts_with("=====") {
                rules += 1;
            }
            banner.push(line);
        }
        banner
    }

    fn terminate(&mut self) -> Option<i32> {
        #[cfg(unix)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not stop within 15 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn banner_value(banner: &[String], label: &str) -> String {
    banner
        .iter()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix(label)
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {label:?} in banner:\n{}", banner.join("\n")))
}

#[cfg(unix)]
#[test]
fn serve_dev_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let log = dir.join("server.log");
    let mut server = Server::start_dev(dir, &log);
    let banner = server.banner();
    assert!(banner.iter().any(|l| l.contains("DEVELOPMENT ONLY")));
    let checkout = banner_value(&banner, "checkout  API key:");
    let payments = banner_value(&banner, "payments  API key:");
    let listening = banner_value(&banner, "listening:");
    let addr = format!("http://{}", listening.split_whitespace().next().unwrap());
    assert_eq!(mode(&dir.join("tokenvault-data/master.key")), 0o600);
    assert_eq!(mode(&dir.join("tokenvault-data/dev-credentials")), 0o600);

    let client = |key: &str, args: &[&str], stdin: Option<&str>| {
        let mut cmd = tokenvault(dir);
        cmd.args(args)
            .args(["--addr", &addr])
            .env("TOKENVAULT_API_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    };

    let out = client(&checkout, &["tokenize"], Some("4111 1111 1111 1111\n"));
    assert_ok(&out);
    let token = stdout(&out).trim().to_owned();
    assert!(token.starts_with("tok_"), "{token}");

    let out = client(
        &payments,
        &["detokenize", &token, "--reason", "smoke test"],
        None,
    );
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "4111111111111111");

    let out = client(&checkout, &["info", &token, "--json"], None);
    assert_ok(&out);
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["brand"], "visa");
    assert_eq!(info["last4"], "1111");

    let out = client(&checkout, &["detokenize", &token], None);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));

    let out = client(&checkout, &["tokenize"], Some("4111111111111112\n"));
    assert_eq!(out.status.code(), Some(5));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("4111111111111112"));

    let out = client("", &["health"], None);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "SERVING");

    assert_eq!(server.terminate(), Some(0));
    drop(server);

    // Even at trace level the server logged no card number and no API key.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("rpc finished"), "the log has the requests");
    for secret in [
        "4111111111111111",
        "4111 1111",
        "4111111111111112",
        &checkout,
        &payments,
    ] {
        assert!(!logged.contains(secret), "log contains a secret");
    }

    // Admin commands on a dev vault find its generated key without being told.
    let out = run(tokenvault(dir).args(["clients", "list", "--json"]));
    assert_ok(&out);
    let clients: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = clients
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["checkout", "payments"]);

    // A second --dev start reuses the vault and shows the same keys again.
    let mut server = Server::start_dev(dir, &log);
    let banner = server.banner();
    assert_eq!(banner_value(&banner, "checkout  API key:"), checkout);
    assert_eq!(banner_value(&banner, "payments  API key:"), payments);
    assert_eq!(server.terminate(), Some(0));
}
