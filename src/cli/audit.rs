//! `tokenvault audit verify|verify-export|export|tail|public-key|rotate-key`: the
//! tamper-evident audit trail for assessors, SIEMs and people.
//!
//! `verify-export` needs neither the master key nor the database: an export, the checkpoint
//! file and the vault's audit public key are enough, on any machine.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::common::{print_table, CliError, VaultArgs};
use super::remote::RemoteArgs;
use crate::audit::{self, AuditRecord, CheckpointLines, TrailReport, TrailVerifier, Verification};
use crate::crypto::AuditPublicKey;
use crate::grpc::convert::micros_to_timestamp;
use crate::grpc::pb;
use crate::vault::{now_micros, Caller, Vault};

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the whole chain in one consistent snapshot; exit non-zero at the first changed,
    /// removed, inserted or reordered record, or (with --checkpoints) at the first checkpoint
    /// the trail contradicts.
    Verify {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Checkpoint file written by `serve --audit-checkpoint-file` (ideally a copy kept
        /// off this host): every record a checkpoint covers must be in the trail with the
        /// same hash.
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
        /// Trust only this audit public key (`ed25519:...`, repeatable) instead of the keys
        /// stored in the vault.
        #[arg(long = "public-key", value_name = "KEY")]
        public_keys: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Verify an `audit export` read from standard input against a checkpoint file and the
    /// audit public key, without the master key or the database.
    VerifyExport {
        /// The vault's audit public key (`tokenvault audit public-key`), repeatable.
        #[arg(long = "public-key", value_name = "KEY", required = true)]
        public_keys: Vec<String>,
        /// The checkpoint file.
        #[arg(long, value_name = "FILE")]
        checkpoints: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write records as JSON lines in Elastic Common Schema (ECS) field names, for a SIEM.
    Export {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-22T00:00:00Z). Record
        /// times never decrease along the trail, even when the clock stepped back.
        #[arg(long)]
        since: Option<String>,
        /// Only records of this action (tokenize, detokenize, info, delete, key_rotate, ...).
        #[arg(long)]
        action: Option<String>,
        /// Only records after sequence number N: how a SIEM resumes exactly where it stopped
        /// (the last `event.sequence` it stored), whatever the clock did.
        #[arg(long, value_name = "N")]
        since_seq: Option<u64>,
        /// Keep running and print new records as they are committed (until interrupted).
        #[arg(long)]
        follow: bool,
    },
    /// Print the newest records for a person.
    Tail {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// Print the audit public key that verifies checkpoints (no master key needed).
    PublicKey {
        #[command(flatten)]
        vault: VaultArgs,
        /// Every key, retired ones included, with its number and id.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Replace the checkpoint signing key. The chain records the new public key, signed over
    /// by the previous key, so verifiers that trust the old key follow the rotation.
    RotateKey {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long)]
        json: bool,
    },
}

const PAGE: usize = 10_000;
/// How often `export --follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

pub async fn run(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify {
            vault,
            remote,
            checkpoints,
            public_keys,
            json,
        } => {
            let pinned = parse_keys(&public_keys)?;
            if let Some(mut admin) = remote.client().await? {
                // The checkpoint file is read here and sent: it is best kept off the server.
                let text = match &checkpoints {
                    Some(path) => std::fs::read_to_string(path).map_err(|e| {
                        CliError::Usage(format!(
                            "cannot read the checkpoint file {}: {e}",
                            path.display()
                        ))
                    })?,
                    None => String::new(),
                };
                let r = admin
                    .verify_audit(pb::VerifyAuditRequest {
                        checkpoints: text,
                        public_keys,
                    })
                    .await?
                    .into_inner();
                return report(TrailReport::try_from(r)?, checkpoints.is_some(), json);
            }
            let cps = match &checkpoints {
                Some(path) => read_checkpoint_file(path)?,
                None => Vec::new(),
            };
            let vault = vault.open()?;
            let result = verify(&vault, cps, &pinned).await;
            vault.close().await;
            report(result?, checkpoints.is_some(), json)
        }
        AuditCommand::VerifyExport {
            public_keys,
            checkpoints,
            json,
        } => {
            let keys = parse_keys(&public_keys)?;
            let cps = read_checkpoint_file(&checkpoints)?;
            let stdin = std::io::stdin();
            let result = verify_export(stdin.lock(), &keys, cps)?;
            report(result, true, json)
        }
        AuditCommand::Export {
            vault,
            remote,
            since,
            action,
            since_seq,
            follow,
        } => {
            let since = match since {
                Some(s) => Some(
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .map_err(|_| CliError::Usage("--since must be an RFC 3339 time".into()))?
                        .timestamp_micros(),
                ),
                None => None,
            };
            if let Some(mut admin) = remote.client().await? {
                if follow {
                    return Err(CliError::Usage(
                        "--follow is local only; with --addr, resume with --since-seq".into(),
                    ));
                }
                let mut stream = admin
                    .export_audit(pb::ExportAuditRequest {
                        since: since.map(micros_to_timestamp),
                        action: action.unwrap_or_default(),
                        since_seq: since_seq.unwrap_or(0),
                    })
                    .await?
                    .into_inner();
                let io = |e: std::io::Error| CliError::Other(e.to_string());
                while let Some(page) = stream.message().await? {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    for line in &page.lines {
                        writeln!(out, "{line}").map_err(io)?;
                    }
                    out.flush().map_err(io)?;
                }
                return Ok(());
            }
            let filter = Filter { since, action };
            let vault = vault.open()?;
            let result = export(&vault, &filter, since_seq.unwrap_or(0), follow).await;
            vault.close().await;
            result
        }
        AuditCommand::Tail {
            vault,
            remote,
            lines,
        } => {
            let records = match remote.client().await? {
                // The service reads 0 as "the default"; locally -n 0 shows nothing.
                Some(_) if lines == 0 => Vec::new(),
                Some(mut admin) => {
                    let lines = u32::try_from(lines).unwrap_or(u32::MAX);
                    admin
                        .tail_audit(pb::TailAuditRequest { lines })
                        .await?
                        .into_inner()
                        .records
                        .into_iter()
                        .map(AuditRecord::try_from)
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    let vault = vault.open()?;
                    let result = tail(&vault, lines).await;
                    vault.close().await;
                    result?
                }
            };
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    vec![
                        r.seq.to_string(),
                        r.time_rfc3339(),
                        r.action.to_string(),
                        r.principal.to_string(),
                        r.outcome.to_string(),
                        r.peer.to_string(),
                        r.subject.to_string(),
                        if r.reason.is_empty() {
                            String::new()
                        } else {
                            format!("{:?}", r.reason)
                        },
                    ]
                })
                .collect();
            print_table(
                &[
                    "SEQ",
                    "TIME",
                    "ACTION",
                    "PRINCIPAL",
                    "OUTCOME",
                    "PEER",
                    "SUBJECT",
                    "REASON",
                ],
                &rows,
            );
            Ok(())
        }
        AuditCommand::PublicKey { vault, all, json } => {
            let (vault_id, keys) = vault.config().location()?.read_audit_public_keys()?;
            let shown: Vec<_> = keys.iter().filter(|k| all || k.active).collect();
            if json {
                let list: Vec<_> = shown
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "number": k.id,
                            "key_id": k.public_key.key_id(),
                            "public_key": k.public_key.to_text(),
                            "active": k.active,
                            "vault": vault_id,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else if all {
                for k in shown {
                    println!(
                        "{:>3}  {}  {}  {}",
                        k.id,
                        k.public_key.key_id(),
                        if k.active { "active " } else { "retired" },
                        k.public_key.to_text()
                    );
                }
            } else {
                for k in shown {
                    println!("{}", k.public_key.to_text());
                }
            }
            Ok(())
        }
        AuditCommand::RotateKey { vault, json } => {
            let vault = vault.open()?;
            let result = vault.rotate_audit_key(&Caller::cli()).await;
            vault.close().await;
            let (n, key) = result?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"number": n, "key_id": key.key_id(), "public_key": key.to_text()})
                );
            } else {
                println!(
                    "audit signing key rotated: key {n} ({}) signs from now on; the previous \
                     private key is destroyed\n{}",
                    key.key_id(),
                    key.to_text()
                );
            }
            Ok(())
        }
    }
}

fn parse_keys(texts: &[String]) -> Result<Vec<AuditPublicKey>, CliError> {
    texts
        .iter()
        .map(|t| {
            AuditPublicKey::parse(t).ok_or_else(|| {
                CliError::Usage(format!(
                    "--public-key {t:?}: expected ed25519:BASE64 as `tokenvault audit public-key` prints it"
                ))
            })
        })
        .collect()
}

fn read_checkpoint_file(path: &Path) -> Result<CheckpointLines, CliError> {
    audit::read_checkpoints(path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read the checkpoint file {}: {e}",
            path.display()
        ))
    })
}

fn report(r: TrailReport, with_checkpoints: bool, json: bool) -> Result<(), CliError> {
    if json {
        let mut v = serde_json::json!({
            "ok": r.verification.is_ok(),
            "head_seq": r.head_seq,
            "head_hash": audit::hex(&r.head_hash),
            "checkpoints": r.checkpoints,
            "last_checkpoint_seq": r.last_checkpoint_seq,
        });
        match &r.verification {
            Verification::Ok { records } => v["records"] = (*records).into(),
            Verification::Broken { seq, why } => {
                v["first_bad_seq"] = (*seq).into();
                v["why"] = (*why).into();
            }
            Verification::Contradicted { line, seq, why } => {
                v["checkpoint_line"] = (*line).into();
                v["first_bad_seq"] = (*seq).into();
                v["why"] = why.clone().into();
            }
        }
        println!("{v}");
    }
    match r.verification {
        Verification::Ok { records } => {
            if !json {
                if with_checkpoints {
                    println!(
                        "audit trail OK: {records} records, chain intact, consistent with {} \
                         checkpoints (newest covers sequence {})",
                        r.checkpoints,
                        r.last_checkpoint_seq
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "none".into())
                    );
                } else {
                    println!("audit trail OK: {records} records, chain intact");
                }
            }
            Ok(())
        }
        other => Err(CliError::Other(format!("audit trail {}", other.describe()))),
    }
}

/// Verifies, and records that a verification ran (after the walk, so it is not part of it).
async fn verify(
    vault: &Vault,
    checkpoints: CheckpointLines,
    pinned: &[AuditPublicKey],
) -> Result<TrailReport, CliError> {
    let result = vault.verify_audit_with(checkpoints, pinned).await?;
    let outcome = match &result.verification {
        Verification::Ok { .. } => "OK".to_owned(),
        Verification::Broken { seq, .. } => format!("BROKEN at {seq}"),
        Verification::Contradicted { line, seq, .. } => {
            format!("CONTRADICTS checkpoint line {line} at {seq}")
        }
    };
    vault
        .audit_event(&Caller::cli(), "audit_verify", &outcome)
        .await?;
    Ok(result)
}

/// Checks an export (every record from sequence 1, as `audit export` writes it) against the
/// checkpoints and trusted keys.
pub fn verify_export(
    input: impl BufRead,
    keys: &[AuditPublicKey],
    checkpoints: CheckpointLines,
) -> Result<TrailReport, CliError> {
    let mut verifier: Option<TrailVerifier> = None;
    let mut checkpoints = Some(checkpoints);
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| CliError::Other(format!("reading the export: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let (vault, rec) = audit::parse_export_line(&line)
            .map_err(|e| CliError::Other(format!("export line {}: {e}", i + 1)))?;
        let v = verifier.get_or_insert_with(|| {
            TrailVerifier::new(&vault, keys, checkpoints.take().unwrap_or_default())
        });
        let hash = rec.hash.clone();
        v.feed(&rec, Some(&hash));
    }
    let verifier = match verifier {
        Some(v) => v,
        None => {
            // An empty export: every checkpoint then names missing records.
            let vault = checkpoints
                .as_ref()
                .and_then(|c| c.iter().find_map(|(_, c)| c.as_ref().ok()))
                .map(|c| c.vault.clone())
                .unwrap_or_default();
            TrailVerifier::new(&vault, keys, checkpoints.take().unwrap_or_default())
        }
    };
    Ok(verifier.finish())
}

struct Filter {
    since: Option<i64>,
    action: Option<String>,
}

impl Filter {
    fn wants(&self, r: &AuditRecord) -> bool {
        !(self.since.is_some_and(|s| r.at < s)
            || self.action.as_deref().is_some_and(|a| a != r.action))
    }
}

async fn export(vault: &Vault, filter: &Filter, after: u64, follow: bool) -> Result<(), CliError> {
    let id = vault.audit_vault_id().await?;
    let io = |e: std::io::Error| CliError::Other(e.to_string());
    if follow {
        // Recorded up front: a follower runs until it is stopped.
        vault
            .audit_event(
                &Caller::cli(),
                "audit_export",
                &format!("follow after {after}"),
            )
            .await?;
    }
    let mut stop = std::pin::pin!(stop_signal());
    let mut from = after + 1;
    loop {
        let page = vault.audit_records(from, PAGE).await?;
        let n = page.len();
        {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for r in &page {
                from = r.seq + 1;
                if filter.wants(r) {
                    writeln!(out, "{}", audit::export_line(&id, r)).map_err(io)?;
                }
            }
            out.flush().map_err(io)?;
        }
        if n == PAGE {
            continue;
        }
        if !follow {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = &mut stop => break,
        }
    }
    if !follow {
        vault
            .audit_event(
                &Caller::cli(),
                "audit_export",
                &format!("at {}", now_micros()),
            )
            .await?;
    }
    Ok(())
}

/// Ctrl-C or SIGTERM: a follower stops cleanly between pages.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn tail(vault: &Vault, n: usize) -> Result<Vec<AuditRecord>, CliError> {
    let head = vault.audit_head_seq().await?;
    let from = (head + 1).saturating_sub(n as u64).max(1);
    Ok(vault.audit_records(from, n).await?)
}
