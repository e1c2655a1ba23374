//! `tokenvault init`: creates a new vault, optionally generating its master key file.

use std::path::PathBuf;

use clap::Args;

use super::common::{create_private_dir, CliError, VaultArgs};
use crate::crypto::MasterKey;
use crate::vault::Vault;

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Generate a new master key and write it to FILE (created with mode 0600; must not
    /// exist). Without this, the key comes from --master-key-file or TOKENVAULT_MASTER_KEY.
    #[arg(long, value_name = "FILE")]
    pub generate_master_key: Option<PathBuf>,
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
    match Vault::create(args.vault.config(), &master) {
        // Let the store's threads finish before the process exits.
        Ok(vault) => vault.close().await,
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
    Ok(())
}
