//! `tokenvault init`: creates a new vault, optionally generating its master key file and
//! the first admin principal (`--admin NAME`: its API key is printed once, and
//! `--admin-cert-identity` binds the certificate it will present), so a fresh vault can be
//! administered remotely, over `AdminService`, from the start.

use std::path::PathBuf;

use clap::Args;

use super::common::{create_private_dir, CliError, VaultArgs};
use crate::auth::Role;
use crate::crypto::MasterKey;
use crate::vault::{Caller, Vault};

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Generate a new master key and write it to FILE (created with mode 0600; must not
    /// exist). Without this, the key comes from --master-key-file or TOKENVAULT_MASTER_KEY.
    #[arg(long, value_name = "FILE")]
    pub generate_master_key: Option<PathBuf>,
    /// Create the first admin principal with this name (role `admin`) and print its API
    /// key, shown only this once.
    #[arg(long, value_name = "NAME")]
    pub admin: Option<String>,
    /// Certificate identity (URI or DNS SAN) bound to the first admin, for mutual TLS
    /// (admin calls need one unless the server runs with --require-cert-for-admin=false).
    /// Implies --admin admin when --admin is not given.
    #[arg(long, value_name = "ID")]
    pub admin_cert_identity: Option<String>,
}

pub async fn run(args: InitArgs) -> Result<(), CliError> {
    let data_dir = &args.vault.data_dir;
    let location = args.vault.config().location()?;
    if location.data_dir().is_some() {
        super::common::check_data_dir(data_dir)?;
    }
    if location.exists() {
        return Err(CliError::Usage(format!(
            "a vault already exists in {}",
            location.describe()
        )));
    }
    let admin = match (&args.admin, &args.admin_cert_identity) {
        (Some(name), _) => Some(name.clone()),
        (None, Some(_)) => Some("admin".to_owned()),
        (None, None) => None,
    };
    if let Some(name) = &admin {
        crate::vault::validate_client_name(name)
            .map_err(|e| CliError::Usage(format!("--admin: {e}")))?;
    }
    if args
        .admin_cert_identity
        .as_deref()
        .is_some_and(|id| id.trim().is_empty())
    {
        return Err(CliError::Usage("--admin-cert-identity is empty".into()));
    }
    let (master, generated) = match &args.generate_master_key {
        Some(path) => {
            if args.vault.has_master_key_source() {
                return Err(CliError::Usage(
                    "--generate-master-key cannot be combined with an existing master key \
                     (--master-key-file, TOKENVAULT_MASTER_KEY_FILE or TOKENVAULT_MASTER_KEY)"
                        .into(),
                ));
            }
            let key = MasterKey::generate();
            key.write_new_file(path)?;
            (key, Some(path))
        }
        // A key in a token is created there when the URI names no existing object.
        None => match &args.vault.master_key_pkcs11 {
            Some(uri) => {
                crate::hardening::harden_process();
                (MasterKey::open_pkcs11(uri, true)?, None)
            }
            None => (args.vault.master_key()?, None),
        },
    };

    if location.data_dir().is_some() {
        create_private_dir(data_dir)?;
    }
    let admin_key;
    match Vault::create(args.vault.config(), &master) {
        Ok(vault) => {
            let added = match &admin {
                Some(name) => vault
                    .add_client(
                        &Caller::cli(),
                        name,
                        &[Role::Admin],
                        args.admin_cert_identity.as_deref(),
                    )
                    .await
                    .map(Some),
                None => Ok(None),
            };
            // Let the store's threads finish before the process exits.
            vault.close().await;
            admin_key = added?;
        }
        Err(e) => {
            // A key generated for a vault that does not exist protects nothing: remove it.
            if let Some(path) = generated {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    }
    println!("created vault in {}", location.describe());
    if let Some(path) = generated {
        println!("master key written to {} (mode 0600)", path.display());
        println!(
            "keep a copy of it somewhere safe and apart from the data: without it the vault \
             cannot be opened"
        );
    }
    if let (Some(name), Some(key)) = (&admin, admin_key) {
        match &args.admin_cert_identity {
            Some(id) => {
                println!("admin principal {name} created, bound to certificate identity {id}")
            }
            None => println!("admin principal {name} created"),
        }
        println!("admin API key (store it now, it cannot be shown again): {key}");
    }
    Ok(())
}
