//! `tokenvault.v1.TokenVaultService`: the RPC handlers.
//!
//! Every handler runs the same steps: authenticate the caller, authorise the RPC by role
//! (refusals are audited), convert the request, call the [`Vault`], convert the result. Batch
//! RPCs validate each item on its own and merge per-item errors, in order, with the vault's
//! results. Nothing here logs request content: spans carry the method, the principal and
//! counts; outcomes are status codes.

use std::future::Future;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::{field, Instrument};

use super::convert;
use super::pb;
use super::pb::token_vault_service_server::TokenVaultService as TokenVaultRpc;
use crate::auth::Role;
use crate::error::{Code, Error, Result};
use crate::vault::{self, Caller, Principal, Vault};

/// Default largest number of items in one batch request.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 10_000;

/// Principal name recorded for refused requests that carried no valid credentials.
const ANONYMOUS: &str = "anonymous";

/// The RPCs of the service, with what each needs and how the audit trail names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    Tokenize,
    TokenizeBatch,
    Detokenize,
    DetokenizeBatch,
    GetTokenInfo,
    DeleteToken,
}

impl Rpc {
    /// The method name as in the proto.
    pub fn method(self) -> &'static str {
        match self {
            Rpc::Tokenize => "Tokenize",
            Rpc::TokenizeBatch => "TokenizeBatch",
            Rpc::Detokenize => "Detokenize",
            Rpc::DetokenizeBatch => "DetokenizeBatch",
            Rpc::GetTokenInfo => "GetTokenInfo",
            Rpc::DeleteToken => "DeleteToken",
        }
    }

    /// Action name in the audit trail.
    pub fn audit_action(self) -> &'static str {
        match self {
            Rpc::Tokenize => "tokenize",
            Rpc::TokenizeBatch => "tokenize_batch",
            Rpc::Detokenize => "detokenize",
            Rpc::DetokenizeBatch => "detokenize_batch",
            Rpc::GetTokenInfo => "get_token_info",
            Rpc::DeleteToken => "delete_token",
        }
    }

    /// Any one of these roles permits the RPC.
    pub fn permitted_roles(self) -> &'static [Role] {
        match self {
            Rpc::Tokenize | Rpc::TokenizeBatch => &[Role::Tokenize],
            Rpc::Detokenize | Rpc::DetokenizeBatch => &[Role::Detokenize],
            Rpc::GetTokenInfo => &[Role::Tokenize, Role::Detokenize, Role::Info],
            Rpc::DeleteToken => &[Role::Delete],
        }
    }

    pub fn permits(self, principal: &Principal) -> bool {
        self.permitted_roles().iter().any(|r| principal.has(*r))
    }
}

/// The service implementation handed to the generated tonic server.
#[derive(Clone)]
pub struct TokenVaultService {
    vault: Vault,
    max_batch_items: usize,
}

impl TokenVaultService {
    pub fn new(vault: Vault, max_batch_items: usize) -> TokenVaultService {
        TokenVaultService {
            vault,
            max_batch_items,
        }
    }

    /// Resolves the caller to a principal: a verified client-certificate identity bound to a
    /// principal wins; otherwise the `authorization: Bearer <api key>` metadata decides.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal> {
        if let Some(identity) = peer_cert_identity(request) {
            if let Ok(principal) = self.vault.authenticate_cert_identity(&identity) {
                return Ok(principal);
            }
            // A certificate may secure the transport without naming a principal: fall back
            // to the API key.
        }
        let key = bearer_token(request.metadata())?;
        self.vault.authenticate_api_key(key)
    }

    /// Authenticates and authorises `rpc`, auditing any refusal; returns the caller to pass
    /// to the vault.
    async fn admit<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
        let peer = peer_addr(request);
        let principal = match self.authenticate(request) {
            Ok(p) => p,
            Err(err) => {
                self.refuse(&Caller::new(ANONYMOUS, peer), rpc, &err).await;
                return Err(err.into());
            }
        };
        tracing::Span::current().record("principal", principal.name.as_str());
        let caller = Caller::new(principal.name.clone(), peer);
        if !rpc.permits(&principal) {
            let roles: Vec<&str> = rpc.permitted_roles().iter().map(|r| r.name()).collect();
            let err = Error::PermissionDenied(format!(
                "{} requires the {} role",
                rpc.method(),
                roles.join(" or ")
            ));
            self.refuse(&caller, rpc, &err).await;
            return Err(err.into());
        }
        Ok(caller)
    }

    /// Best-effort audit of a refused request: a failed audit write is logged, and the
    /// refusal stands either way.
    async fn refuse(&self, caller: &Caller, rpc: Rpc, err: &Error) {
        let outcome = err.code().as_str();
        if let Err(audit_err) = self
            .vault
            .audit_refusal(caller, rpc.audit_action(), outcome)
            .await
        {
            tracing::warn!(error = %audit_err, outcome, "could not audit a refused request");
        }
    }

    fn check_batch_size(&self, items: usize) -> Result<()> {
        tracing::Span::current().record("items", items);
        if items > self.max_batch_items {
            return Err(Error::InvalidArgument(format!(
                "batch has {items} items, more than the limit of {}",
                self.max_batch_items
            )));
        }
        Ok(())
    }
}

/// Identity of a verified client certificate. Always `None` until the server terminates
/// mutual TLS; then this reads the leaf certificate's URI or DNS SAN and [`authenticate`]
/// resolves it with [`Vault::authenticate_cert_identity`].
///
/// [`authenticate`]: TokenVaultService::authenticate
fn peer_cert_identity<T>(request: &Request<T>) -> Option<String> {
    request.peer_certs()?;
    None
}

fn peer_addr<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

/// The API key of `authorization: Bearer <key>`.
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str> {
    let value = metadata.get("authorization").ok_or(Error::Unauthenticated(
        "missing credentials: send authorization: Bearer <api key>",
    ))?;
    let text = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("malformed authorization header"))?;
    let (scheme, key) = text
        .trim()
        .split_once(' ')
        .ok_or(Error::Unauthenticated("malformed authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(Error::Unauthenticated(
            "authorization must be: Bearer <api key>",
        ));
    }
    Ok(key.trim())
}

/// Runs a handler inside its span and logs its outcome (code and duration only).
async fn observe<T>(
    rpc: Rpc,
    handler: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!(
        "rpc",
        method = rpc.method(),
        principal = field::Empty,
        items = field::Empty
    );
    let started = Instant::now();
    let result = handler.instrument(span.clone()).await;
    let _entered = span.enter();
    let elapsed_us = started.elapsed().as_micros() as u64;
    match &result {
        Ok(_) => tracing::info!(code = Code::Ok.as_str(), elapsed_us, "rpc finished"),
        Err(status) => tracing::info!(
            code = ?status.code(),
            message = status.message(),
            elapsed_us,
            "rpc failed"
        ),
    }
    result
}

/// Sends the valid items of a batch to `run` and merges its results with the per-item
/// validation errors, keeping request order. A whole-batch error from `run` fails the RPC.
pub async fn run_batch<In, Out, F, Fut>(items: Vec<Result<In>>, run: F) -> Result<Vec<Result<Out>>>
where
    F: FnOnce(Vec<In>) -> Fut,
    Fut: Future<Output = Result<Vec<Result<Out>>>>,
{
    let mut merged: Vec<Option<Result<Out>>> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    let mut positions = Vec::new();
    for item in items {
        match item {
            Ok(v) => {
                positions.push(merged.len());
                valid.push(v);
                merged.push(None);
            }
            Err(e) => merged.push(Some(Err(e))),
        }
    }
    if !valid.is_empty() {
        let results = run(valid).await?;
        if results.len() != positions.len() {
            return Err(Error::Internal(format!(
                "vault returned {} results for {} batch items",
                results.len(),
                positions.len()
            )));
        }
        for (pos, r) in positions.into_iter().zip(results) {
            merged[pos] = Some(r);
        }
    }
    Ok(merged
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Internal("batch result missing".into()))))
        .collect())
}

#[tonic::async_trait]
impl TokenVaultRpc for TokenVaultService {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let rpc = Rpc::Tokenize;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let req = vault::TokenizeRequest::try_from(request.into_inner())?;
            let out = self.vault.tokenize(&caller, req).await?;
            Ok(Response::new(out.into()))
        })
        .await
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        let rpc = Rpc::TokenizeBatch;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let items = request.into_inner().requests;
            self.check_batch_size(items.len())?;
            let now = vault::now_micros();
            let items = items
                .into_iter()
                .map(|r| convert::tokenize_request(r, now))
                .collect();
            let results =
                run_batch(items, |valid| self.vault.tokenize_batch(&caller, valid)).await?;
            let results = results.into_iter().map(Into::into).collect();
            Ok(Response::new(pb::TokenizeBatchResponse { results }))
        })
        .await
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let rpc = Rpc::Detokenize;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let (token, reason) = convert::detokenize_request(request.into_inner())?;
            let out = self.vault.detokenize(&caller, token, reason).await?;
            Ok(Response::new(out.into()))
        })
        .await
    }

    async fn detokenize_batch(
        &self,
        request: Request<pb::DetokenizeBatchRequest>,
    ) -> Result<Response<pb::DetokenizeBatchResponse>, Status> {
        let rpc = Rpc::DetokenizeBatch;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let items = request.into_inner().requests;
            self.check_batch_size(items.len())?;
            let items = items.into_iter().map(convert::detokenize_request).collect();
            let results =
                run_batch(items, |valid| self.vault.detokenize_batch(&caller, valid)).await?;
            let results = results.into_iter().map(Into::into).collect();
            Ok(Response::new(pb::DetokenizeBatchResponse { results }))
        })
        .await
    }

    async fn get_token_info(
        &self,
        request: Request<pb::GetTokenInfoRequest>,
    ) -> Result<Response<pb::GetTokenInfoResponse>, Status> {
        let rpc = Rpc::GetTokenInfo;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let token = convert::parse_token(&request.get_ref().token)?;
            let info = self.vault.info(&caller, token).await?;
            Ok(Response::new(pb::GetTokenInfoResponse {
                info: Some(info.into()),
            }))
        })
        .await
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let rpc = Rpc::DeleteToken;
        observe(rpc, async move {
            let caller = self.admit(&request, rpc).await?;
            let token = convert::parse_token(&request.get_ref().token)?;
            let deleted = self.vault.delete(&caller, token).await?;
            Ok(Response::new(pb::DeleteTokenResponse { deleted }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn md(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(&md("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&md("bearer  abc ")).unwrap(), "abc");
        assert!(bearer_token(&MetadataMap::new()).is_err());
        assert!(bearer_token(&md("Basic abc")).is_err());
        assert!(bearer_token(&md("Bearer")).is_err());
        assert!(bearer_token(&md("abc")).is_err());
    }

    #[test]
    fn roles() {
        let p = |roles: &[Role]| Principal {
            name: "p".into(),
            roles: roles.to_vec(),
            detokenize_rate: None,
        };
        assert!(Rpc::Tokenize.permits(&p(&[Role::Tokenize])));
        assert!(!Rpc::Tokenize.permits(&p(&[Role::Info, Role::Detokenize])));
        assert!(Rpc::GetTokenInfo.permits(&p(&[Role::Info])));
        assert!(Rpc::GetTokenInfo.permits(&p(&[Role::Detokenize])));
        assert!(!Rpc::GetTokenInfo.permits(&p(&[Role::Delete])));
        assert!(Rpc::DeleteToken.permits(&p(&[Role::Delete])));
        assert!(!Rpc::DetokenizeBatch.permits(&p(&[])));
    }

    #[tokio::test]
    async fn batch_merge_keeps_order() {
        let items: Vec<Result<u32>> = vec![
            Ok(1),
            Err(Error::NotFound),
            Ok(2),
            Err(Error::InvalidArgument("x".into())),
        ];
        let out = run_batch(items, |valid: Vec<u32>| async move {
            Ok(valid.into_iter().map(|v| Ok(v * 10)).collect())
        })
        .await
        .unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(*out[0].as_ref().unwrap(), 10);
        assert!(matches!(out[1], Err(Error::NotFound)));
        assert_eq!(*out[2].as_ref().unwrap(), 20);
        assert!(matches!(out[3], Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn batch_of_only_invalid_items_skips_the_vault() {
        let items: Vec<Result<u32>> = vec![Err(Error::NotFound)];
        let out = run_batch(items, |_: Vec<u32>| async {
            let called: Result<Vec<Result<u32>>> = Err(Error::Internal("vault called".into()));
            called
        })
        .await
        .unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(Error::NotFound)));
    }

    #[tokio::test]
    async fn short_vault_answer_is_internal() {
        let items: Vec<Result<u32>> = vec![Ok(1), Ok(2)];
        let err = run_batch(items, |_| async { Ok(vec![Ok(1u32)]) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Internal(_)));
    }
}
