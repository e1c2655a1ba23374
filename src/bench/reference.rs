//! The no-op reference server: the public `TokenVaultService` contract over the same tonic
//! transport, answering every call with a fixed response and doing no work (no
//! authentication, no storage, no crypto, no audit, no logs). What it sustains is what gRPC
//! itself costs on the machine; `tokenvault bench --compare` measures it beside the vault in
//! one run and reports the vault's throughput as a share of it (issue 14).
//!
//! Its answers are shaped like the vault's (a 26-character token, a full `TokenInfo`, a
//! 16-digit test card number) so both encode messages of about the same size. The card
//! number it returns is a fixed public test number, never one it was sent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::BenchError;
use crate::grpc::pb;
use crate::grpc::pb::token_vault_service_server::{TokenVaultService, TokenVaultServiceServer};

/// The fixed token (the shape of an opaque token).
const TOKEN: &str = "tok_0123456789abcdefghijkl";
/// A public test card number (Visa's documented test PAN).
const TEST_PAN: &str = "4111111111111111";

fn info() -> pb::TokenInfo {
    pb::TokenInfo {
        token: TOKEN.to_owned(),
        masked_pan: "411111******1111".to_owned(),
        last4: "1111".to_owned(),
        bin: "411111".to_owned(),
        brand: pb::CardBrand::Visa.into(),
        pan_length: 16,
        format: pb::TokenFormat::Opaque.into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 1_790_000_000,
            nanos: 0,
        }),
        expires_at: None,
        key_version: 1,
    }
}

fn tokenized() -> pb::TokenizeResponse {
    pb::TokenizeResponse {
        token: TOKEN.to_owned(),
        created: true,
        info: Some(info()),
    }
}

fn revealed() -> pb::DetokenizeResponse {
    pb::DetokenizeResponse {
        pan: TEST_PAN.to_owned(),
        info: Some(info()),
    }
}

/// Fixed answers; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopService;

#[tonic::async_trait]
impl TokenVaultService for NoopService {
    async fn tokenize(
        &self,
        _: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        Ok(Response::new(tokenized()))
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        let results = (0..request.get_ref().requests.len())
            .map(|_| pb::TokenizeBatchResult {
                outcome: Some(pb::tokenize_batch_result::Outcome::Success(tokenized())),
            })
            .collect();
        Ok(Response::new(pb::TokenizeBatchResponse { results }))
    }

    async fn detokenize(
        &self,
        _: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        Ok(Response::new(revealed()))
    }

    async fn detokenize_batch(
        &self,
        request: Request<pb::DetokenizeBatchRequest>,
    ) -> Result<Response<pb::DetokenizeBatchResponse>, Status> {
        let results = (0..request.get_ref().requests.len())
            .map(|_| pb::DetokenizeBatchResult {
                outcome: Some(pb::detokenize_batch_result::Outcome::Success(revealed())),
            })
            .collect();
        Ok(Response::new(pb::DetokenizeBatchResponse { results }))
    }

    async fn get_token_info(
        &self,
        _: Request<pb::GetTokenInfoRequest>,
    ) -> Result<Response<pb::GetTokenInfoResponse>, Status> {
        Ok(Response::new(pb::GetTokenInfoResponse {
            info: Some(info()),
        }))
    }

    async fn delete_token(
        &self,
        _: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        Ok(Response::new(pb::DeleteTokenResponse { deleted: true }))
    }
}

/// The reference served until stopped, with the transport settings the vault's server uses
/// (per-connection concurrency limit, request timeout, message size limit, no Nagle).
pub struct ReferenceServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ReferenceServer {
    /// Serves on `listen` (e.g. `127.0.0.1:0`).
    pub async fn start(listen: SocketAddr) -> Result<ReferenceServer, BenchError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| BenchError::Failed(format!("reference server: bind {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Failed(format!("reference server: {e}")))?;
        let (tx, rx) = oneshot::channel::<()>();
        let cfg = crate::grpc::server::ServerConfig::default();
        let max_message = cfg.max_message_bytes();
        let mut builder = tonic::transport::Server::builder();
        if let Some(limit) = cfg.concurrency_limit_per_connection {
            builder = builder.concurrency_limit_per_connection(limit);
        }
        if let Some(timeout) = cfg.request_timeout {
            builder = builder.timeout(timeout);
        }
        let router = builder.add_service(
            TokenVaultServiceServer::new(NoopService)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        // As the vault's server: Nagle's algorithm off.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });
        let stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async {
            let _ = rx.await;
        });
        let handle = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop));
        Ok(ReferenceServer {
            addr,
            shutdown: Some(tx),
            handle: Some(handle),
        })
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => match h.await {
                Ok(r) => r.map_err(|e| BenchError::Failed(format!("reference server: {e}"))),
                Err(e) => Err(BenchError::Failed(format!("reference server task: {e}"))),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ReferenceServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
