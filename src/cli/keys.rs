//! `tokenvault keys list|rotate|rewrap|retire|revoke|rotate-master`: data-key versions and
//! the master key's lifecycle.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Subcommand;

use super::common::{format_time, print_table, progress_bar, CliError, VaultArgs};
use super::remote::RemoteArgs;
use crate::crypto::MasterKey;
use crate::grpc::admin::duration_from_pb;
use crate::grpc::pb;
use crate::vault::lifecycle::{RevokeReport, RewrapReport, DEFAULT_BATCH};
use crate::vault::{
    now_micros, Caller, KeyState, KeyVersionInfo, RekeyOptions, RewrapOptions, RewrapProgress,
    Vault,
};

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// List data-key versions with their state and usage against the rotation limits.
    List {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a new data-key version; older versions stay usable for decryption.
    Rotate {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Re-encrypt rows sealed under older versions with the active version, online and in
    /// batches; safe to interrupt and run again.
    Rewrap {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Rows per transaction.
        #[arg(long, default_value_t = DEFAULT_BATCH as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        /// Only rows sealed under this version (default: every version older than the active one).
        #[arg(long, value_name = "V")]
        from_version: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Retire a version no row uses any more: its key is destroyed and can no longer decrypt.
    Retire {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        version: u32,
        #[arg(long)]
        json: bool,
    },
    /// For a compromised version: rotate if it is active, re-encrypt its rows, retire it.
    /// Safe to run again if interrupted.
    Revoke {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        version: u32,
        #[arg(long, default_value_t = DEFAULT_BATCH as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        #[arg(long)]
        json: bool,
    },
    /// Re-wrap every stored key under a new master key, in one transaction. Afterwards only
    /// the new master key opens this database; the data keys themselves do not change, so
    /// the old master key together with any older copy of the database (a backup) still
    /// opens them and every card they seal. Reload servers with the new key (SIGHUP).
    ///
    /// With --rekey the old master key is cut off: a new data key, fingerprint layer and
    /// audit key wrapped only under the new master, every row re-sealed online (batches,
    /// progress bar), the old data keys destroyed. Afterwards the old master key and any
    /// earlier backup open nothing created later. Resumable: if interrupted, run the same
    /// command again. Reload servers with the new key (SIGHUP) as soon as it starts.
    RotateMaster {
        #[command(flatten)]
        vault: VaultArgs,
        /// File holding the new master key (mode 0600), e.g. from `tokenvault init`'s key
        /// generation or `openssl rand -base64 32`.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "new_master_key_pkcs11",
            conflicts_with = "new_master_key_pkcs11"
        )]
        new_master_key_file: Option<PathBuf>,
        /// The new master key in an HSM: a PKCS#11 URI (see --master-key-pkcs11). The key
        /// object is created in the token when the URI names none.
        #[arg(long, value_name = "URI")]
        new_master_key_pkcs11: Option<String>,
        /// Also replace the data, fingerprint and audit keys and re-seal every row, so the
        /// old master key and earlier backups open nothing created afterwards.
        #[arg(long)]
        rekey: bool,
        /// Rows per re-seal transaction (--rekey).
        #[arg(long, default_value_t = DEFAULT_BATCH as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        /// Stop after this many re-seal transactions; run again to continue (--rekey).
        #[arg(long, hide = true)]
        max_batches: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Where the master key lives (key file, environment, PKCS#11 token) and that it opens
    /// this vault. Shows nothing secret.
    Status {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long)]
        json: bool,
    },
}

/// Where `args` takes the master key from, for `keys status`: no key material, no PIN.
fn master_source(args: &VaultArgs, master: &MasterKey) -> (&'static str, String) {
    if master.is_pkcs11() {
        return ("pkcs11", master.location());
    }
    match &args.master_key_file {
        Some(path) => ("file", path.display().to_string()),
        None if super::common::master_key_env_present() => {
            ("environment", super::common::MASTER_KEY_ENV.to_owned())
        }
        None => match super::dev::dev_master_key(&args.data_dir) {
            Some(path) => ("file (development)", path.display().to_string()),
            None => ("unknown", String::new()),
        },
    }
}

pub fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::Active => "active",
        KeyState::DecryptOnly => "decrypt-only",
        KeyState::Retired => "retired",
    }
}

/// Job control for long admin runs: Ctrl-Z (SIGTSTP) in the middle of a batch would stop the
/// process while its transaction holds the vault's write lock, and every server write, the
/// audit records of reveals included, would wait until it is continued. Instead the stop is
/// noted and taken between batches, when no transaction is open. (`kill -STOP` cannot be
/// deferred; each batch holds the lock for at most `ADMIN_TX_BUDGET`.) The process's own
/// checkpointer is paused too, after any checkpoint in progress ends: a TRUNCATE checkpoint
/// (retried after every destroying batch) holds the write lock while it waits for readers.
pub struct StopsBetweenBatches {
    requested: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StopsBetweenBatches {
    pub fn install() -> StopsBetweenBatches {
        use tokio::signal::unix::{signal, SignalKind};
        let requested = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Ok(mut tstp) = signal(SignalKind::from_raw(libc::SIGTSTP)) {
            let flag = requested.clone();
            tokio::spawn(async move {
                while tstp.recv().await.is_some() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        StopsBetweenBatches { requested }
    }

    /// Stops the process now if a stop was requested; call only between transactions.
    /// Checkpoints of `vault` stay paused while stopped and resume once continued.
    pub fn safe_point(&self, vault: &crate::vault::Vault) {
        if self
            .requested
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let _paused = vault.pause_checkpoints();
            eprintln!("\nstopped between batches (no lock held); `fg` to continue");
            // SAFETY: raise has no preconditions. It returns once SIGCONT arrived.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
}

/// Progress on standard error: an indicatif bar on a terminal, a plain line per ~second
/// otherwise (no carriage returns or escape codes in log files).
pub struct ProgressPrinter {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last: Option<Instant>,
}

impl ProgressPrinter {
    pub fn new(quiet: bool) -> ProgressPrinter {
        let tty = std::io::stderr().is_terminal();
        ProgressPrinter {
            bar: (tty && !quiet).then(|| progress_bar("rewrap", "rows")),
            quiet,
            last: None,
        }
    }

    pub fn update(&mut self, p: &RewrapProgress) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(p.total);
            bar.set_position(p.done);
            bar.set_message(format!("{} failed", p.failed));
            return;
        }
        let due = self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(1));
        if !due && p.done < p.total {
            return;
        }
        self.last = Some(Instant::now());
        let rate = p.rate();
        let eta = if rate > 0.0 && p.total > p.done {
            format!("{:.0}s", (p.total - p.done) as f64 / rate)
        } else {
            "-".into()
        };
        let pct = if p.total > 0 {
            p.done as f64 * 100.0 / p.total as f64
        } else {
            100.0
        };
        eprintln!(
            "rewrap: {}/{} rows ({pct:.1}%), {rate:.0} rows/s, ETA {eta}, {} failed",
            p.done, p.total, p.failed
        );
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            super::common::finish_bar(bar);
        }
    }
}

fn age_text(created_at: i64) -> String {
    let days = (now_micros() - created_at).max(0) as f64 / 86_400e6;
    format!("{days:.1}d")
}

pub async fn run(cmd: KeysCommand) -> Result<(), CliError> {
    match cmd {
        KeysCommand::List {
            vault,
            remote,
            json,
        } => {
            let (keys, max_age) = match remote.client().await? {
                Some(mut admin) => {
                    let r = admin.list_keys(pb::ListKeysRequest {}).await?.into_inner();
                    let keys = r
                        .keys
                        .into_iter()
                        .map(KeyVersionInfo::try_from)
                        .collect::<Result<Vec<_>, _>>()?;
                    let max_age = r
                        .key_max_age
                        .map(|d| duration_from_pb(&d, "key_max_age"))
                        .transpose()?;
                    (keys, max_age)
                }
                None => {
                    let vault = vault.open()?;
                    let keys = vault.list_keys().await;
                    let max_age = vault.key_policy().max_age;
                    vault.close().await;
                    (keys?, max_age)
                }
            };
            render_keys(&keys, max_age, json);
            Ok(())
        }
        KeysCommand::Rotate { vault, remote } => {
            let rotated = match remote.client().await? {
                Some(mut admin) => {
                    admin
                        .rotate_key(pb::RotateKeyRequest {})
                        .await?
                        .into_inner()
                        .active_version
                }
                None => {
                    let vault = vault.open()?;
                    let rotated = vault.rotate_key(&Caller::cli()).await;
                    vault.close().await;
                    rotated?
                }
            };
            println!("active data key is now version {rotated}");
            Ok(())
        }
        KeysCommand::Rewrap {
            vault,
            remote,
            batch,
            from_version,
            json,
        } => {
            let mut printer = ProgressPrinter::new(json);
            let r = match remote.client().await? {
                Some(mut admin) => {
                    let mut stream = admin
                        .rewrap_keys(pb::RewrapKeysRequest {
                            batch,
                            from_version: from_version.unwrap_or(0),
                        })
                        .await?
                        .into_inner();
                    let mut report = None;
                    while let Some(msg) = stream.message().await? {
                        match msg.event {
                            Some(pb::rewrap_keys_response::Event::Progress(p)) => {
                                printer.update(&RewrapProgress::try_from(p)?);
                            }
                            Some(pb::rewrap_keys_response::Event::Result(r)) => {
                                report = Some(RewrapReport::try_from(r)?);
                            }
                            None => {}
                        }
                    }
                    printer.finish();
                    report.ok_or_else(|| {
                        CliError::Other("the server ended the rewrap without a result".into())
                    })?
                }
                None => {
                    let vault = vault.open()?;
                    let opts = RewrapOptions {
                        batch: batch as usize,
                        only_version: from_version,
                    };
                    let stops = StopsBetweenBatches::install();
                    let r = vault
                        .rewrap(&Caller::cli(), &opts, |p| {
                            printer.update(p);
                            stops.safe_point(&vault);
                        })
                        .await;
                    printer.finish();
                    vault.close().await;
                    r?
                }
            };
            render_rewrap(&r, json)
        }
        KeysCommand::Retire {
            vault,
            remote,
            version,
            json,
        } => {
            let retired = match remote.client().await? {
                Some(mut admin) => {
                    admin
                        .retire_key(pb::RetireKeyRequest { version })
                        .await?
                        .into_inner()
                        .retired
                }
                None => {
                    let vault = vault.open()?;
                    let r = vault.retire_key(&Caller::cli(), version).await;
                    vault.close().await;
                    r?
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"version": version, "retired": true, "already_retired": !retired})
                );
            } else if retired {
                println!("key version {version} is retired; its key is destroyed");
            } else {
                println!("key version {version} was already retired");
            }
            Ok(())
        }
        KeysCommand::Revoke {
            vault,
            remote,
            version,
            batch,
            json,
        } => {
            let r: RevokeReport = match remote.client().await? {
                Some(mut admin) => {
                    let r = admin
                        .revoke_key(pb::RevokeKeyRequest { version, batch })
                        .await?
                        .into_inner();
                    if !r.pending_request_id.is_empty() {
                        super::admin::print_pending(&r.pending_request_id, json);
                        return Ok(());
                    }
                    r.into()
                }
                None => {
                    let vault = vault.open()?;
                    let mut printer = ProgressPrinter::new(json);
                    let stops = StopsBetweenBatches::install();
                    let r = vault
                        .revoke_key(&Caller::cli(), version, batch as usize, |p| {
                            printer.update(p);
                            stops.safe_point(&vault);
                        })
                        .await;
                    printer.finish();
                    vault.close().await;
                    r?
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": r.version,
                        "rotated_to": r.rotated_to,
                        "rewrapped": r.rewrapped,
                        "already_retired": r.already_retired,
                    })
                );
            } else if r.already_retired {
                println!("key version {version} was already revoked (retired)");
            } else {
                if let Some(v) = r.rotated_to {
                    println!("rotated: active data key is now version {v}");
                }
                println!(
                    "re-encrypted {} rows; key version {version} is retired",
                    r.rewrapped
                );
            }
            Ok(())
        }
        KeysCommand::Status { vault: args, json } => {
            super::common::require_vault(&args.data_dir)?;
            let master = args.master_key()?;
            let (kind, location) = master_source(&args, &master);
            // Opening proves the key: the key check passes and every stored key unwraps.
            let vault = crate::vault::Vault::open(args.config(), &master)?;
            let id = vault.audit_vault_id().await;
            let keys = vault.list_keys().await;
            vault.close().await;
            let (id, keys) = (id?, keys?);
            let active = keys
                .iter()
                .find(|k| k.state == KeyState::Active)
                .map(|k| k.version);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "vault_id": id,
                        "master_key": {"kind": kind, "location": location, "opens_vault": true},
                        "active_data_key_version": active,
                    })
                );
            } else {
                println!("vault:       {id}");
                println!("master key:  {kind}: {location}");
                println!("             opens this vault (key check passed, stored keys unwrap)");
                if let Some(v) = active {
                    println!("data key:    version {v} active");
                }
            }
            Ok(())
        }
        KeysCommand::RotateMaster {
            vault,
            new_master_key_file,
            new_master_key_pkcs11,
            rekey,
            batch,
            max_batches,
            json,
        } => {
            let new = match (&new_master_key_file, &new_master_key_pkcs11) {
                (Some(path), None) => MasterKey::load_file(path)?,
                (None, Some(uri)) => {
                    crate::hardening::harden_process();
                    MasterKey::open_pkcs11(uri, true)?
                }
                _ => {
                    return Err(CliError::Usage(
                        "give the new master key once: --new-master-key-file or \
                         --new-master-key-pkcs11"
                            .into(),
                    ))
                }
            };
            let new_location = new.location();
            if rekey {
                return rekey_master(&vault, &new, batch, max_batches, json).await;
            }
            let vault = vault.open()?;
            let r = vault.rotate_master(&Caller::cli(), &new).await;
            vault.close().await;
            let n = r?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "rotated": true,
                        "new_master_key": new_location,
                        "data_keys_rewrapped": n,
                        "data_keys_changed": false,
                        "old_master_with_old_backup_still_opens": true,
                    })
                );
            } else {
                println!(
                    "master key rotated: {n} data keys and the fingerprint and audit keys are \
                     re-wrapped under the new master key, which alone opens this database now; \
                     send servers SIGHUP (or restart them) with it."
                );
                println!("new master key: {new_location}");
                println!(
                    "note: the data keys themselves did not change. The OLD master key together \
                     with any older copy of this database (a backup, a snapshot) still opens \
                     them and every card sealed under them, including cards stored later. \
                     Destroy the old master key and those copies, or rotate the data keys \
                     (`keys revoke` each version) if the old master key may be compromised."
                );
            }
            Ok(())
        }
    }
}

/// `keys rotate-master --rekey`: opens the vault with the current master key, or, when a
/// rekey already switched it, with the new one, and runs the rekey to its end.
async fn rekey_master(
    args: &VaultArgs,
    new: &MasterKey,
    batch: u32,
    max_batches: Option<u64>,
    json: bool,
) -> Result<(), CliError> {
    let config = args.config();
    if config.store_url.is_none() {
        super::common::require_vault(&args.data_dir)?;
    }
    let current = args
        .master_key()
        .and_then(|m| Ok(Vault::open(config.clone(), &m)?));
    let vault = match current {
        Ok(vault) => vault,
        // Resuming: an earlier run already made the new key the vault's master key.
        Err(first) => Vault::open(config, new).map_err(|_| first)?,
    };
    let opts = RekeyOptions {
        batch: batch as usize,
        max_batches,
    };
    let mut printer = ProgressPrinter::new(json);
    let stops = StopsBetweenBatches::install();
    let r = vault
        .rekey(&Caller::cli(), new, &opts, |p| {
            printer.update(p);
            stops.safe_point(&vault);
        })
        .await;
    printer.finish();
    vault.close().await;
    let r = r?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rekeyed": r.finished,
                "resumed": r.resumed,
                "new_master_key": new.location(),
                "data_key_version": r.version,
                "rows_resealed": r.resealed,
                "old_data_keys_destroyed": r.retired,
                "old_master_with_old_backup_still_opens": if r.finished { "only data created before the rekey" } else { "rekey unfinished" },
            })
        );
    } else if r.finished {
        println!(
            "master key rekeyed: data key v{} active, {} rows re-sealed, {} old data keys \
             destroyed, new fingerprint layer, audit key and checkpoint signing key (publish \
             `audit public-key`); only the new master key ({}) opens this database. The old master key and earlier backups open nothing \
             created from now on (destroy them to cut off what they hold from before).",
            r.version,
            r.resealed,
            r.retired,
            new.location()
        );
    } else {
        println!(
            "rekey in progress: {} rows re-sealed so far under v{}; run the same command \
             again to finish. Only the new master key opens this database now: reload \
             servers with it (SIGHUP).",
            r.resealed, r.version
        );
    }
    Ok(())
}

/// `keys list` output, the same in local and remote mode.
pub fn render_keys(keys: &[KeyVersionInfo], max_age: Option<Duration>, json: bool) {
    let max_age_days = max_age.map(|a| a.as_secs_f64() / 86_400.0);
    if json {
        let out: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "version": k.version,
                    "state": state_name(k.state),
                    "created_at": format_time(k.created_at),
                    "age_seconds": (now_micros() - k.created_at).max(0) / 1_000_000,
                    "max_age_seconds": max_age.map(|a| a.as_secs()),
                    "encryptions": k.encryptions,
                    "max_encryptions": k.max_encryptions,
                    "rows": k.rows,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
    } else {
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                let pct = k.encryptions as f64 * 100.0 / k.max_encryptions.max(1) as f64;
                vec![
                    k.version.to_string(),
                    state_name(k.state).to_owned(),
                    format_time(k.created_at),
                    match max_age_days {
                        Some(d) => format!("{} / {d:.0}d", age_text(k.created_at)),
                        None => age_text(k.created_at),
                    },
                    format!("{} / {} ({pct:.2}%)", k.encryptions, k.max_encryptions),
                    k.rows.to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "VERSION",
                "STATE",
                "CREATED",
                "AGE / MAX",
                "ENCRYPTIONS / LIMIT",
                "ROWS",
            ],
            &rows,
        );
    }
}

/// `keys rewrap` output and exit status, the same in local and remote mode.
fn render_rewrap(r: &RewrapReport, json: bool) -> Result<(), CliError> {
    let rate = r.rewrapped as f64 / r.elapsed.as_secs_f64().max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rewrapped": r.rewrapped,
                "failed_tokens": r.failed,
                "active_version": r.active_version,
                "batches": r.batches,
                "seconds": r.elapsed.as_secs_f64(),
                "rows_per_second": rate,
            })
        );
    } else {
        println!(
            "re-encrypted {} rows under v{} in {:.2}s ({rate:.0} rows/s)",
            r.rewrapped,
            r.active_version,
            r.elapsed.as_secs_f64()
        );
        if !r.failed.is_empty() {
            println!(
                "{} tokens failed authentication and were left as they were:",
                r.failed.len()
            );
            for t in &r.failed {
                println!("  {t}");
            }
        }
    }
    if r.failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "{} tokens could not be re-encrypted",
            r.failed.len()
        )))
    }
}
