//! `tokenvault config check` end to end: precedence flag > environment > file > default,
//! unknown keys named, secrets redacted, exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// The binary with no inherited tokenvault settings.
fn tokenvault(cwd: &Path) -> Command {
    let mut cmd = common::tokenvault_command();
    cmd.current_dir(cwd);
    cmd
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn precedence_flag_over_env_over_file_over_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tv.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:6000\"\n[limits]\nmax_batch_items = 50\nrequest_timeout = \"9s\"\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = tokenvault(dir.path());
        cmd.args(["config", "check", "--no-files"]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        stdout
    };

    // Default only.
    let out = check(&[], &[]);
    assert!(out.contains("listen = \"127.0.0.1:50051\""), "{out}");
    assert!(out.contains("max_batch_items = 10000"), "{out}");

    // File over default (named by flag, then by TOKENVAULT_CONFIG).
    let f = file.to_str().unwrap();
    for out in [
        check(&[], &["--config", f]),
        check(&[("TOKENVAULT_CONFIG", f)], &[]),
    ] {
        assert!(out.contains("listen = \"127.0.0.1:6000\""), "{out}");
        assert!(out.contains("max_batch_items = 50"), "{out}");
        assert!(out.contains("request_timeout = \"9s\""), "{out}");
        assert!(out.contains("max_age = \"90d\""), "default kept: {out}");
    }

    // Environment over file.
    let env = [
        ("TOKENVAULT_CONFIG", f),
        ("TOKENVAULT_LISTEN", "127.0.0.1:7000"),
        ("TOKENVAULT_MAX_BATCH_ITEMS", "60"),
    ];
    let out = check(&env, &[]);
    assert!(out.contains("listen = \"127.0.0.1:7000\""), "{out}");
    assert!(out.contains("max_batch_items = 60"), "{out}");
    assert!(out.contains("request_timeout = \"9s\""), "file kept: {out}");

    // Flag over environment.
    let out = check(
        &env,
        &["--listen", "127.0.0.1:8000", "--request-timeout", "2"],
    );
    assert!(out.contains("listen = \"127.0.0.1:8000\""), "{out}");
    assert!(out.contains("max_batch_items = 60"), "env kept: {out}");
    assert!(out.contains("request_timeout = \"2s\""), "{out}");
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tv.toml");
    std::fs::write(&file, "[limits]\nmax_batch_items = 5\nmax_bach = 1\n").unwrap();
    let out = tokenvault(dir.path())
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("unknown field `max_bach`"), "{stderr}");
    assert!(
        stdout.is_empty(),
        "nothing printed for a bad file: {stdout}"
    );

    let out = tokenvault(dir.path())
        .args(["config", "check", "--config", "missing.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("missing.toml"));
}

#[test]
fn secrets_are_redacted_and_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let secret_master = "c2VjcmV0LW1hc3Rlci1rZXktYnl0ZXMtMzItbG9uZyE=";
    let secret_api = "tvk_very_secret_api_key_value";
    let out = tokenvault(dir.path())
        .args(["config", "check"])
        .env("TOKENVAULT_MASTER_KEY", secret_master)
        .env("TOKENVAULT_API_KEY", secret_api)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("master_key = \"<redacted>\""), "{stdout}");
    assert!(stdout.contains("api_key = \"<redacted>\""), "{stdout}");
    for s in [secret_master, secret_api] {
        assert!(!stdout.contains(s) && !stderr.contains(s), "secret printed");
    }
    assert!(stderr.contains("no vault there yet"), "{stderr}");

    // A master key file readable by others is refused, as `serve` would.
    let key = dir.path().join("master.key");
    std::fs::write(&key, format!("{secret_master}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = tokenvault(dir.path())
            .args(["config", "check", "--master-key-file"])
            .arg(&key)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    }

    // A TLS file that does not exist is named.
    let out = tokenvault(dir.path())
        .args([
            "config",
            "check",
            "--tls-cert",
            "nope.crt",
            "--tls-key",
            "nope.key",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("nope.crt"), "{:?}", text(&out));

    // Plaintext on a public address is refused.
    let out = tokenvault(dir.path())
        .args(["config", "check", "--no-files", "--listen", "0.0.0.0:50051"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("requires TLS"));
}

/// Every struct that holds a store URL (the file's `[store]`, the flags and environment,
/// the merged overrides, the vault settings, the CLI's vault and migrate arguments) prints
/// with `{:?}` without the password, whether it came in the userinfo or as `?password=`.
#[test]
fn no_debug_output_shows_the_store_password() {
    use clap::Parser;
    use tokenvault::cli::common::VaultArgs;
    use tokenvault::cli::store::MigrateArgs;
    use tokenvault::config::{Config, ConfigArgs};

    #[derive(Parser, Debug)]
    struct Vault {
        #[command(flatten)]
        v: VaultArgs,
    }
    #[derive(Parser, Debug)]
    struct Migrate {
        #[command(flatten)]
        m: MigrateArgs,
    }
    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        c: ConfigArgs,
    }
    const SECRET: &str = "s3cr3t-pw";
    for url in [
        "postgres://vault:s3cr3t-pw@db.example/vault?sslmode=disable",
        "postgresql://vault@127.0.0.1/vault?password=s3cr3t-pw",
        // Review finding: tokio-postgres reads the userinfo up to the first `@` (base64
        // passwords hold `/`), and decodes query keys.
        "postgres://vault:s3cr3t-pw/x+y=@db.example/vault?sslmode=disable",
        "postgres://vault:a?s3cr3t-pw@db.example/vault?sslmode=disable",
        "postgresql://vault@127.0.0.1/vault?pass%77ord=s3cr3t-pw",
    ] {
        let file = Config::from_toml(&format!("[store]\nurl = \"{url}\"\n")).unwrap();
        let flags = Flags::try_parse_from(["t", "--store-url", url]).unwrap();
        let overrides = flags.c.overrides(None, None);
        let merged = Config::default().overlay(&overrides);
        let vault_args = Vault::try_parse_from(["t", "--store-url", url]).unwrap();
        let migrate = Migrate::try_parse_from(["t", "--to", url]).unwrap();
        let shown = [
            format!("{:?}", file.store),
            format!("{file:?}"),
            format!("{flags:?}"),
            format!("{overrides:?}"),
            format!("{merged:?}"),
            format!("{:?}", merged.vault_config()),
            format!("{vault_args:?}"),
            format!("{:?}", vault_args.v.config()),
            format!("{migrate:?}"),
            format!("{:#?}", merged.vault_config()),
        ];
        for s in shown {
            assert!(!s.contains(SECRET), "{s}");
            assert!(s.contains("vault@") || s.contains("vault:***@"), "{s}");
        }
        // The value itself still reaches the connection.
        assert_eq!(merged.vault_config().store_url.as_deref(), Some(url));
    }
}
