//! The load generator behind `tokenvault bench`: drives any tokenvault server over real gRPC
//! and measures throughput, latency (HDR histogram) and errors by gRPC code.
//!
//! Design, so that it measures the server and not itself:
//! - every in-flight slot is its own task with its own clone of a tonic client (clients share
//!   one of `connections` HTTP/2 channels) and its own histogram: no locks on the hot path;
//! - test card numbers are generated before the run ([`pans::PanGenerator`]); a request
//!   costs one small string copy per card number;
//! - closed loop by default (each slot sends its next request when the previous answered);
//!   with a target rate, open loop: one pacer thread sets the send times ([`Pacer`]), the
//!   next free slot sends at each, and latency is counted from the *scheduled* send time, so
//!   a stalled server cannot hide its queueing delay (no coordinated omission).
//!
//! Card numbers are synthetic but treated as card data: nothing here prints or logs them,
//! nor the PANs a server returns.

pub mod pans;
pub mod reference;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::auth::Role;
use crate::crypto::MasterKey;
use crate::grpc::client::{with_auth, BearerAuth, Client};
use crate::grpc::pb;
use crate::grpc::server::{serve, ServerConfig};
use crate::vault::{Caller, Vault, VaultConfig};

/// Largest latency the histograms hold (longer ones are recorded as this), in microseconds.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Items per TokenizeBatch call while prefilling.
const PREFILL_BATCH: usize = 1000;
/// TokenizeBatch calls in flight while prefilling.
const PREFILL_CONCURRENCY: usize = 4;
/// Tokens a detokenize run needs at least; `--prefill` below it is raised to it.
pub const DEFAULT_PREFILL: usize = 10_000;
/// Reason sent with every detokenize call (recorded in the server's audit trail).
pub const BENCH_REASON: &str = "tokenvault-bench";

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Tokenize,
    TokenizeBatch,
    Detokenize,
    DetokenizeBatch,
    /// Single tokenize and detokenize calls, `mix` percent of them tokenize.
    Mixed,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Tokenize => "tokenize",
            Op::TokenizeBatch => "tokenize-batch",
            Op::Detokenize => "detokenize",
            Op::DetokenizeBatch => "detokenize-batch",
            Op::Mixed => "mixed",
        }
    }
    fn needs_tokens(self) -> bool {
        matches!(self, Op::Detokenize | Op::DetokenizeBatch | Op::Mixed)
    }
    fn needs_tokenize_key(self) -> bool {
        matches!(self, Op::Tokenize | Op::TokenizeBatch | Op::Mixed) || self.needs_tokens()
    }
    fn is_batch(self) -> bool {
        matches!(self, Op::TokenizeBatch | Op::DetokenizeBatch)
    }
}

/// When the measured part of a run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Duration(Duration),
    Requests(u64),
}

/// Everything a run needs. (No `Debug` derive: it holds API keys.)
#[derive(Clone)]
pub struct BenchConfig {
    /// `http://host:port` or `https://host:port`.
    pub addr: String,
    /// API key for tokenize calls (and prefill).
    pub tokenize_key: Option<String>,
    /// API key for detokenize calls.
    pub detokenize_key: Option<String>,
    /// PEM CA certificate to verify a TLS server with.
    pub tls_ca: Option<PathBuf>,
    pub op: Op,
    /// Percent of tokenize calls in a mixed run.
    pub mix: u8,
    pub batch_size: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    pub connections: usize,
    pub stop: Stop,
    pub warmup: Duration,
    /// Tokens created (in batches) before a detokenize or mixed run.
    pub prefill: usize,
    pub seed: u64,
    /// Open-loop target rate in requests per second; `None` = closed loop.
    pub rate: Option<f64>,
    pub format: pb::TokenFormat,
    /// Distinct card numbers generated before the run and cycled through.
    pub pan_pool: usize,
    /// A progress line on standard error each second.
    pub progress: bool,
}

impl std::fmt::Debug for BenchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchConfig")
            .field("addr", &self.addr)
            .field("op", &self.op)
            .field("concurrency", &self.concurrency)
            .field("connections", &self.connections)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl BenchConfig {
    /// Defaults for `op` against `addr` with one key for everything.
    pub fn new(addr: impl Into<String>, api_key: Option<String>, op: Op) -> BenchConfig {
        BenchConfig {
            addr: addr.into(),
            tokenize_key: api_key.clone(),
            detokenize_key: api_key,
            tls_ca: None,
            op,
            mix: 80,
            batch_size: 100,
            concurrency: 64,
            connections: 2,
            stop: Stop::Duration(Duration::from_secs(10)),
            warmup: Duration::from_secs(2),
            prefill: 0,
            seed: 1,
            rate: None,
            format: pb::TokenFormat::Opaque,
            pan_pool: 100_000,
            progress: false,
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let usage = |m: &str| Err(BenchError::Usage(m.into()));
        if self.concurrency == 0 {
            return usage("--concurrency must be at least 1");
        }
        if self.connections == 0 {
            return usage("--connections must be at least 1");
        }
        if self.batch_size == 0 {
            return usage("--batch-size must be at least 1");
        }
        if self.mix > 100 {
            return usage("--mix is a percentage, 0 to 100");
        }
        if matches!(self.stop, Stop::Requests(0)) {
            return usage("--requests must be at least 1");
        }
        if matches!(self.stop, Stop::Duration(d) if d.is_zero()) {
            return usage("--duration must be positive");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return usage("--rate must be a positive number of requests per second");
            }
        }
        if self.op.needs_tokenize_key() && self.tokenize_key.is_none() {
            return usage("no API key for tokenize calls: set TOKENVAULT_API_KEY (or --api-key / --tokenize-key)");
        }
        if self.op.needs_tokens() && self.detokenize_key.is_none() {
            return usage("no API key for detokenize calls: set TOKENVAULT_API_KEY (or --api-key / --detokenize-key)");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the server at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("{0}")]
    Failed(String),
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Per-RPC figures of a run (one entry per RPC method used).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RpcStats {
    pub requests: u64,
    pub ok: u64,
    pub ops_per_s: f64,
    pub latency: Latency,
}

/// The result of a run; `--json` prints it as is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub op: Op,
    pub addr: String,
    pub concurrency: usize,
    pub connections: usize,
    pub batch_size: usize,
    /// Percent tokenize in a mixed run.
    pub mix: Option<u8>,
    /// Open-loop target rate (requests/s); absent for closed loop.
    pub target_rate: Option<f64>,
    pub warmup_s: f64,
    /// Tokens created before the run.
    pub prefilled: u64,
    /// Length of the measured window.
    pub duration_s: f64,
    /// RPCs completed in the measured window, failed ones included.
    pub requests: u64,
    /// RPCs that returned OK.
    pub ok: u64,
    /// RPCs that failed, any code.
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    /// Items of OK batch responses that carried a per-item error.
    pub item_errors: u64,
    /// OK RPCs per second.
    pub ops_per_s: f64,
    /// Card numbers tokenized or revealed per second (successful items; = ops/s for single calls).
    pub pans_per_s: f64,
    /// Latency of all measured RPCs, microseconds (from the scheduled send time when paced).
    pub latency: Latency,
    pub by_rpc: BTreeMap<String, RpcStats>,
}

impl BenchReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out = String::new();
        let mode = match self.target_rate {
            Some(r) => format!("open loop at {} req/s", group(r.round() as u64)),
            None => "closed loop".into(),
        };
        out.push_str(&format!(
            "tokenvault bench: {} against {}\n",
            self.op.name(),
            self.addr
        ));
        let mut shape = format!(
            "  {} in flight over {} connection(s), {mode}",
            self.concurrency, self.connections
        );
        if self.op.is_batch() {
            shape.push_str(&format!(", batches of {}", self.batch_size));
        }
        if let Some(m) = self.mix {
            shape.push_str(&format!(", {m}% tokenize"));
        }
        out.push_str(&shape);
        out.push('\n');
        out.push_str(&format!(
            "  measured {:.1} s after {:.1} s warm-up{}\n",
            self.duration_s,
            self.warmup_s,
            if self.prefilled > 0 {
                format!(", {} tokens prefilled", group(self.prefilled))
            } else {
                String::new()
            }
        ));
        out.push_str(&format!(
            "  requests    {} ok, {} failed\n",
            group(self.ok),
            group(self.errors)
        ));
        out.push_str(&format!(
            "  throughput  {} ops/s",
            group(self.ops_per_s.round() as u64)
        ));
        if self.op.is_batch() {
            out.push_str(&format!(
                ", {} PANs/s",
                group(self.pans_per_s.round() as u64)
            ));
        }
        out.push('\n');
        let l = &self.latency;
        out.push_str(&format!(
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})\n",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            l.mean_us / 1000.0
        ));
        if self.by_rpc.len() > 1 {
            for (name, s) in &self.by_rpc {
                out.push_str(&format!(
                    "    {name:<17} {} ops/s  p50 {:.3}  p99 {:.3}  max {:.3}\n",
                    group(s.ops_per_s.round() as u64),
                    ms(s.latency.p50_us),
                    ms(s.latency.p99_us),
                    ms(s.latency.max_us)
                ));
            }
        }
        if self.errors_by_code.is_empty() {
            out.push_str("  errors      none\n");
        } else {
            let list: Vec<String> = self
                .errors_by_code
                .iter()
                .map(|(c, n)| format!("{c} {}", group(*n)))
                .collect();
            out.push_str(&format!("  errors      {}\n", list.join(", ")));
        }
        if self.item_errors > 0 {
            out.push_str(&format!(
                "  batch items with errors: {}\n",
                group(self.item_errors)
            ));
        }
        out
    }
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Connecting

async fn connect_channels(cfg: &BenchConfig) -> Result<Vec<Channel>, BenchError> {
    let connect_err = |detail: String| BenchError::Connect {
        addr: cfg.addr.clone(),
        detail,
    };
    let mut endpoint = Endpoint::from_shared(cfg.addr.clone())
        .map_err(|e| BenchError::Usage(format!("--addr {}: {e}", cfg.addr)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if let Some(ca) = &cfg.tls_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| BenchError::Usage(format!("cannot read {}: {e}", ca.display())))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| BenchError::Usage(format!("TLS configuration: {e}")))?;
    }
    let mut channels = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        // `connect` opens one HTTP/2 connection per call; clones of a channel share it.
        let ch = endpoint
            .connect()
            .await
            .map_err(|e| connect_err(crate::grpc::client::error_chain(&e)))?;
        channels.push(ch);
    }
    Ok(channels)
}

fn client(channel: &Channel, key: Option<&str>) -> Result<Client, BenchError> {
    let auth = BearerAuth::new(key).map_err(|e| BenchError::Usage(e.into()))?;
    Ok(with_auth(channel.clone(), auth))
}

// ---------------------------------------------------------------------------------------
// Prefill

/// Creates `n` tokens with TokenizeBatch calls and returns them.
async fn prefill(
    cfg: &BenchConfig,
    channels: &[Channel],
    pans: &Arc<Vec<String>>,
) -> Result<Vec<String>, BenchError> {
    let n = cfg.prefill;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let batches = n.div_ceil(PREFILL_BATCH) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..PREFILL_CONCURRENCY.min(batches as usize).max(1) {
        let mut c = client(&channels[i % channels.len()], cfg.tokenize_key.as_deref())?;
        let (next, done, pans) = (next.clone(), done.clone(), pans.clone());
        let format = cfg.format as i32;
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let first = b as usize * PREFILL_BATCH;
                let count = PREFILL_BATCH.min(n - first);
                let requests = (first..first + count)
                    .map(|k| pb::TokenizeRequest {
                        pan: pans[k % pans.len()].clone(),
                        format,
                        reuse_existing: false,
                        expires_at: None,
                    })
                    .collect();
                let resp = c
                    .tokenize_batch(pb::TokenizeBatchRequest { requests })
                    .await
                    .map_err(|s| {
                        BenchError::Failed(format!(
                            "prefill: TokenizeBatch failed with {}: {}",
                            code_name(s.code()),
                            s.message()
                        ))
                    })?
                    .into_inner();
                for r in resp.results {
                    match r.outcome {
                        Some(pb::tokenize_batch_result::Outcome::Success(s)) => {
                            tokens.push(s.token)
                        }
                        Some(pb::tokenize_batch_result::Outcome::Error(e)) => {
                            return Err(BenchError::Failed(format!(
                                "prefill: a batch item failed with code {}: {}",
                                e.code, e.message
                            )))
                        }
                        None => {
                            return Err(BenchError::Failed(
                                "prefill: a batch result has no outcome".into(),
                            ))
                        }
                    }
                }
                done.fetch_add(count as u64, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(tokens)
        }));
    }
    // A bar on a terminal (indicatif), a plain line a second otherwise.
    let bar = (cfg.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| crate::cli::common::progress_bar("prefill", "tokens"));
    if let Some(bar) = &bar {
        bar.set_length(n as u64);
    }
    let reporter = cfg.progress.then(|| {
        let done = done.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                if let Some(bar) = &bar {
                    bar.set_position(d);
                    continue;
                }
                eprintln!(
                    "[prefill {:>4.0}s] {}/{} tokens ({:.0}/s)",
                    started.elapsed().as_secs_f64(),
                    group(d),
                    group(n as u64),
                    d as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    });
    let mut tokens = Vec::with_capacity(n);
    let mut failure = None;
    for t in tasks {
        match t.await {
            Ok(Ok(mut v)) => tokens.append(&mut v),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(BenchError::Failed(format!("prefill task: {e}")))),
        }
    }
    if let Some(r) = reporter {
        r.abort();
    }
    if let Some(bar) = bar {
        bar.set_position(tokens.len() as u64);
        crate::cli::common::finish_bar(&bar);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(tokens),
    }
}

// ---------------------------------------------------------------------------------------
// The run

/// State shared by the workers: counters for progress and the stop conditions.
struct Shared {
    /// When measuring starts (end of warm-up).
    measure_from: Instant,
    /// End of the measured window in duration mode.
    deadline: Option<Instant>,
    /// Requests claimed in the measured window (requests mode).
    claimed: AtomicU64,
    limit: Option<u64>,
    stop: AtomicBool,
    /// All completed RPCs (warm-up included), for the progress line.
    completed: AtomicU64,
    failed: AtomicU64,
}

/// Send times of an open-loop run, from one thread that sleeps on the kernel's
/// high-resolution timers. Not a `tokio::time::sleep_until` per request: tokio's timer wheel
/// ticks once a millisecond, so every request went out up to 1 ms late, in bursts at each
/// tick, and that lateness counted in every latency, the no-op reference's too (BENCHMARKS.md,
/// "Stop 26"). Slots take the next time from one queue, in order.
struct Pacer {
    next: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>,
}

impl Pacer {
    /// Times `start + k / rate` until `end` (or until every slot has gone).
    fn start(rate: f64, start: Instant, end: Option<Instant>) -> std::io::Result<Arc<Pacer>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                // Wake at the time asked, not up to 50 µs later (the default timer slack).
                // SAFETY: PR_SET_TIMERSLACK takes one integer and affects this thread only.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                for k in 0u64.. {
                    let at = start + Duration::from_secs_f64(k as f64 / rate);
                    if end.is_some_and(|e| at >= e) {
                        break;
                    }
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if tx.send(at).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Arc::new(Pacer {
            next: tokio::sync::Mutex::new(rx),
        }))
    }

    /// The next scheduled send time; None once the schedule has ended.
    async fn next(&self) -> Option<Instant> {
        self.next.lock().await.recv().await
    }
}

/// What one worker measured.
struct WorkerResult {
    /// Per RPC kind: histogram, requests, ok.
    hist: [Histogram<u64>; 2],
    requests: [u64; 2],
    ok: [u64; 2],
    ok_items: u64,
    item_errors: u64,
    errors: BTreeMap<&'static str, u64>,
    last_done: Option<Instant>,
}

/// Index into [`WorkerResult`] arrays.
const TOK: usize = 0;
const DETOK: usize = 1;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

struct Worker {
    id: usize,
    cfg: Arc<BenchConfig>,
    shared: Arc<Shared>,
    tok: Option<Client>,
    detok: Option<Client>,
    pans: Arc<Vec<String>>,
    tokens: Arc<Vec<String>>,
    /// Open loop: the send times (closed loop: none).
    pacer: Option<Arc<Pacer>>,
}

impl Worker {
    async fn run(mut self) -> WorkerResult {
        let cfg = self.cfg.clone();
        let shared = self.shared.clone();
        let mut res = WorkerResult {
            hist: [new_histogram(), new_histogram()],
            requests: [0; 2],
            ok: [0; 2],
            ok_items: 0,
            item_errors: 0,
            errors: BTreeMap::new(),
            last_done: None,
        };
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (self.id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let stride = cfg.concurrency;
        // Each worker walks its own residue class of the pools, so workers do not collide.
        let mut pan_cursor = self.id * cfg.batch_size.max(1);
        let mut token_cursor = if self.tokens.is_empty() {
            0
        } else {
            rng.gen_range(0..self.tokens.len())
        };
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let start = match &self.pacer {
                Some(pacer) => match pacer.next().await {
                    Some(at) => at,
                    None => break,
                },
                None => Instant::now(),
            };
            if let Some(d) = shared.deadline {
                if start >= d {
                    break;
                }
            }
            let measured = start >= shared.measure_from;
            if measured {
                if let Some(limit) = shared.limit {
                    if shared.claimed.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                }
            }
            let kind = match cfg.op {
                Op::Tokenize | Op::TokenizeBatch => TOK,
                Op::Detokenize | Op::DetokenizeBatch => DETOK,
                Op::Mixed => {
                    if rng.gen_range(0..100u8) < cfg.mix {
                        TOK
                    } else {
                        DETOK
                    }
                }
            };
            let outcome = match cfg.op {
                Op::Tokenize | Op::Mixed if kind == TOK => {
                    let pan = self.pans[pan_cursor % self.pans.len()].clone();
                    pan_cursor = pan_cursor.wrapping_add(stride);
                    self.tokenize(pan).await
                }
                Op::Detokenize | Op::Mixed => {
                    let token = self.tokens[token_cursor % self.tokens.len()].clone();
                    token_cursor = token_cursor.wrapping_add(stride);
                    self.detokenize(token).await
                }
                Op::TokenizeBatch => {
                    let n = cfg.batch_size;
                    let pans = &self.pans;
                    let requests = (0..n)
                        .map(|k| pb::TokenizeRequest {
                            pan: pans[(pan_cursor + k) % pans.len()].clone(),
                            format: cfg.format as i32,
                            reuse_existing: false,
                            expires_at: None,
                        })
                        .collect();
                    pan_cursor = pan_cursor.wrapping_add(n * stride);
                    self.tokenize_batch(requests).await
                }
                Op::DetokenizeBatch => {
                    let n = cfg.batch_size;
                    let tokens = &self.tokens;
                    let requests = (0..n)
                        .map(|k| pb::DetokenizeRequest {
                            token: tokens[(token_cursor + k) % tokens.len()].clone(),
                            reason: BENCH_REASON.to_owned(),
                        })
                        .collect();
                    token_cursor = token_cursor.wrapping_add(n * stride);
                    self.detokenize_batch(requests).await
                }
                Op::Tokenize => unreachable!("tokenize is always TOK"),
            };
            let done = Instant::now();
            shared.completed.fetch_add(1, Ordering::Relaxed);
            if outcome.is_err() {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            if !measured || shared.deadline.is_some_and(|d| done > d) {
                continue;
            }
            let us = done.duration_since(start).as_micros() as u64;
            res.hist[kind].saturating_record(us.clamp(1, MAX_LATENCY_US));
            res.requests[kind] += 1;
            res.last_done = Some(done);
            match outcome {
                Ok((ok_items, bad_items)) => {
                    res.ok[kind] += 1;
                    res.ok_items += ok_items;
                    res.item_errors += bad_items;
                }
                Err(code) => *res.errors.entry(code).or_insert(0) += 1,
            }
        }
        res
    }

    async fn tokenize(&mut self, pan: String) -> Result<(u64, u64), &'static str> {
        let c = self.tok.as_mut().expect("tokenize client");
        let req = pb::TokenizeRequest {
            pan,
            format: self.cfg.format as i32,
            reuse_existing: false,
            expires_at: None,
        };
        match c.tokenize(req).await {
            Ok(r) if !r.get_ref().token.is_empty() => Ok((1, 0)),
            Ok(_) => Err("EMPTY_RESPONSE"),
            Err(s) => Err(code_name(s.code())),
        }
    }

    async fn detokenize(&mut self, token: String) -> Result<(u64, u64), &'static str> {
        let c = self.detok.as_mut().expect("detokenize client");
        let req = pb::DetokenizeRequest {
            token,
            reason: BENCH_REASON.to_owned(),
        };
        match c.detokenize(req).await {
            // The PAN is checked for presence only and dropped, never shown.
            Ok(r) if !r.get_ref().pan.is_empty() => Ok((1, 0)),
            Ok(_) => Err("EMPTY_RESPONSE"),
            Err(s) => Err(code_name(s.code())),
        }
    }

    async fn tokenize_batch(
        &mut self,
        requests: Vec<pb::TokenizeRequest>,
    ) -> Result<(u64, u64), &'static str> {
        let c = self.tok.as_mut().expect("tokenize client");
        match c
            .tokenize_batch(pb::TokenizeBatchRequest { requests })
            .await
        {
            Ok(r) => {
                let ok = r
                    .get_ref()
                    .results
                    .iter()
                    .filter(|x| {
                        matches!(
                            x.outcome,
                            Some(pb::tokenize_batch_result::Outcome::Success(_))
                        )
                    })
                    .count() as u64;
                Ok((ok, r.get_ref().results.len() as u64 - ok))
            }
            Err(s) => Err(code_name(s.code())),
        }
    }

    async fn detokenize_batch(
        &mut self,
        requests: Vec<pb::DetokenizeRequest>,
    ) -> Result<(u64, u64), &'static str> {
        let c = self.detok.as_mut().expect("detokenize client");
        match c
            .detokenize_batch(pb::DetokenizeBatchRequest { requests })
            .await
        {
            Ok(r) => {
                let ok = r
                    .get_ref()
                    .results
                    .iter()
                    .filter(|x| {
                        matches!(
                            x.outcome,
                            Some(pb::detokenize_batch_result::Outcome::Success(_))
                        )
                    })
                    .count() as u64;
                Ok((ok, r.get_ref().results.len() as u64 - ok))
            }
            Err(s) => Err(code_name(s.code())),
        }
    }
}

/// gRPC code names as the proto spells them.
pub fn code_name(code: tonic::Code) -> &'static str {
    crate::cli::common::code_name(code)
}

/// Runs a benchmark as configured and returns its report. Prints progress lines on standard
/// error when `cfg.progress` is set, and nothing else.
pub async fn run(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    let mut cfg = cfg;
    cfg.validate()?;
    if cfg.op.needs_tokens() && cfg.prefill == 0 {
        cfg.prefill = DEFAULT_PREFILL;
    }
    let cfg = Arc::new(cfg);
    let channels = connect_channels(&cfg).await?;

    // Card numbers for the run, and a separate stream for prefill.
    let pool = cfg.pan_pool.max(cfg.batch_size).max(1);
    let pans = Arc::new(pans::PanGenerator::new(cfg.seed).take(pool));
    let tokens = if cfg.prefill > 0 {
        let prefill_pans =
            Arc::new(pans::PanGenerator::new(cfg.seed.wrapping_add(1)).take(cfg.prefill.min(pool)));
        prefill(&cfg, &channels, &prefill_pans).await?
    } else {
        Vec::new()
    };
    let prefilled = tokens.len() as u64;
    if cfg.op.needs_tokens() && tokens.is_empty() {
        return Err(BenchError::Failed(
            "prefill created no tokens to detokenize".into(),
        ));
    }
    let tokens = Arc::new(tokens);

    let started = Instant::now();
    let measure_from = started + cfg.warmup;
    let (deadline, limit) = match cfg.stop {
        Stop::Duration(d) => (Some(measure_from + d), None),
        Stop::Requests(n) => (None, Some(n)),
    };
    let shared = Arc::new(Shared {
        measure_from,
        deadline,
        claimed: AtomicU64::new(0),
        limit,
        stop: AtomicBool::new(false),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });

    let pacer = match cfg.rate {
        Some(rate) => Some(
            Pacer::start(rate, started, deadline)
                .map_err(|e| BenchError::Failed(format!("cannot start the pacer thread: {e}")))?,
        ),
        None => None,
    };
    let mut workers = Vec::with_capacity(cfg.concurrency);
    for id in 0..cfg.concurrency {
        let channel = &channels[id % channels.len()];
        let tok = if matches!(cfg.op, Op::Tokenize | Op::TokenizeBatch | Op::Mixed) {
            Some(client(channel, cfg.tokenize_key.as_deref())?)
        } else {
            None
        };
        let detok = if cfg.op.needs_tokens() {
            Some(client(channel, cfg.detokenize_key.as_deref())?)
        } else {
            None
        };
        let worker = Worker {
            id,
            cfg: cfg.clone(),
            shared: shared.clone(),
            tok,
            detok,
            pans: pans.clone(),
            tokens: tokens.clone(),
            pacer: pacer.clone(),
        };
        workers.push(tokio::spawn(worker.run()));
    }

    let progress = cfg
        .progress
        .then(|| spawn_progress(shared.clone(), started, cfg.op.is_batch(), cfg.batch_size));
    // Duration mode: stop the workers at the deadline (they also check it themselves).
    let stopper = deadline.map(|d| {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(d.into()).await;
            shared.stop.store(true, Ordering::Relaxed);
        })
    });

    let mut results = Vec::with_capacity(workers.len());
    for w in workers {
        match w.await {
            Ok(r) => results.push(r),
            Err(e) => return Err(BenchError::Failed(format!("a load task failed: {e}"))),
        }
    }
    if let Some((task, bar)) = progress {
        task.abort();
        if let Some(bar) = bar {
            crate::cli::common::finish_bar(&bar);
        }
    }
    if let Some(s) = stopper {
        s.abort();
    }

    let end = match deadline {
        Some(d) => d,
        None => results
            .iter()
            .filter_map(|r| r.last_done)
            .max()
            .unwrap_or(measure_from),
    };
    let duration = end
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    Ok(build_report(&cfg, results, duration, prefilled))
}

fn build_report(
    cfg: &BenchConfig,
    results: Vec<WorkerResult>,
    duration: f64,
    prefilled: u64,
) -> BenchReport {
    let mut hist = [new_histogram(), new_histogram()];
    let (mut requests, mut ok) = ([0u64; 2], [0u64; 2]);
    let (mut ok_items, mut item_errors) = (0, 0);
    let mut errors_by_code: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        for k in [TOK, DETOK] {
            // Same bounds on both sides, so adding cannot fail.
            let _ = hist[k].add(&r.hist[k]);
            requests[k] += r.requests[k];
            ok[k] += r.ok[k];
        }
        ok_items += r.ok_items;
        item_errors += r.item_errors;
        for (c, n) in r.errors {
            *errors_by_code.entry(c.to_owned()).or_insert(0) += n;
        }
    }
    let mut all = new_histogram();
    let _ = all.add(&hist[TOK]);
    let _ = all.add(&hist[DETOK]);
    let rpc_names = match cfg.op {
        Op::TokenizeBatch | Op::DetokenizeBatch => ["TokenizeBatch", "DetokenizeBatch"],
        _ => ["Tokenize", "Detokenize"],
    };
    let mut by_rpc = BTreeMap::new();
    for k in [TOK, DETOK] {
        if requests[k] > 0 {
            by_rpc.insert(
                rpc_names[k].to_owned(),
                RpcStats {
                    requests: requests[k],
                    ok: ok[k],
                    ops_per_s: ok[k] as f64 / duration,
                    latency: Latency::of(&hist[k]),
                },
            );
        }
    }
    let total_ok = ok[TOK] + ok[DETOK];
    let total = requests[TOK] + requests[DETOK];
    BenchReport {
        op: cfg.op,
        addr: cfg.addr.clone(),
        concurrency: cfg.concurrency,
        connections: cfg.connections,
        batch_size: if cfg.op.is_batch() { cfg.batch_size } else { 1 },
        mix: (cfg.op == Op::Mixed).then_some(cfg.mix),
        target_rate: cfg.rate,
        warmup_s: cfg.warmup.as_secs_f64(),
        prefilled,
        duration_s: duration,
        requests: total,
        ok: total_ok,
        errors: total - total_ok,
        errors_by_code,
        item_errors,
        ops_per_s: total_ok as f64 / duration,
        pans_per_s: ok_items as f64 / duration,
        latency: Latency::of(&all),
        by_rpc,
    }
}

/// Progress of the run: an indicatif bar on a terminal (over the requests, or over the
/// warm-up and measured time), a plain line a second otherwise (no escape codes in logs).
fn spawn_progress(
    shared: Arc<Shared>,
    started: Instant,
    batch: bool,
    batch_size: usize,
) -> (JoinHandle<()>, Option<indicatif::ProgressBar>) {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = crate::cli::common::progress_bar("bench", "requests");
        match (shared.limit, shared.deadline) {
            (Some(n), _) => bar.set_length(n),
            // Time mode: the bar counts milliseconds of the run.
            (None, Some(d)) => {
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "bench [{elapsed_precise}] {wide_bar} {percent}% of the run, {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_length(d.duration_since(started).as_millis() as u64)
            }
            (None, None) => {}
        }
        bar
    });
    let task_bar = bar.clone();
    let task = tokio::spawn(async move {
        let bar = task_bar;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let (mut last_done, mut last_at) = (0u64, Instant::now());
        loop {
            tick.tick().await;
            let now = Instant::now();
            let done = shared.completed.load(Ordering::Relaxed);
            let rate = (done - last_done) as f64 / now.duration_since(last_at).as_secs_f64();
            (last_done, last_at) = (done, now);
            let phase = if now < shared.measure_from {
                "warm-up"
            } else {
                "measure"
            };
            let pans = if batch {
                format!(
                    " ({} PANs/s)",
                    group((rate * batch_size as f64).round() as u64)
                )
            } else {
                String::new()
            };
            let failed = group(shared.failed.load(Ordering::Relaxed));
            if let Some(bar) = &bar {
                match shared.limit {
                    Some(_) => bar.set_position(done),
                    None => bar.set_position(now.duration_since(started).as_millis() as u64),
                }
                bar.set_message(format!(
                    "{phase}: {} ops/s{pans}, {} done, {failed} failed",
                    group(rate.round() as u64),
                    group(done)
                ));
                continue;
            }
            eprintln!(
                "[{:>5.1}s {phase}] {} ops/s{pans}, {} done, {failed} failed",
                now.duration_since(started).as_secs_f64(),
                group(rate.round() as u64),
                group(done),
            );
        }
    });
    (task, bar)
}

// ---------------------------------------------------------------------------------------
// In-process server

/// A server on 127.0.0.1:0 over a fresh vault in a temporary directory, with one principal
/// allowed to tokenize, detokenize and describe tokens. For `bench --in-process` and tests.
pub struct InProcessServer {
    pub addr: SocketAddr,
    /// API key of the bench principal (tokenize, detokenize, info).
    pub api_key: String,
    pub vault: Vault,
    dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<crate::error::Result<()>>>,
}

impl InProcessServer {
    pub async fn start() -> Result<InProcessServer, BenchError> {
        Self::start_with(VaultConfig::new(PathBuf::new()), ServerConfig::default()).await
    }

    /// `vault_cfg.data_dir` is replaced by a new temporary directory.
    pub async fn start_with(
        mut vault_cfg: VaultConfig,
        server_cfg: ServerConfig,
    ) -> Result<InProcessServer, BenchError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            BenchError::Failed(format!("in-process server: {what}: {e}"))
        };
        let suffix: String = crate::crypto::random_bytes::<8>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = std::env::temp_dir().join(format!("tokenvault-bench-{suffix}"));
        vault_cfg.data_dir = dir.join("data");
        let master = MasterKey::generate();
        let vault = Vault::create(vault_cfg, &master).map_err(|e| fail("create vault", &e))?;
        let api_key = vault
            .add_client(
                &Caller::cli(),
                "bench",
                &[Role::Tokenize, Role::Detokenize, Role::Info],
                None,
            )
            .await
            .map_err(|e| fail("add client", &e))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| fail("bind", &e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| fail("local address", &e))?;
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, vault.clone(), server_cfg, async {
            let _ = rx.await;
        }));
        Ok(InProcessServer {
            addr,
            api_key,
            vault,
            dir,
            shutdown: Some(tx),
            handle: Some(handle),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server, closes the vault and removes the temporary directory.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match self.handle.take() {
            Some(h) => match h.await {
                Ok(r) => r.map_err(|e| BenchError::Failed(format!("in-process server: {e}"))),
                Err(e) => Err(BenchError::Failed(format!("in-process server task: {e}"))),
            },
            None => Ok(()),
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.handle.is_some() {
            // Not stopped properly: the vault may still be open; remove what we can.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn config_is_validated() {
        let ok = BenchConfig::new("http://x", Some("k".into()), Op::Mixed);
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.concurrency = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.mix = 101;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.detokenize_key = None;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.rate = Some(0.0);
        assert!(c.validate().is_err());
        assert!(!format!(
            "{:?}",
            BenchConfig::new("http://x", Some("secret".into()), Op::Tokenize)
        )
        .contains("secret"));
    }
}
