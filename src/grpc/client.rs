//! Client-side helpers shared by the CLI and the tests: connecting to a server and attaching
//! the API key to every call.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::pb::token_vault_service_client::TokenVaultServiceClient;

/// A service client that sends `authorization: Bearer <api key>` with every call.
pub type Client = TokenVaultServiceClient<InterceptedService<Channel, BearerAuth>>;

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

/// An endpoint for `addr` (`http://host:port`) with the CLI's timeouts.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(addr.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true))
}

pub fn with_auth(channel: Channel, auth: BearerAuth) -> Client {
    // Batches can be large; accept what a server configured for big batches may send.
    TokenVaultServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}
