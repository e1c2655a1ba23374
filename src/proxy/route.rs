//! A configured route, ready to use: its upstream, the TLS client that trusts only the
//! route's CA (and, optionally, one pinned leaf certificate), and the rules for the part of
//! the caller's path that is appended to the route's base ([`check_rest`]).
//!
//! The upstream exchange ([`Route::send`]) opens one connection per request (HTTP/1.1 over
//! TLS with ALPN `http/1.1`, or plain HTTP to a loopback upstream), sends the request and
//! returns the response head; redirects are never followed (hyper's connection API has no
//! such thing). No connection pool: a connection never carries two callers' requests.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use super::config::{RouteSection, Upstream};

/// A route as the handler uses it.
pub struct Route {
    pub name: String,
    pub upstream: Upstream,
    pub methods: HashSet<http::Method>,
    pub principals: HashSet<String>,
    /// Lower-case names of the headers in which placeholders are substituted.
    pub headers: HashSet<http::HeaderName>,
    pub timeout: Duration,
    pub max_body: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    pin: Option<[u8; 32]>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// Why the upstream exchange failed (502; the route's timeout, 504, is applied around
/// it). Messages never carry request or response content.
#[derive(Debug)]
pub struct UpstreamError(pub String);

impl Route {
    /// Builds the route, reading its CA file. Errors name the route and the file.
    pub fn load(section: &RouteSection) -> Result<Route, String> {
        let at = |m: String| format!("proxy route {:?}: {m}", section.name);
        let upstream = Upstream::parse(&section.upstream).map_err(at)?;
        let tls = match (&section.ca_file, upstream.https) {
            (Some(path), _) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| at(format!("ca_file {}: {e}", path.display())))?;
                let mut roots = RootCertStore::empty();
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| at(format!("ca_file {}: {e}", path.display())))?;
                }
                if roots.is_empty() {
                    return Err(at(format!("ca_file {}: no certificate", path.display())));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                    .map_err(|e| at(format!("TLS: {e}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
            (None, true) => return Err(at("ca_file is required for https".into())),
            (None, false) => None,
        };
        let pin = match &section.pin_sha256 {
            Some(hex) => Some(
                crate::audit::unhex(hex)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| at("pin_sha256 must be 64 hex digits".into()))?,
            ),
            None => None,
        };
        let methods = section
            .methods
            .iter()
            .map(|m| http::Method::from_bytes(m.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| at("bad method".into()))?;
        let headers = section
            .headers
            .iter()
            .map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| at("bad header name".into()))?;
        Ok(Route {
            name: section.name.clone(),
            upstream,
            methods,
            principals: section.principals.iter().cloned().collect(),
            headers,
            timeout: section.timeout,
            max_body: usize::try_from(section.max_body).unwrap_or(usize::MAX),
            tls,
            pin,
        })
    }

    /// The upstream URI for the caller's `rest` of the path (already checked) and query.
    pub fn upstream_uri(&self, rest: &str, query: Option<&str>) -> Result<http::Uri, String> {
        let u = &self.upstream;
        let scheme = if u.https { "https" } else { "http" };
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let mut uri = format!("{scheme}://{host}:{}{}/{rest}", u.port, u.base_path);
        if let Some(q) = query {
            uri.push('?');
            uri.push_str(q);
        }
        uri.parse()
            .map_err(|_| "the path does not make a valid upstream URL".to_owned())
    }

    /// The `host` header the upstream expects.
    pub fn host_header(&self) -> String {
        let u = &self.upstream;
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let default = if u.https { 443 } else { 80 };
        if u.port == default {
            host
        } else {
            format!("{host}:{}", u.port)
        }
    }

    /// Connects and sends `req` (origin-form URI), returning the response head; the body
    /// is read by the caller. Everything until the head arrives is bounded by the caller's timeout.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let addr = (self.upstream.host.as_str(), self.upstream.port);
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| UpstreamError(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => exchange(TokioIo::new(tcp), req).await,
            Some(config) => {
                let name = ServerName::try_from(self.upstream.host.clone())
                    .map_err(|_| UpstreamError("bad upstream host name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| UpstreamError(format!("TLS: {e}")))?;
                if let Some(pin) = &self.pin {
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .ok_or_else(|| UpstreamError("no certificate".into()))?;
                    let got: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
                    if !crate::crypto::ct_eq(&got, pin) {
                        return Err(UpstreamError(
                            "the upstream certificate does not match the route's pin".into(),
                        ));
                    }
                }
                exchange(TokioIo::new(tls), req).await
            }
        }
    }
}

async fn exchange<S>(
    io: TokioIo<S>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| UpstreamError(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        // Ends when the response body is read or dropped; errors surface on the response.
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| UpstreamError(format!("request: {e}")))
}

/// Checks the caller's part of the path (after `/v1/proxy/ROUTE/`, still percent-encoded)
/// so that, appended to the route's base, it cannot leave it: no `.` or `..` segment, no
/// empty segment (`//host`, `a//b`) except a trailing `/`, no encoded dot, slash or
/// backslash (`%2e`, `%2f`, `%5c`), no backslash, no scheme-looking first segment.
pub fn check_rest(rest: &str) -> Result<(), &'static str> {
    if rest.is_empty() {
        return Ok(());
    }
    let lower = rest.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Err("the path may not contain an encoded '.', '/' or '\\'");
    }
    if rest.contains('\\') {
        return Err("the path may not contain '\\'");
    }
    let trimmed = rest.strip_suffix('/').unwrap_or(rest);
    for segment in trimmed.split('/') {
        // `..;x` is `..` to servlet containers (path parameters): judge what precedes `;`.
        match segment.split(';').next().unwrap_or_default() {
            "" => return Err("the path may not contain an empty segment ('//')"),
            "." | ".." => return Err("the path may not contain '.' or '..' segments"),
            _ => {}
        }
    }
    if trimmed.split('/').next().is_some_and(|s| s.ends_with(':')) {
        return Err("the path may not be an absolute URL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_cannot_escape_the_base() {
        for ok in ["", "charges", "v1/charges/", "a/b.c/d", "a..b", "x%20y"] {
            assert!(check_rest(ok).is_ok(), "{ok}");
        }
        for bad in [
            "..",
            "../admin",
            "a/../../admin",
            "./a",
            "a/./b",
            "%2e%2e/admin",
            "%2E%2E/admin",
            "..;/admin",
            "a/..;x/admin",
            ".%2e/admin",
            "a%2fb",
            "a%5c..",
            "a\\..\\b",
            "/evil.example/x",
            "a//b",
            "https://evil.example/",
            "https:",
        ] {
            assert!(check_rest(bad).is_err(), "{bad}");
        }
    }
}
