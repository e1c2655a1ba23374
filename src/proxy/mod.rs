//! The detokenizing forward proxy (`serve --proxy-listen`, issue 19): a payment worker
//! sends its request to the processor through the vault, with `{{tokenvault:TOKEN}}`
//! where card data goes; the vault substitutes the card numbers on the way out to a
//! configured upstream and tokenizes any card number in the answer, so the worker never
//! holds a PAN in either direction.
//!
//! What each file owns:
//! - [`config`]: the `[proxy]` / `[[proxy.routes]]` configuration and its checks.
//! - [`route`]: a loaded route, its TLS client (trusting only the route's CA, optionally a
//!   pinned leaf), the path rules ([`route::check_rest`]) and the upstream exchange.
//! - [`placeholder`]: finding and substituting placeholders in bodies and headers.
//! - [`scan`]: finding card numbers in upstream responses.
//! - [`handler`]: one request, from authentication to the tokenized answer.
//! - this file: the listener (HTTP/1.1 and HTTP/2; TLS and mutual TLS with the gRPC
//!   listener's [`TlsReloader`], plaintext only on loopback, checked by `serve`).
//!
//! Order of a request (see [`handler`]): authenticate (client certificate and/or
//! `proxy-authorization: Bearer <api key>`), `proxy` role, route (404), principal listed on
//! the route (403), method (405), path (400), body limit (413), placeholders (400 when
//! malformed, or in the URL or a header the route does not allow), `detokenize` role and
//! the reveal rate limit (every placeholder counts), then the reveal through
//! [`crate::vault::Vault::reveal_batch`], which commits one `proxy_detokenize` audit record
//! per placeholder before it returns. Only then does a byte go upstream. After the
//! response, a second record (`proxy_request`) carries the upstream status.

pub mod config;
pub mod handler;
pub mod placeholder;
pub mod route;
pub mod scan;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::error::{Error, Result};
use crate::grpc::tls::TlsReloader;
use crate::ratelimit::{Rate, RateLimiter};
use crate::vault::Vault;
pub use route::Route;

/// Path prefix of every proxied call: `/v1/proxy/ROUTE/rest?query`.
pub const PATH_PREFIX: &str = "/v1/proxy/";
/// Header carrying the caller's API key (the `authorization` header belongs to the
/// upstream: a processor's own credentials pass through untouched).
pub const AUTH_HEADER: &str = "proxy-authorization";

/// How the proxy serves.
pub struct ProxyConfig {
    pub routes: Vec<Route>,
    /// Terminate TLS (the gRPC listener's certificate, reloadable); `None` = plaintext.
    pub tls: Option<Arc<TlsReloader>>,
    /// Require both a bound client certificate and the same principal's API key.
    pub require_client_cert_and_key: bool,
    /// Reveal limit of principals without their own; `None` = unlimited. Every
    /// substituted placeholder counts as one reveal.
    pub detokenize_rate: Option<Rate>,
    /// The gRPC server's detokenize buckets, so reveals through either count against one
    /// budget; `None` = the proxy's own, at `detokenize_rate`.
    pub detokenize_limiter: Option<Arc<RateLimiter>>,
}

/// Serves the proxy on `listener` until `shutdown` completes; then stops accepting
/// (requests in progress finish on their own connections).
pub async fn serve(
    listener: TcpListener,
    vault: Vault,
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let local = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let mut routes = HashMap::new();
    for r in cfg.routes {
        routes.insert(r.name.clone(), Arc::new(r));
    }
    let state = Arc::new(handler::State::new(
        vault,
        routes,
        cfg.require_client_cert_and_key,
        cfg.detokenize_limiter
            .unwrap_or_else(|| Arc::new(RateLimiter::new(cfg.detokenize_rate))),
    ));
    tracing::info!(listen = %local, tls = cfg.tls.is_some(), routes = state.route_count(), "proxy serving");
    tokio::pin!(shutdown);
    match cfg.tls {
        Some(tls) => {
            let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let (mut incoming, task) =
                crate::grpc::tls::incoming_with_alpn(listener, tls, Some(alpn));
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    next = incoming.next() => match next {
                        Some(Ok(stream)) => {
                            let (tcp, session) = stream.get_ref();
                            let peer = tcp.peer_addr().ok();
                            let identities = session
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|leaf| crate::grpc::tls::cert_identities(leaf.as_ref()))
                                .unwrap_or_default();
                            spawn_connection(state.clone(), stream, peer, identities);
                        }
                        Some(Err(e)) => tracing::info!(error = %e, "proxy accept failed"),
                        None => break,
                    }
                }
            }
            task.abort();
        }
        None => loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        spawn_connection(state.clone(), stream, Some(peer), Vec::new());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        },
    }
    tracing::info!("proxy stopped accepting");
    Ok::<(), Error>(())
}

fn spawn_connection<S>(
    state: Arc<handler::State>,
    io: S,
    peer: Option<SocketAddr>,
    identities: Vec<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(handler::Conn {
        peer: peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
        identities,
    });
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let conn = conn.clone();
            async move { Ok::<_, std::convert::Infallible>(handler::handle(&state, &conn, req).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(error = %e, "proxy connection ended with an error");
        }
    });
}
