//! `serve --dev`: a one-command local setup. Creates the data directory, a master key file,
//! the vault and two demo principals as needed, and prints their API keys.
//!
//! API keys are shown only when created, so the demo keys are kept in
//! `<data-dir>/dev-credentials` (mode 0600) for the next `serve --dev` to print again. Nothing
//! here runs without `--dev`: a real deployment never stores API keys.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::common::{create_private_dir, CliError, VaultArgs};
use crate::auth::Role;
use crate::crypto::MasterKey;
use crate::vault::{Caller, Vault, VaultConfig};

pub const MASTER_KEY_FILE: &str = "master.key";
pub const CREDENTIALS_FILE: &str = "dev-credentials";

/// The demo principals: a checkout page that tokenizes, a payments service that reveals.
pub const DEV_CLIENTS: [(&str, &[Role]); 2] = [
    ("checkout", &[Role::Tokenize, Role::Info]),
    ("payments", &[Role::Detokenize, Role::Info]),
];

/// What `prepare` did, for the banner.
#[derive(Debug)]
pub struct DevSetup {
    pub data_dir: PathBuf,
    /// The generated or reused key file, when the key was not supplied by the user.
    pub master_key_file: Option<PathBuf>,
    /// Each demo principal with its key, when known.
    pub keys: Vec<(&'static str, Option<String>)>,
}

/// The generated key of a vault made by `serve --dev`: only when the vault itself records
/// that `serve --dev` created it. Files in the directory prove nothing: a production vault
/// with a planted `master.key` and `dev-credentials` must still be given its key.
pub fn dev_master_key(data_dir: &Path) -> Option<PathBuf> {
    let key = data_dir.join(MASTER_KEY_FILE);
    (key.is_file() && crate::store::sqlite::is_dev_vault(data_dir).unwrap_or(false)).then_some(key)
}

/// `config` holds the vault settings (key policy, storage limit) for `args.data_dir`.
pub async fn prepare(args: &VaultArgs, config: VaultConfig) -> Result<(Vault, DevSetup), CliError> {
    let data_dir = args.data_dir.clone();
    create_private_dir(&data_dir)?;
    let exists = Vault::exists(&data_dir);

    let (master, master_key_file) = if args.has_master_key_source() {
        (args.master_key()?, None)
    } else {
        let path = data_dir.join(MASTER_KEY_FILE);
        if exists && !crate::store::sqlite::is_dev_vault(&data_dir).unwrap_or(false) {
            return Err(CliError::MasterKey(format!(
                "{} holds a vault that `serve --dev` did not create; pass its key with \
                 --master-key-file (a key file beside the data is used only for development \
                 vaults)",
                data_dir.display()
            )));
        } else if path.exists() {
            crate::hardening::harden_process();
            (MasterKey::load_file(&path)?, Some(path))
        } else if exists {
            return Err(CliError::MasterKey(format!(
                "{} holds a vault but no {MASTER_KEY_FILE}; pass its key with --master-key-file",
                data_dir.display()
            )));
        } else {
            let key = MasterKey::generate();
            key.write_new_file(&path)?;
            (key, Some(path))
        }
    };

    let vault = if exists {
        Vault::open(config, &master)?
    } else {
        Vault::create_dev(config, &master)?
    };
    match ensure_clients(&vault, &data_dir).await {
        Ok(keys) => Ok((
            vault,
            DevSetup {
                data_dir,
                master_key_file,
                keys,
            },
        )),
        Err(e) => {
            vault.close().await;
            Err(e)
        }
    }
}

/// Creates the demo principals that are missing and returns every demo key it knows.
async fn ensure_clients(
    vault: &Vault,
    data_dir: &Path,
) -> Result<Vec<(&'static str, Option<String>)>, CliError> {
    let cred_path = data_dir.join(CREDENTIALS_FILE);
    let mut saved = read_credentials(&cred_path)?;
    let clients = vault.list_clients().await?;
    let mut changed = false;
    let mut keys = Vec::new();
    for (name, roles) in DEV_CLIENTS {
        let existing = clients.iter().find(|c| c.name == name);
        let live = existing.is_some_and(|c| c.revoked_at.is_none());
        let key = if live {
            // Only trust a saved key that still authenticates as this principal.
            saved
                .get(name)
                .filter(|k| vault.authenticate_api_key(k).is_ok_and(|p| p.name == name))
                .cloned()
        } else if existing.is_some() {
            tracing::warn!(client = name, "demo client is revoked; not recreating it");
            None
        } else {
            let key = vault.add_client(&Caller::cli(), name, roles, None).await?;
            saved.insert(name.to_owned(), key.clone());
            changed = true;
            Some(key)
        };
        keys.push((name, key));
    }
    if changed {
        write_credentials(&cred_path, &saved)?;
    }
    Ok(keys)
}

fn read_credentials(path: &Path) -> Result<BTreeMap<String, String>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(CliError::Storage(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// Writes the file whole (temp file + rename) with mode 0600.
fn write_credentials(path: &Path, creds: &BTreeMap<String, String>) -> Result<(), CliError> {
    let mut text = String::from(
        "# DEVELOPMENT ONLY: API keys of the demo clients created by `tokenvault serve --dev`.\n\
         # Never use this file, these keys or this vault for real card data.\n",
    );
    for (name, key) in creds {
        text.push_str(&format!("{name}={key}\n"));
    }
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| CliError::Storage(format!("cannot write {}: {e}", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

pub fn print_banner(setup: &DevSetup, bound: SocketAddr, args: &VaultArgs, tls: bool) {
    // Examples connect over loopback even when listening on all interfaces.
    let target = if bound.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port())
    } else {
        bound
    };
    let rule = "=".repeat(78);
    let mut out = String::new();
    out.push_str(&format!("{rule}\n"));
    out.push_str("  DEVELOPMENT ONLY -- DEVELOPMENT ONLY -- DEVELOPMENT ONLY\n");
    out.push_str("  This vault, its master key and the API keys below are for local testing.\n");
    out.push_str("  Never put real card data in it. Never run --dev in production.\n");
    out.push_str(&format!("{rule}\n"));
    out.push_str(&format!("  data dir:    {}\n", setup.data_dir.display()));
    if let Some(key) = &setup.master_key_file {
        out.push_str(&format!("  master key:  {}\n", key.display()));
    }
    let transport = if tls { "TLS" } else { "plaintext gRPC" };
    out.push_str(&format!("  listening:   {bound} ({transport})\n\n"));
    for (name, key) in &setup.keys {
        match key {
            Some(k) => out.push_str(&format!("  {name:<9} API key: {k}\n")),
            None => out.push_str(&format!(
                "  {name:<9} API key: unknown (not in {CREDENTIALS_FILE}); create another client \
                 with `tokenvault clients add`\n"
            )),
        }
    }
    let key_of = |n: &str| {
        setup
            .keys
            .iter()
            .find(|(name, _)| *name == n)
            .and_then(|(_, k)| k.clone())
            .unwrap_or_else(|| "<api key>".into())
    };
    let (checkout, payments) = (key_of("checkout"), key_of("payments"));
    let (scheme, ca, grpcurl_tls) = if tls {
        ("https", " --tls-ca <ca.pem>", "-cacert <ca.pem>")
    } else {
        ("http", "", "-plaintext")
    };
    out.push_str("\n  Try it (4111 1111 1111 1111 is a test card number):\n\n");
    out.push_str(&format!(
        "    echo 4111111111111111 | TOKENVAULT_API_KEY={checkout} \\\n      tokenvault tokenize --addr {scheme}://{target}{ca}\n"
    ));
    out.push_str(&format!(
        "    TOKENVAULT_API_KEY={payments} tokenvault detokenize <token> --reason demo --addr {scheme}://{target}{ca}\n\n"
    ));
    out.push_str(&format!(
        "    grpcurl {grpcurl_tls} -H 'authorization: Bearer {checkout}' \\\n      -d '{{\"pan\": \"4111111111111111\"}}' {target} tokenvault.v1.TokenVaultService/Tokenize\n"
    ));
    out.push_str(&format!(
        "    grpcurl {grpcurl_tls} -H 'authorization: Bearer {payments}' \\\n      -d '{{\"token\": \"<token>\", \"reason\": \"demo\"}}' {target} tokenvault.v1.TokenVaultService/Detokenize\n"
    ));
    if setup.master_key_file.is_some() {
        // Admin commands find the dev key on their own (see `common::VaultArgs::master_key`).
        let dir = args.data_dir.display();
        out.push_str(&format!(
            "\n  Admin commands on this vault:\n    tokenvault clients list --data-dir {dir}\n    \
             tokenvault audit tail -n 10 --data-dir {dir}\n"
        ));
    }
    out.push_str(&format!("{rule}\n"));
    print!("{out}");
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIALS_FILE);
        assert!(read_credentials(&path).unwrap().is_empty());
        let mut creds = BTreeMap::new();
        creds.insert("checkout".to_owned(), "tvk_a_b".to_owned());
        write_credentials(&path, &creds).unwrap();
        write_credentials(&path, &creds).unwrap();
        assert_eq!(read_credentials(&path).unwrap(), creds);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# DEVELOPMENT ONLY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
