//! `tokenvault check [--full]`: database integrity, keyring consistency, and decryption of a
//! sample of rows (or every row). Failing rows are named by token, never by card number.

use clap::Args;

use super::common::{CliError, VaultArgs};
use crate::vault::lifecycle::DEFAULT_SAMPLE;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
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
    let vault = args.vault.open()?;
    let r = vault.check(args.full, args.sample).await;
    vault.close().await;
    let r = r?;
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
