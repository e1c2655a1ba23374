//! `tokenvault master-key split|combine`: split knowledge for a master key held as bytes
//! (Shamir's scheme, see `crypto::shares`). `split` proves the key opens the vault, then
//! writes one share file per custodian (mode 0600, created new); `combine` rebuilds the key
//! from any K share files, proves it opens the vault, and writes it to a new key file.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;

use super::common::{create_private_dir, require_vault, CliError, VaultArgs};
use crate::crypto::shares::{self, Collector, Share};
use crate::crypto::{MasterKey, VaultId};
use crate::vault::Vault;

#[derive(Subcommand, Debug)]
pub enum MasterKeyCommand {
    /// Split the master key into N share files, any K of which rebuild it.
    Split {
        #[command(flatten)]
        vault: VaultArgs,
        /// Number of shares (one per custodian).
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        shares: u8,
        /// Shares needed to rebuild the key.
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        threshold: u8,
        /// Directory for the share files (created mode 0700 if missing; files must not exist).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
    /// Rebuild the master key from K share files and write it to a new key file.
    Combine {
        /// Directory holding the vault the key belongs to (the rebuilt key is checked against it).
        #[arg(long, env = "TOKENVAULT_DATA_DIR", default_value = super::common::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The vault's shared PostgreSQL store instead of --data-dir (as for every command
        /// that opens a vault; the password never on the command line).
        #[arg(
            long,
            env = "TOKENVAULT_STORE_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        store_url: Option<crate::config::StoreUrl>,
        /// A share file; repeat once per share.
        #[arg(long = "share-file", value_name = "FILE", required = true)]
        share_files: Vec<PathBuf>,
        /// Where to write the rebuilt key (created with mode 0600; must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// `tokenvault unseal`: hands one share to a sealed server.
#[derive(clap::Args, Debug)]
pub struct UnsealArgs {
    /// The server's unseal socket (`serve --unseal-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The custodian's share file; without it the share is read from standard input (never
    /// from the command line).
    #[arg(long, value_name = "FILE")]
    pub share_file: Option<PathBuf>,
}

pub async fn unseal(args: UnsealArgs) -> Result<(), CliError> {
    use std::io::Read;
    crate::hardening::harden_process();
    let text =
        match &args.share_file {
            Some(path) => {
                // Checked locally first (permissions, format); the server checks the rest.
                read_share_file(path)?;
                zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
                    CliError::MasterKey(format!("share file {}: {e}", path.display()))
                })?)
            }
            None => {
                let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(4096));
                std::io::stdin()
                    .take(4097)
                    .read_to_end(&mut buf)
                    .map_err(|e| CliError::Other(format!("standard input: {e}")))?;
                buf
            }
        };
    let reply = crate::grpc::sealed::send_share(&args.socket, &text)
        .await
        .map_err(|e| CliError::Connect {
            addr: args.socket.display().to_string(),
            detail: e.to_string(),
        })?;
    println!("{reply}");
    if reply.starts_with("refused") {
        Err(CliError::MasterKey("the share was refused".into()))
    } else {
        Ok(())
    }
}

/// The header and id of the vault in `data_dir`, or in the shared store `url` when given.
fn header_at(
    data_dir: &std::path::Path,
    url: Option<&str>,
) -> Result<(crate::store::VaultHeader, VaultId), CliError> {
    if url.is_none() {
        require_vault(data_dir)?;
    }
    let header = crate::store::StoreLocation::from_config(data_dir, url, 1)?.read_header()?;
    let id = VaultId::from_slice(&header.vault_id)
        .ok_or_else(|| CliError::Storage("vault id has the wrong length".into()))?;
    Ok((header, id))
}

/// The vault id of the vault `args` name: a data directory or a shared store URL.
pub fn vault_id_of(args: &super::common::VaultArgs) -> Result<VaultId, CliError> {
    Ok(header_at(&args.data_dir, args.shared_store_url())?.1)
}

/// Reads a share file (small, owner-only like a key file).
pub fn read_share_file(path: &std::path::Path) -> Result<Share, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::MasterKey(format!("share file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CliError::MasterKey(format!(
            "share file {} is accessible by group or others; run chmod 600 on it",
            path.display()
        )));
    }
    if meta.len() > 4096 {
        return Err(CliError::MasterKey(format!(
            "{} is not a share file",
            path.display()
        )));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CliError::MasterKey(format!("share file {}: {e}", path.display())))?,
    );
    Share::parse(&text).map_err(|e| CliError::MasterKey(format!("{}: {e}", path.display())))
}

pub async fn run(cmd: MasterKeyCommand) -> Result<(), CliError> {
    match cmd {
        MasterKeyCommand::Split {
            vault: args,
            shares,
            threshold,
            out_dir,
        } => {
            if threshold > shares {
                return Err(CliError::Usage(format!(
                    "--threshold {threshold} is more than --shares {shares}"
                )));
            }
            let id = vault_id_of(&args)?;
            let master = args.master_key()?;
            // Proves the key is this vault's before anyone is handed a share of it.
            Vault::open(args.config(), &master)?.close().await;
            let parts = shares::split(&master, &id, shares, threshold)?;
            create_private_dir(&out_dir)?;
            let short = &id.to_hex()[..8];
            for part in &parts {
                let path = out_dir.join(format!(
                    "tokenvault-{short}-share-{}-of-{shares}.txt",
                    part.index
                ));
                write_private(&path, part.to_text().as_bytes())?;
                println!("{}", path.display());
            }
            eprintln!(
                "{shares} shares written (any {threshold} rebuild the master key). Hand one to \
                 each custodian, then destroy this directory and, unless another copy is \
                 required, the master key file."
            );
            Ok(())
        }
        MasterKeyCommand::Combine {
            data_dir,
            store_url,
            share_files,
            out,
        } => {
            crate::hardening::harden_process();
            let url = super::common::shared_store_url(store_url.as_ref());
            let (header, id) = header_at(&data_dir, url)?;
            let mut collector = Collector::new();
            for path in &share_files {
                collector
                    .add(&id, read_share_file(path)?)
                    .map_err(|e| CliError::MasterKey(format!("{}: {e}", path.display())))?;
            }
            let master = match collector.combine() {
                Ok(key) => key?,
                Err(shares::Combine::NeedMore { have, need }) => {
                    return Err(CliError::MasterKey(format!(
                        "{have} shares given, {need} needed"
                    )))
                }
            };
            check_rebuilt(&id, &header, &master)?;
            master.write_new_file(&out)?;
            println!(
                "master key rebuilt and written to {} (mode 0600)",
                out.display()
            );
            Ok(())
        }
    }
}

/// The rebuilt key opens the vault (an altered share rebuilds a wrong key).
fn check_rebuilt(
    id: &VaultId,
    header: &crate::store::VaultHeader,
    master: &MasterKey,
) -> Result<(), CliError> {
    let (_, check) = master.derive(id);
    if check.matches(&header.key_check) {
        Ok(())
    } else {
        Err(CliError::MasterKey(
            "the shares rebuild a key that does not open this vault (a share was altered or \
             belongs to an older key)"
                .into(),
        ))
    }
}

/// Creates `path` (must not exist) with mode 0600 and writes `bytes`, synced.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Storage(format!("{}: {e}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::Storage(format!("{}: {e}", path.display())))
}
