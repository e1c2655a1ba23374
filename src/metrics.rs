//! Prometheus metrics through the `metrics` facade and `metrics-exporter-prometheus`.
//!
//! [`install`] starts the HTTP listener of [`crate::probes`] (`/metrics`, `/livez`, `/readyz`,
//! 404 elsewhere) on its own address, separate from gRPC and off unless `--metrics-listen` is
//! given. The recording functions below are cheap no-ops until then, so the gRPC layer and
//! the store can call them unconditionally.
//!
//! **No PAN, token, API key, principal or reason ever becomes a label.** Labels come only from
//! fixed sets: [`Method`] (the RPC names), the gRPC code names, the commit outcome, key
//! version numbers, and the proxy's route names (from the configuration file, never from a
//! request) and status classes. The recording functions take those types, not strings, so a caller cannot
//! pass request data by mistake.

use std::net::SocketAddr;
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "tokenvault_grpc_requests_total";
pub const REQUEST_DURATION: &str = "tokenvault_grpc_request_duration_seconds";
pub const GROUP_COMMIT_ITEMS: &str = "tokenvault_store_group_commit_items";
pub const COMMIT_DURATION: &str = "tokenvault_store_commit_duration_seconds";
pub const COMMITS_TOTAL: &str = "tokenvault_store_commits_total";
pub const WAL_RESETS: &str = "tokenvault_store_wal_resets_total";
pub const WAL_RESET_DURATION: &str = "tokenvault_store_wal_reset_duration_seconds";
pub const TOKENS_STORED: &str = "tokenvault_tokens_stored";
pub const KEY_ENCRYPTIONS: &str = "tokenvault_key_encryptions_total";
pub const KEY_ENCRYPTION_LIMIT: &str = "tokenvault_key_encryption_limit";
pub const KEY_ACTIVE_VERSION: &str = "tokenvault_key_active_version";
pub const AUDIT_RECORDS: &str = "tokenvault_audit_records_total";
pub const RATE_LIMIT_REJECTIONS: &str = "tokenvault_rate_limit_rejections_total";
pub const BUILD_INFO: &str = "tokenvault_build_info";
pub const KEY_CREATED: &str = "tokenvault_key_created_timestamp_seconds";
pub const KEY_AGE: &str = "tokenvault_key_age_seconds";
pub const KEY_MAX_AGE: &str = "tokenvault_key_max_age_seconds";
pub const STORAGE_BYTES: &str = "tokenvault_storage_bytes";
pub const STORAGE_LIMIT: &str = "tokenvault_storage_limit_bytes";
pub const AUDIT_WRITE_FAILURES: &str = "tokenvault_audit_write_failures_total";
pub const TLS_CERT_EXPIRY: &str = "tokenvault_tls_certificate_expiry_timestamp_seconds";
pub const TLS_RELOADS: &str = "tokenvault_tls_reloads_total";
pub const PROXY_REQUESTS_TOTAL: &str = "tokenvault_proxy_requests_total";
pub const PROXY_REQUEST_DURATION: &str = "tokenvault_proxy_request_duration_seconds";

/// Request latency buckets, seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Commit latency buckets, seconds: 0.1 ms to 5 s (an fsync dominates).
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Items per group commit: powers of two up to the writer's default group size.
const GROUP_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The RPCs of `tokenvault.v1.TokenVaultService`, the only values of the `method` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Tokenize,
    TokenizeBatch,
    Detokenize,
    DetokenizeBatch,
    GetTokenInfo,
    DeleteToken,
    /// Any other path (health, reflection, unknown methods).
    Other,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Tokenize,
        Method::TokenizeBatch,
        Method::Detokenize,
        Method::DetokenizeBatch,
        Method::GetTokenInfo,
        Method::DeleteToken,
        Method::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Tokenize => "Tokenize",
            Method::TokenizeBatch => "TokenizeBatch",
            Method::Detokenize => "Detokenize",
            Method::DetokenizeBatch => "DetokenizeBatch",
            Method::GetTokenInfo => "GetTokenInfo",
            Method::DeleteToken => "DeleteToken",
            Method::Other => "other",
        }
    }

    /// From an HTTP/2 request path such as `/tokenvault.v1.TokenVaultService/Tokenize`.
    pub fn from_path(path: &str) -> Method {
        let Some(name) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(crate::grpc::SERVICE_NAME))
            .and_then(|p| p.strip_prefix('/'))
        else {
            return Method::Other;
        };
        Method::ALL
            .into_iter()
            .find(|m| *m != Method::Other && m.as_str() == name)
            .unwrap_or(Method::Other)
    }
}

/// The `grpc_code` label: the code names of the standard gRPC dashboards (grpc-go's
/// `codes.Code.String()`, as go-grpc-prometheus and the OpenTelemetry conventions use).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The `grpc_service` label of a [`Method`].
fn grpc_service(method: Method) -> &'static str {
    match method {
        Method::Other => "other",
        _ => crate::grpc::SERVICE_NAME,
    }
}

/// Outcome of a group commit, the only values of the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Ok,
    Error,
}

impl CommitOutcome {
    fn as_str(self) -> &'static str {
        match self {
            CommitOutcome::Ok => "ok",
            CommitOutcome::Error => "error",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot start the metrics listener on {addr}: {detail}")]
    Listen { addr: SocketAddr, detail: String },
    #[error("metrics are already installed: {0}")]
    AlreadyInstalled(String),
}

/// The exporter configuration shared by [`install`] and the tests: bucket boundaries turn
/// the duration and size distributions into Prometheus histograms.
pub fn builder() -> PrometheusBuilder {
    let set = |b: PrometheusBuilder, name: &str, buckets: &[f64]| {
        b.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .expect("bucket lists are not empty")
    };
    let b = PrometheusBuilder::new();
    let b = set(b, REQUEST_DURATION, LATENCY_BUCKETS);
    let b = set(b, COMMIT_DURATION, COMMIT_BUCKETS);
    let b = set(b, WAL_RESET_DURATION, COMMIT_BUCKETS);
    let b = set(b, PROXY_REQUEST_DURATION, LATENCY_BUCKETS);
    set(b, GROUP_COMMIT_ITEMS, GROUP_BUCKETS)
}

/// Starts the Prometheus listener on `listen` (plain HTTP; it carries no card data) and
/// installs the global recorder. Call once, from inside the Tokio runtime (e.g. at the top
/// of `serve`), before the server starts. Fails when the address cannot be bound or when a
/// recorder is already installed.
pub fn install(listen: SocketAddr) -> Result<PrometheusHandle, MetricsError> {
    let recorder = builder().build_recorder();
    let handle = recorder.handle();
    // Bind first: a taken port must not leave a recorder installed with nothing serving it.
    crate::probes::spawn(listen, handle.clone()).map_err(|e| MetricsError::Listen {
        addr: listen,
        detail: e.to_string(),
    })?;
    ::metrics::set_global_recorder(recorder)
        .map_err(|e| MetricsError::AlreadyInstalled(e.to_string()))?;
    describe();
    tracing::info!(metrics_addr = %listen, "Prometheus metrics on http://{listen}/metrics, probes on /livez and /readyz");
    Ok(handle)
}

/// Help texts and units of every metric (shown as `# HELP` lines).
pub fn describe() {
    use ::metrics::Unit;
    describe_counter!(
        PROXY_REQUESTS_TOTAL,
        "proxy requests answered, by configured route, status_class of the answer and \
         upstream_class of the upstream's status (none: the upstream was not reached)"
    );
    describe_histogram!(
        PROXY_REQUEST_DURATION,
        Unit::Seconds,
        "proxy request latency by route, substitution and upstream included"
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "gRPC requests answered, by grpc_service, grpc_method and grpc_code"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "gRPC request latency by method"
    );
    describe_histogram!(
        GROUP_COMMIT_ITEMS,
        Unit::Count,
        "write requests folded into one SQLite transaction (group commit)"
    );
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "time of one group commit, BEGIN to COMMIT returned"
    );
    describe_counter!(COMMITS_TOTAL, "group commits by outcome");
    describe_counter!(
        WAL_RESETS,
        "WAL resets by the writer once the WAL passed its bound, by outcome (done, busy)"
    );
    describe_histogram!(
        WAL_RESET_DURATION,
        Unit::Seconds,
        "time the writer paused to copy the WAL back and truncate it"
    );
    describe_gauge!(TOKENS_STORED, "live tokens in the vault");
    describe_counter!(
        KEY_ENCRYPTIONS,
        "encryptions made under each data-key version"
    );
    describe_gauge!(
        KEY_ENCRYPTION_LIMIT,
        "encryptions allowed per data-key version before rotation"
    );
    describe_gauge!(
        KEY_ACTIVE_VERSION,
        "the data-key version used for new tokens"
    );
    describe_counter!(
        AUDIT_RECORDS,
        "audit records committed (the sequence number of the newest)"
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        "audit records that could not be written (best-effort events and refusals)"
    );
    describe_gauge!(BUILD_INFO, "always 1; the labels name the running build");
    describe_gauge!(
        KEY_CREATED,
        Unit::Seconds,
        "creation time of each data-key version, Unix time"
    );
    describe_gauge!(KEY_AGE, Unit::Seconds, "age of each data-key version");
    describe_gauge!(
        KEY_MAX_AGE,
        Unit::Seconds,
        "age at which the active data-key version is rotated (absent: no limit)"
    );
    describe_gauge!(
        STORAGE_BYTES,
        Unit::Bytes,
        "size of the database files (main file and write-ahead log)"
    );
    describe_gauge!(
        STORAGE_LIMIT,
        Unit::Bytes,
        "limits.max_storage_bytes (absent: no limit)"
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "notAfter of the serving TLS certificate, Unix time"
    );
    describe_counter!(
        TLS_RELOADS,
        "TLS reloads (file change or SIGHUP) by outcome"
    );
    describe_counter!(
        RATE_LIMIT_REJECTIONS,
        "requests refused by a rate limit, by grpc_method"
    );
    process().describe();
    // Present from the start at 0, so rate() and increase() see the first event and an
    // alert on "absent" cannot mistake a quiet vault for a missing one.
    for m in Method::ALL.into_iter().filter(|m| *m != Method::Other) {
        counter!(RATE_LIMIT_REJECTIONS, "grpc_service" => grpc_service(m), "grpc_method" => m.as_str())
            .increment(0);
    }
    counter!(AUDIT_WRITE_FAILURES).increment(0);
    for outcome in [CommitOutcome::Ok, CommitOutcome::Error] {
        counter!(COMMITS_TOTAL, "outcome" => outcome.as_str()).increment(0);
    }
    for outcome in ["done", "busy"] {
        counter!(WAL_RESETS, "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "error"] {
        counter!(TLS_RELOADS, "outcome" => outcome).increment(0);
    }
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => build_commit()
    )
    .set(1.0);
}

/// The commit this binary was built from, as `--version` shows it (see `build.rs`).
pub fn build_commit() -> &'static str {
    crate::GIT_COMMIT
}

/// The process collector (RSS, open and maximum file descriptors, CPU seconds, threads,
/// start time) under the standard `process_*` names.
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process figures; called on each scrape.
pub fn collect_process() {
    process().collect();
}

/// One answered gRPC request: counts it by method and code and records its latency.
pub fn record_request(method: Method, code: tonic::Code, latency: Duration) {
    let service = grpc_service(method);
    let method = method.as_str();
    counter!(
        REQUESTS_TOTAL,
        "grpc_service" => service,
        "grpc_method" => method,
        "grpc_code" => grpc_code_name(code)
    )
    .increment(1);
    histogram!(REQUEST_DURATION, "grpc_service" => service, "grpc_method" => method)
        .record(latency.as_secs_f64());
}

/// [`record_request`] for a handler's result: `OK` for `Ok`, the status code otherwise.
pub fn record_result<T>(
    method: Method,
    started: std::time::Instant,
    result: &Result<T, tonic::Status>,
) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    record_request(method, code, started.elapsed());
}

/// One group commit of the store's writer: how many requests it carried, how long the
/// transaction took, and whether it committed.
pub fn record_group_commit(items: usize, latency: Duration, outcome: CommitOutcome) {
    histogram!(GROUP_COMMIT_ITEMS).record(items as f64);
    histogram!(COMMIT_DURATION).record(latency.as_secs_f64());
    counter!(COMMITS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

/// [`crate::store::WalResetObserver`]: the writer reset the WAL (or tried to: `done` false
/// when readers or another process kept the checkpoint from finishing).
pub fn record_wal_reset(latency: Duration, done: bool) {
    histogram!(WAL_RESET_DURATION).record(latency.as_secs_f64());
    counter!(WAL_RESETS, "outcome" => if done { "done" } else { "busy" }).increment(1);
}

/// [`crate::store::CommitObserver`]: the store reports each group commit here.
pub fn observe_store_commit(items: usize, latency: Duration, ok: bool) {
    let outcome = if ok {
        CommitOutcome::Ok
    } else {
        CommitOutcome::Error
    };
    record_group_commit(items, latency, outcome);
}

/// Live tokens in the vault (set after a commit or from a periodic count).
pub fn set_tokens_stored(count: u64) {
    gauge!(TOKENS_STORED).set(count as f64);
}

/// Usage of one data-key version: encryptions so far and the limit that triggers rotation.
pub fn set_key_usage(version: u32, encryptions: u64, limit: u64) {
    let version = version.to_string();
    counter!(KEY_ENCRYPTIONS, "version" => version.clone()).absolute(encryptions);
    gauge!(KEY_ENCRYPTION_LIMIT, "version" => version).set(limit as f64);
}

/// The active data-key version.
pub fn set_active_key_version(version: u32) {
    gauge!(KEY_ACTIVE_VERSION).set(f64::from(version));
}

/// Sequence number of the newest committed audit record.
pub fn set_audit_head(sequence: u64) {
    counter!(AUDIT_RECORDS).absolute(sequence);
}

/// An audit record that could not be written.
pub fn record_audit_write_failure() {
    counter!(AUDIT_WRITE_FAILURES).increment(1);
}

/// Creation time and age of one data-key version.
pub fn set_key_age(version: u32, created_unix_seconds: f64, now_unix_seconds: f64) {
    let version = version.to_string();
    gauge!(KEY_CREATED, "version" => version.clone()).set(created_unix_seconds);
    gauge!(KEY_AGE, "version" => version).set((now_unix_seconds - created_unix_seconds).max(0.0));
}

/// The limits alerts compare against: rotation age and storage size (`None` = unlimited,
/// then the gauge is not exported).
pub fn set_limits(key_max_age: Option<Duration>, max_storage_bytes: Option<u64>) {
    if let Some(age) = key_max_age {
        gauge!(KEY_MAX_AGE).set(age.as_secs_f64());
    }
    if let Some(bytes) = max_storage_bytes {
        gauge!(STORAGE_LIMIT).set(bytes as f64);
    }
}

/// Size of the database files in `data_dir` (main file and write-ahead log).
pub fn set_storage_size(data_dir: &std::path::Path) {
    let db = crate::store::sqlite::DB_FILE;
    let bytes: u64 = [db.to_owned(), format!("{db}-wal")]
        .iter()
        .filter_map(|f| std::fs::metadata(data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    gauge!(STORAGE_BYTES).set(bytes as f64);
}

/// How often [`spawn_gauge_refresher`] refreshes the gauges that need store queries.
pub const GAUGE_REFRESH: Duration = Duration::from_secs(10);

/// Refreshes, off the request path, the gauges that need store queries: tokens stored, key
/// usage per version, the active key version and the audit head. Runs at once, then every
/// `every`; when a refresh takes long (the per-version token count scans the token table)
/// the next one waits at least 20 times as long, so it never takes more than about 5% of
/// one reader connection. Start it only when metrics are installed; abort it at shutdown.
pub fn spawn_gauge_refresher(
    vault: crate::vault::Vault,
    data_dir: std::path::PathBuf,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            refresh_gauges(&vault).await;
            set_storage_size(&data_dir);
            let pause = every.max(started.elapsed() * 20);
            tokio::time::sleep(pause).await;
        }
    })
}

/// One refresh of the store gauges; failures are logged at debug level and the gauges keep
/// their last values (storage health has its own signal).
pub async fn refresh_gauges(vault: &crate::vault::Vault) {
    match vault.list_keys().await {
        Ok(keys) => {
            // Rows holding a ciphertext: live tokens (deleted and purged ones have none).
            set_tokens_stored(keys.iter().map(|k| k.rows).sum());
            let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
            for k in &keys {
                set_key_usage(k.version, k.encryptions, k.max_encryptions);
                set_key_age(k.version, k.created_at as f64 / 1e6, now);
                if k.state == crate::vault::KeyState::Active {
                    set_active_key_version(k.version);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "metrics: cannot read key usage"),
    }
    match vault.audit_head_seq().await {
        Ok(seq) => set_audit_head(seq),
        Err(e) => tracing::debug!(error = %e, "metrics: cannot read the audit head"),
    }
}

/// `notAfter` of the serving certificate, Unix seconds.
pub fn set_tls_cert_expiry(not_after: i64) {
    gauge!(TLS_CERT_EXPIRY).set(not_after as f64);
}

/// One TLS reload attempt and the expiry of the certificate serving afterwards.
pub fn record_tls_reload(ok: bool, not_after: i64) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(TLS_RELOADS, "outcome" => outcome).increment(1);
    set_tls_cert_expiry(not_after);
}

/// One answered proxy request. `route` is a configured route's name (from the
/// configuration file, never from the request) or `unknown`; the statuses become classes.
pub fn record_proxy_request(
    route: &str,
    status: u16,
    upstream_status: Option<u16>,
    latency: Duration,
) {
    fn class(s: u16) -> &'static str {
        match s {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        }
    }
    let route = route.to_owned();
    counter!(
        PROXY_REQUESTS_TOTAL,
        "route" => route.clone(),
        "status_class" => class(status),
        "upstream_class" => upstream_status.map_or("none", class)
    )
    .increment(1);
    histogram!(PROXY_REQUEST_DURATION, "route" => route).record(latency.as_secs_f64());
}

/// A request refused by a rate limit (counted per request, not per batch item).
pub fn record_rate_limited(method: Method) {
    counter!(RATE_LIMIT_REJECTIONS, "grpc_service" => grpc_service(method), "grpc_method" => method.as_str())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(f: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            f();
        });
        handle.render()
    }

    #[test]
    fn exposition_has_names_labels_and_buckets() {
        let text = render(|| {
            record_request(Method::Tokenize, tonic::Code::Ok, Duration::from_millis(3));
            record_request(
                Method::Detokenize,
                tonic::Code::PermissionDenied,
                Duration::from_micros(800),
            );
            record_group_commit(17, Duration::from_millis(2), CommitOutcome::Ok);
            record_group_commit(1, Duration::from_millis(1), CommitOutcome::Error);
            set_tokens_stored(42);
            set_key_usage(3, 1000, 1 << 30);
            set_active_key_version(3);
            set_audit_head(99);
            record_rate_limited(Method::DetokenizeBatch);
            set_key_age(3, 1_700_000_000.0, 1_700_086_400.0);
            set_limits(Some(Duration::from_secs(90 * 86400)), Some(10 << 30));
        });
        for needle in [
            "# TYPE tokenvault_grpc_requests_total counter",
            "# TYPE tokenvault_store_commits_total counter",
            r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Tokenize",grpc_code="OK"} 1"#,
            r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Detokenize",grpc_code="PermissionDenied"} 1"#,
            "# TYPE tokenvault_grpc_request_duration_seconds histogram",
            r#"tokenvault_grpc_request_duration_seconds_bucket{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Tokenize",le="0.005"} 1"#,
            r#"tokenvault_grpc_request_duration_seconds_count{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Detokenize"} 1"#,
            r#"tokenvault_store_group_commit_items_bucket{le="32"} 2"#,
            "tokenvault_store_group_commit_items_sum 18",
            "tokenvault_store_commit_duration_seconds_count 2",
            r#"tokenvault_store_commits_total{outcome="ok"} 1"#,
            r#"tokenvault_store_commits_total{outcome="error"} 1"#,
            "tokenvault_tokens_stored 42",
            "# TYPE tokenvault_key_encryptions_total counter",
            r#"tokenvault_key_encryptions_total{version="3"} 1000"#,
            r#"tokenvault_key_encryption_limit{version="3"} 1073741824"#,
            "tokenvault_key_active_version 3",
            "# TYPE tokenvault_audit_records_total counter",
            "tokenvault_audit_records_total 99",
            r#"tokenvault_rate_limit_rejections_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="DetokenizeBatch"} 1"#,
            // Present at 0 before anything happened.
            r#"tokenvault_rate_limit_rejections_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="Detokenize"} 0"#,
            "tokenvault_audit_write_failures_total 0",
            r#"tokenvault_tls_reloads_total{outcome="error"} 0"#,
            r#"tokenvault_key_age_seconds{version="3"} 86400"#,
            r#"tokenvault_key_created_timestamp_seconds{version="3"} 1700000000"#,
            "tokenvault_key_max_age_seconds 7776000",
            "tokenvault_storage_limit_bytes 10737418240",
            &format!(
                r#"tokenvault_build_info{{version="{}",commit="{}"}} 1"#,
                env!("CARGO_PKG_VERSION"),
                build_commit()
            ),
            "# HELP tokenvault_grpc_requests_total",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn labels_come_only_from_fixed_sets() {
        let text = render(|| {
            for m in Method::ALL {
                record_request(m, tonic::Code::InvalidArgument, Duration::ZERO);
            }
            set_key_usage(1, 1, 2);
        });
        let allowed_keys = [
            "grpc_service",
            "grpc_method",
            "grpc_code",
            "outcome",
            "version",
            "commit",
            "le",
            "quantile",
        ];
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('{'))
        {
            let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
            for pair in labels.split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                assert!(allowed_keys.contains(&k), "label {k} in {line}");
                let v = v.trim_matches('"');
                assert!(
                    v.len() <= 40
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.+".contains(c)),
                    "label value {v:?} in {line}"
                );
                // Nothing that looks like a card number or a token.
                assert!(!v.starts_with("tok_"), "{line}");
                assert!(
                    v.chars().filter(char::is_ascii_digit).count() < 12,
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn proxy_requests_by_route_and_status_class() {
        let text = render(|| {
            record_proxy_request("psp", 200, Some(201), Duration::from_millis(40));
            record_proxy_request("psp", 502, None, Duration::from_millis(1));
        });
        assert!(text.contains(
            r#"tokenvault_proxy_requests_total{route="psp",status_class="2xx",upstream_class="2xx"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"tokenvault_proxy_requests_total{route="psp",status_class="5xx",upstream_class="none"} 1"#
        ), "{text}");
        assert!(
            text.contains(
                r#"tokenvault_proxy_request_duration_seconds_bucket{route="psp",le="0.05"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn method_from_path() {
        for m in Method::ALL.into_iter().filter(|m| *m != Method::Other) {
            let path = format!("/{}/{}", crate::grpc::SERVICE_NAME, m.as_str());
            assert_eq!(Method::from_path(&path), m);
        }
        for other in [
            "/grpc.health.v1.Health/Check",
            "/tokenvault.v1.TokenVaultService/4111111111111111",
            "/tokenvault.v1.TokenVaultService",
            "",
        ] {
            assert_eq!(Method::from_path(other), Method::Other, "{other}");
        }
    }

    #[tokio::test]
    async fn install_serves_the_exposition_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A free port: bind, read it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let _handle = install(addr).unwrap();
        record_request(
            Method::GetTokenInfo,
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        assert!(matches!(
            install(addr),
            Err(MetricsError::Listen { .. } | MetricsError::AlreadyInstalled(_))
        ));

        let get = |path: &'static str| async move {
            let mut body = String::new();
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    let req =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    s.write_all(req.as_bytes()).await.unwrap();
                    s.read_to_string(&mut body).await.unwrap();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            body
        };
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        // Process figures under the standard names, read at scrape time.
        for name in [
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(body.contains(name), "no {name} in {body}");
        }
        assert!(
            body.contains(
                r#"tokenvault_grpc_requests_total{grpc_service="tokenvault.v1.TokenVaultService",grpc_method="GetTokenInfo",grpc_code="NotFound"} 1"#
            ),
            "{body}"
        );
        // A health check against a wrong path must fail, not get the exposition.
        for path in ["/", "/metricz", "/healthz", "/livez/x"] {
            let body = get(path).await;
            assert!(body.starts_with("HTTP/1.1 404"), "{path}: {body}");
        }
        assert!(get("/livez").await.starts_with("HTTP/1.1 200"));
        // Not ready until a vault is open, ready while it can write, not ready once closed.
        let body = get("/readyz").await;
        assert!(
            body.starts_with("HTTP/1.1 503") && body.ends_with("starting\n"),
            "{body}"
        );
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::vault::Vault::create(
            crate::vault::VaultConfig::new(dir.path().join("v")),
            &crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        crate::probes::probes().attach(vault.clone());
        let body = get("/readyz").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        vault.close().await;
        let body = get("/readyz").await;
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        assert!(get("/livez").await.starts_with("HTTP/1.1 200"));
    }
}
