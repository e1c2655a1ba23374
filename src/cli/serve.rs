//! `tokenvault serve`: runs the gRPC server until ctrl-c or SIGTERM.
//!
//! Start-up order matters: core dumps are disabled (and memory locked with `--mlock`)
//! before the master key is read; the transport is checked before the vault is opened.
//! Without `--dev`, a non-loopback listen address requires TLS ([`check_transport`]): card
//! data may cross a network only encrypted. With TLS, the certificate, key and client CA are
//! re-read when they change on disk (polled, debounced) and on SIGHUP (`systemctl reload`);
//! a failed reload keeps the old ones.
//!
//! Settings: flag > `TOKENVAULT_…` environment variable > configuration file (`--config`,
//! `TOKENVAULT_CONFIG`) > default, resolved and validated by [`crate::config`]. With
//! `--metrics-listen` (or `[metrics] listen`) Prometheus metrics are served on their own
//! plain-HTTP listener, installed before the vault opens, and the gauges that need store
//! queries are refreshed by a background task ([`crate::metrics::spawn_gauge_refresher`]).
//!
//! With `--proxy-listen` (or `[proxy] listen`) the detokenizing forward proxy
//! ([`crate::proxy`]) serves beside gRPC, under the same transport rule and TLS files, with
//! one detokenize budget per principal for both; it stops accepting at the shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use tokio::net::TcpListener;

use super::common::{CliError, VaultArgs};
use super::dev;
use crate::config::{Config, ConfigArgs};
use crate::grpc::server::{serve, ServerConfig};
use crate::grpc::tls::{TlsFiles, TlsReloader};
use crate::ratelimit::Rate;

/// Every setting comes from a flag, its `TOKENVAULT_…` environment variable, the
/// configuration file (`--config`, `TOKENVAULT_CONFIG`) or the built-in default, in that
/// order; `tokenvault config check` with the same options shows the result.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub settings: ConfigArgs,
    /// DEVELOPMENT ONLY: create the data directory, master key, vault and two demo clients
    /// as needed, and print their API keys.
    #[arg(long)]
    pub dev: bool,
    /// Start sealed, without a master key: health NOT_SERVING and every RPC UNAVAILABLE
    /// until custodians hand in enough master-key shares on this Unix socket (mode 0600)
    /// with `tokenvault unseal --socket PATH`.
    #[arg(long, value_name = "PATH", conflicts_with = "dev")]
    pub unseal_socket: Option<std::path::PathBuf>,
    /// Refuse AdminService calls authenticated by an API key alone: admin principals must
    /// present a client certificate bound to them (`--require-cert-for-admin` or `=false`;
    /// default: true, false with --dev).
    #[arg(
        long,
        env = "TOKENVAULT_REQUIRE_CERT_FOR_ADMIN",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_cert_for_admin: Option<bool>,
}

impl ServeArgs {
    /// Defaults, the file, then environment and flags; validated (warnings are logged).
    pub fn resolve(&self) -> Result<Config, CliError> {
        let usage = |e: crate::config::ConfigError| CliError::Usage(e.to_string());
        // Logging was set up from the same sources before this runs (see `cli::main`).
        let cfg = self.settings.resolve(None, None).map_err(usage)?;
        // The transport rule (TLS off loopback, not with --dev) is checked by `run` on the
        // resolved address, see [`check_transport`].
        let warnings = cfg.validate_except_transport().map_err(usage)?;
        for w in warnings {
            tracing::warn!("configuration: {w}");
        }
        Ok(cfg)
    }
}

fn tls_files(cfg: &Config) -> Option<TlsFiles> {
    Some(TlsFiles {
        cert: cfg.tls.cert.clone()?,
        key: cfg.tls.key.clone()?,
        client_ca: cfg.tls.client_ca.clone(),
    })
}

/// Checkpoint file of `serve --dev` inside its data directory.
pub const DEV_CHECKPOINT_FILE: &str = "audit-checkpoints.jsonl";

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
    crate::hardening::harden_process();
    if mlock {
        match crate::hardening::lock_memory() {
            Ok(()) => tracing::info!("process memory locked"),
            Err(e) => tracing::warn!(error = %e, "--mlock: could not lock memory; continuing"),
        }
    }
}

pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let cfg = args.resolve()?;
    // Before any secret is in memory.
    harden(cfg.server.mlock);

    let addr = resolve_listen(&cfg.server.listen).await?;
    let tls_files = tls_files(&cfg);
    check_transport(addr, tls_files.is_some(), args.dev)?;
    // The proxy listener follows the same transport rule; its routes' CA files are read now.
    let proxy_addr = match &cfg.proxy.listen {
        Some(listen) => {
            let proxy_addr = resolve_listen(listen).await?;
            check_transport(proxy_addr, tls_files.is_some(), args.dev)?;
            Some(proxy_addr)
        }
        None => None,
    };
    let proxy_routes = cfg
        .proxy
        .routes
        .iter()
        .map(crate::proxy::Route::load)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::Usage)?;
    let tls = match tls_files {
        Some(files) => Some(TlsReloader::new(files).map_err(|e| CliError::Usage(e.to_string()))?),
        None => None,
    };
    let detokenize_rate = cfg
        .limits
        .detokenize_rate
        .as_deref()
        .map(Rate::parse)
        .transpose()
        .map_err(|e| CliError::Usage(format!("limits.detokenize_rate: {e}")))?;
    let reuse_rate = match cfg.limits.reuse_rate.as_deref() {
        Some(text) => {
            Rate::parse(text).map_err(|e| CliError::Usage(format!("limits.reuse_rate: {e}")))?
        }
        None => Rate {
            per_second: crate::grpc::server::DEFAULT_REUSE_PER_SECOND,
        },
    };

    // Metrics before the vault opens, so a taken port fails fast and no commit goes uncounted.
    let metrics_on = match cfg.metrics.listen {
        Some(listen) => {
            crate::metrics::install(listen).map_err(|e| CliError::Other(e.to_string()))?;
            true
        }
        None => false,
    };

    let vault_args = VaultArgs {
        data_dir: cfg.storage.data_dir.clone(),
        master_key_file: cfg.storage.master_key_file.clone(),
        store_url: cfg.store.url.clone(),
        master_key_pkcs11: cfg.storage.master_key_pkcs11.clone(),
    };
    let mut early_listener = None;
    let (vault, dev_setup) = if args.dev {
        let (vault, setup) = dev::prepare(&vault_args, cfg.vault_config()).await?;
        (vault, Some(setup))
    } else if let Some(socket) = &args.unseal_socket {
        let (vault, listener) =
            unseal_then_open(&vault_args, &cfg, addr, socket, tls.clone()).await?;
        early_listener = Some(listener);
        (vault, None)
    } else {
        (vault_args.open_with(cfg.vault_config())?, None)
    };

    if metrics_on {
        // `/readyz` answers 200 from here on while storage is writable.
        crate::probes::probes().attach(vault.clone());
    }
    let (proxy_stop, mut proxy_stopped) = tokio::sync::watch::channel(false);
    let shutdown = match shutdown_signal() {
        Ok(s) => {
            async move {
                s.await;
                crate::probes::probes().set_stopping();
                let _ = proxy_stop.send(true);
            }
        }
        Err(e) => {
            vault.close().await;
            return Err(e);
        }
    };
    let bound = match early_listener {
        Some(l) => Ok(l),
        None => TcpListener::bind(addr).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            vault.close().await;
            return Err(CliError::Other(format!("cannot listen on {addr}: {e}")));
        }
    };
    // One detokenize budget per principal for gRPC reveals and proxy substitutions.
    let reveal_budget = Arc::new(crate::ratelimit::RateLimiter::new(detokenize_rate));
    let proxy_task = match proxy_addr {
        Some(proxy_addr) => {
            let proxy_listener = match TcpListener::bind(proxy_addr).await {
                Ok(l) => l,
                Err(e) => {
                    vault.close().await;
                    return Err(CliError::Other(format!(
                        "cannot listen on {proxy_addr} (proxy): {e}"
                    )));
                }
            };
            let proxy_cfg = crate::proxy::ProxyConfig {
                routes: proxy_routes,
                tls: tls.clone(),
                require_client_cert_and_key: cfg.tls.require_cert_and_key,
                detokenize_rate,
                detokenize_limiter: Some(reveal_budget.clone()),
            };
            Some(tokio::spawn(crate::proxy::serve(
                proxy_listener,
                vault.clone(),
                proxy_cfg,
                async move {
                    let _ = proxy_stopped.wait_for(|stop| *stop).await;
                },
            )))
        }
        None => None,
    };
    // Renewed certificates are picked up without a signal (after the metrics install, so the
    // expiry gauge is published).
    let watcher = tls
        .as_ref()
        .map(|t| t.watch(crate::grpc::tls::WATCH_INTERVAL));
    let reloader = match reload_on_sighup(tls.as_ref()) {
        Ok(task) => task,
        Err(e) => {
            vault.close().await;
            return Err(e);
        }
    };
    let master_reloader = match master_key_path(&vault_args, args.dev) {
        Some(path) => match reload_master_on_sighup(vault.clone(), path) {
            Ok(task) => Some(task),
            Err(e) => {
                vault.close().await;
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(setup) = dev_setup {
        let bound = listener.local_addr().unwrap_or(addr);
        dev::print_banner(&setup, bound, &vault_args, tls.is_some());
    }

    let limits = &cfg.limits;
    let server_cfg = ServerConfig {
        max_batch_items: limits.max_batch_items,
        access_log: cfg.logging.access,
        require_client_cert_and_key: cfg.tls.require_cert_and_key,
        detokenize_rate,
        reuse_rate,
        concurrency_limit_per_connection: (limits.max_concurrent_per_connection > 0)
            .then_some(limits.max_concurrent_per_connection),
        request_timeout: (!limits.request_timeout.is_zero()).then_some(limits.request_timeout),
        tls,
        detokenize_limiter: Some(reveal_budget),
        // `--dev` keeps checkpoints beside the data unless told otherwise, so the audit
        // commands have something to verify against.
        audit_checkpoint_file: cfg.audit.checkpoint_file.clone().or_else(|| {
            args.dev
                .then(|| vault_args.data_dir.join(DEV_CHECKPOINT_FILE))
        }),
        require_cert_for_admin: args.require_cert_for_admin.unwrap_or(!args.dev),
        dual_control: cfg.admin.dual_control.then_some(cfg.admin.approval_window),
        ..ServerConfig::default()
    };
    let gauges = metrics_on.then(|| {
        crate::metrics::set_limits(
            cfg.vault_config().key_policy.max_age,
            cfg.limits.max_storage_bytes,
        );
        crate::metrics::spawn_gauge_refresher(
            vault.clone(),
            vault_args.data_dir.clone(),
            crate::metrics::GAUGE_REFRESH,
        )
    });
    let result = serve(listener, vault, server_cfg, shutdown).await;
    for task in [reloader, master_reloader, watcher].into_iter().flatten() {
        task.abort();
    }
    if let Some(task) = gauges {
        task.abort();
    }
    if let Some(task) = proxy_task {
        task.abort();
    }
    result?;
    Ok(())
}

/// Sealed start: listens at once (answering UNAVAILABLE), takes shares on `socket` until they
/// rebuild the vault's key, then opens the vault and audits the unseal attempts.
async fn unseal_then_open(
    vault_args: &VaultArgs,
    cfg: &Config,
    addr: SocketAddr,
    socket: &std::path::Path,
    tls: Option<Arc<TlsReloader>>,
) -> Result<(crate::vault::Vault, TcpListener), CliError> {
    if vault_args.has_master_key_source() {
        return Err(CliError::Usage(
            "--unseal-socket starts without a master key: drop --master-key-file, \
             --master-key-pkcs11 and TOKENVAULT_MASTER_KEY"
                .into(),
        ));
    }
    let config = cfg.vault_config();
    // A shared store says itself whether it holds a vault (at the header read).
    if config.store_url.is_none() {
        super::common::require_vault(&vault_args.data_dir)?;
    }
    let location = config.location()?;
    crate::hardening::harden_process();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Other(format!("cannot listen on {addr}: {e}")))?;
    let (master, attempts) = crate::grpc::sealed::unseal(&listener, socket, location, tls).await?;
    let vault = crate::vault::Vault::open(cfg.vault_config(), &master)?;
    drop(master);
    for (peer, outcome, detail) in attempts {
        let caller = crate::vault::Caller::new("unseal", peer);
        vault
            .audit_summary(&caller, "Unseal", outcome, &detail)
            .await?;
    }
    tracing::info!("vault unsealed");
    Ok((vault, listener))
}

/// The file the master key was read from, if it came from a file (a key in the environment
/// cannot change under a running process).
fn master_key_path(args: &VaultArgs, dev: bool) -> Option<std::path::PathBuf> {
    match &args.master_key_file {
        Some(path) => Some(path.clone()),
        None if dev && !crate::cli::common::master_key_env_present() => {
            Some(args.data_dir.join(dev::MASTER_KEY_FILE))
        }
        None => None,
    }
}

/// SIGHUP also re-reads the master key file, so a server keeps working after
/// `keys rotate-master` once the file holds the new key. A key that does not match the vault
/// is refused and the current one stays in use.
fn reload_master_on_sighup(
    vault: crate::vault::Vault,
    path: std::path::PathBuf,
) -> Result<tokio::task::JoinHandle<()>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| CliError::Other(format!("cannot install SIGHUP handler: {e}")))?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // File work off the async workers: even a bounded wait on a pipe must not stall
            // the serving threads.
            let p = path.clone();
            let loaded =
                tokio::task::spawn_blocking(move || crate::crypto::MasterKey::load_file(&p))
                    .await
                    .map_err(|e| crate::error::Error::Internal(format!("key reload task: {e}")));
            let result = match loaded {
                Ok(Ok(key)) => vault.reload_master_key(&key).await,
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::info!(path = %path.display(), "SIGHUP: master key reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: master key not reloaded; keeping the current one")
                }
            }
        }
    }))
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

/// HOST:PORT to one socket address (the first the name resolves to; all must agree on
/// being loopback or not, so `localhost` works and a mixed name is refused).
async fn resolve_listen(listen: &str) -> Result<SocketAddr, CliError> {
    let usage = || CliError::Usage(format!("listen address {listen}: expected HOST:PORT"));
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
            "listen address {listen} resolves to both loopback and other addresses; give an IP \
             address"
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
