//! `tokenvault bench`: a load generator that speaks real gRPC to any tokenvault server, or
//! to one it starts in-process over a throw-away vault (`--in-process`), or to the no-op
//! reference server (`--reference`; `--compare` runs it beside the target and prints the
//! ratio, the figure issue 14's goals are stated in). The work is done by
//! [`crate::bench`]; this file maps the command line onto it and prints the report.
//!
//! The generated card numbers are never printed, nor the card numbers a server reveals.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::common::CliError;
use crate::bench::reference::ReferenceServer;
use crate::bench::{self, group, BenchConfig, BenchError, BenchReport, InProcessServer, Op, Stop};
use crate::grpc::pb;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OpArg {
    Tokenize,
    TokenizeBatch,
    Detokenize,
    DetokenizeBatch,
    Mixed,
}

impl From<OpArg> for Op {
    fn from(o: OpArg) -> Op {
        match o {
            OpArg::Tokenize => Op::Tokenize,
            OpArg::TokenizeBatch => Op::TokenizeBatch,
            OpArg::Detokenize => Op::Detokenize,
            OpArg::DetokenizeBatch => Op::DetokenizeBatch,
            OpArg::Mixed => Op::Mixed,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchFormat {
    Opaque,
    PanShaped,
    PanShapedKeepBin,
}

/// Drive a server with synthetic card numbers and report throughput, latency and errors.
/// (No `Debug`: it holds API keys.)
#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Server address (http:// or https://). Ignored with --in-process.
    #[arg(
        long,
        env = "TOKENVAULT_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// API key used for every call. For detokenize and mixed runs it needs the tokenize role
    /// too (prefill), or give --tokenize-key and --detokenize-key.
    #[arg(
        long,
        env = "TOKENVAULT_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// API key for tokenize calls and prefill (default: --api-key).
    #[arg(
        long,
        env = "TOKENVAULT_TOKENIZE_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub tokenize_key: Option<String>,
    /// API key for detokenize calls (default: --api-key).
    #[arg(
        long,
        env = "TOKENVAULT_DETOKENIZE_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub detokenize_key: Option<String>,
    /// PEM file of the CA that signed the server's certificate (use an https:// address).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Start a server in this process on 127.0.0.1:0 over a temporary vault, and bench it.
    #[arg(long, alias = "self-serve")]
    pub in_process: bool,
    /// Bench the no-op reference server (the same gRPC contract answering fixed responses,
    /// no work) in this process instead of a vault: what gRPC itself costs here.
    #[arg(long, conflicts_with_all = ["in_process", "compare"])]
    pub reference: bool,
    /// Bench the no-op reference and then the target (--in-process or --addr), alternating
    /// for --rounds rounds, and report the target's throughput as a share of the reference's.
    #[arg(long)]
    pub compare: bool,
    /// Rounds of a --compare run (reference then target in each); medians are compared.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub rounds: u64,
    /// Serve the no-op reference on this address until interrupted (to bench it from
    /// another process, like a real server); nothing else runs.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["in_process", "compare", "reference"])]
    pub serve_reference: Option<std::net::SocketAddr>,
    /// What each request does.
    #[arg(long, value_enum, default_value_t = OpArg::Tokenize)]
    pub op: OpArg,
    /// Percent of tokenize calls in a mixed run (the rest detokenize).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub mix: u8,
    /// Items per batch call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: u64,
    /// Requests in flight.
    #[arg(short = 'c', long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub connections: u64,
    /// How long to measure, e.g. 10s, 500ms, 2m.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Duration,
    /// Measure this many requests instead of a duration.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Load before measuring starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Tokens to create (in batches) before a detokenize or mixed run
    /// (default for those: 10000).
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// Open-loop pacing: send this many requests per second in total, latency counted from
    /// each request's scheduled time. Default: closed loop (as fast as answers come).
    #[arg(long, value_name = "REQ_PER_S")]
    pub rate: Option<f64>,
    /// Seed of the synthetic card numbers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Distinct card numbers generated before the run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub pan_pool: u64,
    /// Token format requested.
    #[arg(long, value_enum, default_value_t = BenchFormat::Opaque)]
    pub format: BenchFormat,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on standard error.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `10s`, `500ms`, `2m`, `1.5s`, or plain seconds: the one duration grammar
/// ([`crate::config::parse_timeout`]).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_timeout(s)
}

impl BenchArgs {
    /// The library configuration for these arguments, against `addr` with `key` as the
    /// fallback for both roles.
    pub fn config(&self, addr: String, key: Option<String>) -> BenchConfig {
        let pick = |k: &Option<String>| {
            k.clone()
                .or_else(|| key.clone())
                .filter(|k| !k.trim().is_empty())
        };
        let mut cfg = BenchConfig::new(addr, None, self.op.into());
        cfg.tokenize_key = pick(&self.tokenize_key);
        cfg.detokenize_key = pick(&self.detokenize_key);
        cfg.tls_ca = self.tls_ca.clone();
        cfg.mix = self.mix;
        cfg.batch_size = self.batch_size as usize;
        cfg.concurrency = self.concurrency as usize;
        cfg.connections = self.connections as usize;
        cfg.stop = match self.requests {
            Some(n) => Stop::Requests(n),
            None => Stop::Duration(self.duration),
        };
        cfg.warmup = self.warmup;
        cfg.prefill = self.prefill;
        cfg.seed = self.seed;
        cfg.rate = self.rate;
        cfg.pan_pool = self.pan_pool as usize;
        cfg.format = match self.format {
            BenchFormat::Opaque => pb::TokenFormat::Opaque,
            BenchFormat::PanShaped => pb::TokenFormat::PanShaped,
            BenchFormat::PanShapedKeepBin => pb::TokenFormat::PanShapedKeepBin,
        };
        cfg.progress = !self.quiet;
        cfg
    }
}

impl From<BenchError> for CliError {
    fn from(e: BenchError) -> Self {
        match e {
            BenchError::Usage(m) => CliError::Usage(m),
            BenchError::Connect { addr, detail } => CliError::Connect { addr, detail },
            BenchError::Failed(m) => CliError::Other(m),
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if let Some(listen) = args.serve_reference {
        // It answers Tokenize without storing anything and checks no key: never beyond
        // this machine, where a client pointed at it by mistake would send card numbers.
        if !listen.ip().is_loopback() {
            return Err(CliError::Usage(format!(
                "--serve-reference {listen}: the no-op reference listens on loopback only"
            )));
        }
        let server = ReferenceServer::start(listen).await?;
        eprintln!(
            "bench: no-op reference server on {}; Ctrl-C stops it",
            server.addr
        );
        let _ = tokio::signal::ctrl_c().await;
        return Ok(server.stop().await?);
    }
    if args.compare {
        return compare(args).await;
    }
    let report = if args.reference {
        measure_reference(&args).await?
    } else {
        measure_target(&args).await?
    };
    if args.json {
        println!("{}", to_json(&report)?);
    } else {
        print!("{}", report.render());
    }
    if report.errors > 0 {
        return Err(CliError::Other(format!(
            "{} requests failed",
            report.errors
        )));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(format!("cannot encode the report: {e}")))
}

/// One run against the no-op reference, started in this process for the run.
async fn measure_reference(args: &BenchArgs) -> Result<BenchReport, CliError> {
    let server = ReferenceServer::start(([127, 0, 0, 1], 0).into()).await?;
    if !args.quiet {
        eprintln!("bench: no-op reference server on {}", server.addr);
    }
    // The reference checks no key; the load generator wants one to send.
    let cfg = args.config(server.url(), Some("reference".into()));
    let result = bench::run(cfg).await;
    server.stop().await?;
    Ok(result?)
}

/// One run against the target: a vault started in this process, or `--addr`.
async fn measure_target(args: &BenchArgs) -> Result<BenchReport, CliError> {
    let (server, cfg) = if args.in_process {
        let server = InProcessServer::start().await?;
        let cfg = args.config(server.url(), Some(server.api_key.clone()));
        if !args.quiet {
            eprintln!(
                "bench: in-process server on {} over a temporary vault",
                server.addr
            );
        }
        (Some(server), cfg)
    } else {
        (None, args.config(args.addr.clone(), args.api_key.clone()))
    };
    let result = bench::run(cfg).await;
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(result?)
}

/// `--compare`: what one side did in each round, and the ratio of the medians.
#[derive(serde::Serialize)]
struct Comparison {
    reference: Vec<BenchReport>,
    target: Vec<BenchReport>,
    /// Median throughput (PANs/s for batch runs, ops/s otherwise) of each side.
    reference_median: f64,
    target_median: f64,
    /// target_median / reference_median.
    ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Throughput as compared: card numbers per second (equal to ops/s for single calls).
fn throughput(r: &BenchReport) -> f64 {
    r.pans_per_s
}

async fn compare(args: BenchArgs) -> Result<(), CliError> {
    let (mut reference, mut target) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        if !args.quiet {
            eprintln!("bench: round {round} of {}", args.rounds);
        }
        reference.push(measure_reference(&args).await?);
        target.push(measure_target(&args).await?);
    }
    let reference_median = median(reference.iter().map(throughput).collect());
    let target_median = median(target.iter().map(throughput).collect());
    let ratio = if reference_median > 0.0 {
        target_median / reference_median
    } else {
        0.0
    };
    let failed: u64 = reference.iter().chain(&target).map(|r| r.errors).sum();
    let c = Comparison {
        reference,
        target,
        reference_median,
        target_median,
        ratio,
    };
    if args.json {
        println!("{}", to_json(&c)?);
    } else {
        for (i, (r, t)) in c.reference.iter().zip(&c.target).enumerate() {
            println!("round {} of {}: no-op reference", i + 1, c.reference.len());
            print!("{}", r.render());
            println!("round {} of {}: target", i + 1, c.target.len());
            print!("{}", t.render());
        }
        println!(
            "compare: target {} /s vs no-op reference {} /s (medians of {}): ratio {:.2}",
            group(c.target_median.round() as u64),
            group(c.reference_median.round() as u64),
            c.target.len(),
            c.ratio
        );
    }
    if failed > 0 {
        return Err(CliError::Other(format!("{failed} requests failed")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("ten").is_err());
        assert_eq!(
            parse_duration("3d").unwrap(),
            Duration::from_secs(3 * 86_400)
        );
    }
}
