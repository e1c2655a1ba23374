//! `tokenvault audit verify|export|tail`: the tamper-evident audit trail for assessors,
//! SIEMs and people.

use std::io::Write;

use clap::Subcommand;

use super::common::{CliError, VaultArgs};
use crate::audit::{AuditRecord, Verification};
use crate::vault::{now_micros, Caller, Vault};

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the whole chain; exit non-zero at the first changed, removed, inserted or
    /// reordered record.
    Verify {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write records as JSON lines (for a SIEM).
    Export {
        #[command(flatten)]
        vault: VaultArgs,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-22T00:00:00Z). Record
        /// times never decrease along the trail, even when the clock stepped back.
        #[arg(long)]
        since: Option<String>,
        /// Only records with this sequence number or later: how a SIEM resumes exactly where
        /// it stopped (the last exported `seq` + 1), whatever the clock did.
        #[arg(long, value_name = "SEQ", default_value_t = 1)]
        from_seq: u64,
        /// Only records of this action (tokenize, detokenize, info, delete, key_rotate, ...).
        #[arg(long)]
        action: Option<String>,
    },
    /// Print the newest records for a person.
    Tail {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

const PAGE: usize = 10_000;

pub async fn run(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify { vault, json } => {
            let vault = vault.open()?;
            let result = verify(&vault).await;
            vault.close().await;
            let result = result?;
            match result {
                Verification::Ok { records } => {
                    if json {
                        println!("{}", serde_json::json!({"ok": true, "records": records}));
                    } else {
                        println!("audit trail OK: {records} records, chain intact");
                    }
                    Ok(())
                }
                Verification::Broken { seq, why } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "first_bad_seq": seq, "why": why})
                        );
                    }
                    Err(CliError::Other(format!(
                        "audit trail BROKEN at sequence {seq}: {why}"
                    )))
                }
            }
        }
        AuditCommand::Export {
            vault,
            since,
            from_seq,
            action,
        } => {
            let since = match since {
                Some(s) => Some(
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .map_err(|_| CliError::Usage("--since must be an RFC 3339 time".into()))?
                        .timestamp_micros(),
                ),
                None => None,
            };
            let vault = vault.open()?;
            let result = export(&vault, from_seq, since, action.as_deref()).await;
            vault.close().await;
            result
        }
        AuditCommand::Tail { vault, lines } => {
            let vault = vault.open()?;
            let result = tail(&vault, lines).await;
            vault.close().await;
            let records = result?;
            for r in records {
                println!(
                    "{:>8}  {}  {:<12} {:<20} {:<18} {:<20} {}{}",
                    r.seq,
                    r.time_rfc3339(),
                    r.action,
                    r.principal,
                    r.outcome,
                    r.peer,
                    r.subject,
                    if r.reason.is_empty() {
                        String::new()
                    } else {
                        format!("  reason={:?}", r.reason)
                    }
                );
            }
            Ok(())
        }
    }
}

/// Verifies, and records that a verification ran (after the walk, so it is not part of it).
async fn verify(vault: &Vault) -> Result<Verification, CliError> {
    let result = vault.verify_audit().await?;
    let outcome = match &result {
        Verification::Ok { .. } => "OK".to_owned(),
        Verification::Broken { seq, .. } => format!("BROKEN at {seq}"),
    };
    vault
        .audit_event(&Caller::cli(), "audit_verify", &outcome)
        .await?;
    Ok(result)
}

fn json_line(r: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": r.seq,
        "time": r.time_rfc3339(),
        "principal": r.principal,
        "peer": r.peer,
        "action": r.action,
        "subject": r.subject,
        "outcome": r.outcome,
        "reason": r.reason,
    })
}

async fn export(
    vault: &Vault,
    from_seq: u64,
    since: Option<i64>,
    action: Option<&str>,
) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut from = from_seq.max(1);
    loop {
        let page = vault.audit_records(from, PAGE).await?;
        let n = page.len();
        for r in &page {
            from = r.seq + 1;
            if since.is_some_and(|s| r.at < s) || action.is_some_and(|a| a != r.action) {
                continue;
            }
            writeln!(out, "{}", json_line(r)).map_err(|e| CliError::Other(e.to_string()))?;
        }
        if n < PAGE {
            break;
        }
    }
    out.flush().map_err(|e| CliError::Other(e.to_string()))?;
    vault
        .audit_event(
            &Caller::cli(),
            "audit_export",
            &format!("at {}", now_micros()),
        )
        .await?;
    Ok(())
}

async fn tail(vault: &Vault, n: usize) -> Result<Vec<AuditRecord>, CliError> {
    let head = vault.audit_head_seq().await?;
    let from = (head + 1).saturating_sub(n as u64).max(1);
    Ok(vault.audit_records(from, n).await?)
}
