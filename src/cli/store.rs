//! `tokenvault store migrate --to TARGET`: copies the vault named by `--data-dir` /
//! `--store-url` into an empty store of the other kind (a `postgres://` URL, or a data
//! directory for SQLite), ciphertexts as they are, then proves the copy: the same master
//! key opens it, counts match, the audit chain verifies, and a sample decrypts.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::common::{create_private_dir, progress_bar, CliError, VaultArgs};
use crate::store::copy::{self, CopyCounts};
use crate::store::postgres::PgUrl;
use crate::vault::{KeyVersionInfo, Vault, VaultConfig};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy this vault into an empty store of the other kind and verify the copy.
    Migrate(MigrateArgs),
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source vault (and its master key, which also opens the copy).
    #[command(flatten)]
    pub vault: VaultArgs,
    /// The empty target: a postgres:// URL (password from PGPASSWORD or PGPASSFILE/~/.pgpass), or a directory for a
    /// SQLite vault (created; must hold no vault).
    #[arg(long, value_name = "URL|DIR")]
    pub to: crate::config::StoreUrl,
    /// Ciphertexts of the copy to decrypt as a check.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub sample: usize,
}

pub async fn run(cmd: StoreCommand) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Migrate(args) => migrate(args).await,
    }
}

/// What the copy must agree with.
#[derive(Debug, PartialEq)]
struct Summary {
    keys: Vec<(u32, u64, u64)>,
    clients: usize,
    audit_head: u64,
}

async fn summary(vault: &Vault) -> Result<Summary, CliError> {
    let keys = vault
        .list_keys()
        .await?
        .iter()
        .map(|k: &KeyVersionInfo| (k.version, k.encryptions, k.rows))
        .collect();
    Ok(Summary {
        keys,
        clients: vault.list_clients().await?.len(),
        audit_head: vault.audit_head_seq().await?,
    })
}

async fn migrate(args: MigrateArgs) -> Result<(), CliError> {
    let master = args.vault.master_key()?;
    let source_cfg = args.vault.config();
    let source = source_cfg.location()?;
    let mut target_cfg = VaultConfig::new(PathBuf::from(args.to.as_str()));
    if PgUrl::is_postgres(&args.to) {
        target_cfg.data_dir = PathBuf::from("/nonexistent-tokenvault-data-dir");
        target_cfg.store_url = Some(args.to.clone());
    } else {
        create_private_dir(&target_cfg.data_dir)?;
    }
    let target = target_cfg.location()?;
    if source.data_dir().is_some() == target.data_dir().is_some() {
        return Err(CliError::Usage(
            "`store migrate` copies between the two kinds of store (SQLite and PostgreSQL); \
             to copy a SQLite vault use `backup`"
                .into(),
        ));
    }
    if target.exists() {
        return Err(CliError::Usage(format!(
            "the target {} already holds a vault: the target must be empty",
            target.describe()
        )));
    }

    // Open the source once: the master key is checked, pending migrations run, and the
    // chain must verify before anything is copied.
    let vault = args.vault.open_with(source_cfg)?;
    let (counts, checked) =
        copy_verified(vault, &source, target_cfg, &target, &master, args.sample).await?;
    println!(
        "migrated to {}: {} tokens, {} audit records (chain verified), {} key versions, {} clients; \
         {} ciphertexts decrypted as a check",
        target.describe(),
        counts.tokens,
        counts.audit,
        counts.keys,
        counts.clients,
        checked
    );
    Ok(())
}

/// Copies the opened `vault` (at `source`) into the empty `target` and proves the copy: it
/// opens with the same master key, its counts match, its chain verifies and `sample`
/// ciphertexts decrypt. Returns the counts copied and the number decrypted.
pub(super) async fn copy_verified(
    vault: Vault,
    source: &crate::store::StoreLocation,
    target_cfg: VaultConfig,
    target: &crate::store::StoreLocation,
    master: &crate::crypto::MasterKey,
    sample: usize,
) -> Result<(CopyCounts, u64), CliError> {
    let verdict = vault.verify_audit().await?;
    if !verdict.is_ok() {
        vault.close().await;
        return Err(CliError::Other(format!(
            "the source's audit trail does not verify ({}): refusing to copy it",
            verdict.describe()
        )));
    }
    let before = summary(&vault).await?;
    vault.close().await;
    let rows: u64 = before.keys.iter().map(|k| k.2).sum();

    eprintln!("copying {} to {}", source.describe(), target.describe());
    let bar = progress_bar("migrate", "tokens");
    bar.set_length(rows.max(1));
    let (from, to) = (source.copy_endpoint()?, target.copy_endpoint()?);
    let b = bar.clone();
    let counts: CopyCounts = tokio::task::spawn_blocking(move || {
        copy::copy(&from, &to, move |n| {
            if n > b.length().unwrap_or(0) {
                b.set_length(n);
            }
            b.set_position(n);
        })
    })
    .await
    .map_err(|e| CliError::Other(format!("copy: {e}")))??;
    super::common::finish_bar(&bar);

    // The copy opens with the same master key and agrees with the source.
    let copy = Vault::open(target_cfg, master)?;
    let after = summary(&copy).await?;
    let verdict = copy.verify_audit().await?;
    let check = copy.check(false, sample).await?;
    copy.close().await;
    if after != before {
        return Err(CliError::Other(format!(
            "the copy does not match the source (was the source written to meanwhile? stop \
             every writer and migrate into a new empty target): source {before:?}, copy {after:?}"
        )));
    }
    if !verdict.is_ok() {
        return Err(CliError::Other(format!(
            "the copy's audit trail does not verify: {}",
            verdict.describe()
        )));
    }
    if !check.ok() {
        return Err(CliError::Other(format!(
            "the copy fails its check: {} failed tokens, {:?} {:?}",
            check.failed_tokens.len(),
            check.integrity,
            check.keyring
        )));
    }
    Ok((counts, check.checked as u64))
}
