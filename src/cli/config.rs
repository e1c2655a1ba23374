//! `tokenvault config check`: validates a configuration (file, environment, flags) and prints
//! the effective values. Secrets are never printed: the master key and API key environment
//! variables show as `<redacted>` when set.

use std::path::Path;

use clap::{Args, Subcommand};

use super::common::CliError;
use crate::config::{Config, ConfigArgs, LogFormat, Secrets};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print the effective values (secrets redacted).
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub settings: ConfigArgs,
    /// Only validate the values; do not look at the files they name (certificates, key
    /// file, data directory), e.g. when checking a file for another machine.
    #[arg(long)]
    pub no_files: bool,
}

/// `log_level`/`log_format` are the CLI's global options (`None` when not given).
pub async fn run(
    cmd: ConfigCommand,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
) -> Result<(), CliError> {
    match cmd {
        ConfigCommand::Check(args) => check(args, log_level, log_format),
    }
}

fn check(
    args: CheckArgs,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
) -> Result<(), CliError> {
    let cfg = args
        .settings
        .resolve(log_level, log_format)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut warnings = cfg.validate().map_err(|e| CliError::Usage(e.to_string()))?;
    if !args.no_files {
        check_files(&cfg, &mut warnings)?;
    }
    match &args.settings.config {
        Some(path) => println!("# configuration file: {}", path.display()),
        None => println!("# no configuration file: defaults, environment and flags"),
    }
    print!("{}", cfg.render(&Secrets::from_env()));
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    eprintln!("configuration OK");
    Ok(())
}

/// The files the configuration names: present, readable, and the master key file private.
fn check_files(cfg: &Config, warnings: &mut Vec<String>) -> Result<(), CliError> {
    let readable = |what: &str, path: &Path| -> Result<(), CliError> {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| CliError::Usage(format!("{what} {}: {e}", path.display())))
    };
    for (what, path) in [
        ("tls.cert", &cfg.tls.cert),
        ("tls.key", &cfg.tls.key),
        ("tls.client_ca", &cfg.tls.client_ca),
    ] {
        if let Some(path) = path {
            readable(what, path)?;
        }
    }
    if let Some(uri) = &cfg.storage.master_key_pkcs11 {
        // Opens the token, logs in and finds the key object: every failure has its message.
        crate::crypto::MasterKey::open_pkcs11(uri, false)
            .map_err(|e| CliError::MasterKey(format!("storage.master_key_pkcs11: {e}")))?;
    } else if let Some(path) = &cfg.storage.master_key_file {
        // Loads and checks the key (permissions, length, encoding); the key is dropped (and
        // wiped) at once and never shown.
        crate::crypto::MasterKey::load_file(path)
            .map_err(|e| CliError::MasterKey(format!("storage.master_key_file: {e}")))?;
    } else if !crate::cli::common::master_key_env_present() {
        warnings.push(
            "no master key source: set storage.master_key_file (or TOKENVAULT_MASTER_KEY_FILE, \
             --master-key-file) or TOKENVAULT_MASTER_KEY"
                .into(),
        );
    }
    let dir = &cfg.storage.data_dir;
    if cfg.store.url.is_none() && !crate::vault::Vault::exists(dir) {
        warnings.push(format!(
            "storage.data_dir {}: no vault there yet (run `tokenvault init`)",
            dir.display()
        ));
    }
    Ok(())
}
