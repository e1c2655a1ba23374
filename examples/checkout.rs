//! A payment platform's two sides of tokenvault, with the generated client of this crate:
//! the checkout service tokenizes the card at checkout, the payments worker detokenizes it
//! at charge time (with a reason that lands in the audit trail).
//!
//! ```sh
//! cargo run --release -- serve --dev                 # another terminal; prints both API keys
//! CHECKOUT_API_KEY=tvk_... PAYMENTS_API_KEY=tvk_... cargo run --example checkout
//! ```
//!
//! Over TLS, and with mutual TLS (client certificate) when `CLIENT_CERT`/`CLIENT_KEY` are set:
//!
//! ```sh
//! VAULT_ADDR=https://vault.internal:50051 VAULT_CA=ca.crt \
//! CLIENT_CERT=checkout.crt CLIENT_KEY=checkout.key \
//! CHECKOUT_API_KEY=... PAYMENTS_API_KEY=... cargo run --example checkout
//! ```
//!
//! (For brevity one process plays both services; in production each has its own key and
//! certificate, and only the payments worker holds the detokenize role.)

use tokenvault::grpc::client::{with_auth, BearerAuth, Client};
use tokenvault::grpc::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A client that sends `api_key` with every call, over TLS when the address is https.
async fn connect(api_key: &str) -> Result<Client, BoxError> {
    let addr = env("VAULT_ADDR").unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let mut endpoint = Endpoint::from_shared(addr.clone())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10));
    if addr.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = env("VAULT_CA") {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        if let (Some(cert), Some(key)) = (env("CLIENT_CERT"), env("CLIENT_KEY")) {
            // Mutual TLS: the certificate's SAN identifies this service to the vault.
            let key = Zeroizing::new(std::fs::read(key)?);
            tls = tls.identity(Identity::from_pem(std::fs::read(cert)?, key.as_slice()));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await?;
    Ok(with_auth(channel, BearerAuth::new(Some(api_key))?))
}

/// Checkout: the card number arrives from the payment form and leaves as a token.
async fn checkout(client: &mut Client, pan: &str) -> Result<String, BoxError> {
    let response = client
        .tokenize(pb::TokenizeRequest {
            pan: pan.to_owned(),
            format: pb::TokenFormat::Opaque as i32,
            // The same card at the next checkout gets the same token back.
            reuse_existing: true,
            expires_at: None,
        })
        .await?
        .into_inner();
    Ok(response.token)
}

/// Charge time: the payments worker reveals the card to send it to the acquirer.
async fn charge(client: &mut Client, token: &str, order: &str) -> Result<(), BoxError> {
    let response = client
        .detokenize(pb::DetokenizeRequest {
            token: token.to_owned(),
            reason: format!("charge order {order}"),
        })
        .await?
        .into_inner();
    let pan = Zeroizing::new(response.pan);
    // ... hand `pan` to the acquirer here; never log it. Only the masked form is shown.
    let masked = response.info.map(|i| i.masked_pan).unwrap_or_default();
    println!("charged order {order} on {masked} ({} digits)", pan.len());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let checkout_key = env("CHECKOUT_API_KEY").ok_or("set CHECKOUT_API_KEY")?;
    let payments_key = env("PAYMENTS_API_KEY").ok_or("set PAYMENTS_API_KEY")?;

    let mut checkout_client = connect(&checkout_key).await?;
    let token = checkout(&mut checkout_client, "4111 1111 1111 1111").await?;
    println!("checkout stored token {token}");

    let mut payments_client = connect(&payments_key).await?;
    charge(&mut payments_client, &token, "42").await?;

    // The checkout service may not reveal cards: the vault says PERMISSION_DENIED.
    match checkout_client
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "curiosity".into(),
        })
        .await
    {
        Err(status) => println!("checkout detokenize refused: {:?}", status.code()),
        Ok(_) => return Err("checkout could detokenize: check its roles".into()),
    }
    Ok(())
}
