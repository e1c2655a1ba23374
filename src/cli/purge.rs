//! `tokenvault purge [--deleted] [--expired] [--older-than D] [--yes]`: removes tombstoned
//! and expired token rows for data-retention policies, in batches. It first counts what it
//! will remove and shows it; on a terminal it asks, elsewhere it needs `--yes`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Args;

use super::common::{format_time, CliError, VaultArgs};
use super::remote::RemoteArgs;
use crate::grpc::client::AdminClient;
use crate::grpc::convert::timestamp_to_micros;
use crate::grpc::pb;
use crate::vault::lifecycle::{PurgePlan, PurgeReport, DEFAULT_BATCH};
use crate::vault::{Caller, PurgeOptions, Vault};

#[derive(Args, Debug)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Remove deleted (tombstoned) tokens.
    #[arg(long)]
    pub deleted: bool,
    /// Remove expired tokens (by default only those expired more than 24 hours ago).
    #[arg(long)]
    pub expired: bool,
    /// Only rows deleted or expired at least this long ago, e.g. `2w`, `30d`, `12h`, `90m`,
    /// `45s` (at most 36500d).
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Rows per transaction.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Remove without asking (required when standard input is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

/// Longest accepted `--older-than`: a century. Anything longer is a typo, not a policy.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// The one duration grammar ([`crate::config::parse_timeout`], humantime's; a bare number is
/// seconds), at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match crate::config::parse_timeout(s)? {
        d if d <= MAX_DURATION => Ok(d),
        _ => Err(format!("`{}` is longer than 36500d (100 years)", s.trim())),
    }
}

pub async fn run(args: PurgeArgs) -> Result<(), CliError> {
    if !args.deleted && !args.expired {
        return Err(CliError::Usage(
            "choose what to purge: --deleted and/or --expired".into(),
        ));
    }
    if let Some(admin) = args.remote.client().await? {
        return purge(&mut Target::Remote(admin), &args).await;
    }
    let vault = args.vault.open()?;
    let r = purge(&mut Target::Local(&vault), &args).await;
    vault.close().await;
    r
}

/// Where the purge runs: the database here, or a server's AdminService. Over --addr the
/// server fixes the cut-offs again when it purges, a moment after the count shown.
enum Target<'a> {
    Local(&'a Vault),
    Remote(AdminClient),
}

impl Target<'_> {
    async fn plan(&mut self, opts: &PurgeOptions) -> Result<PurgePlan, CliError> {
        match self {
            Target::Local(vault) => Ok(vault.purge_plan(opts).await?),
            Target::Remote(admin) => {
                let r = admin.purge(purge_request(opts, true)).await?.into_inner();
                let time = |t: Option<prost_types::Timestamp>, field| {
                    t.map(|t| timestamp_to_micros(&t, field)).transpose()
                };
                Ok(PurgePlan {
                    deleted_before: time(r.deleted_before, "deleted_before")?,
                    expired_before: time(r.expired_before, "expired_before")?,
                    deleted: r.deleted_to_remove,
                    expired: r.expired_to_remove,
                })
            }
        }
    }

    async fn run(
        &mut self,
        opts: &PurgeOptions,
        plan: &PurgePlan,
    ) -> Result<PurgeReport, CliError> {
        match self {
            Target::Local(vault) => Ok(vault
                .purge_planned(&Caller::cli(), plan, opts.batch)
                .await?),
            Target::Remote(admin) => {
                let r = admin.purge(purge_request(opts, false)).await?.into_inner();
                Ok(PurgeReport {
                    deleted: r.deleted_removed,
                    expired: r.expired_removed,
                    batches: r.batches,
                })
            }
        }
    }
}

fn purge_request(opts: &PurgeOptions, dry_run: bool) -> pb::PurgeRequest {
    pb::PurgeRequest {
        deleted: opts.deleted,
        expired: opts.expired,
        older_than: opts.older_than.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
        batch: u32::try_from(opts.batch).unwrap_or(u32::MAX),
        dry_run,
    }
}

async fn purge(target: &mut Target<'_>, args: &PurgeArgs) -> Result<(), CliError> {
    let opts = PurgeOptions {
        deleted: args.deleted,
        expired: args.expired,
        older_than: args.older_than,
        batch: args.batch.max(1),
    };
    let plan = target.plan(&opts).await?;
    let mut what = Vec::new();
    if let Some(t) = plan.deleted_before {
        what.push(format!(
            "{} deleted tokens (deleted before {})",
            plan.deleted,
            format_time(t)
        ));
    }
    if let Some(t) = plan.expired_before {
        what.push(format!(
            "{} expired tokens (expired before {})",
            plan.expired,
            format_time(t)
        ));
    }
    let what = what.join(" and ");
    if args.dry_run {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"dry_run": true, "deleted_to_remove": plan.deleted, "expired_to_remove": plan.expired})
            );
        } else {
            println!("would remove {what}");
        }
        return Ok(());
    }
    if plan.deleted + plan.expired > 0 && !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Usage(format!(
                "purge would remove {what}; pass --yes to do so without a terminal"
            )));
        }
        eprint!("purge will remove {what}. This cannot be undone. Continue? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| CliError::Other(format!("reading the answer: {e}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing removed");
            return Ok(());
        }
    }
    let r = target.run(&opts, &plan).await?;
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
        // 999999999d once wrapped the cut-off into the future and purged live tokens.
        assert!(parse_duration("999999999d").is_err());
        assert!(parse_duration("18446744073709551615d").is_err());
        assert!(parse_duration("36500d").is_ok());
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("2 fortnights").is_err());
    }
}
