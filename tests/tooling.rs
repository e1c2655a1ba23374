//! Issue 18, the hand-written utilities replaced by crates, end to end through the binary:
//! one duration grammar (humantime) on every flag and key, byte sizes with units (bytesize),
//! `--version` with the commit, completions and man pages from the clap definition
//! (clap_complete, clap_mangen), tables with headers (comfy-table) and progress bars on a
//! terminal only (indicatif).

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

/// The binary with no inherited tokenvault settings, run in `cwd`.
fn tokenvault(cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(cwd).env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOKENVAULT_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn ok(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    stdout
}

/// A fresh vault in `dir/data` with its master key in `dir/mk`.
fn init(dir: &Path) {
    ok(tokenvault(dir)
        .args(["init", "--data-dir", "data", "--generate-master-key", "mk"])
        .output()
        .unwrap());
}

fn admin(dir: &Path, args: &[&str]) -> Output {
    tokenvault(dir)
        .args(args)
        .args(["--data-dir", "data", "--master-key-file", "mk"])
        .output()
        .unwrap()
}

#[test]
fn every_duration_flag_takes_the_same_grammar() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);

    // `purge --older-than 2w` was refused while `--key-max-age 2w` worked.
    let out = ok(admin(
        dir,
        &["purge", "--deleted", "--older-than", "2w", "--json"],
    ));
    assert!(out.contains("\"deleted_removed\":0"), "{out}");
    ok(admin(dir, &["purge", "--expired", "--older-than", "1.5d"]));
    let bad = admin(dir, &["purge", "--deleted", "--older-than", "2 fortnights"]);
    assert_eq!(bad.status.code(), Some(2), "{:?}", text(&bad));

    // `tokenize --expires-in` took bare seconds only: the duration is parsed (the command
    // goes on to dial the server), a bad one is a usage error.
    let tokenize = |expires: &str| {
        let mut child = tokenvault(dir)
            .args([
                "tokenize",
                "--addr",
                "http://127.0.0.1:9",
                "--api-key",
                "tvk_x",
            ])
            .args(["--expires-in", expires])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(b"4111111111111111\n");
        child.wait_with_output().unwrap()
    };
    for good in ["30d", "2w", "3600"] {
        let out = tokenize(good);
        assert!(
            text(&out).1.contains("cannot reach the server"),
            "{good}: {:?}",
            text(&out)
        );
    }
    for bad in ["1.5s", "2 fortnights", "200years"] {
        assert_eq!(tokenize(bad).status.code(), Some(2), "{bad}");
    }

    // `--request-timeout 1.5s` was refused while `bench -d 1.5s` worked.
    let check = |args: &[&str]| {
        ok(tokenvault(dir)
            .args(["config", "check", "--no-files"])
            .args(args)
            .output()
            .unwrap())
    };
    let out = check(&["--request-timeout", "1.5s", "--key-max-age", "2w"]);
    assert!(out.contains("request_timeout = \"1500ms\""), "{out}");
    assert!(out.contains("max_age = \"2w\""), "{out}");
    // Bare seconds still work on the flag, and fractions of them.
    let out = check(&["--request-timeout", "2.5"]);
    assert!(out.contains("request_timeout = \"2500ms\""), "{out}");

    // The same grammar in the file.
    std::fs::write(
        dir.join("tv.toml"),
        "[limits]\nrequest_timeout = \"1m 30s\"\n[key_rotation]\nmax_age = \"12weeks\"\n",
    )
    .unwrap();
    let out = check(&["--config", "tv.toml"]);
    assert!(out.contains("request_timeout = \"90s\""), "{out}");
    assert!(out.contains("max_age = \"12w\""), "{out}");
}

#[test]
fn byte_sizes_take_units_and_raw_integers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let check = |args: &[&str], env: Option<&str>| {
        let mut cmd = tokenvault(dir);
        cmd.args(["config", "check", "--no-files"]).args(args);
        if let Some(v) = env {
            cmd.env("TOKENVAULT_MAX_STORAGE_BYTES", v);
        }
        cmd.output().unwrap()
    };
    for (file_value, bytes) in [
        ("\"10GiB\"", "10737418240"),
        ("10737418240", "10737418240"),
        ("\"512 MiB\"", "536870912"),
    ] {
        std::fs::write(
            dir.join("tv.toml"),
            format!("[limits]\nmax_storage_bytes = {file_value}\n"),
        )
        .unwrap();
        let out = ok(check(&["--config", "tv.toml"], None));
        assert!(
            out.contains(&format!("max_storage_bytes = {bytes}")),
            "{file_value}: {out}"
        );
    }
    let out = ok(check(&["--max-storage-bytes", "2GiB"], None));
    assert!(out.contains("max_storage_bytes = 2147483648"), "{out}");
    let out = ok(check(&[], Some("64MB")));
    assert!(out.contains("max_storage_bytes = 64000000"), "{out}");
    // Under the 1 MiB floor, with a unit or without: refused.
    let small = check(&["--max-storage-bytes", "1KiB"], None);
    assert!(!small.status.success(), "{:?}", text(&small));
    assert!(
        text(&small).1.contains("max_storage_bytes"),
        "{:?}",
        text(&small)
    );
    let junk = check(&["--max-storage-bytes", "lots"], None);
    assert_eq!(junk.status.code(), Some(2), "{:?}", text(&junk));
}

#[test]
fn version_names_the_commit() {
    let out = ok(Command::new(BIN).arg("--version").output().unwrap());
    let version = out.trim();
    let prefix = format!("tokenvault {} (", env!("CARGO_PKG_VERSION"));
    assert!(
        version.starts_with(&prefix) && version.ends_with(')'),
        "{version}"
    );
    let commit = &version[prefix.len()..version.len() - 1];
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match (head, std::env::var("GIT_COMMIT")) {
        // A build argument names the commit (container builds without .git).
        (_, Ok(given)) if !given.is_empty() => assert_eq!(commit, given.trim()),
        (Some(head), _) => assert_eq!(commit, head, "{version}"),
        (None, _) => assert_eq!(commit, "unknown", "{version}"),
    }
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definition() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = ok(tokenvault(dir)
            .args(["completions", shell])
            .output()
            .unwrap());
        // Subcommands and their flags, straight from the definition.
        for word in ["tokenvault", "purge", "older-than", "rewrap"] {
            assert!(out.contains(word), "{shell}: {word} missing");
        }
    }
    let bash = ok(tokenvault(dir)
        .args(["completions", "bash"])
        .output()
        .unwrap());
    std::fs::write(dir.join("tokenvault.bash"), &bash).unwrap();
    if let Ok(out) = Command::new("bash")
        .arg("-n")
        .arg(dir.join("tokenvault.bash"))
        .output()
    {
        assert!(out.status.success(), "bash -n: {:?}", text(&out));
    }
    let bad = tokenvault(dir)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let page = ok(tokenvault(dir).arg("man").output().unwrap());
    assert!(page.contains(".TH tokenvault 1"), "{page}");
    assert!(page.contains(env!("CARGO_PKG_VERSION")), "{page}");
    for sub in ["purge", "keys", "completions"] {
        assert!(page.contains(sub), "{sub} missing from the man page");
    }
    ok(tokenvault(dir)
        .args(["man", "--out-dir", "man"])
        .output()
        .unwrap());
    let purge = std::fs::read_to_string(dir.join("man/tokenvault-purge.1")).unwrap();
    assert!(purge.contains("older\\-than"), "{purge}");
    assert!(dir.join("man/tokenvault-keys-rewrap.1").exists());
    assert!(dir.join("man/tokenvault.1").exists());
}

#[test]
fn tables_have_headers_and_audit_tail_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);
    ok(admin(
        dir,
        &["clients", "add", "shop", "--roles", "tokenize"],
    ));

    let tail = ok(admin(dir, &["audit", "tail"]));
    let lines: Vec<&str> = tail.lines().collect();
    assert!(
        lines[0].starts_with("SEQ  TIME") && lines[0].contains("PRINCIPAL"),
        "{tail}"
    );
    assert!(lines.iter().any(|l| l.contains("client_add")), "{tail}");
    // Columns line up under the header.
    let col = lines[0].find("ACTION").unwrap();
    let row = lines.iter().find(|l| l.contains("client_add")).unwrap();
    assert_eq!(row.find("client_add"), Some(col), "{tail}");
    assert!(lines.iter().all(|l| !l.ends_with(' ')), "{tail:?}");

    let keys = ok(admin(dir, &["keys", "list"]));
    assert!(keys.starts_with("VERSION  STATE"), "{keys}");
    let clients = ok(admin(dir, &["clients", "list"]));
    assert!(
        clients.lines().next().unwrap().starts_with("NAME"),
        "{clients}"
    );
}

#[test]
fn rewrap_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);

    // Off a terminal: plain lines, no carriage returns or escape codes in the log.
    let out = admin(dir, &["keys", "rewrap"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );

    // On a terminal (util-linux `script` gives the command a pty): an indicatif bar.
    let cmd = format!("{BIN} keys rewrap --data-dir data --master-key-file mk");
    let Ok(pty) = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
    else {
        eprintln!("no `script` here: the terminal half is not checked");
        return;
    };
    let screen = String::from_utf8_lossy(&pty.stdout);
    assert!(pty.status.success(), "{screen}");
    assert!(screen.contains("rewrap [00:00:"), "{screen:?}");
    assert!(screen.contains('█'), "a drawn bar: {screen:?}");
    assert!(screen.contains("re-encrypted 0 rows"), "{screen:?}");
}

/// The image's HEALTHCHECK, run as written in deploy/Dockerfile against a `serve` child that
/// requires client certificates: the environment the Dockerfile documents
/// (TOKENVAULT_TLS_CA, plus TOKENVAULT_CLIENT_TLS_CERT/KEY under mutual TLS) is all it needs.
#[test]
fn dockerfile_healthcheck_works_with_mutual_tls_as_documented() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use std::io::BufRead;
    use std::time::Duration;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir);

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issue = |sans: Vec<SanType>, usage, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        p.distinguished_name.push(DnType::CommonName, "leaf");
        p.extended_key_usages = vec![usage];
        let cert = p
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    issue(
        vec![SanType::DnsName("localhost".try_into().unwrap())],
        ExtendedKeyUsagePurpose::ServerAuth,
        "tls",
    );
    // Bound to no principal: it can reach health and nothing else.
    issue(vec![], ExtendedKeyUsagePurpose::ClientAuth, "health");

    let mut serve = tokenvault(dir)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", "data", "--master-key-file", "mk"])
        .args([
            "--tls-cert",
            "tls.crt",
            "--tls-key",
            "tls.key",
            "--client-ca",
            "ca.crt",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = serve.stderr.take().unwrap();
    let _serve = Kill(serve);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            // Nested or flat JSON log lines alike.
            for o in [&v["fields"], &v] {
                if o["message"] == "serving" {
                    if let Some(listen) = o["listen"].as_str() {
                        let _ = tx.send(listen.to_owned());
                    }
                }
            }
        }
    });
    let listen: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server did not report serving in time")
        .parse()
        .unwrap();

    // The HEALTHCHECK's exec array, as written.
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .unwrap();
    let argv: Vec<String> = serde_json::from_str(&line[line.find('[').unwrap()..]).unwrap();
    assert_eq!(argv[0], "/usr/local/bin/tokenvault");
    let argv: Vec<String> = argv[1..]
        .iter()
        .map(|a| a.replace(":50051", &format!(":{}", listen.port())))
        .collect();
    let image_env = |name: &str| {
        let at = joined.find(&format!("{name}=")).unwrap() + name.len() + 1;
        joined[at..].split_whitespace().next().unwrap().to_owned()
    };
    let ca_path = image_env("TOKENVAULT_TLS_CA");
    assert_eq!(ca_path, "/etc/tokenvault/tls/ca.crt");
    let check = |client_cert: bool| {
        let mut cmd = tokenvault(dir);
        cmd.args(&argv).env("TOKENVAULT_TLS_CA", dir.join("ca.crt"));
        if client_cert {
            cmd.env("TOKENVAULT_CLIENT_TLS_CERT", dir.join("health.crt"))
                .env("TOKENVAULT_CLIENT_TLS_KEY", dir.join("health.key"));
        }
        cmd.output().unwrap()
    };
    // Without the client certificate the handshake is refused: the check fails, as it must.
    let refused = check(false);
    assert!(!refused.status.success(), "{:?}", text(&refused));
    // With it, as documented: SERVING.
    let out = ok(check(true));
    assert_eq!(out.trim(), "SERVING");
}

/// `tokenize` on a terminal (a pty from util-linux `script`): rpassword prompts, the card
/// number typed is not echoed, and it is read (the command goes on to dial the server).
#[test]
fn tokenize_on_a_terminal_reads_the_card_without_echo() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let pan = "4111111111111111";
    // Port 9 (discard) on loopback: nothing listens, the dial fails fast after the read.
    let cmd = format!("{BIN} tokenize --addr http://127.0.0.1:9 --api-key tvk_test");
    let Ok(mut child) = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(tmp.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("no `script` here: not checked");
        return;
    };
    // Typed after the prompt is up (echo is off by then), as a person would.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{pan}\n").as_bytes()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("Card number (input hidden): "),
        "{screen:?}"
    );
    assert!(screen.contains("cannot reach the server"), "{screen:?}");
    assert!(
        !screen.contains(pan),
        "the card number was echoed: {screen:?}"
    );
}
