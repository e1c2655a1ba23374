//! The gate in front of `TokenVaultService` (and, through [`Admission`], `AdminService`):
//! authenticates and authorises every call from
//! its path and headers (API key, and the peer certificate for mutual TLS) before a byte of
//! its body is read, so an unauthenticated or unauthorised request costs the server no
//! decoding at all. Refusals are audited exactly as before (anonymous ones up to the
//! server-wide rate, a principal's up to its own), and counted in the metrics.
//!
//! For the batch RPCs the gate also bounds what decoding may cost an admitted caller: it
//! reads the (already size-limited) message and counts its items on the wire before prost
//! decodes them, refusing more than `max_batch_items` with INVALID_ARGUMENT. A 6 MB batch of
//! empty items is three million items; decoded, each is a struct tens of bytes wide, so
//! counting first keeps a request's decoded size within max_batch_items items plus its bytes.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::Status;
use tracing::Instrument;

use super::service::{Rpc, TokenVaultService};
use crate::error::Error;
use crate::metrics;
use crate::vault::{Caller, Principal};

/// What the gate established about a call; the handlers take it from the request's
/// extensions instead of authenticating again.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub caller: Caller,
    pub principal: Principal,
}

/// What the gate needs from the service behind it: which of its methods a request path
/// names, and how a caller is admitted to one (authenticated, authorised, refusals audited).
pub trait Admission: Clone + Send + Sync + 'static {
    type Rpc: Copy + Send + Sync + 'static;
    /// The method `path` names; None for paths the service does not have.
    fn rpc(path: &str) -> Option<Self::Rpc>;
    /// Admits the caller of `rpc` from the request's metadata and extensions alone.
    fn admit(&self, head: tonic::Request<()>, rpc: Self::Rpc) -> BoxFuture<Admitted, Status>;
    /// The `method` label of the metrics.
    fn metric(rpc: Self::Rpc) -> metrics::Method;
    /// The method name, for the log.
    fn method(rpc: Self::Rpc) -> &'static str;
    /// Batch methods, whose items are counted before decoding.
    fn is_batch(_rpc: Self::Rpc) -> bool {
        false
    }
}

impl Admission for TokenVaultService {
    type Rpc = Rpc;
    fn rpc(path: &str) -> Option<Rpc> {
        Rpc::from_path(path)
    }
    fn admit(&self, head: tonic::Request<()>, rpc: Rpc) -> BoxFuture<Admitted, Status> {
        let service = self.clone();
        Box::pin(async move {
            let (caller, principal) = service.admit_principal(&head, rpc).await?;
            Ok(Admitted { caller, principal })
        })
    }
    fn metric(rpc: Rpc) -> metrics::Method {
        rpc.metric()
    }
    fn method(rpc: Rpc) -> &'static str {
        rpc.method()
    }
    fn is_batch(rpc: Rpc) -> bool {
        matches!(rpc, Rpc::TokenizeBatch | Rpc::DetokenizeBatch)
    }
}

/// Wraps a generated service server (`inner`), admitting callers through `service`.
#[derive(Clone)]
pub struct AuthGate<S, A = TokenVaultService> {
    inner: S,
    service: A,
    max_batch_items: usize,
    max_message_bytes: usize,
}

impl<S, A> AuthGate<S, A> {
    pub fn new(
        inner: S,
        service: A,
        max_batch_items: usize,
        max_message_bytes: usize,
    ) -> AuthGate<S, A> {
        AuthGate {
            inner,
            service,
            max_batch_items,
            max_message_bytes,
        }
    }
}

impl<S: NamedService, A> NamedService for AuthGate<S, A> {
    const NAME: &'static str = S::NAME;
}

impl<S, A> Service<http::Request<Body>> for AuthGate<S, A>
where
    A: Admission,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (the tower pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let service = self.service.clone();
        let max_items = self.max_batch_items;
        let max_bytes = self.max_message_bytes;
        // Every line logged for this call carries its request id (also sent back as
        // `x-request-id`) and, when the caller sent a valid W3C `traceparent`, its trace id.
        let request_id = format!("{:016x}", rand::random::<u64>());
        let span = tracing::info_span!(
            "request",
            request_id = request_id.as_str(),
            trace_id = tracing::field::Empty
        );
        if let Some(trace_id) = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id)
        {
            span.record("trace_id", trace_id);
        }
        let call = async move {
            let Some(rpc) = A::rpc(req.uri().path()) else {
                // Unknown methods: tonic answers UNIMPLEMENTED without reading the body.
                return inner.call(req).await;
            };
            let started = Instant::now();
            let head = tonic::Request::from_parts(
                MetadataMap::from_headers(req.headers().clone()),
                req.extensions().clone(),
                (),
            );
            let admitted = match service.admit(head, rpc).await {
                Ok(admitted) => admitted,
                Err(status) => return Ok(refused::<A>(rpc, started, status)),
            };
            let mut req = if A::is_batch(rpc) {
                match bound_batch(req, max_items, max_bytes).await {
                    Ok(req) => req,
                    Err(status) => return Ok(refused::<A>(rpc, started, status)),
                }
            } else {
                req
            };
            req.extensions_mut().insert(admitted);
            inner.call(req).await
        };
        Box::pin(
            async move {
                let mut response = call.await?;
                if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", value);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), or `None`
/// when the header is malformed (then nothing of it is logged).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let [version, trace, parent, flags, ..] = parts[..] else {
        return None;
    };
    // Version ff is invalid; version 00 has exactly four parts; all-zero ids are invalid.
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.len() == 4)
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

/// The status as a gRPC response, counted and logged like an answered call.
fn refused<A: Admission>(rpc: A::Rpc, started: Instant, status: Status) -> http::Response<Body> {
    metrics::record_request(A::metric(rpc), status.code(), started.elapsed());
    tracing::info!(
        method = A::method(rpc),
        code = ?status.code(),
        error = status.message(),
        "rpc refused before its body was read"
    );
    status.into_http()
}

/// Reads a batch request's body (bounded by the message limit) and refuses it, before
/// decoding, if it holds more than `max_items` items.
async fn bound_batch(
    req: http::Request<Body>,
    max_items: usize,
    max_message_bytes: usize,
) -> Result<http::Request<Body>, Status> {
    let (parts, body) = req.into_parts();
    // One gRPC frame: 5 header bytes and the message.
    let limit = max_message_bytes.saturating_add(5);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::OutOfRange(format!(
                "request message is larger than the limit of {max_message_bytes} bytes"
            ))
            .into())
        }
        Err(_) => return Err(Error::Cancelled("request body was not received").into()),
    };
    // Counting is a scan without allocation; count them all for an exact message.
    if let Some(items) = count_batch_items(&bytes, usize::MAX) {
        if items > max_items {
            return Err(Error::InvalidArgument(format!(
                "batch has {items} items, more than the limit of {max_items}"
            ))
            .into());
        }
    }
    Ok(http::Request::from_parts(
        parts,
        Body::new(Full::new(bytes)),
    ))
}

/// Counts the `requests` (field 1) entries of the gRPC-framed batch messages in `frames`,
/// stopping once past `stop_after`. None when the bytes cannot be counted (compressed or
/// malformed): prost then decodes, and refuses, them as before.
pub fn count_batch_items(frames: &[u8], stop_after: usize) -> Option<usize> {
    let mut count = 0usize;
    let mut rest = frames;
    while !rest.is_empty() {
        if rest.len() < 5 || rest[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let msg = rest.get(5..5 + len)?;
        rest = &rest[5 + len..];
        let mut m = msg;
        while !m.is_empty() {
            let tag = read_varint(&mut m)?;
            match tag & 7 {
                0 => {
                    read_varint(&mut m)?;
                }
                1 => m = m.get(8..)?,
                2 => {
                    let n = usize::try_from(read_varint(&mut m)?).ok()?;
                    m = m.get(n..)?;
                }
                5 => m = m.get(4..)?,
                _ => return None,
            }
            if tag >> 3 == 1 {
                count += 1;
                if count > stop_after {
                    return Some(count);
                }
            }
        }
    }
    Some(count)
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn traceparent_trace_ids() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        assert_eq!(
            trace_id(&format!("01-{id}-00f067aa0ba902b7-01-extra")),
            Some(id)
        );
        for bad in [
            "",
            "00-nothex-1-01",
            &format!("ff-{id}-00f067aa0ba902b7-01"),
            &format!("00-{id}-00f067aa0ba902b7-01-extra"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            &format!("00-{id}-0000000000000000-01"),
            &format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase()),
            "00-4111111111111111-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }

    fn framed(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn counts_items_on_the_wire() {
        use crate::grpc::pb;
        for n in [0usize, 1, 2, 127, 128, 5_000] {
            let req = pb::DetokenizeBatchRequest {
                requests: (0..n)
                    .map(|i| pb::DetokenizeRequest {
                        token: format!("tok_{i}"),
                        reason: "r".repeat(i % 300),
                    })
                    .collect(),
            };
            assert_eq!(count_batch_items(&framed(&req), usize::MAX), Some(n));
            let req = pb::TokenizeBatchRequest {
                requests: vec![pb::TokenizeRequest::default(); n],
            };
            assert_eq!(count_batch_items(&framed(&req), usize::MAX), Some(n));
        }
        // Stops early once past the limit.
        let req = pb::TokenizeBatchRequest {
            requests: vec![pb::TokenizeRequest::default(); 1_000],
        };
        assert_eq!(count_batch_items(&framed(&req), 10), Some(11));
    }

    #[test]
    fn uncountable_bytes_are_left_to_prost() {
        assert_eq!(count_batch_items(&[1, 0, 0, 0, 0], 10), None); // compressed
        assert_eq!(count_batch_items(&[0, 0, 0, 0, 9, 10], 10), None); // short
        assert_eq!(count_batch_items(&[0, 0, 0, 0, 2, 10, 5], 10), None); // truncated field
        assert_eq!(count_batch_items(&[0, 0, 0, 0, 1, 0x0b], 10), None); // group wire type
        assert_eq!(count_batch_items(&[], 10), Some(0));
    }
}
