//! PostgreSQL password authentication end to end: a role that must log in with SCRAM
//! (pg_hba `scram-sha-256` on the loopback), the password from `PGPASSWORD` or a libpq
//! password file. A file `PGPASSFILE` names that others may read stops the command; a
//! `~/.pgpass` others may read is ignored (as libpq does); a wrong or missing password is a
//! clear failure; no password ever shows in any output. And at `--log-level debug` no
//! statement parameter shows either.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

mod pg;

const PASSWORD: &str = "Corr3ct-h0rse:b@ttery/st?ple";
const WRONG: &str = "not-the-Passw0rd";

fn bin(home: &Path) -> Command {
    let mut c = common::tokenvault_command();
    c.env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("HOME", home);
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

/// A libpq password file line for `url`'s database; `:` in the password escaped.
fn pgpass(path: &Path, port: &str, db: &str, password: &str, mode: u32) {
    let line = format!(
        "127.0.0.1:{port}:{db}:vaultpw:{}\n",
        password.replace('\\', "\\\\").replace(':', "\\:")
    );
    std::fs::write(path, format!("# vault\n*:*:otherdb:*:nope\n{line}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_scram_role_logs_in_with_a_password_from_pgpassword_or_a_0600_password_file() {
    let Some(cluster) = pg::private_cluster() else {
        return;
    };
    let superuser_url = cluster.create_db();
    let db = pg::db_of(&superuser_url).to_owned();
    cluster.sql(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE vaultpw LOGIN PASSWORD '{PASSWORD}'; \
             ALTER DATABASE {db} OWNER TO vaultpw"
        ),
    );
    // This role, and only it, must prove its password on the loopback.
    let hba = cluster.dir().join("data").join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all vaultpw 127.0.0.1/32 scram-sha-256\n{rest}"),
    )
    .unwrap();
    cluster.sql("postgres", "SELECT pg_reload_conf()");
    let url = superuser_url.replacen("postgres@", "vaultpw@", 1);
    let port = url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .unwrap()
        .to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let key = tmp.path().join("pg.key");
    let init = |env: &[(&str, &std::ffi::OsStr)]| {
        let mut c = bin(&home);
        c.args(["init", "--store-url", &url, "--generate-master-key"])
            .arg(&key);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let all = text(&out);
        assert!(!all.contains(PASSWORD) && !all.contains(WRONG), "{all}");
        assert!(!all.contains("Corr3ct"), "{all}");
        out
    };
    let refused = |out: &Output, why: &str| {
        assert!(!out.status.success(), "{}", text(out));
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains(why), "expected {why:?}: {}", text(out));
    };

    // No password anywhere: the server asks for one and the command fails clearly.
    refused(&init(&[]), "password");
    // A wrong password, from PGPASSWORD: refused by the server.
    refused(&init(&[("PGPASSWORD", WRONG.as_ref())]), "password");
    // A ~/.pgpass others can read is ignored, with a warning naming the file (libpq's rule).
    let dot = home.join(".pgpass");
    pgpass(&dot, &port, &db, PASSWORD, 0o644);
    let out = init(&[]);
    refused(&out, "password");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password file ignored"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(&dot).unwrap();
    // The file PGPASSFILE names, readable by others: the command stops and says why.
    let named = tmp.path().join("vault.pgpass");
    pgpass(&named, &port, &db, PASSWORD, 0o640);
    refused(&init(&[("PGPASSFILE", named.as_os_str())]), "chmod 0600");
    // 0600 with the wrong password: the server refuses it.
    pgpass(&named, &port, &db, WRONG, 0o600);
    refused(&init(&[("PGPASSFILE", named.as_os_str())]), "password");
    assert!(!key.exists(), "a failed init wrote the key file");
    // 0600 with the right one: the vault is created, and opens with PGPASSWORD too.
    pgpass(&named, &port, &db, PASSWORD, 0o600);
    let out = init(&[("PGPASSFILE", named.as_os_str())]);
    assert!(out.status.success(), "{}", text(&out));
    let status = bin(&home)
        .args(["keys", "list", "--store-url", &url, "--master-key-file"])
        .arg(&key)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    assert!(!text(&status).contains(PASSWORD));
    assert_eq!(
        cluster.query(&db, "SELECT count(*) FROM data_keys"),
        "1",
        "the vault lives in the role's database"
    );
}

/// `--log-level debug` on a PostgreSQL store: the driver logs every statement's parameters
/// at debug (tokens, ciphertexts, client key hashes, audit records), so its statement logs
/// stay off whatever level is asked for; the vault's own debug lines still show.
#[test]
fn debug_logs_never_carry_the_databases_statement_parameters() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let url = cluster.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("pg.key");
    let run = |args: &[&str]| {
        let out = bin(tmp.path())
            .args(["--log-level", "debug"])
            .args(args)
            .args(["--store-url", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    let init = run(&["init", "--generate-master-key", key.to_str().unwrap()]);
    let key_arg = ["--master-key-file", key.to_str().unwrap()];
    let add = run(&[
        &["clients", "add", "checkout", "--roles", "tokenize"][..],
        &key_arg,
    ]
    .concat());
    let api_key = String::from_utf8_lossy(&add.stdout).trim().to_owned();
    assert!(api_key.len() >= 20, "{}", text(&add));
    let list = run(&[&["keys", "list"][..], &key_arg].concat());
    let stored_hash = cluster.query_blobs(
        pg::db_of(&url),
        "SELECT key_hash FROM clients WHERE name = 'checkout'",
    );
    let mut debug_lines = 0;
    for out in [&init, &add, &list] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        debug_lines += stderr.lines().filter(|l| l.contains("DEBUG")).count();
        assert!(!stderr.contains("with parameters"), "{}", text(out));
        assert!(!stderr.contains("DEBUG tokio_postgres"), "{}", text(out));
        assert!(!stderr.contains(&api_key), "{}", text(out));
        for hash in &stored_hash {
            assert!(
                !stderr.contains(&format!("{hash:?}")[1..20]),
                "{}",
                text(out)
            );
        }
    }
    assert!(
        debug_lines > 0,
        "no debug line at all: the level was not debug"
    );
}
