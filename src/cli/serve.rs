//! `tokenvault serve`: runs the gRPC server until ctrl-c or SIGTERM.
//!
//! Start-up order matters: core dumps are disabled (and memory locked with `--mlock`)
//! before the master key is read; the transport is checked before the vault is opened.
//! Without `--dev`, a non-loopback listen address requires TLS ([`check_transport`]): card
//! data may cross a network only encrypted. With TLS, SIGHUP re-reads the certificate, key
//! and client CA; a failed reload keeps the old ones.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;

use super::common::{CliError, VaultArgs};
use super::dev;
use crate::grpc::server::{
    serve, ServerConfig, DEFAULT_CONCURRENCY_PER_CONNECTION, DEFAULT_REQUEST_TIMEOUT,
};
use crate::grpc::service::DEFAULT_MAX_BATCH_ITEMS;
use crate::grpc::tls::{TlsFiles, TlsReloader};
use crate::ratelimit::Rate;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Address to listen on, HOST:PORT.
    #[arg(long, env = "TOKENVAULT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// DEVELOPMENT ONLY: create the data directory, master key, vault and two demo clients
    /// as needed, and print their API keys.
    #[arg(long)]
    pub dev: bool,
    /// Largest number of items accepted in one batch request.
    #[arg(
        long,
        env = "TOKENVAULT_MAX_BATCH_ITEMS",
        default_value_t = DEFAULT_MAX_BATCH_ITEMS,
        value_parser = parse_batch_items
    )]
    pub max_batch_items: usize,
    /// PEM certificate chain of the server (leaf first); enables TLS (1.2 and 1.3).
    #[arg(
        long,
        env = "TOKENVAULT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (keep it mode 0600).
    #[arg(
        long,
        env = "TOKENVAULT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for mutual TLS: clients must present a certificate chaining to
    /// it, and its URI or DNS SAN identifies the client (`clients add --cert-identity`).
    #[arg(
        long,
        env = "TOKENVAULT_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub client_ca: Option<PathBuf>,
    /// Require both a client certificate bound to a client and that client's API key.
    #[arg(long, requires = "client_ca")]
    pub require_cert_and_key: bool,
    /// Detokenize limit of clients without their own (`clients add --detokenize-rate`),
    /// e.g. 100/s or 6000/m; items of a batch count one by one. Default: unlimited.
    #[arg(long, env = "TOKENVAULT_DETOKENIZE_RATE", value_name = "RATE", value_parser = Rate::parse)]
    pub detokenize_rate: Option<Rate>,
    /// Requests in flight on one connection; 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY_PER_CONNECTION)]
    pub max_concurrent_per_connection: usize,
    /// Longest a request may run on the server, in seconds; 0 = no limit.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout: u64,
    /// Lock the process memory so keys and card numbers are never swapped out (needs
    /// CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; warns when it cannot).
    #[arg(long)]
    pub mlock: bool,
}

impl ServeArgs {
    fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.client_ca.clone(),
        })
    }
}

/// Refuses plaintext on an address other machines can reach, unless `dev` (which warns).
pub fn check_transport(addr: SocketAddr, tls: bool, dev: bool) -> Result<(), CliError> {
    if tls || addr.ip().is_loopback() {
        return Ok(());
    }
    if dev {
        tracing::warn!(listen = %addr, "listening on a non-loopback address without TLS (--dev)");
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "refusing to listen on {addr} without TLS: card data may leave this machine only \
         encrypted. Pass --tls-cert FILE and --tls-key FILE (and --client-ca FILE for mutual \
         TLS), or listen on a loopback address such as 127.0.0.1:50051"
    )))
}

/// Disables core dumps and, with `mlock`, locks memory; problems are warnings.
fn harden(mlock: bool) {
    for problem in crate::hardening::disable_core_dumps() {
        tracing::warn!(problem = %problem, "could not fully disable core dumps");
    }
    if mlock {
        match crate::hardening::lock_memory() {
            Ok(()) => tracing::info!("process memory locked"),
            Err(e) => tracing::warn!(error = %e, "--mlock: could not lock memory; continuing"),
        }
    }
}

pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    // Before any secret is in memory.
    harden(args.mlock);

    let addr = resolve_listen(&args.listen).await?;
    let tls_files = args.tls_files();
    check_transport(addr, tls_files.is_some(), args.dev)?;
    let tls = match tls_files {
        Some(files) => Some(TlsReloader::new(files).map_err(|e| CliError::Usage(e.to_string()))?),
        None => None,
    };

    let (vault, dev_setup) = if args.dev {
        let (vault, setup) = dev::prepare(&args.vault).await?;
        (vault, Some(setup))
    } else {
        (args.vault.open()?, None)
    };

    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            vault.close().await;
            return Err(e);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            vault.close().await;
            return Err(CliError::Other(format!("cannot listen on {addr}: {e}")));
        }
    };
    let reloader = match reload_on_sighup(tls.as_ref()) {
        Ok(task) => task,
        Err(e) => {
            vault.close().await;
            return Err(e);
        }
    };
    if let Some(setup) = dev_setup {
        let bound = listener.local_addr().unwrap_or(addr);
        dev::print_banner(&setup, bound, &args.vault, tls.is_some());
    }

    let cfg = ServerConfig {
        max_batch_items: args.max_batch_items,
        require_client_cert_and_key: args.require_cert_and_key,
        detokenize_rate: args.detokenize_rate,
        concurrency_limit_per_connection: (args.max_concurrent_per_connection > 0)
            .then_some(args.max_concurrent_per_connection),
        request_timeout: (args.request_timeout > 0)
            .then(|| Duration::from_secs(args.request_timeout)),
        tls,
        ..ServerConfig::default()
    };
    let result = serve(listener, vault, cfg, shutdown).await;
    if let Some(task) = reloader {
        task.abort();
    }
    result?;
    Ok(())
}

/// SIGHUP reloads the TLS files; without TLS it is logged and ignored (rather than
/// terminating the server, its default action).
fn reload_on_sighup(
    tls: Option<&Arc<TlsReloader>>,
) -> Result<Option<tokio::task::JoinHandle<()>>, CliError> {
    #[cfg(unix)]
    {
        let cannot =
            |e: std::io::Error| CliError::Other(format!("cannot install SIGHUP handler: {e}"));
        match tls {
            Some(tls) => Ok(Some(tls.reload_on_sighup().map_err(cannot)?)),
            None => {
                use tokio::signal::unix::{signal, SignalKind};
                let mut hup = signal(SignalKind::hangup()).map_err(cannot)?;
                Ok(Some(tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP ignored: no TLS files to reload");
                    }
                })))
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
        Ok(None)
    }
}

/// Largest `--max-batch-items`: beyond it the message size limit passes a gigabyte.
pub const MAX_BATCH_ITEMS_LIMIT: usize = 1_000_000;

fn parse_batch_items(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_ITEMS_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number from 1 to {MAX_BATCH_ITEMS_LIMIT}"
        )),
    }
}

/// HOST:PORT to one socket address (the first the name resolves to; all must agree on
/// being loopback or not, so `localhost` works and a mixed name is refused).
async fn resolve_listen(listen: &str) -> Result<SocketAddr, CliError> {
    let usage = || CliError::Usage(format!("--listen {listen}: expected HOST:PORT"));
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(|_| usage())?
        .collect();
    let first = *addrs.first().ok_or_else(usage)?;
    if addrs
        .iter()
        .any(|a| a.ip().is_loopback() != first.ip().is_loopback())
    {
        return Err(CliError::Usage(format!(
            "--listen {listen} resolves to both loopback and other addresses; give an IP address"
        )));
    }
    Ok(first)
}

/// A future that completes on ctrl-c or, on Unix, SIGTERM. The handlers are installed
/// here, before the server announces itself, so a signal sent right after the banner is
/// not lost to the default action (termination without a clean shutdown).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, CliError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| {
            signal(kind).map_err(|e| CliError::Other(format!("cannot install signal handler: {e}")))
        };
        let mut interrupt = install(SignalKind::interrupt())?;
        let mut terminate = install(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_addresses() {
        assert!(resolve_listen("127.0.0.1:50051")
            .await
            .unwrap()
            .ip()
            .is_loopback());
        assert!(resolve_listen("[::1]:1").await.unwrap().ip().is_loopback());
        assert!(!resolve_listen("0.0.0.0:50051")
            .await
            .unwrap()
            .ip()
            .is_loopback());
        assert!(resolve_listen("nonsense").await.is_err());
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let v6: SocketAddr = "[::1]:50051".parse().unwrap();
        assert!(check_transport(lo, false, false).is_ok());
        assert!(check_transport(v6, false, false).is_ok());
        assert!(check_transport(any, true, false).is_ok());
        assert!(check_transport(any, false, true).is_ok());
        let err = check_transport(any, false, false).unwrap_err();
        assert_eq!(err.exit_code(), super::super::common::exit::USAGE);
        let text = err.to_string();
        assert!(
            text.contains("without TLS") && text.contains("--tls-cert"),
            "{text}"
        );
    }
}
