//! `tokenvault bench` against an in-process server: short, bounded runs that check the load
//! generator behaves (requests complete, no errors, sane percentiles, JSON round-trips).
//! Nothing here asserts speed.

use std::time::Duration;

use tokenvault::bench::pans::PanGenerator;
use tokenvault::bench::{self, BenchConfig, BenchReport, InProcessServer, Op, Stop};

fn bounded(server: &InProcessServer, op: Op, requests: u64) -> BenchConfig {
    let mut cfg = BenchConfig::new(server.url(), Some(server.api_key.clone()), op);
    cfg.stop = Stop::Requests(requests);
    cfg.concurrency = 8;
    cfg.connections = 2;
    cfg.warmup = Duration::ZERO;
    cfg.pan_pool = 1000;
    cfg
}

fn check(report: &BenchReport, requests: u64) {
    assert_eq!(report.requests, requests, "{report:?}");
    assert_eq!(report.ok, requests, "{report:?}");
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_code);
    assert!(report.errors_by_code.is_empty());
    assert_eq!(report.item_errors, 0);
    assert!(report.ops_per_s > 0.0);
    assert!(report.pans_per_s >= report.ops_per_s);
    assert!(report.duration_s > 0.0);
    let l = &report.latency;
    assert!(l.min_us > 0);
    assert!(l.min_us <= l.p50_us, "{l:?}");
    assert!(l.p50_us <= l.p90_us, "{l:?}");
    assert!(l.p90_us <= l.p99_us, "{l:?}");
    assert!(l.p99_us <= l.p999_us, "{l:?}");
    assert!(l.p999_us <= l.max_us, "{l:?}");

    let json = serde_json::to_string(report).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["requests"], requests);
    assert!(v["latency"]["p99_us"].is_u64());
    let back: BenchReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.requests, report.requests);
    assert_eq!(back.errors_by_code, report.errors_by_code);
    assert_eq!(back.latency.p99_us, report.latency.p99_us);
    assert_eq!(
        back.by_rpc.keys().collect::<Vec<_>>(),
        report.by_rpc.keys().collect::<Vec<_>>()
    );
    // The human report renders and never carries a card number: no run of 12+ digits in
    // the text, and none of the generated card numbers (run and prefill streams) anywhere.
    let text = report.render();
    assert!(text.contains("ops/s"));
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        assert!(run < 12, "a long digit run in the output: {text}");
    }
    for seed in [1, 2] {
        for pan in PanGenerator::new(seed).take(1000) {
            assert!(!json.contains(&pan) && !text.contains(&pan));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_against_an_in_process_server() {
    let server = InProcessServer::start().await.expect("in-process server");

    let report = bench::run(bounded(&server, Op::Tokenize, 300))
        .await
        .expect("tokenize run");
    check(&report, 300);
    assert_eq!(report.op, Op::Tokenize);
    assert_eq!(report.by_rpc["Tokenize"].requests, 300);

    let mut cfg = bounded(&server, Op::Detokenize, 300);
    cfg.prefill = 500;
    let report = bench::run(cfg).await.expect("detokenize run");
    check(&report, 300);
    assert_eq!(report.prefilled, 500);
    assert_eq!(report.by_rpc["Detokenize"].ok, 300);

    let mut cfg = bounded(&server, Op::Mixed, 200);
    cfg.prefill = 100;
    cfg.mix = 50;
    let report = bench::run(cfg).await.expect("mixed run");
    check(&report, 200);
    assert_eq!(
        report.by_rpc.len(),
        2,
        "both RPCs used: {:?}",
        report.by_rpc.keys()
    );

    let mut cfg = bounded(&server, Op::TokenizeBatch, 20);
    cfg.batch_size = 50;
    let report = bench::run(cfg).await.expect("batch run");
    check(&report, 20);
    assert!((report.pans_per_s / report.ops_per_s - 50.0).abs() < 1e-6);

    let mut cfg = bounded(&server, Op::DetokenizeBatch, 20);
    cfg.batch_size = 50;
    cfg.prefill = 200;
    let report = bench::run(cfg).await.expect("detokenize batch run");
    check(&report, 20);

    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_and_timed_runs() {
    let server = InProcessServer::start().await.expect("in-process server");
    let mut cfg = bounded(&server, Op::Tokenize, 1);
    cfg.stop = Stop::Duration(Duration::from_millis(500));
    cfg.warmup = Duration::from_millis(100);
    cfg.rate = Some(200.0);
    let report = bench::run(cfg).await.expect("paced run");
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_code);
    assert!(report.requests > 0);
    // 200/s for 0.5 s: about 100; the schedule caps it however fast the server is.
    assert!(report.requests <= 110, "{}", report.requests);
    assert!(report.latency.p50_us <= report.latency.p99_us);
    assert!(report.latency.p99_us <= report.latency.max_us);
    assert_eq!(report.target_rate, Some(200.0));
    // And not far below it: the pacer keeps the schedule (a tick-bound one sent late).
    assert!(report.requests >= 50, "{}", report.requests);

    // A paced run of a number of requests ends once they are sent, though its schedule has
    // no end of its own.
    let mut cfg = bounded(&server, Op::Tokenize, 30);
    cfg.rate = Some(300.0);
    let report = tokio::time::timeout(Duration::from_secs(30), bench::run(cfg))
        .await
        .expect("a paced run of 30 requests ended")
        .expect("paced run");
    assert_eq!(report.requests, 30);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_code);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn refuses_bad_configuration_and_reports_auth_errors() {
    let mut cfg = BenchConfig::new("http://127.0.0.1:1", None, Op::Tokenize);
    cfg.stop = Stop::Requests(1);
    assert!(matches!(
        bench::run(cfg).await,
        Err(bench::BenchError::Usage(_))
    ));

    let server = InProcessServer::start().await.expect("in-process server");
    let mut cfg = BenchConfig::new(server.url(), Some("tvk_wrong_key".into()), Op::Tokenize);
    cfg.stop = Stop::Requests(10);
    cfg.concurrency = 2;
    cfg.warmup = Duration::ZERO;
    cfg.pan_pool = 10;
    let report = bench::run(cfg).await.expect("run completes");
    assert_eq!(report.ok, 0);
    assert_eq!(report.errors, 10);
    assert_eq!(report.errors_by_code.get("UNAUTHENTICATED"), Some(&10));
    server.stop().await.expect("clean stop");
}

/// The no-op reference (issue 14) answers the same contract for every op the load generator
/// drives, and `--compare` reports both sides and their ratio from one command.
#[test]
fn compare_runs_the_reference_and_the_target_in_one_command() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args([
            "bench",
            "--compare",
            "--rounds",
            "2",
            "--in-process",
            "--op",
            "detokenize",
            "-n",
            "200",
            "--warmup",
            "0s",
            "-c",
            "8",
            "--pan-pool",
            "1000",
            "--json",
            "-q",
        ])
        .env_remove("TOKENVAULT_ADDR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for side in ["reference", "target"] {
        let runs = v[side].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{v}");
        for r in runs {
            assert_eq!(r["ok"], 200, "{r}");
            assert_eq!(r["errors"], 0, "{r}");
        }
    }
    let (reference, target) = (
        v["reference_median"].as_f64().unwrap(),
        v["target_median"].as_f64().unwrap(),
    );
    assert!(reference > 0.0 && target > 0.0, "{v}");
    assert!((v["ratio"].as_f64().unwrap() - target / reference).abs() < 1e-9);
    // The reference and the vault each answered on their own port.
    assert_ne!(v["reference"][0]["addr"], v["target"][0]["addr"]);

    for op in ["tokenize", "tokenize-batch", "detokenize-batch", "mixed"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
            .args([
                "bench",
                "--reference",
                "--op",
                op,
                "-n",
                "50",
                "--warmup",
                "0s",
            ])
            .args([
                "-c",
                "4",
                "--batch-size",
                "10",
                "--pan-pool",
                "100",
                "--json",
                "-q",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["errors"], 0, "{op}: {r}");
        assert_eq!(r["item_errors"], 0, "{op}: {r}");
    }
}

/// Review finding: the no-op reference stores nothing and checks no key, so it never
/// listens beyond loopback.
#[test]
fn the_reference_server_refuses_a_non_loopback_address() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["bench", "--serve-reference", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
