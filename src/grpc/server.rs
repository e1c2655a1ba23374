//! Hosts [`TokenVaultService`] on a TCP listener together with `grpc.health.v1.Health` and
//! gRPC reflection (v1 and v1alpha), and owns the server's lifecycle: start, health polling,
//! graceful shutdown, closing the vault.
//!
//! Transport is plaintext HTTP/2 or, with [`ServerConfig::tls`], TLS terminated by
//! [`super::tls`] (reloadable on SIGHUP). Abuse limits applied here: at most
//! [`ServerConfig::concurrency_limit_per_connection`] requests in flight per connection and
//! a server-side [`ServerConfig::request_timeout`]; the per-principal detokenize rate is
//! enforced by the service.
//!
//! With [`ServerConfig::audit_checkpoint_file`], signed checkpoints of the audit chain are
//! appended to that file while the server runs and once more after the `server_stop` record
//! (see [`crate::audit::spawn_checkpointer`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::admin::AdminService;
use super::gate::AuthGate;
use super::pb;
use super::pb::admin_service_server::AdminServiceServer;
use super::pb::token_vault_service_server::TokenVaultServiceServer;
use super::service::{AuthPolicy, TokenVaultService, DEFAULT_MAX_BATCH_ITEMS};
use super::tls::TlsReloader;
use super::SERVICE_NAME;
use crate::error::{Error, Result};
use crate::ratelimit::Rate;
use crate::vault::{Caller, Vault};

/// Message budget per batch item. The largest item is a detokenize request (token plus a
/// reason of at most 512 bytes) or a detokenize result (PAN plus a full `TokenInfo`, about
/// 250 bytes); 1 KiB covers either with room for protobuf framing.
pub const BYTES_PER_BATCH_ITEM: usize = 1024;
/// Room for everything in a message that is not a batch item, and for single-item RPCs.
pub const MESSAGE_SLACK_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest number of items in one batch request; more is INVALID_ARGUMENT.
    pub max_batch_items: usize,
    /// How often the health service re-reads [`Vault::healthy`].
    pub health_poll_interval: Duration,
    /// After the shutdown signal, how long in-flight requests may take before the server
    /// stops waiting for them.
    pub shutdown_grace: Duration,
    /// Terminate TLS with this (reloadable) configuration; `None` serves plaintext.
    pub tls: Option<Arc<TlsReloader>>,
    /// Require a bound client certificate and the API key of the same principal.
    pub require_client_cert_and_key: bool,
    /// Detokenize limit for principals without their own; `None` = unlimited.
    pub detokenize_rate: Option<Rate>,
    /// `reuse_existing` lookups per second for principals without their own budget.
    pub reuse_rate: Rate,
    /// Audit records written for unauthenticated requests, server-wide; refusals beyond it
    /// are still refused, only counted in the log, so an anonymous flood cannot fill the trail.
    pub anonymous_audit_rate: Rate,
    /// Requests in flight on one connection; more wait (HTTP/2 streams queue behind it).
    pub concurrency_limit_per_connection: Option<usize>,
    /// Longest a request may run on the server before it is cancelled.
    pub request_timeout: Option<Duration>,
    /// Append signed audit checkpoints to this file (O_APPEND, never rewritten).
    pub audit_checkpoint_file: Option<std::path::PathBuf>,
    /// Log every answered request at INFO (otherwise at DEBUG): `logging.access`.
    pub access_log: bool,
    /// The detokenize buckets, when shared with the proxy (`serve --proxy-listen`); `None`
    /// = the service's own, at `detokenize_rate`.
    pub detokenize_limiter: Option<Arc<crate::ratelimit::RateLimiter>>,
    /// Refuse `AdminService` calls authenticated by an API key alone: admin principals must
    /// present a client certificate bound to them (mutual TLS).
    pub require_cert_for_admin: bool,
    /// Dual control of dangerous admin operations: requests wait this long for a second
    /// admin's approval; None = off.
    pub dual_control: Option<Duration>,
}

/// Default of [`ServerConfig::concurrency_limit_per_connection`].
pub const DEFAULT_CONCURRENCY_PER_CONNECTION: usize = 64;
/// Default of [`ServerConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ServerConfig::reuse_rate`]: `reuse_existing` lookups per principal per second.
pub const DEFAULT_REUSE_PER_SECOND: f64 = 100.0;
/// Default of [`ServerConfig::anonymous_audit_rate`].
pub const DEFAULT_ANONYMOUS_AUDIT_PER_SECOND: f64 = 20.0;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch_items: DEFAULT_MAX_BATCH_ITEMS,
            health_poll_interval: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
            require_client_cert_and_key: false,
            detokenize_rate: None,
            reuse_rate: Rate {
                per_second: DEFAULT_REUSE_PER_SECOND,
            },
            anonymous_audit_rate: Rate {
                per_second: DEFAULT_ANONYMOUS_AUDIT_PER_SECOND,
            },
            concurrency_limit_per_connection: Some(DEFAULT_CONCURRENCY_PER_CONNECTION),
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            audit_checkpoint_file: None,
            access_log: false,
            detokenize_limiter: None,
            require_cert_for_admin: true,
            dual_control: None,
        }
    }
}

impl ServerConfig {
    /// Largest gRPC message received or sent: what the largest allowed batch needs
    /// (10,000 items: 10,000 KiB + 64 KiB, about 10.3 MB).
    pub fn max_message_bytes(&self) -> usize {
        self.max_batch_items
            .saturating_mul(BYTES_PER_BATCH_ITEM)
            .saturating_add(MESSAGE_SLACK_BYTES)
    }
}

/// Serves until `shutdown` completes, then stops accepting connections, lets in-flight
/// requests finish (up to `cfg.shutdown_grace`) and closes the vault.
pub async fn serve(
    listener: TcpListener,
    vault: Vault,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let local = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let server_caller = Caller::new("server", local.clone());

    // Before anything is served: a checkpoint file this vault contradicts is refused.
    let checkpointer = match &cfg.audit_checkpoint_file {
        Some(path) => match open_checkpoints(&vault, path).await {
            Ok(file) => Some(crate::audit::spawn_checkpointer(vault.clone(), file)),
            Err(e) => {
                vault.close().await;
                return Err(e);
            }
        },
        None => None,
    };

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut serving = vault.healthy();
    set_health(&reporter, serving).await;

    // Reflection lists the health service too, so stock tools (grpcurl) can call it.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;

    let max_message = cfg.max_message_bytes();
    let policy = AuthPolicy {
        require_client_cert_and_key: cfg.require_client_cert_and_key,
        detokenize_rate: cfg.detokenize_rate,
        reuse_rate: cfg.reuse_rate,
        anonymous_audit_rate: cfg.anonymous_audit_rate,
    };
    let mut handlers = TokenVaultService::new(vault.clone(), cfg.max_batch_items)
        .with_policy(policy)
        .with_access_log(cfg.access_log);
    if let Some(limiter) = &cfg.detokenize_limiter {
        handlers = handlers.with_detokenize_limiter(limiter.clone());
    }
    // Callers are admitted, and batch sizes counted, before a request body is decoded.
    let admin = AdminService::new(vault.clone(), handlers.clone(), cfg.require_cert_for_admin)
        .with_dual_control(cfg.dual_control);
    let service = AuthGate::new(
        TokenVaultServiceServer::new(handlers.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        handlers,
        cfg.max_batch_items,
        max_message,
    );
    // The admin service on the same listener, behind the same kind of gate.
    let admin_service = AuthGate::new(
        AdminServiceServer::new(admin.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        admin,
        cfg.max_batch_items,
        max_message,
    );

    // Health follows storage: NOT_SERVING while the vault cannot write.
    let (stop_health, mut health_stopped) = oneshot::channel::<()>();
    let health_task = {
        let vault = vault.clone();
        let reporter = reporter.clone();
        let mut tick = tokio::time::interval(cfg.health_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut health_stopped => break,
                    _ = tick.tick() => {}
                }
                // `healthy` reads a flag the store's prober maintains; it does not block.
                let healthy = vault.healthy();
                if healthy != serving {
                    if healthy {
                        tracing::info!("storage writable again; health is SERVING");
                    } else {
                        tracing::warn!("storage not writable; health is NOT_SERVING");
                    }
                    set_health(&reporter, healthy).await;
                    serving = healthy;
                }
            }
        })
    };

    // On the signal: report NOT_SERVING first so balancers drain, then let tonic stop
    // accepting and drain connections; `signalled` starts the grace timer.
    let signalled = Arc::new(Notify::new());
    let shutdown = {
        let signalled = signalled.clone();
        let reporter = reporter.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested; finishing in-flight requests");
            let _ = stop_health.send(());
            set_health(&reporter, false).await;
            signalled.notify_one();
        }
    };

    audit_event(&vault, &server_caller, "server_start", &local).await;
    tracing::info!(
        listen = %local,
        tls = cfg.tls.is_some(),
        mutual_tls = cfg.tls.as_ref().is_some_and(|t| t.mutual()),
        max_batch_items = cfg.max_batch_items,
        max_message,
        "serving"
    );

    let mut builder = tonic::transport::Server::builder();
    if let Some(limit) = cfg.concurrency_limit_per_connection {
        builder = builder.concurrency_limit_per_connection(limit);
    }
    if let Some(timeout) = cfg.request_timeout {
        builder = builder.timeout(timeout);
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(admin_service);

    // The TLS accept loop runs beside tonic and is stopped with it.
    let (tls_incoming, accept_task) = match &cfg.tls {
        Some(tls) => {
            let (incoming, task) = super::tls::incoming(listener, tls.clone());
            (Ok(incoming), Some(task))
        }
        None => (Err(listener), None),
    };
    let served = async move {
        match tls_incoming {
            Ok(incoming) => {
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            Err(listener) => {
                // Nagle's algorithm delays small gRPC frames by up to 40 ms; disable it.
                let incoming = TcpListenerStream::new(listener).map(|conn| {
                    conn.inspect(|stream| {
                        let _ = stream.set_nodelay(true);
                    })
                });
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    };
    let grace = cfg.shutdown_grace;
    let result = tokio::select! {
        r = served => r.map_err(|e| Error::Unavailable(format!("gRPC server: {e}"))),
        _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_s = grace.as_secs(), "in-flight requests did not finish in time; stopping anyway");
            Ok(())
        }
    };

    health_task.abort();
    if let Some(task) = accept_task {
        task.abort();
    }
    audit_event(&vault, &server_caller, "server_stop", &local).await;
    if let Some(checkpointer) = checkpointer {
        checkpointer.finish().await;
    }
    vault.close().await;
    tracing::info!("server stopped");
    result
}

async fn open_checkpoints(
    vault: &Vault,
    path: &std::path::Path,
) -> Result<crate::audit::CheckpointFile> {
    crate::audit::check_file_against_vault(vault, path).await?;
    crate::audit::CheckpointFile::open(path).map_err(|e| {
        Error::Unavailable(format!(
            "cannot open the audit checkpoint file {}: {e}",
            path.display()
        ))
    })
}

async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Server lifecycle events are audited best effort: failing to record one must not stop the
/// server from starting or stopping.
async fn audit_event(vault: &Vault, caller: &Caller, action: &str, subject: &str) {
    if let Err(e) = vault.audit_event(caller, action, subject).await {
        crate::metrics::record_audit_write_failure();
        tracing::warn!(error = %e, action, "could not write audit event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_budget() {
        let cfg = ServerConfig::default();
        assert_eq!(cfg.max_message_bytes(), 10_000 * 1024 + 64 * 1024);
        let huge = ServerConfig {
            max_batch_items: usize::MAX,
            ..ServerConfig::default()
        };
        assert_eq!(huge.max_message_bytes(), usize::MAX);
    }

    #[test]
    fn descriptor_set_names_the_service() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.package() == "tokenvault.v1")
            .unwrap();
        assert_eq!(
            format!("{}.{}", file.package(), file.service[0].name()),
            SERVICE_NAME
        );
    }
}
