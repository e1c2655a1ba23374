//! `tokenvault serve`: runs the gRPC server until ctrl-c or SIGTERM.
//!
//! Without `--dev` the listen address must be loopback: card data may cross a network only
//! over TLS, which the server does not terminate yet.

use std::net::SocketAddr;

use clap::Args;
use tokio::net::TcpListener;

use super::common::{CliError, VaultArgs};
use super::dev;
use crate::grpc::server::{serve, ServerConfig};
use crate::grpc::service::DEFAULT_MAX_BATCH_ITEMS;

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
}

pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let addr = resolve_listen(&args.listen).await?;
    if !addr.ip().is_loopback() {
        if args.dev {
            tracing::warn!(listen = %addr, "listening on a non-loopback address without TLS (--dev)");
        } else {
            return Err(CliError::Usage(format!(
                "refusing to listen on {addr}: serving card data beyond this machine requires \
                 TLS, which is not available yet; listen on a loopback address such as \
                 127.0.0.1:50051"
            )));
        }
    }

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
    if let Some(setup) = dev_setup {
        let bound = listener.local_addr().unwrap_or(addr);
        dev::print_banner(&setup, bound, &args.vault);
    }

    let cfg = ServerConfig {
        max_batch_items: args.max_batch_items,
        ..ServerConfig::default()
    };
    serve(listener, vault, cfg, shutdown).await?;
    Ok(())
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
}
