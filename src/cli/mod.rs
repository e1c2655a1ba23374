//! The `tokenvault` command line: argument parsing, logging setup, the runtime, and the
//! mapping of failures to exit codes. One file per command group:
//! [`init`], [`keys`], [`clients`], [`serve`] (with [`dev`] for `serve --dev`) and [`client`]
//! (the commands that call a running server). Shared options live in [`common`].

pub mod admin;
pub mod audit;
pub mod backup;
pub mod bench;
pub mod check;
pub mod client;
pub mod clients;
pub mod common;
pub mod completions;
pub mod config;
pub mod dev;
pub mod init;
pub mod keys;
pub mod master_key;
pub mod purge;
pub mod remote;
pub mod serve;
pub mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use common::{exit, CliError};

#[derive(Parser)]
#[command(
    name = "tokenvault",
    version = crate::VERSION,
    about = "Tokenization vault for payment card numbers"
)]
pub struct Cli {
    /// Log filter, e.g. `info` or `tokenvault=debug` (default: RUST_LOG, then `serve`'s
    /// configuration file [logging] level, else `info`).
    #[arg(
        long,
        global = true,
        env = "TOKENVAULT_LOG_LEVEL",
        value_name = "FILTER"
    )]
    pub log_level: Option<String>,
    /// Log line format; logs go to standard error (default: `serve`'s configuration file
    /// [logging] format, else text).
    #[arg(long, global = true, env = "TOKENVAULT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

pub use crate::config::LogFormat;

#[derive(Subcommand)]
pub enum Command {
    /// Create a new vault.
    Init(init::InitArgs),
    /// Manage data-key versions.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Split the master key into custodian shares, or rebuild it from them.
    #[command(subcommand)]
    MasterKey(master_key::MasterKeyCommand),
    /// Hand one master-key share to a server started with --unseal-socket.
    Unseal(master_key::UnsealArgs),
    /// Manage client principals and their API keys.
    #[command(subcommand)]
    Clients(clients::ClientsCommand),
    /// Dual-control requests of a running server: list and approve (needs --addr).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Verify, export and read the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Run the gRPC server.
    Serve(serve::ServeArgs),
    /// Tokenize a card number read from standard input.
    Tokenize(client::TokenizeArgs),
    /// Reveal the card number behind a token.
    Detokenize(client::DetokenizeArgs),
    /// Describe a token without revealing the card number.
    Info(client::TokenArgs),
    /// Delete a token.
    Delete(client::TokenArgs),
    /// Check that a server is serving.
    Health(client::HealthArgs),
    /// Validate a configuration file and print the effective settings.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Check database integrity, keyring consistency and that ciphertexts decrypt.
    Check(check::CheckArgs),
    /// Write a consistent online snapshot of the vault to a file.
    Backup(backup::BackupArgs),
    /// Restore a vault from a backup file after verifying it.
    Restore(backup::RestoreArgs),
    /// Remove deleted and expired tokens (data retention).
    Purge(purge::PurgeArgs),
    /// Move a vault between SQLite and PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Load-test a server (or one started in-process) and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Print the man page, or write one per subcommand with --out-dir.
    Man(completions::ManArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Before anything else, while the process is single-threaded: no core dumps, and the
    // master key moved out of the environment (see `common::env_master_key`).
    let hardening = crate::hardening::disable_core_dumps();
    common::capture_master_key_env();
    let cli = Cli::parse();
    // `serve` reads its configuration file before logging starts, for its [logging] section.
    let (level, format) = match logging_settings(&cli) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if let Err(e) = init_tracing(level, format) {
        eprintln!("error: {e}");
        return ExitCode::from(e.exit_code());
    }
    for problem in hardening {
        tracing::warn!(problem = %problem, "could not fully disable core dumps");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let result = match cli.command {
        // `config check` shows the effective logging settings too.
        Command::Config(cmd) => runtime.block_on(config::run(cmd, cli.log_level, cli.log_format)),
        command => runtime.block_on(run(command)),
    };
    // Do not wait on blocking tasks still running (a key file read waiting on a pipe): the
    // command's work is done or has failed, and the process must exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A log filter and where it came from (`--log-level`, `logging.level`), for messages.
type LogFilter = (String, &'static str);

/// The log filter (with where it came from, for error messages) and format: `--log-level`
/// (or `TOKENVAULT_LOG_LEVEL`) > `RUST_LOG` > the configuration file of `serve` > `info`;
/// `--log-format` (or `TOKENVAULT_LOG_FORMAT`) > the file > text.
fn logging_settings(cli: &Cli) -> Result<(Option<LogFilter>, LogFormat), CliError> {
    let file = match &cli.command {
        Command::Serve(args) => {
            crate::config::Config::load(args.settings.config.as_deref())
                .map_err(|e| CliError::Usage(e.to_string()))?
                .logging
        }
        _ => crate::config::LoggingSection::default(),
    };
    let level = match &cli.log_level {
        Some(l) => Some((l.clone(), "--log-level")),
        None if std::env::var_os("RUST_LOG").is_some() => None,
        None => file.level.map(|l| (l, "logging.level")),
    };
    Ok((level, cli.log_format.unwrap_or(file.format)))
}

pub async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init(args) => init::run(args).await,
        Command::Keys(cmd) => keys::run(cmd).await,
        Command::MasterKey(cmd) => master_key::run(cmd).await,
        Command::Unseal(args) => master_key::unseal(args).await,
        Command::Clients(cmd) => clients::run(cmd).await,
        Command::Audit(cmd) => audit::run(cmd).await,
        Command::Admin(cmd) => admin::run(cmd).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Tokenize(args) => client::tokenize(args).await,
        Command::Detokenize(args) => client::detokenize(args).await,
        Command::Info(args) => client::info(args).await,
        Command::Delete(args) => client::delete(args).await,
        Command::Health(args) => client::health(args).await,
        Command::Config(cmd) => config::run(cmd, None, None).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Check(args) => check::run(args).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Purge(args) => purge::run(args).await,
        Command::Store(cmd) => store::run(cmd).await,
        Command::Completions(args) => completions::completions(args),
        Command::Man(args) => completions::man(args),
    }
}

fn init_tracing(level: Option<LogFilter>, format: LogFormat) -> Result<(), CliError> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some((l, origin)) => {
            EnvFilter::try_new(&l).map_err(|e| CliError::Usage(format!("{origin}: {e}")))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    }
    // The PostgreSQL driver logs every statement with its parameters at debug: tokens,
    // ciphertexts, wrapped keys and the key check, client key hashes, audit records. Those
    // lines stay off at any level asked for; the vault's own lines are unaffected.
    .add_directive(
        "tokio_postgres=info"
            .parse()
            .map_err(|e| CliError::Other(format!("log filter: {e}")))?,
    );
    // Colours only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        // One flat object per line with unique keys (see `crate::logging`).
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(crate::logging::FlatJson)
            .try_init(),
    };
    result.map_err(|e| CliError::Other(format!("cannot set up logging: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_common_commands() {
        let cli = Cli::try_parse_from([
            "tokenvault",
            "clients",
            "add",
            "checkout",
            "--roles",
            "tokenize,info",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Clients(_)));
        assert!(
            Cli::try_parse_from(["tokenvault", "clients", "add", "x", "--roles", "nope"]).is_err()
        );
        let cli = Cli::try_parse_from(["tokenvault", "serve", "--dev", "--max-batch-items", "5"])
            .unwrap();
        match cli.command {
            Command::Serve(s) => assert_eq!(s.settings.max_batch_items, Some(5)),
            _ => panic!("not serve"),
        }
        assert!(Cli::try_parse_from(["tokenvault", "serve", "--max-batch-items", "0"]).is_err());
    }
}
