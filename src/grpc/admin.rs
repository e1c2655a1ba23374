//! `tokenvault.v1.AdminService`: the admin commands of the CLI over authenticated gRPC, so
//! security administrators manage a running vault without the master key or the database.
//!
//! Admission ([`AdminService::admit_admin`], run by the [`super::gate::AuthGate`] before a
//! body is read): the caller authenticates exactly as on `TokenVaultService`; unless the
//! server was started with `--require-cert-for-admin=false` it must have done so with a
//! client certificate bound to its principal (an API key alone is UNAUTHENTICATED); and it
//! must hold a role that permits the method ([`AdminRpc::permitted_roles`]), else
//! PERMISSION_DENIED. Refusals are audited like the data plane's.
//!
//! Handlers stay thin: convert the request, make the same vault call the local CLI makes,
//! record the call (principal, subject, outcome) in the audit trail, convert the result.
//! A call whose audit record cannot be written fails, so no admin answer goes unrecorded.
//! Long work (rewrap, export, backup) streams.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxFuture;
use tonic::{Request, Response, Status};

use super::convert::{micros_to_timestamp, timestamp_to_micros};
use super::gate::{Admission, Admitted};
use super::pb;
use super::pb::admin_service_server::AdminService as AdminRpcs;
use super::service::{peer_addr, peer_cert_identities, TokenVaultService, ANONYMOUS};
use crate::audit::{self, AuditRecord, TrailReport, Verification};
use crate::auth::Role;
use crate::crypto::AuditPublicKey;
use crate::error::{outcome_of, Error, Result};
use crate::metrics::Method;
use crate::store::AdminRequestRow;
use crate::vault::lifecycle::{
    CheckReport, PurgeOptions, PurgePlan, PurgeReport, RevokeReport, RewrapOptions, RewrapProgress,
    RewrapReport, DEFAULT_BATCH, DEFAULT_SAMPLE,
};
use crate::vault::{
    Caller, ClientInfo, ClientLimits, KeyState, KeyVersionInfo, Micros, Principal, Vault,
};

/// Fully qualified name of the admin service.
pub const ADMIN_SERVICE_NAME: &str = "tokenvault.v1.AdminService";
/// Records per `ExportAudit` message.
pub const EXPORT_PAGE: usize = 1_000;
/// Most records `TailAudit` returns.
pub const MAX_TAIL: u32 = 10_000;
/// Bytes per `Backup` message.
const BACKUP_CHUNK: usize = 256 * 1024;
/// Largest rows-per-transaction an admin may ask for (as the CLI's `--batch`).
const MAX_BATCH: u32 = 1_000_000;
/// Longest `older_than` of a purge: a century (as the CLI's `--older-than`).
const MAX_OLDER_THAN: Duration = Duration::from_secs(36_500 * 86_400);

/// What an admin principal may be refused with when it authenticated by API key alone.
const CERT_REQUIRED: &str = "admin calls need a client certificate bound to the principal \
     (mutual TLS); an API key alone is refused on this server (--require-cert-for-admin)";

/// The methods of the admin service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRpc {
    GetStatus,
    ListKeys,
    RotateKey,
    RewrapKeys,
    RetireKey,
    RevokeKey,
    ListClients,
    AddClient,
    RevokeClient,
    VerifyAudit,
    ExportAudit,
    TailAudit,
    Check,
    Purge,
    Backup,
    ListAdminRequests,
    ApproveAdminRequest,
}

impl AdminRpc {
    pub const ALL: [AdminRpc; 17] = [
        AdminRpc::GetStatus,
        AdminRpc::ListKeys,
        AdminRpc::RotateKey,
        AdminRpc::RewrapKeys,
        AdminRpc::RetireKey,
        AdminRpc::RevokeKey,
        AdminRpc::ListClients,
        AdminRpc::AddClient,
        AdminRpc::RevokeClient,
        AdminRpc::VerifyAudit,
        AdminRpc::ExportAudit,
        AdminRpc::TailAudit,
        AdminRpc::Check,
        AdminRpc::Purge,
        AdminRpc::Backup,
        AdminRpc::ListAdminRequests,
        AdminRpc::ApproveAdminRequest,
    ];

    /// The method name as in the proto.
    pub fn method(self) -> &'static str {
        match self {
            AdminRpc::GetStatus => "GetStatus",
            AdminRpc::ListKeys => "ListKeys",
            AdminRpc::RotateKey => "RotateKey",
            AdminRpc::RewrapKeys => "RewrapKeys",
            AdminRpc::RetireKey => "RetireKey",
            AdminRpc::RevokeKey => "RevokeKey",
            AdminRpc::ListClients => "ListClients",
            AdminRpc::AddClient => "AddClient",
            AdminRpc::RevokeClient => "RevokeClient",
            AdminRpc::VerifyAudit => "VerifyAudit",
            AdminRpc::ExportAudit => "ExportAudit",
            AdminRpc::TailAudit => "TailAudit",
            AdminRpc::Check => "Check",
            AdminRpc::Purge => "Purge",
            AdminRpc::Backup => "Backup",
            AdminRpc::ListAdminRequests => "ListAdminRequests",
            AdminRpc::ApproveAdminRequest => "ApproveAdminRequest",
        }
    }

    /// Action name in the audit trail: one record per call, admitted or refused.
    pub fn audit_action(self) -> &'static str {
        match self {
            AdminRpc::GetStatus => "admin_get_status",
            AdminRpc::ListKeys => "admin_list_keys",
            AdminRpc::RotateKey => "admin_rotate_key",
            AdminRpc::RewrapKeys => "admin_rewrap_keys",
            AdminRpc::RetireKey => "admin_retire_key",
            AdminRpc::RevokeKey => "admin_revoke_key",
            AdminRpc::ListClients => "admin_list_clients",
            AdminRpc::AddClient => "admin_add_client",
            AdminRpc::RevokeClient => "admin_revoke_client",
            AdminRpc::VerifyAudit => "admin_verify_audit",
            AdminRpc::ExportAudit => "admin_export_audit",
            AdminRpc::TailAudit => "admin_tail_audit",
            AdminRpc::Check => "admin_check",
            AdminRpc::Purge => "admin_purge",
            AdminRpc::Backup => "admin_backup",
            AdminRpc::ListAdminRequests => "admin_list_requests",
            AdminRpc::ApproveAdminRequest => "admin_approve_request",
        }
    }

    /// Any one of these roles permits the method.
    pub fn permitted_roles(self) -> &'static [Role] {
        use Role::{Admin, Auditor, ClientsAdmin, KeysAdmin};
        match self {
            AdminRpc::GetStatus => &[Admin, KeysAdmin, ClientsAdmin, Auditor],
            AdminRpc::ListKeys
            | AdminRpc::RotateKey
            | AdminRpc::RewrapKeys
            | AdminRpc::RetireKey
            | AdminRpc::RevokeKey
            | AdminRpc::Check => &[Admin, KeysAdmin],
            AdminRpc::ListClients | AdminRpc::AddClient | AdminRpc::RevokeClient => {
                &[Admin, ClientsAdmin]
            }
            AdminRpc::VerifyAudit | AdminRpc::ExportAudit | AdminRpc::TailAudit => {
                &[Admin, Auditor]
            }
            AdminRpc::Purge | AdminRpc::Backup => &[Admin],
            // The approver must also be permitted the operation itself (checked on approval).
            AdminRpc::ListAdminRequests | AdminRpc::ApproveAdminRequest => {
                &[Admin, KeysAdmin, ClientsAdmin]
            }
        }
    }

    pub fn permits(self, principal: &Principal) -> bool {
        self.permitted_roles().iter().any(|r| principal.has(*r))
    }

    /// The method a request path (`/tokenvault.v1.AdminService/ListKeys`) names.
    pub fn from_path(path: &str) -> Option<AdminRpc> {
        let method = path
            .strip_prefix('/')?
            .strip_prefix(ADMIN_SERVICE_NAME)?
            .strip_prefix('/')?;
        AdminRpc::ALL.into_iter().find(|r| r.method() == method)
    }
}

/// The admin service handed to the generated tonic server.
#[derive(Clone)]
pub struct AdminService {
    vault: Vault,
    /// Authentication and refusal auditing are the data plane's, shared.
    tokens: TokenVaultService,
    require_cert: bool,
    started: Instant,
    /// Dual control: how long a request may wait for its approval; None = off.
    dual_control: Option<Duration>,
}

impl AdminService {
    /// `require_cert`: refuse admin calls authenticated by an API key alone.
    pub fn new(vault: Vault, tokens: TokenVaultService, require_cert: bool) -> AdminService {
        AdminService {
            vault,
            tokens,
            require_cert,
            started: Instant::now(),
            dual_control: None,
        }
    }

    /// Turns dual control on: `keys revoke` and `clients add` of a client with the
    /// `detokenize` role or an admin role become requests a second admin approves within
    /// `window`.
    pub fn with_dual_control(mut self, window: Option<Duration>) -> AdminService {
        self.dual_control = window;
        self
    }

    /// Authenticates, checks the certificate requirement and the role; audits refusals.
    pub async fn admit_admin<T>(
        &self,
        request: &Request<T>,
        rpc: AdminRpc,
    ) -> Result<Admitted, Status> {
        if let Some(a) = request.extensions().get::<Admitted>() {
            return Ok(a.clone());
        }
        let action = rpc.audit_action();
        let peer = peer_addr(request);
        let principal = match self.tokens.authenticate(request) {
            Ok(p) => p,
            Err(err) => {
                self.tokens
                    .refuse_anonymous(&Caller::new(ANONYMOUS, peer), action, &err)
                    .await;
                return Err(err.into());
            }
        };
        let caller = Caller::new(principal.name.clone(), peer);
        // `authenticate` succeeded with identities present only through a bound certificate.
        if self.require_cert && peer_cert_identities(request).is_empty() {
            let err = Error::Unauthenticated(CERT_REQUIRED);
            self.tokens.refuse_principal(&caller, action, &err).await;
            return Err(err.into());
        }
        if !rpc.permits(&principal) {
            let roles: Vec<&str> = rpc.permitted_roles().iter().map(|r| r.name()).collect();
            let err = Error::PermissionDenied(format!(
                "{} requires the {} role",
                rpc.method(),
                roles.join(" or ")
            ));
            self.tokens.refuse_principal(&caller, action, &err).await;
            return Err(err.into());
        }
        tracing::info!(method = rpc.method(), principal = %principal.name, "admin call admitted");
        Ok(Admitted { caller, principal })
    }

    async fn revoke(
        &self,
        caller: &Caller,
        version: u32,
        batch: usize,
    ) -> Result<pb::RevokeKeyResponse> {
        Ok(self
            .vault
            .revoke_key(caller, version, batch, |_| {})
            .await?
            .into())
    }

    async fn add(&self, caller: &Caller, new: NewClient) -> Result<pb::AddClientResponse> {
        let api_key = self
            .vault
            .add_client_with(
                caller,
                &new.name,
                &new.roles,
                new.cert_identity.as_deref(),
                new.limits,
            )
            .await?;
        Ok(pb::AddClientResponse {
            api_key,
            pending_request_id: String::new(),
        })
    }

    /// Approves request `id` as `approver` and runs it.
    async fn approve(
        &self,
        approver: &Admitted,
        id: &str,
    ) -> Result<pb::ApproveAdminRequestResponse> {
        let requests = self.vault.admin_requests().await?;
        let row = requests.iter().find(|r| r.id == id).ok_or_else(|| {
            Error::FailedPrecondition("there is no admin request with that id".into())
        })?;
        let params: serde_json::Value = serde_json::from_str(&row.params)
            .map_err(|_| Error::Internal("unreadable admin request parameters".into()))?;
        // The approver must be allowed the operation itself.
        let (rpc, new_client) = match row.operation.as_str() {
            "revoke_key" => (AdminRpc::RevokeKey, None),
            "add_client" => {
                let req = add_client_request(&params)?;
                (AdminRpc::AddClient, Some(NewClient::try_from(req)?))
            }
            _ => return Err(Error::Internal("unknown admin request operation".into())),
        };
        let admin_roles = new_client
            .as_ref()
            .is_some_and(|n| n.roles.iter().any(|r| r.is_admin()));
        if !rpc.permits(&approver.principal)
            || (admin_roles && !approver.principal.has(Role::Admin))
        {
            return Err(Error::PermissionDenied(format!(
                "approving {} needs a role that permits it",
                row.operation
            )));
        }
        let approved = self
            .vault
            .approve_admin_request(&approver.caller, id)
            .await?;
        let outcome = match new_client {
            None => {
                let version = params["version"]
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok());
                let batch = params["batch"].as_u64().map(|b| b as usize);
                let (Some(version), Some(batch)) = (version, batch) else {
                    return Err(Error::Internal(
                        "unreadable admin request parameters".into(),
                    ));
                };
                pb::approve_admin_request_response::Outcome::RevokeKey(
                    self.revoke(&approver.caller, version, batch).await?,
                )
            }
            Some(new) => pb::approve_admin_request_response::Outcome::AddClient(
                self.add(&approver.caller, new).await?,
            ),
        };
        Ok(pb::ApproveAdminRequestResponse {
            request: Some(approved.into()),
            outcome: Some(outcome),
        })
    }

    /// Records the call and its outcome; a record that cannot be written fails the call.
    async fn record<T>(
        &self,
        caller: &Caller,
        rpc: AdminRpc,
        subject: &str,
        result: Result<T>,
    ) -> Result<T, Status> {
        // An internal error's detail stays in the log (see `status`).
        let detail = match &result {
            Ok(_) | Err(Error::Internal(_)) => String::new(),
            Err(e) => e.to_string(),
        };
        let written = self
            .vault
            .audit_admin_call(
                caller,
                rpc.audit_action(),
                subject,
                outcome_of(&result),
                &detail,
            )
            .await;
        if let Err(e) = written {
            crate::metrics::record_audit_write_failure();
            tracing::warn!(error = %e, method = rpc.method(), "could not audit an admin call");
            // The error of the call itself, if any, matters more to the caller.
            result?;
            return Err(e.into());
        }
        result.map_err(Into::into)
    }

    /// Admits, runs `f`, records the outcome.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        request: Request<Req>,
        rpc: AdminRpc,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Admitted, Req) -> Fut,
        Fut: std::future::Future<Output = (String, Result<Resp>)>,
    {
        let admitted = self.admit_admin(&request, rpc).await?;
        let caller = admitted.caller.clone();
        let (subject, result) = f(admitted, request.into_inner()).await;
        self.record(&caller, rpc, &subject, result)
            .await
            .map(Response::new)
    }
}

impl Admission for AdminService {
    type Rpc = AdminRpc;
    fn rpc(path: &str) -> Option<AdminRpc> {
        AdminRpc::from_path(path)
    }
    fn admit(&self, head: Request<()>, rpc: AdminRpc) -> BoxFuture<Admitted, Status> {
        let service = self.clone();
        Box::pin(async move { service.admit_admin(&head, rpc).await })
    }
    fn metric(_rpc: AdminRpc) -> Method {
        Method::Other
    }
    fn method(rpc: AdminRpc) -> &'static str {
        rpc.method()
    }
}

// ---- conversions: proto -> domain (validated) and domain -> proto ----

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A non-negative protobuf duration.
pub fn duration_from_pb(d: &prost_types::Duration, field: &str) -> Result<Duration> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return Err(Error::InvalidArgument(format!(
            "{field}: must be a non-negative duration"
        )));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn batch_size(batch: u32) -> Result<usize> {
    match batch {
        0 => Ok(DEFAULT_BATCH),
        b if b <= MAX_BATCH => Ok(b as usize),
        _ => Err(Error::InvalidArgument(format!(
            "batch: at most {MAX_BATCH} rows per transaction"
        ))),
    }
}

pub fn pb_key_state(state: KeyState) -> pb::KeyVersionState {
    match state {
        KeyState::Active => pb::KeyVersionState::Active,
        KeyState::DecryptOnly => pb::KeyVersionState::DecryptOnly,
        KeyState::Retired => pb::KeyVersionState::Retired,
    }
}

impl From<KeyVersionInfo> for pb::KeyVersion {
    fn from(k: KeyVersionInfo) -> pb::KeyVersion {
        pb::KeyVersion {
            version: k.version,
            state: pb_key_state(k.state) as i32,
            created_at: Some(micros_to_timestamp(k.created_at)),
            encryptions: k.encryptions,
            max_encryptions: k.max_encryptions,
            rows: k.rows,
        }
    }
}

impl TryFrom<pb::KeyVersion> for KeyVersionInfo {
    type Error = Error;
    fn try_from(k: pb::KeyVersion) -> Result<KeyVersionInfo> {
        let state = match pb::KeyVersionState::try_from(k.state) {
            Ok(pb::KeyVersionState::Active) => KeyState::Active,
            Ok(pb::KeyVersionState::DecryptOnly) => KeyState::DecryptOnly,
            Ok(pb::KeyVersionState::Retired) => KeyState::Retired,
            _ => return Err(Error::InvalidArgument("key state: unknown value".into())),
        };
        Ok(KeyVersionInfo {
            version: k.version,
            state,
            created_at: required_time(k.created_at.as_ref(), "created_at")?,
            encryptions: k.encryptions,
            max_encryptions: k.max_encryptions,
            rows: k.rows,
        })
    }
}

fn required_time(ts: Option<&prost_types::Timestamp>, field: &str) -> Result<Micros> {
    let ts = ts.ok_or_else(|| Error::InvalidArgument(format!("{field}: missing")))?;
    timestamp_to_micros(ts, field)
}

fn optional_rate(value: f64, field: &str) -> Result<Option<f64>> {
    if value == 0.0 {
        Ok(None)
    } else if value.is_finite() && value > 0.0 {
        Ok(Some(value))
    } else {
        Err(Error::InvalidArgument(format!(
            "{field}: must be a positive number of requests per second, or 0 for the default"
        )))
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<ClientInfo> for pb::ClientPrincipal {
    fn from(c: ClientInfo) -> pb::ClientPrincipal {
        pb::ClientPrincipal {
            name: c.name,
            roles: c.roles.iter().map(|r| r.name().to_owned()).collect(),
            cert_identity: c.cert_identity.unwrap_or_default(),
            detokenize_rate: c.detokenize_rate.unwrap_or(0.0),
            reuse_rate: c.reuse_rate.unwrap_or(0.0),
            reuse_group: c.reuse_group.unwrap_or_default(),
            created_at: Some(micros_to_timestamp(c.created_at)),
            revoked_at: c.revoked_at.map(micros_to_timestamp),
        }
    }
}

impl TryFrom<pb::ClientPrincipal> for ClientInfo {
    type Error = Error;
    fn try_from(c: pb::ClientPrincipal) -> Result<ClientInfo> {
        Ok(ClientInfo {
            roles: parse_roles(&c.roles)?,
            name: c.name,
            cert_identity: non_empty(c.cert_identity),
            detokenize_rate: optional_rate(c.detokenize_rate, "detokenize_rate")?,
            reuse_rate: optional_rate(c.reuse_rate, "reuse_rate")?,
            reuse_group: non_empty(c.reuse_group),
            created_at: required_time(c.created_at.as_ref(), "created_at")?,
            revoked_at: c
                .revoked_at
                .as_ref()
                .map(|t| timestamp_to_micros(t, "revoked_at"))
                .transpose()?,
        })
    }
}

fn parse_roles(names: &[String]) -> Result<Vec<Role>> {
    names
        .iter()
        .map(|n| {
            Role::parse(n).ok_or_else(|| {
                let known: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                Error::InvalidArgument(format!(
                    "roles: unknown role; expected one of {}",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

/// A validated `AddClient` request.
#[derive(Debug)]
pub struct NewClient {
    pub name: String,
    pub roles: Vec<Role>,
    pub cert_identity: Option<String>,
    pub limits: ClientLimits,
}

impl TryFrom<pb::AddClientRequest> for NewClient {
    type Error = Error;
    fn try_from(r: pb::AddClientRequest) -> Result<NewClient> {
        let mut roles = parse_roles(&r.roles)?;
        roles.sort();
        roles.dedup();
        Ok(NewClient {
            name: r.name,
            roles,
            cert_identity: non_empty(r.cert_identity),
            limits: ClientLimits {
                detokenize_rate: optional_rate(r.detokenize_rate, "detokenize_rate")?,
                reuse_rate: optional_rate(r.reuse_rate, "reuse_rate")?,
                reuse_group: non_empty(r.reuse_group),
            },
        })
    }
}

// The generated `Debug` would print the new API key; build.rs skips it.
impl std::fmt::Debug for pb::AddClientResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddClientResponse")
            .field("api_key", &"<redacted>")
            .field("pending_request_id", &self.pending_request_id)
            .finish()
    }
}

impl From<&RewrapProgress> for pb::RewrapProgress {
    fn from(p: &RewrapProgress) -> pb::RewrapProgress {
        pb::RewrapProgress {
            done: p.done,
            total: p.total,
            failed: p.failed,
            elapsed: Some(pb_duration(p.elapsed)),
        }
    }
}

impl TryFrom<pb::RewrapProgress> for RewrapProgress {
    type Error = Error;
    fn try_from(p: pb::RewrapProgress) -> Result<RewrapProgress> {
        Ok(RewrapProgress {
            done: p.done,
            total: p.total,
            failed: p.failed,
            elapsed: duration_from_pb(&p.elapsed.unwrap_or_default(), "elapsed")?,
        })
    }
}

impl From<RewrapReport> for pb::RewrapResult {
    fn from(r: RewrapReport) -> pb::RewrapResult {
        pb::RewrapResult {
            rewrapped: r.rewrapped,
            failed_tokens: r.failed,
            active_version: r.active_version,
            batches: r.batches,
            elapsed: Some(pb_duration(r.elapsed)),
        }
    }
}

impl TryFrom<pb::RewrapResult> for RewrapReport {
    type Error = Error;
    fn try_from(r: pb::RewrapResult) -> Result<RewrapReport> {
        Ok(RewrapReport {
            rewrapped: r.rewrapped,
            failed: r.failed_tokens,
            active_version: r.active_version,
            batches: r.batches,
            elapsed: duration_from_pb(&r.elapsed.unwrap_or_default(), "elapsed")?,
        })
    }
}

impl From<RevokeReport> for pb::RevokeKeyResponse {
    fn from(r: RevokeReport) -> pb::RevokeKeyResponse {
        pb::RevokeKeyResponse {
            version: r.version,
            rotated_to: r.rotated_to.unwrap_or(0),
            rewrapped: r.rewrapped,
            already_retired: r.already_retired,
            pending_request_id: String::new(),
        }
    }
}

impl From<pb::RevokeKeyResponse> for RevokeReport {
    fn from(r: pb::RevokeKeyResponse) -> RevokeReport {
        RevokeReport {
            version: r.version,
            rotated_to: (r.rotated_to != 0).then_some(r.rotated_to),
            rewrapped: r.rewrapped,
            already_retired: r.already_retired,
        }
    }
}

impl From<TrailReport> for pb::VerifyAuditResponse {
    fn from(r: TrailReport) -> pb::VerifyAuditResponse {
        let mut out = pb::VerifyAuditResponse {
            ok: r.verification.is_ok(),
            head_seq: r.head_seq,
            head_hash: audit::hex(&r.head_hash),
            checkpoints: r.checkpoints as u64,
            last_checkpoint_seq: r.last_checkpoint_seq.unwrap_or(0),
            ..Default::default()
        };
        match r.verification {
            Verification::Ok { records } => out.records = records,
            Verification::Broken { seq, why } => {
                out.first_bad_seq = seq;
                out.why = why.to_owned();
            }
            Verification::Contradicted { line, seq, why } => {
                out.checkpoint_line = line as u64;
                out.first_bad_seq = seq;
                out.why = why;
            }
        }
        out
    }
}

impl TryFrom<pb::VerifyAuditResponse> for TrailReport {
    type Error = Error;
    fn try_from(r: pb::VerifyAuditResponse) -> Result<TrailReport> {
        let bad = || Error::InvalidArgument("head_hash: expected 64 hex digits".into());
        let hash = r.head_hash.as_bytes();
        if hash.len() != 64 {
            return Err(bad());
        }
        let mut head_hash = [0u8; 32];
        for (i, pair) in hash.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            head_hash[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        let verification = if r.ok {
            Verification::Ok { records: r.records }
        } else if r.checkpoint_line != 0 {
            Verification::Contradicted {
                line: r.checkpoint_line as usize,
                seq: r.first_bad_seq,
                why: r.why,
            }
        } else {
            Verification::Broken {
                seq: r.first_bad_seq,
                // The reasons are a fixed set of texts; one leaked string per CLI run.
                why: Box::leak(r.why.into_boxed_str()),
            }
        };
        Ok(TrailReport {
            verification,
            checkpoints: r.checkpoints as usize,
            last_checkpoint_seq: (r.last_checkpoint_seq != 0).then_some(r.last_checkpoint_seq),
            head_seq: r.head_seq,
            head_hash,
        })
    }
}

impl From<AuditRecord> for pb::AuditRecord {
    fn from(r: AuditRecord) -> pb::AuditRecord {
        pb::AuditRecord {
            seq: r.seq,
            time: Some(micros_to_timestamp(r.at)),
            action: r.action,
            principal: r.principal,
            outcome: r.outcome,
            peer: r.peer,
            subject: r.subject,
            reason: r.reason,
        }
    }
}

impl TryFrom<pb::AuditRecord> for AuditRecord {
    type Error = Error;
    fn try_from(r: pb::AuditRecord) -> Result<AuditRecord> {
        Ok(AuditRecord {
            seq: r.seq,
            at: required_time(r.time.as_ref(), "time")?,
            principal: r.principal,
            peer: r.peer,
            action: r.action,
            subject: r.subject,
            outcome: r.outcome,
            reason: r.reason,
            mac: Vec::new(),
            hash: Vec::new(),
        })
    }
}

impl From<CheckReport> for pb::CheckResponse {
    fn from(r: CheckReport) -> pb::CheckResponse {
        pb::CheckResponse {
            ok: r.ok(),
            full: r.full,
            integrity: r.integrity,
            keyring: r.keyring,
            rows_checked: r.checked,
            failed_tokens: r.failed_tokens,
            leftovers: r.leftovers,
        }
    }
}

impl From<pb::CheckResponse> for CheckReport {
    fn from(r: pb::CheckResponse) -> CheckReport {
        CheckReport {
            full: r.full,
            integrity: r.integrity,
            keyring: r.keyring,
            checked: r.rows_checked,
            failed_tokens: r.failed_tokens,
            leftovers: r.leftovers,
        }
    }
}

/// A validated `Purge` request.
impl TryFrom<&pb::PurgeRequest> for PurgeOptions {
    type Error = Error;
    fn try_from(r: &pb::PurgeRequest) -> Result<PurgeOptions> {
        if !r.deleted && !r.expired {
            return Err(Error::InvalidArgument(
                "choose what to purge: deleted and/or expired tokens".into(),
            ));
        }
        let older_than = r
            .older_than
            .as_ref()
            .map(|d| duration_from_pb(d, "older_than"))
            .transpose()?;
        if older_than.is_some_and(|d| d > MAX_OLDER_THAN) {
            return Err(Error::InvalidArgument(
                "older_than: at most 36500 days (100 years)".into(),
            ));
        }
        Ok(PurgeOptions {
            deleted: r.deleted,
            expired: r.expired,
            older_than,
            batch: batch_size(r.batch)?,
        })
    }
}

fn pb_purge(plan: &PurgePlan, report: Option<&PurgeReport>) -> pb::PurgeResponse {
    pb::PurgeResponse {
        dry_run: report.is_none(),
        deleted_to_remove: plan.deleted,
        expired_to_remove: plan.expired,
        deleted_removed: report.map_or(0, |r| r.deleted),
        expired_removed: report.map_or(0, |r| r.expired),
        batches: report.map_or(0, |r| r.batches),
        deleted_before: plan.deleted_before.map(micros_to_timestamp),
        expired_before: plan.expired_before.map(micros_to_timestamp),
    }
}

fn pinned_keys(texts: &[String]) -> Result<Vec<AuditPublicKey>> {
    texts
        .iter()
        .map(|t| {
            AuditPublicKey::parse(t).ok_or_else(|| {
                Error::InvalidArgument(
                    "public_keys: expected ed25519:BASE64 as `tokenvault audit public-key` prints it"
                        .into(),
                )
            })
        })
        .collect()
}

/// A fresh private directory for one streamed backup, outside the data directory.
fn backup_scratch() -> Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("tokenvault-backup-{:016x}", rand::random::<u64>()));
    crate::vault::create_private_dir(&dir)?;
    Ok(dir)
}

/// The parameters of an `add_client` request as stored (no secret among them).
fn add_client_params(r: &pb::AddClientRequest) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "roles": r.roles,
        "cert_identity": r.cert_identity,
        "detokenize_rate": r.detokenize_rate,
        "reuse_rate": r.reuse_rate,
        "reuse_group": r.reuse_group,
    })
}

fn add_client_request(v: &serde_json::Value) -> Result<pb::AddClientRequest> {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Ok(pb::AddClientRequest {
        name: text("name"),
        roles: v["roles"]
            .as_array()
            .ok_or_else(|| Error::Internal("unreadable admin request parameters".into()))?
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect(),
        cert_identity: text("cert_identity"),
        detokenize_rate: v["detokenize_rate"].as_f64().unwrap_or(0.0),
        reuse_rate: v["reuse_rate"].as_f64().unwrap_or(0.0),
        reuse_group: text("reuse_group"),
    })
}

impl From<AdminRequestRow> for pb::AdminRequest {
    fn from(r: AdminRequestRow) -> pb::AdminRequest {
        pb::AdminRequest {
            id: r.id,
            operation: r.operation,
            params: r.params,
            requester: r.requester,
            created_at: Some(micros_to_timestamp(r.created_at)),
            expires_at: Some(micros_to_timestamp(r.expires_at)),
            approver: r.approver.unwrap_or_default(),
            approved_at: r.approved_at.map(micros_to_timestamp),
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AdminRpcs for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.unary(request, AdminRpc::GetStatus, |_, _| async {
            let keys = self
                .vault
                .list_keys()
                .await
                .map(|keys| pb::GetStatusResponse {
                    version: crate::VERSION.to_owned(),
                    store: match self.vault.location() {
                        crate::store::StoreLocation::Sqlite(_) => "sqlite",
                        crate::store::StoreLocation::Postgres(_) => "postgresql",
                    }
                    .to_owned(),
                    keys: keys.into_iter().map(Into::into).collect(),
                    sealed: false,
                    uptime: Some(pb_duration(self.started.elapsed())),
                    healthy: self.vault.healthy(),
                    replicas: Vec::new(),
                    key_max_age: self.vault.key_policy().max_age.map(pb_duration),
                });
            (String::new(), keys)
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.unary(request, AdminRpc::ListKeys, |_, _| async {
            let keys = self
                .vault
                .list_keys()
                .await
                .map(|keys| pb::ListKeysResponse {
                    keys: keys.into_iter().map(Into::into).collect(),
                    key_max_age: self.vault.key_policy().max_age.map(pb_duration),
                });
            (String::new(), keys)
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.unary(request, AdminRpc::RotateKey, |a, _| async move {
            let r = self.vault.rotate_key(&a.caller).await;
            let subject = r.as_ref().map(|v| format!("key v{v}")).unwrap_or_default();
            (
                subject,
                r.map(|active_version| pb::RotateKeyResponse { active_version }),
            )
        })
        .await
    }

    type RewrapKeysStream = Stream<pb::RewrapKeysResponse>;

    async fn rewrap_keys(
        &self,
        request: Request<pb::RewrapKeysRequest>,
    ) -> Result<Response<Self::RewrapKeysStream>, Status> {
        let rpc = AdminRpc::RewrapKeys;
        let admitted = self.admit_admin(&request, rpc).await?;
        let req = request.into_inner();
        let opts = batch_size(req.batch).map(|batch| RewrapOptions {
            batch,
            only_version: (req.from_version != 0).then_some(req.from_version),
        });
        let subject = match req.from_version {
            0 => "older versions".to_owned(),
            v => format!("key v{v}"),
        };
        let opts = self.record(&admitted.caller, rpc, &subject, opts).await?;
        let (tx, rx) = mpsc::channel(16);
        let vault = self.vault.clone();
        // The work runs to completion even if the caller goes away: it is resumable, and a
        // half-done batch is never left open.
        tokio::spawn(async move {
            let progress = tx.clone();
            let r = vault
                .rewrap(&admitted.caller, &opts, |p| {
                    // Progress is advisory: a slow reader misses some, never the result.
                    let _ = progress.try_send(Ok(pb::RewrapKeysResponse {
                        event: Some(pb::rewrap_keys_response::Event::Progress(p.into())),
                    }));
                })
                .await;
            let last = r
                .map_err(Status::from)
                .map(|report| pb::RewrapKeysResponse {
                    event: Some(pb::rewrap_keys_response::Event::Result(report.into())),
                });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.unary(request, AdminRpc::RetireKey, |a, req| async move {
            let r = self.vault.retire_key(&a.caller, req.version).await;
            (
                format!("key v{}", req.version),
                r.map(|retired| pb::RetireKeyResponse { retired }),
            )
        })
        .await
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        self.unary(request, AdminRpc::RevokeKey, |a, req| async move {
            let r = match (batch_size(req.batch), self.dual_control) {
                (Err(e), _) => Err(e),
                (Ok(batch), Some(window)) => {
                    let params = serde_json::json!({"version": req.version, "batch": batch});
                    self.vault
                        .request_admin_op(&a.caller, "revoke_key", &params, window)
                        .await
                        .map(|row| pb::RevokeKeyResponse {
                            version: req.version,
                            pending_request_id: row.id,
                            ..Default::default()
                        })
                }
                (Ok(batch), None) => self.revoke(&a.caller, req.version, batch).await,
            };
            (format!("key v{}", req.version), r)
        })
        .await
    }

    async fn list_clients(
        &self,
        request: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        self.unary(request, AdminRpc::ListClients, |_, _| async {
            let r = self
                .vault
                .list_clients()
                .await
                .map(|c| pb::ListClientsResponse {
                    clients: c.into_iter().map(Into::into).collect(),
                });
            (String::new(), r)
        })
        .await
    }

    async fn add_client(
        &self,
        request: Request<pb::AddClientRequest>,
    ) -> Result<Response<pb::AddClientResponse>, Status> {
        self.unary(request, AdminRpc::AddClient, |a, req| async move {
            let subject = format!("client {}", req.name);
            let params = add_client_params(&req);
            let r = async {
                let new = NewClient::try_from(req)?;
                // A clients-admin must not mint admins: that would be every admin right.
                if new.roles.iter().any(|r| r.is_admin()) && !a.principal.has(Role::Admin) {
                    return Err(Error::PermissionDenied(
                        "only an admin may grant admin roles".into(),
                    ));
                }
                match self.dual_control {
                    // A new admin is dangerous too: with one, a single person could approve
                    // their own requests. So is a client joining a reuse group: its
                    // `reuse_existing` answers tell it which guessed cards the group holds.
                    Some(window)
                        if new.limits.reuse_group.is_some()
                            || new
                                .roles
                                .iter()
                                .any(|r| *r == Role::Detokenize || r.is_admin()) =>
                    {
                        // Validated now; the approver sees exactly these parameters.
                        crate::vault::validate_client_name(&new.name)?;
                        let row = self
                            .vault
                            .request_admin_op(&a.caller, "add_client", &params, window)
                            .await?;
                        Ok(pb::AddClientResponse {
                            api_key: String::new(),
                            pending_request_id: row.id,
                        })
                    }
                    _ => self.add(&a.caller, new).await,
                }
            }
            .await;
            (subject, r)
        })
        .await
    }

    async fn revoke_client(
        &self,
        request: Request<pb::RevokeClientRequest>,
    ) -> Result<Response<pb::RevokeClientResponse>, Status> {
        self.unary(request, AdminRpc::RevokeClient, |a, req| async move {
            let subject = format!("client {}", req.name);
            let r = async {
                if !a.principal.has(Role::Admin) {
                    let target = self.vault.list_clients().await?;
                    let holds_admin = target.iter().any(|c| {
                        c.name == req.name
                            && c.revoked_at.is_none()
                            && c.roles.iter().any(|r| r.is_admin())
                    });
                    if holds_admin {
                        return Err(Error::PermissionDenied(
                            "only an admin may revoke a principal holding admin roles".into(),
                        ));
                    }
                }
                let revoked = self.vault.revoke_client(&a.caller, &req.name).await?;
                Ok(pb::RevokeClientResponse { revoked })
            }
            .await;
            (subject, r)
        })
        .await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let rpc = AdminRpc::VerifyAudit;
        let admitted = self.admit_admin(&request, rpc).await?;
        let req = request.into_inner();
        let pinned = pinned_keys(&req.public_keys);
        // Recorded before the walk, so the walk covers its own record, and a local
        // `audit verify` run right after reports the same trail.
        let pinned = self.record(&admitted.caller, rpc, "walk", pinned).await?;
        let with_checkpoints = !req.checkpoints.is_empty();
        let cps = audit::parse_checkpoints(&req.checkpoints);
        let report = self.vault.verify_audit_with(cps, &pinned).await?;
        let mut out = pb::VerifyAuditResponse::from(report);
        out.with_checkpoints = with_checkpoints;
        Ok(Response::new(out))
    }

    type ExportAuditStream = Stream<pb::ExportAuditResponse>;

    async fn export_audit(
        &self,
        request: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let rpc = AdminRpc::ExportAudit;
        let admitted = self.admit_admin(&request, rpc).await?;
        let req = request.into_inner();
        let since = req
            .since
            .as_ref()
            .map(|t| timestamp_to_micros(t, "since"))
            .transpose();
        let subject = format!("after {}", req.since_seq);
        let since = self.record(&admitted.caller, rpc, &subject, since).await?;
        let action = non_empty(req.action);
        let (tx, rx) = mpsc::channel(4);
        let vault = self.vault.clone();
        tokio::spawn(async move {
            let id = match vault.audit_vault_id().await {
                Ok(id) => id,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let mut from = req.since_seq.saturating_add(1);
            loop {
                let page = match vault.audit_records(from, EXPORT_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let full = page.len() == EXPORT_PAGE;
                let mut lines = Vec::with_capacity(page.len());
                for r in &page {
                    from = r.seq + 1;
                    let wanted = !(since.is_some_and(|s| r.at < s)
                        || action.as_deref().is_some_and(|a| a != r.action));
                    if wanted {
                        lines.push(audit::export_line(&id, r).to_string());
                    }
                }
                if !lines.is_empty()
                    && tx
                        .send(Ok(pb::ExportAuditResponse { lines }))
                        .await
                        .is_err()
                {
                    return; // the caller went away
                }
                if !full {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tail_audit(
        &self,
        request: Request<pb::TailAuditRequest>,
    ) -> Result<Response<pb::TailAuditResponse>, Status> {
        self.unary(request, AdminRpc::TailAudit, |_, req| async move {
            let r = async {
                let n = match req.lines {
                    0 => 20,
                    n if n <= MAX_TAIL => n as usize,
                    _ => return Err(Error::InvalidArgument(format!("lines: at most {MAX_TAIL}"))),
                };
                let head = self.vault.audit_head_seq().await?;
                let from = (head + 1).saturating_sub(n as u64).max(1);
                let records = self.vault.audit_records(from, n).await?;
                Ok(pb::TailAuditResponse {
                    records: records.into_iter().map(Into::into).collect(),
                })
            }
            .await;
            (String::new(), r)
        })
        .await
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        self.unary(request, AdminRpc::Check, |_, req| async move {
            let sample = match req.sample {
                0 => DEFAULT_SAMPLE,
                n => n as usize,
            };
            let r = self.vault.check(req.full, sample).await.map(Into::into);
            let subject = if req.full { "full" } else { "sample" };
            (subject.to_owned(), r)
        })
        .await
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        self.unary(request, AdminRpc::Purge, |a, req| async move {
            let r = async {
                let opts = PurgeOptions::try_from(&req)?;
                let plan = self.vault.purge_plan(&opts).await?;
                if req.dry_run {
                    return Ok(pb_purge(&plan, None));
                }
                let report = self
                    .vault
                    .purge_planned(&a.caller, &plan, opts.batch)
                    .await?;
                Ok(pb_purge(&plan, Some(&report)))
            }
            .await;
            let subject = if req.dry_run { "dry run" } else { "purge" };
            (subject.to_owned(), r)
        })
        .await
    }

    async fn list_admin_requests(
        &self,
        request: Request<pb::ListAdminRequestsRequest>,
    ) -> Result<Response<pb::ListAdminRequestsResponse>, Status> {
        self.unary(request, AdminRpc::ListAdminRequests, |_, _| async {
            let r = self
                .vault
                .admin_requests()
                .await
                .map(|rows| pb::ListAdminRequestsResponse {
                    requests: rows.into_iter().map(Into::into).collect(),
                });
            (String::new(), r)
        })
        .await
    }

    async fn approve_admin_request(
        &self,
        request: Request<pb::ApproveAdminRequestRequest>,
    ) -> Result<Response<pb::ApproveAdminRequestResponse>, Status> {
        self.unary(
            request,
            AdminRpc::ApproveAdminRequest,
            |a, req| async move {
                let r = self.approve(&a, &req.id).await;
                (req.id, r)
            },
        )
        .await
    }

    type BackupStream = Stream<pb::BackupResponse>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let rpc = AdminRpc::Backup;
        let admitted = self.admit_admin(&request, rpc).await?;
        // The snapshot goes to a private scratch file, is opened, and is unlinked before a
        // byte is sent: nothing of it outlives the stream.
        let snapshot = async {
            let dir = backup_scratch()?;
            let path = dir.join("backup.db");
            let written = self.vault.backup(&admitted.caller, &path).await;
            let opened = written.and_then(|bytes| {
                std::fs::File::open(&path)
                    .map(|f| (f, bytes))
                    .map_err(|e| Error::Unavailable(format!("reading the backup: {e}")))
            });
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir(&dir);
            opened
        }
        .await;
        let (file, total) = self
            .record(&admitted.caller, rpc, "streamed to the caller", snapshot)
            .await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; BACKUP_CHUNK];
                let n = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let err = Error::Unavailable(format!("reading the backup: {e}"));
                        let _ = tx.blocking_send(Err(err.into()));
                        return;
                    }
                };
                buf.truncate(n);
                let msg = pb::BackupResponse {
                    data: buf,
                    total_bytes: if first { total } else { 0 },
                };
                first = false;
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(roles: &[Role]) -> Principal {
        Principal {
            name: "p".into(),
            roles: roles.to_vec(),
            detokenize_rate: None,
            reuse_rate: None,
            reuse_group: None,
        }
    }

    #[test]
    fn paths_and_roles() {
        for rpc in AdminRpc::ALL {
            let path = format!("/{ADMIN_SERVICE_NAME}/{}", rpc.method());
            assert_eq!(AdminRpc::from_path(&path), Some(rpc));
            assert!(rpc.permits(&p(&[Role::Admin])), "{rpc:?}");
            // No data-plane role opens any admin method.
            assert!(!rpc.permits(&p(&[
                Role::Tokenize,
                Role::Detokenize,
                Role::Info,
                Role::Delete
            ])));
        }
        assert_eq!(
            AdminRpc::from_path("/tokenvault.v1.TokenVaultService/Tokenize"),
            None
        );
        assert!(AdminRpc::TailAudit.permits(&p(&[Role::Auditor])));
        assert!(!AdminRpc::RotateKey.permits(&p(&[Role::Auditor])));
        assert!(!AdminRpc::AddClient.permits(&p(&[Role::KeysAdmin])));
        assert!(AdminRpc::AddClient.permits(&p(&[Role::ClientsAdmin])));
        assert!(!AdminRpc::Backup.permits(&p(&[Role::KeysAdmin, Role::ClientsAdmin])));
    }

    #[test]
    fn add_client_requests_are_validated() {
        let ok = NewClient::try_from(pb::AddClientRequest {
            name: "x".into(),
            roles: vec!["info".into(), "tokenize".into(), "info".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.roles, vec![Role::Tokenize, Role::Info]);
        assert!(ok.cert_identity.is_none());
        for bad in [
            pb::AddClientRequest {
                roles: vec!["root".into()],
                ..Default::default()
            },
            pb::AddClientRequest {
                roles: vec!["info".into()],
                detokenize_rate: -1.0,
                ..Default::default()
            },
            pb::AddClientRequest {
                roles: vec!["info".into()],
                reuse_rate: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                NewClient::try_from(bad),
                Err(Error::InvalidArgument(_))
            ));
        }
        let resp = pb::AddClientResponse {
            api_key: "tvk_secret_value".into(),
            pending_request_id: String::new(),
        };
        assert!(!format!("{resp:?}").contains("secret"));
    }

    #[test]
    fn purge_requests_are_validated() {
        let base = pb::PurgeRequest {
            deleted: true,
            ..Default::default()
        };
        assert!(PurgeOptions::try_from(&base).is_ok());
        assert!(PurgeOptions::try_from(&pb::PurgeRequest::default()).is_err());
        let negative = pb::PurgeRequest {
            older_than: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..base
        };
        assert!(PurgeOptions::try_from(&negative).is_err());
        let huge = pb::PurgeRequest {
            older_than: Some(prost_types::Duration {
                seconds: 36_501 * 86_400,
                nanos: 0,
            }),
            ..base
        };
        assert!(PurgeOptions::try_from(&huge).is_err());
        let batch = pb::PurgeRequest {
            batch: MAX_BATCH + 1,
            ..base
        };
        assert!(PurgeOptions::try_from(&batch).is_err());
    }

    #[test]
    fn round_trips() {
        let k = KeyVersionInfo {
            version: 3,
            state: KeyState::DecryptOnly,
            created_at: 1_700_000_000_000_000,
            encryptions: 5,
            max_encryptions: 10,
            rows: 2,
        };
        let back = KeyVersionInfo::try_from(pb::KeyVersion::from(k.clone())).unwrap();
        assert_eq!(format!("{back:?}"), format!("{k:?}"));
        let c = ClientInfo {
            name: "n".into(),
            roles: vec![Role::Admin, Role::Auditor],
            cert_identity: Some("spiffe://x/y".into()),
            detokenize_rate: Some(2.5),
            reuse_rate: None,
            reuse_group: Some("g".into()),
            created_at: 1_700_000_000_000_000,
            revoked_at: Some(1_700_000_001_000_000),
        };
        let back = ClientInfo::try_from(pb::ClientPrincipal::from(c.clone())).unwrap();
        assert_eq!(format!("{back:?}"), format!("{c:?}"));
    }
}
