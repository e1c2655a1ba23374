//! Client-side helpers shared by the CLI and the tests: connecting to a server (plaintext
//! or TLS, optionally with a client certificate) and attaching the API key to every call.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::pb::admin_service_client::AdminServiceClient;
use super::pb::token_vault_service_client::TokenVaultServiceClient;

/// A service client that sends `authorization: Bearer <api key>` with every call.
pub type Client = TokenVaultServiceClient<InterceptedService<Channel, BearerAuth>>;
/// An `AdminService` client that sends the API key (if any) with every call.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Adds the API key to each request. The header value is marked sensitive so it never shows
/// in debug output.
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    /// `None` sends no credentials. Fails when the key cannot be an HTTP header value; the
    /// error does not echo the key.
    pub fn new(api_key: Option<&str>) -> Result<BearerAuth, &'static str> {
        let value = match api_key {
            None => None,
            Some(key) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {}", key.trim())
                    .parse()
                    .map_err(|_| "API key contains characters not allowed in a header")?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(BearerAuth(value))
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(<redacted>)")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// An endpoint for `addr` (`http://host:port`) with the CLI's timeouts; see [`tls_endpoint`]
/// for TLS.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(addr.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true))
}

/// Files for a TLS connection: the CA that signed the server's certificate and, for mutual
/// TLS, this client's certificate and key.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against; default: the host of the address.
    pub domain: Option<String>,
}

impl ClientTlsFiles {
    /// True when any TLS option was given.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The tonic TLS configuration. Errors name files, never their contents.
    pub fn config(&self) -> Result<ClientTlsConfig, String> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let ca = self
            .ca
            .as_ref()
            .ok_or("https:// needs --tls-ca FILE (the CA that signed the server certificate)")?;
        let mut cfg =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                cfg = cfg.identity(Identity::from_pem(
                    read("--tls-cert", cert)?,
                    read("--tls-key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("--tls-cert and --tls-key go together".into()),
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

/// An endpoint for `addr` (`http://` or `https://host:port`); TLS options need `https://`.
pub fn tls_endpoint(addr: &str, tls: &ClientTlsFiles) -> Result<Endpoint, String> {
    let ep = endpoint(addr).map_err(|e| format!("{addr}: {e}"))?;
    let https = addr.starts_with("https://");
    match (https, tls.any()) {
        (false, false) => Ok(ep),
        (false, true) => Err(format!(
            "{addr}: TLS options given for a plaintext address; use https://"
        )),
        (true, _) => ep
            .tls_config(tls.config()?)
            .map_err(|e| format!("{addr}: {e}")),
    }
}

pub fn with_auth(channel: Channel, auth: BearerAuth) -> Client {
    // Batches can be large; accept what a server configured for big batches may send.
    TokenVaultServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

pub fn admin_with_auth(channel: Channel, auth: BearerAuth) -> AdminClient {
    AdminServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// An error with its sources, e.g. "transport error: connection refused", for messages that
/// tell an operator why a connection failed (never request content).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
