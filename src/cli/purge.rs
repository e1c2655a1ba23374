//! `tokenvault purge [--deleted] [--expired] [--older-than D]`: removes tombstoned and
//! expired token rows for data-retention policies, in batches.

use std::time::Duration;

use clap::Args;

use super::common::{CliError, VaultArgs};
use crate::vault::lifecycle::DEFAULT_BATCH;
use crate::vault::{Caller, PurgeOptions};

#[derive(Args, Debug)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Remove deleted (tombstoned) tokens.
    #[arg(long)]
    pub deleted: bool,
    /// Remove expired tokens.
    #[arg(long)]
    pub expired: bool,
    /// Only rows deleted or expired at least this long ago, e.g. `2w`, `30d`, `12h`, `90m`, `45s`.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Rows per transaction.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

/// The one duration grammar ([`crate::config::parse_duration`], humantime's); a bare number
/// is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_timeout(s)
}

pub async fn run(args: PurgeArgs) -> Result<(), CliError> {
    if !args.deleted && !args.expired {
        return Err(CliError::Usage(
            "choose what to purge: --deleted and/or --expired".into(),
        ));
    }
    let vault = args.vault.open()?;
    let opts = PurgeOptions {
        deleted: args.deleted,
        expired: args.expired,
        older_than: args.older_than,
        batch: args.batch.max(1),
    };
    let r = vault.purge(&Caller::cli(), &opts).await;
    vault.close().await;
    let r = r?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"deleted_removed": r.deleted, "expired_removed": r.expired, "batches": r.batches})
        );
    } else {
        println!(
            "removed {} deleted and {} expired tokens",
            r.deleted, r.expired
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        // Weeks and fractions, as every other duration flag takes them.
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("2 fortnights").is_err());
    }
}
