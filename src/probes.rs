//! The plain-HTTP operations listener (`--metrics-listen`): Prometheus metrics and the
//! health endpoints for load balancers and kubelets that cannot speak gRPC.
//!
//! | path       | answer                                                                  |
//! |------------|-------------------------------------------------------------------------|
//! | `/metrics` | 200, the Prometheus exposition                                          |
//! | `/livez`   | 200 while the process answers (it runs on the same runtime as gRPC)     |
//! | `/readyz`  | 200 when the vault is open (master key checked, keys loaded), storage   |
//! |            | is writable and the server is not shutting down; 503 otherwise          |
//! | other      | 404, so an HTTP check against a wrong path fails instead of passing     |
//!
//! Bodies are short fixed words (`ok`, `starting`, `storage not writable`, `stopping`): the
//! listener is plaintext and carries no card data, no names and no counts beyond metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::vault::Vault;

/// What `/readyz` looks at. One per process, like the metrics recorder ([`probes`]).
#[derive(Default)]
pub struct Probes {
    vault: OnceLock<Vault>,
    stopping: AtomicBool,
}

impl Probes {
    /// The vault is open: its master key matched and its keys are loaded.
    pub fn attach(&self, vault: Vault) {
        let _ = self.vault.set(vault);
    }

    /// Shutdown has begun: report not ready so balancers drain before the listener closes.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else the short reason `/readyz` answers with.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("stopping");
        }
        match self.vault.get() {
            None => Err("starting"),
            Some(v) if !v.healthy() => Err("storage not writable"),
            Some(_) => Ok(()),
        }
    }
}

/// The process-wide probe state the listener reads.
pub fn probes() -> &'static Probes {
    static PROBES: OnceLock<Probes> = OnceLock::new();
    PROBES.get_or_init(Probes::default)
}

/// Status and body for one GET/HEAD of `path`.
pub fn respond(path: &str, probes: &Probes, metrics: &PrometheusHandle) -> (StatusCode, String) {
    match path {
        "/metrics" => {
            crate::metrics::collect_process();
            (StatusCode::OK, metrics.render())
        }
        "/livez" => (StatusCode::OK, "ok\n".into()),
        "/readyz" => match probes.readiness() {
            Ok(()) => (StatusCode::OK, "ok\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Binds `listen` (so a taken port fails at start-up) and serves [`respond`] on it until the
/// runtime stops. HTTP/1.1 only; every request is answered from memory.
pub fn spawn(
    listen: SocketAddr,
    metrics: PrometheusHandle,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(listen)?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (status, body) =
                        if matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
                            respond(req.uri().path(), probes(), &metrics)
                        } else {
                            (
                                StatusCode::METHOD_NOT_ALLOWED,
                                "method not allowed\n".into(),
                            )
                        };
                    let content_type = if req.uri().path() == "/metrics" {
                        "text/plain; version=0.0.4; charset=utf-8"
                    } else {
                        "text/plain; charset=utf-8"
                    };
                    let response = Response::builder()
                        .status(status)
                        .header(hyper::header::CONTENT_TYPE, content_type)
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid");
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics listener: connection ended");
                }
            });
        }
    }))
}
