//! `tokenvault check [--full]`: database integrity, keyring consistency, and decryption of a
//! sample of rows (or every row). Failing rows are named by token, never by card number.

use clap::Args;

use super::common::{CliError, VaultArgs};
use super::remote::RemoteArgs;
use crate::grpc::pb;
use crate::vault::lifecycle::{CheckReport, DEFAULT_SAMPLE};

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Decrypt every row instead of a random sample.
    #[arg(long)]
    pub full: bool,
    /// Rows to decrypt without --full.
    #[arg(long, default_value_t = DEFAULT_SAMPLE)]
    pub sample: usize,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: CheckArgs) -> Result<(), CliError> {
    let r = match args.remote.client().await? {
        Some(mut admin) => {
            let sample = u32::try_from(args.sample)
                .map_err(|_| CliError::Usage(format!("--sample: at most {} rows", u32::MAX)))?;
            if sample == 0 && !args.full {
                // The service reads 0 as "the default"; locally 0 checks no rows.
                return Err(CliError::Usage(
                    "--sample 0 with --addr: use --full or N > 0".into(),
                ));
            }
            CheckReport::from(
                admin
                    .check(pb::CheckRequest {
                        full: args.full,
                        sample,
                    })
                    .await?
                    .into_inner(),
            )
        }
        None => {
            let vault = args.vault.open()?;
            let r = vault.check(args.full, args.sample).await;
            vault.close().await;
            r?
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ok": r.ok(),
                "full": r.full,
                "integrity": r.integrity,
                "keyring": r.keyring,
                "rows_checked": r.checked,
                "failed_tokens": r.failed_tokens,
                "leftovers": r.leftovers,
            })
        );
    } else {
        let verdict = |problems: bool| if problems { "FAILED" } else { "ok" };
        println!("database integrity:   {}", verdict(!r.integrity.is_empty()));
        for m in &r.integrity {
            println!("  {m}");
        }
        println!("keyring consistency:  {}", verdict(!r.keyring.is_empty()));
        for m in &r.keyring {
            println!("  {m}");
        }
        println!(
            "decryption ({}): {} rows checked, {} failed",
            if r.full { "every row" } else { "sample" },
            r.checked,
            r.failed_tokens.len()
        );
        for t in &r.failed_tokens {
            println!("  token {t}: ciphertext failed authentication");
        }
        for p in &r.leftovers {
            println!("leftover: {p} (from an interrupted restore; the next restore removes it, or delete it)");
        }
    }
    if r.ok() {
        Ok(())
    } else {
        Err(CliError::Storage("the vault check found problems".into()))
    }
}
