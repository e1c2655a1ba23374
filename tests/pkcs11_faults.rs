//! PKCS#11 faults under a vault that is open (its own test binary: the module is loaded once
//! per process, with this binary's SOFTHSM2_CONF). The token forgets the login (as after an
//! HSM restart or fail-over): the next wrap opens a fresh session and succeeds. When no
//! fresh session can be had, the error is UNAVAILABLE, never DATA_LOSS or a wrong key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::TokenFormat;
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "20261203";

/// Logs the application out of the token through a second handle on the module (login
/// state is per application, so every session of the vault loses it too).
fn log_out_everyone() {
    let ctx = Pkcs11::new(MODULE).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx.get_slots_with_initialized_token().unwrap()[0];
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(PIN)));
    session.logout().unwrap();
}

fn req() -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse("4111111111111111").unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_reopened_and_a_dead_token_is_unavailable() {
    if !Path::new(MODULE).exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("SoftHSM2 is not installed ({MODULE})");
        }
        eprintln!("\n*** SKIPPED: SoftHSM2 is not installed ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    // Before the module is first loaded in this process (the only test of this binary).
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "vault", "--pin", PIN])
        .args(["--so-pin", "87654321"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let pin = dir.path().join("pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    let uri = format!(
        "pkcs11:token=vault;object=master?module-path={MODULE}&pin-source=file:{}",
        pin.display()
    );
    let master = MasterKey::open_pkcs11(&uri, true).unwrap();
    let data = dir.path().join("data");
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let caller = Caller::cli();
    let t = vault.tokenize(&caller, req()).await.unwrap().token;

    // The token forgot the login: the wrap of a new data key reopens the session.
    log_out_everyone();
    assert_eq!(vault.rotate_key(&caller).await.unwrap(), 2);
    log_out_everyone();
    vault.reload_master_key(&master).await.unwrap();
    let r = vault
        .detokenize(&caller, t.clone(), "t".into())
        .await
        .unwrap();
    assert_eq!(r.pan.expose_digits(), "4111111111111111");

    // No fresh session to be had (the PIN source is gone): UNAVAILABLE, not DATA_LOSS,
    // and not a wrong master key.
    std::fs::remove_file(&pin).unwrap();
    log_out_everyone();
    let e = vault.rotate_key(&caller).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let e = Vault::open(VaultConfig::new(&data), &master)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let e = vault.reload_master_key(&master).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    // The token comes back: the same handle serves again.
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(vault.rotate_key(&caller).await.unwrap(), 3);
    vault.close().await;
    drop(vault);
    let vault = Vault::open(VaultConfig::new(&data), &master).unwrap();
    let r = vault.detokenize(&caller, t, "t".into()).await.unwrap();
    assert_eq!(r.pan.expose_digits(), "4111111111111111");
    vault.close().await;
}
