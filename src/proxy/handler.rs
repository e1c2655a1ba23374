//! One proxied request, start to finish (the order is in the [module docs](super)).
//!
//! Fail closed: every check, every reveal and every `proxy_detokenize` audit commit happens
//! before the upstream connection is even opened; any failure answers 4xx/5xx with nothing
//! sent. Bodies are held in memory (bounded by the route's `max_body`): the request to be
//! substituted, the response to be scanned, so a card number split across network chunks
//! is still found, and an upstream that fails mid-body never leaves half a response at the
//! worker. Error bodies are `{"error": "..."}` with fixed texts: never a body, a header
//! value or a card number. Nothing here logs a body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::placeholder::{self, Part, Placeholder};
use super::route::{Route, UpstreamError};
use super::{scan, AUTH_HEADER, PATH_PREFIX};
use crate::auth::Role;
use crate::error::Error;
use crate::ratelimit::{Rate, RateLimiter};
use crate::token::TokenFormat;
use crate::vault::{Caller, Principal, TokenizeRequest, Vault};

/// Audit action of each substituted placeholder (one record per placeholder).
pub const AUDIT_REVEAL: &str = "proxy_detokenize";
/// Audit action of the request as a whole: refusals, and the upstream's status.
pub const AUDIT_REQUEST: &str = "proxy_request";
/// Refusal records per principal (and for all anonymous callers together) per second.
const REFUSAL_AUDIT_PER_SECOND: f64 = 10.0;

/// Shared by every connection of the proxy.
pub struct State {
    vault: Vault,
    routes: HashMap<String, Arc<Route>>,
    require_both: bool,
    reveals: Arc<RateLimiter>,
    refusal_audit: RateLimiter,
}

impl State {
    pub fn new(
        vault: Vault,
        routes: HashMap<String, Arc<Route>>,
        require_both: bool,
        reveals: Arc<RateLimiter>,
    ) -> State {
        State {
            vault,
            routes,
            require_both,
            reveals,
            refusal_audit: RateLimiter::new(Some(Rate {
                per_second: REFUSAL_AUDIT_PER_SECOND,
            })),
        }
    }
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }
}

/// What the connection established: the peer and its verified certificate identities.
pub struct Conn {
    pub peer: String,
    pub identities: Vec<String>,
}

/// An answer other than the upstream's: status and a fixed text.
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// The one mapping of vault errors to HTTP statuses for the proxy (the gRPC one is
/// `grpc::status`). Exhaustive; internal details never reach the caller.
fn refusal_of(e: &Error) -> Refusal {
    let (status, text) = match e {
        Error::InvalidArgument(m) => (StatusCode::BAD_REQUEST, m.clone()),
        Error::NotFound => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "token not found (unknown, expired or deleted)".to_owned(),
        ),
        Error::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, (*m).to_owned()),
        Error::PermissionDenied(m) => (StatusCode::FORBIDDEN, m.clone()),
        Error::ResourceExhausted(m) => (StatusCode::TOO_MANY_REQUESTS, m.clone()),
        Error::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable; nothing was sent upstream".to_owned(),
        ),
        Error::FailedPrecondition(m) => (StatusCode::PRECONDITION_FAILED, m.clone()),
        Error::AlreadyExists(m) => (StatusCode::CONFLICT, m.clone()),
        Error::OutOfRange(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
        Error::Cancelled(m) => (StatusCode::BAD_REQUEST, (*m).to_owned()),
        Error::DataLoss(_) | Error::WrongMasterKey | Error::Internal(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; nothing was sent upstream".to_owned(),
        ),
    };
    Refusal::new(status, text)
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// What the metrics and the closing audit record need to know about a request.
#[derive(Default)]
struct Progress {
    route: Option<Arc<Route>>,
    caller: Option<Caller>,
    upstream_status: Option<u16>,
    substituted: usize,
    tokenized: usize,
}

pub async fn handle(
    state: &State,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    // Logged and audited only as a standard method: a caller-chosen extension method (any
    // token, digits included) never reaches the log or the trail.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let mut progress = Progress::default();
    let answer = proxy(state, conn, req, &mut progress).await;
    let (response, outcome) = match answer {
        Ok(resp) => (resp, "OK".to_owned()),
        Err(r) => {
            let outcome = format!("HTTP {}", r.status.as_u16());
            (json_error(r.status, &r.message), outcome)
        }
    };
    let route_name = progress
        .route
        .as_ref()
        .map_or("unknown", |r| r.name.as_str());
    crate::metrics::record_proxy_request(
        route_name,
        response.status().as_u16(),
        progress.upstream_status,
        started.elapsed(),
    );
    tracing::info!(
        route = route_name,
        method = %method,
        status = response.status().as_u16(),
        upstream_status = progress.upstream_status,
        substituted = progress.substituted,
        tokenized = progress.tokenized,
        elapsed_us = started.elapsed().as_micros() as u64,
        "proxy request"
    );
    // The closing record: once a caller is known and either the upstream was reached or
    // the request was refused (refusals of one principal are budgeted, see `refuse_audit`).
    if let (Some(caller), Some(route)) = (&progress.caller, &progress.route) {
        let upstream = progress
            .upstream_status
            .map_or_else(|| "not reached".to_owned(), |s| s.to_string());
        let reason = format!(
            "{method} via route {}: upstream {upstream}; answered {}; {} substituted, {} \
             tokenized in the response",
            route.name,
            response.status().as_u16(),
            progress.substituted,
            progress.tokenized
        );
        let audit = progress.upstream_status.is_some()
            || state.refusal_audit.try_take(&caller.principal, None, 1);
        if audit {
            if let Err(e) = state
                .vault
                .audit_summary(caller, AUDIT_REQUEST, &outcome, &reason)
                .await
            {
                crate::metrics::record_audit_write_failure();
                tracing::warn!(error = %e, "could not audit a proxy request");
            }
        }
    }
    response
}

/// Authenticates as the gRPC service does (`grpc::service::TokenVaultService::authenticate`),
/// with the API key in `proxy-authorization` (`authorization` is the upstream's).
fn authenticate(state: &State, conn: &Conn, headers: &HeaderMap) -> Result<Principal, Error> {
    let vault = &state.vault;
    vault.check_clients_fresh()?;
    let by_cert = if conn.identities.is_empty() {
        None
    } else {
        Some(
            conn.identities
                .iter()
                .find_map(|id| vault.authenticate_cert_identity(id).ok())
                .ok_or(Error::Unauthenticated(
                    "client certificate identity is not bound to any client",
                ))?,
        )
    };
    let key = headers.get(AUTH_HEADER);
    let by_key = |v: &HeaderValue| -> Result<Principal, Error> {
        let text = v
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed proxy-authorization header"))?;
        let (scheme, key) = text.trim().split_once(' ').ok_or(Error::Unauthenticated(
            "malformed proxy-authorization header",
        ))?;
        if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
            return Err(Error::Unauthenticated(
                "proxy-authorization must be: Bearer <api key>",
            ));
        }
        vault.authenticate_api_key(key.trim())
    };
    match (by_cert, key) {
        (Some(p), None) if !state.require_both => Ok(p),
        (Some(_), None) => Err(Error::Unauthenticated(
            "this server requires an API key as well as a client certificate",
        )),
        (Some(p), Some(v)) => {
            if by_key(v)?.name == p.name {
                Ok(p)
            } else {
                Err(Error::Unauthenticated(
                    "API key and client certificate belong to different clients",
                ))
            }
        }
        (None, _) if state.require_both => Err(Error::Unauthenticated(
            "this server requires a client certificate bound to a client",
        )),
        (None, Some(v)) => by_key(v),
        (None, None) => Err(Error::Unauthenticated(
            "missing credentials: send proxy-authorization: Bearer <api key>",
        )),
    }
}

/// Audits a refusal before the route is known (authentication, the proxy role), within
/// the refusal budget (anonymous callers share one bucket).
async fn refuse_early(state: &State, caller: &Caller, err: &Error) {
    if state.refusal_audit.try_take(&caller.principal, None, 1) {
        if let Err(e) = state
            .vault
            .audit_refusal(caller, AUDIT_REQUEST, err.code().as_str())
            .await
        {
            crate::metrics::record_audit_write_failure();
            tracing::warn!(error = %e, "could not audit a refused proxy request");
        }
    }
}

/// Hop-by-hop and proxy-owned request headers that are never forwarded.
const DROP_REQUEST: [&str; 13] = [
    "connection",
    "expect",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
];
/// Hop-by-hop response headers that are never passed back.
const DROP_RESPONSE: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
];

async fn proxy(
    state: &State,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
    progress: &mut Progress,
) -> Result<Response<Full<Bytes>>, Refusal> {
    // 1. Who is calling, and may they use the proxy at all.
    let principal = match authenticate(state, conn, req.headers()) {
        Ok(p) => p,
        Err(e) => {
            refuse_early(state, &Caller::new("anonymous", conn.peer.clone()), &e).await;
            return Err(refusal_of(&e));
        }
    };
    let caller = Caller::new(principal.name.clone(), conn.peer.clone())
        .with_reuse_group(principal.reuse_group.clone());
    if !principal.has(Role::Proxy) {
        let e = Error::PermissionDenied("the proxy requires the proxy role".into());
        refuse_early(state, &caller, &e).await;
        return Err(refusal_of(&e));
    }

    // 2. The route, from the configuration only.
    let path = req.uri().path().to_owned();
    let Some(after) = path.strip_prefix(PATH_PREFIX) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not a proxy path: expected /v1/proxy/ROUTE/...",
        ));
    };
    let (name, rest) = after.split_once('/').unwrap_or((after, ""));
    let Some(route) = state.routes.get(name).cloned() else {
        return Err(Refusal::new(StatusCode::NOT_FOUND, "no such proxy route"));
    };
    progress.route = Some(route.clone());
    progress.caller = Some(caller.clone());
    if !route.principals.contains(&principal.name) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "this client may not use this route",
        ));
    }
    if !route.methods.contains(req.method()) {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route",
        ));
    }
    super::route::check_rest(rest).map_err(|m| Refusal::new(StatusCode::BAD_REQUEST, m))?;
    let query = req.uri().query().map(str::to_owned);
    // Card data never goes in a URL (processors log URLs).
    let in_url = placeholder::find(path.as_bytes()).map_or(true, |f| !f.is_empty())
        || query
            .as_deref()
            .is_some_and(|q| placeholder::find(q.as_bytes()).map_or(true, |f| !f.is_empty()));
    if in_url {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "placeholders are not allowed in the path or query",
        ));
    }
    let upstream_uri = route
        .upstream_uri(rest, query.as_deref())
        .map_err(|m| Refusal::new(StatusCode::BAD_REQUEST, m))?;

    // 3. The body, bounded.
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than this route's limit of {} bytes",
                route.max_body
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body as u64) {
        return Err(too_large());
    }
    // Placeholders in a compressed body could not be found (nor substituted).
    let compressed = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if compressed {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed request bodies are not supported: send the body uncompressed",
        ));
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, route.max_body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the request body was not received",
            ))
        }
    };

    // 4. Placeholders: body, then the headers the route allows; anywhere else refused.
    let malformed = |where_: &str, e: placeholder::Malformed| {
        Refusal::new(StatusCode::BAD_REQUEST, format!("{where_}: {e}"))
    };
    let body_found = placeholder::find(&body).map_err(|e| malformed("body", e))?;
    let mut header_found: Vec<(HeaderName, usize, Vec<Placeholder>)> = Vec::new();
    for (i, (name, value)) in parts.headers.iter().enumerate() {
        let found = placeholder::find(value.as_bytes())
            .map_err(|e| malformed(&format!("header {name}"), e))?;
        if found.is_empty() {
            continue;
        }
        if DROP_REQUEST.contains(&name.as_str()) || !route.headers.contains(name) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("placeholders are not allowed in header {name} on this route"),
            ));
        }
        header_found.push((name.clone(), i, found));
    }
    let all: Vec<&Placeholder> = body_found
        .iter()
        .chain(header_found.iter().flat_map(|(_, _, f)| f.iter()))
        .collect();

    // 5. Reveal every placeholder: role, rate limit, then the vault's audited reveal.
    let mut values: Vec<zeroize::Zeroizing<String>> = Vec::with_capacity(all.len());
    if !all.is_empty() {
        // The `proxy` role and the route's principal list (checked above) authorise the
        // substitution; the `detokenize` role is not needed, so a payment worker can be a
        // proxy principal that cannot reveal a card over gRPC at all.
        let own = principal
            .detokenize_rate
            .map(|per_second| Rate { per_second });
        let n = u32::try_from(all.len()).unwrap_or(u32::MAX);
        if !state.reveals.try_take(&principal.name, own, n) {
            crate::metrics::record_rate_limited(crate::metrics::Method::Other);
            return Err(refusal_of(&Error::ResourceExhausted(
                "detokenize rate limit exceeded for this client (every placeholder counts); \
                 retry later"
                    .into(),
            )));
        }
        let items = all
            .iter()
            .map(|p| {
                (
                    p.token.clone(),
                    format!("proxy route {} ({})", route.name, p.part.name()),
                )
            })
            .collect();
        // Returns only after every record is committed (fail closed on an audit error).
        let revealed = state
            .vault
            .reveal_batch(&caller, AUDIT_REVEAL, items)
            .await
            .map_err(|e| refusal_of(&e))?;
        for (p, r) in all.iter().zip(revealed) {
            let r = r.map_err(|e| refusal_of(&e))?;
            let value = match p.part {
                Part::Pan => r.pan.expose_digits().to_owned(),
                Part::Last4 => r.info.last4.clone(),
                Part::Bin if r.info.bin.is_empty() => {
                    return Err(Refusal::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "|bin is not shown for cards under 15 digits",
                    ))
                }
                Part::Bin => r.info.bin.clone(),
            };
            values.push(zeroize::Zeroizing::new(value));
        }
        progress.substituted = all.len();
    }

    // 6. The upstream request: the route's host, the checked path, filtered headers.
    let strs: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
    let (body_values, header_values) = strs.split_at(body_found.len());
    let out_body = if body_found.is_empty() {
        body
    } else {
        Bytes::from(placeholder::substitute(&body, &body_found, body_values))
    };
    let connection_named: Vec<String> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut upstream_req = Request::builder()
        .method(parts.method.clone())
        .uri(upstream_uri)
        .body(Full::new(out_body))
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "cannot build the upstream request"))?;
    let headers = upstream_req.headers_mut();
    let mut next_value = 0;
    for (i, (name, value)) in parts.headers.iter().enumerate() {
        if DROP_REQUEST.contains(&name.as_str())
            || connection_named.iter().any(|c| c == name.as_str())
        {
            continue;
        }
        match header_found.iter().find(|(_, at, _)| *at == i) {
            Some((_, _, found)) => {
                let vals = &header_values[next_value..next_value + found.len()];
                next_value += found.len();
                let text =
                    zeroize::Zeroizing::new(placeholder::substitute(value.as_bytes(), found, vals));
                let mut v = HeaderValue::from_bytes(&text).map_err(|_| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad header value after substitution",
                    )
                })?;
                // Kept out of HPACK tables and Debug output.
                v.set_sensitive(true);
                headers.append(name.clone(), v);
            }
            None => {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&route.host_header())
            .map_err(|_| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "bad upstream host"))?,
    );
    // The response is scanned for card numbers: it must come back uncompressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // The full card numbers sent: the answer is checked for them once it is tokenized, in
    // case the processor echoed one glued to other digits where the scan cannot see it.
    let sent_pans: Vec<zeroize::Zeroizing<String>> = all
        .iter()
        .zip(values.iter())
        .filter(|(p, _)| matches!(p.part, Part::Pan))
        .map(|(_, v)| v.clone())
        .collect();
    drop(values);

    // 7. Send, read the whole response within the route's timeout.
    let exchange = async {
        let resp = route.send(upstream_req).await?;
        let (head, body) = resp.into_parts();
        let body = Limited::new(body, route.max_body)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    UpstreamError("response larger than max_body".into())
                } else {
                    UpstreamError("the response body broke off".into())
                }
            })?;
        Ok::<_, UpstreamError>((head, body))
    };
    let (head, resp_body) = match tokio::time::timeout(route.timeout, exchange).await {
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer within this route's timeout",
            ))
        }
        Ok(Err(UpstreamError(why))) => {
            tracing::warn!(
                route = route.name.as_str(),
                error = why.as_str(),
                "proxy upstream failed"
            );
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "the upstream could not be reached or its answer was unusable",
            ));
        }
        Ok(Ok(r)) => r,
    };
    progress.upstream_status = Some(head.status.as_u16());
    let encoded = head
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the upstream answered with a compressed body, which cannot be scanned for card numbers",
        ));
    }

    // 8. Tokenize every card number in the response body and headers.
    let body_cards = scan::find_cards(&resp_body);
    let mut header_cards = Vec::new();
    for (i, (name, value)) in head.headers.iter().enumerate() {
        if DROP_RESPONSE.contains(&name.as_str()) {
            continue;
        }
        let found = scan::find_cards(value.as_bytes());
        if !found.is_empty() {
            header_cards.push((i, found));
        }
    }
    let cards: Vec<&scan::Found> = body_cards
        .iter()
        .chain(header_cards.iter().flat_map(|(_, f)| f.iter()))
        .collect();
    let mut tokens: Vec<String> = Vec::with_capacity(cards.len());
    if !cards.is_empty() {
        let mut reqs = Vec::with_capacity(cards.len());
        for c in &cards {
            let pan = crate::card::Pan::parse(&c.digits).map_err(|_| {
                Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "could not tokenize the upstream's answer",
                )
            })?;
            // Always a fresh token, never `reuse_existing`: the worker chooses what an
            // echoing processor sends back, so a reused token would tell it whether a card
            // it guessed is one it has seen before (a card oracle).
            reqs.push(TokenizeRequest {
                pan,
                format: TokenFormat::Opaque,
                reuse_existing: false,
                expires_at: None,
            });
        }
        let fail = || {
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "the upstream's answer held card numbers that could not be tokenized; it was \
                 withheld",
            )
        };
        let results = state
            .vault
            .tokenize_batch(&caller, reqs)
            .await
            .map_err(|_| fail())?;
        for r in results {
            tokens.push(r.map_err(|_| fail())?.token.into_string());
        }
        progress.tokenized = cards.len();
    }
    let (body_tokens, header_tokens) = tokens.split_at(body_cards.len());
    let out = if body_cards.is_empty() {
        resp_body
    } else {
        Bytes::from(scan::replace(&resp_body, &body_cards, body_tokens))
    };
    let leaks = |bytes: &[u8]| sent_pans.iter().any(|pan| holds_digits(bytes, pan));
    // A card sent upstream that still shows in the answer (digits of it glued to others,
    // or split by any separator) withholds the whole answer.
    let leaked = leaks(&out);
    let mut response = Response::new(Full::new(out));
    *response.status_mut() = head.status;
    let mut next_token = 0;
    for (i, (name, value)) in head.headers.iter().enumerate() {
        if DROP_RESPONSE.contains(&name.as_str()) {
            continue;
        }
        let value = match header_cards.iter().find(|(at, _)| *at == i) {
            Some((_, found)) => {
                let toks = &header_tokens[next_token..next_token + found.len()];
                next_token += found.len();
                HeaderValue::from_bytes(&scan::replace(value.as_bytes(), found, toks))
                    .map_err(|_| Refusal::new(StatusCode::BAD_GATEWAY, "bad upstream header"))?
            }
            None => value.clone(),
        };
        response.headers_mut().append(name.clone(), value);
    }
    if leaked || response.headers().values().any(|v| leaks(v.as_bytes())) {
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the upstream's answer held a card number that was sent to it; it was withheld",
        ));
    }
    Ok(response)
}

/// Whether the digits of `text`, with everything else removed, contain `pan`.
fn holds_digits(text: &[u8], pan: &str) -> bool {
    let digits: zeroize::Zeroizing<Vec<u8>> =
        zeroize::Zeroizing::new(text.iter().copied().filter(u8::is_ascii_digit).collect());
    !pan.is_empty() && digits.windows(pan.len()).any(|w| w == pan.as_bytes())
}
