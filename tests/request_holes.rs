//! Issue 11, the request-side holes: each test is the attack, run over real gRPC against a
//! real vault, and what the vault must answer now.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokenvault::grpc::client::Client;
use tokenvault::grpc::pb;
use tokenvault::grpc::pb::detokenize_batch_result::Outcome as DetokenizeOutcome;
use tokenvault::grpc::server::ServerConfig;
use tokenvault::ratelimit::Rate;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

async fn tokenize(c: &mut Client, pan: &str) -> String {
    c.tokenize(pb::TokenizeRequest {
        pan: pan.into(),
        ..Default::default()
    })
    .await
    .expect("tokenize")
    .into_inner()
    .token
}

fn detokenize_batch_req(token: &str, reason: &str, n: usize) -> pb::DetokenizeBatchRequest {
    pb::DetokenizeBatchRequest {
        requests: (0..n)
            .map(|_| pb::DetokenizeRequest {
                token: token.into(),
                reason: reason.into(),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Item 2: a batch must not bypass the detokenize rate limit.

#[tokio::test]
async fn a_batch_larger_than_the_bucket_reveals_nothing_and_refusals_are_bounded() {
    let srv = TestServer::start_with(ServerConfig {
        detokenize_rate: Some(Rate { per_second: 1.0 }),
        ..ServerConfig::default()
    })
    .await;
    let pan = test_pan(7);
    let token = tokenize(&mut srv.client(CHECKOUT).await, &pan).await;
    let mut payments = srv.client(PAYMENTS).await;

    // The attack: one DetokenizeBatch of 5,000 on a full bucket of 1/s.
    let status = payments
        .detokenize_batch(detokenize_batch_req(&token, "bulk", 5_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Waiting does not help: it can never fit.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let status = payments
        .detokenize_batch(detokenize_batch_req(&token, "bulk", 5_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let status = payments
        .detokenize_batch(detokenize_batch_req(&token, "bulk", 2))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // The refused batches took nothing: one reveal still fits, then none.
    let ok = payments
        .detokenize_batch(detokenize_batch_req(&token, "one", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        &ok.results[0].outcome,
        Some(DetokenizeOutcome::Success(r)) if r.pan == pan
    ));
    let records = srv.vault.audit_records(1, 100_000).await.unwrap();
    let reveals = records
        .iter()
        .filter(|r| r.action == "detokenize" && r.outcome == "OK")
        .count();
    assert_eq!(reveals, 1, "only the one allowed reveal happened");

    // A flood of refused batches leaves a bounded number of records, plus a summary.
    let started = Instant::now();
    let flood = 300;
    for _ in 0..flood {
        let status = payments
            .detokenize_batch(detokenize_batch_req(&token, "bulk", 50))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let records = srv.vault.audit_records(1, 100_000).await.unwrap();
    let refusals = records
        .iter()
        .filter(|r| {
            r.principal == PAYMENTS
                && r.outcome == "RESOURCE_EXHAUSTED"
                && r.action == "detokenize_batch"
        })
        .count();
    let bound = 10 + (elapsed * 10.0).ceil() as usize + 3;
    assert!(
        refusals <= bound,
        "{refusals} refusal records for {flood}+3 refusals in {elapsed:.2}s"
    );
    let summarised: u64 = records
        .iter()
        .filter(|r| r.principal == PAYMENTS && r.action == "refusals_not_recorded")
        .map(|r| {
            r.reason
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        refusals as u64 + summarised,
        flood + 3,
        "every refusal is either recorded or counted in a summary"
    );
}

// ---------------------------------------------------------------------------------------
// Item 5: no card number in `reason` ever reaches the trail.

#[tokio::test]
async fn a_card_number_in_reason_is_refused_and_never_reaches_the_trail() {
    let srv = TestServer::start().await;
    let pan = test_pan(11);
    let token = tokenize(&mut srv.client(CHECKOUT).await, &pan).await;
    let mut payments = srv.client(PAYMENTS).await;
    let secret = "4539146252760189";
    let reasons = [
        format!("refund to card {secret}"),
        "refund to card 4539 1462 5276 0189".to_string(),
        "card 4539-1462-5276-0189 order 42".to_string(),
        format!("order 12 {pan}"),
    ];
    for reason in &reasons {
        let status = payments
            .detokenize(pb::DetokenizeRequest {
                token: token.clone(),
                reason: reason.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{reason}");
        assert!(!has_digit_run(status.message(), 4), "{}", status.message());
        // In a batch the item fails, the others are served.
        let out = payments
            .detokenize_batch(pb::DetokenizeBatchRequest {
                requests: vec![
                    pb::DetokenizeRequest {
                        token: token.clone(),
                        reason: reason.clone(),
                    },
                    pb::DetokenizeRequest {
                        token: token.clone(),
                        reason: "order 42".into(),
                    },
                ],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(&out.results[0].outcome,
            Some(DetokenizeOutcome::Error(e)) if e.code == Code::InvalidArgument as i32
                && !has_digit_run(&e.message, 4)));
        assert!(matches!(&out.results[1].outcome,
            Some(DetokenizeOutcome::Success(r)) if r.pan == pan));
    }
    // An ordinary reason with numbers is kept.
    payments
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "order 2026-11-27 #123456".into(),
        })
        .await
        .unwrap();

    let records = srv.vault.audit_records(1, 100_000).await.unwrap();
    let refused = records
        .iter()
        .filter(|r| r.action == "detokenize" && r.outcome == "INVALID_ARGUMENT")
        .count();
    assert_eq!(refused, 2 * reasons.len(), "each refusal is audited");
    for r in &records {
        let text = format!("{} {} {}", r.subject, r.reason, r.principal);
        assert!(!text.contains("4539"), "{text}");
        assert!(!text.contains(&pan[..8]), "{text}");
        assert!(!tokenvault::card::contains_card_number(&text), "{text}");
    }
    assert!(records
        .iter()
        .any(|r| r.reason == "order 2026-11-27 #123456"));

    // And `audit export`, as an operator would read it.
    let key_file = srv.dir.path().join("master.key");
    srv.master.write_new_file(&key_file).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["audit", "export", "--data-dir"])
        .arg(srv.data_dir())
        .arg("--master-key-file")
        .arg(&key_file)
        .env_remove("TOKENVAULT_MASTER_KEY")
        .env_remove("TOKENVAULT_DATA_DIR")
        .env_remove("TOKENVAULT_MASTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8(out.stdout).unwrap();
    assert!(export.contains("INVALID_ARGUMENT"), "{export}");
    assert!(!export.contains("4539"));
    assert!(!export.contains(&pan[..8]));
    assert!(!export.contains("1462"));
}

#[tokio::test]
async fn the_audit_writer_withholds_a_reason_with_a_card_number() {
    // Defence in depth: whatever path an entry takes, the stored reason has no card.
    let srv = TestServer::start().await;
    let caller = tokenvault::vault::Caller::new("x", "local");
    srv.vault
        .audit_summary(&caller, "note", "OK", "card 4539 1462 5276 0189")
        .await
        .unwrap();
    let records = srv.vault.audit_records(1, 100_000).await.unwrap();
    let note = records.iter().find(|r| r.action == "note").unwrap();
    assert_eq!(note.reason, tokenvault::audit::REASON_WITHHELD);
}

// ---------------------------------------------------------------------------------------
// Item 3: revocation must not depend on a key refresh.

async fn info_code(c: &mut Client, token: &str) -> Code {
    match c
        .get_token_info(pb::GetTokenInfoRequest {
            token: token.into(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn revocation_reaches_the_server_while_it_cannot_load_a_new_key_version() {
    use tokenvault::crypto::MasterKey;
    use tokenvault::vault::{Caller, Vault, VaultConfig};
    let srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let token = tokenize(&mut checkout, &test_pan(21)).await;

    // An admin rotates the master key and then the data key: the server, still on the old
    // master key (no SIGHUP yet), cannot unwrap the new version, so its key refresh fails.
    let new_master = MasterKey::generate();
    let admin = srv.reopen_second();
    admin
        .rotate_master(&Caller::cli(), &new_master)
        .await
        .unwrap();
    admin.close().await;
    let admin = Vault::open(VaultConfig::new(srv.data_dir()), &new_master).unwrap();
    admin.rotate_key(&Caller::cli()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(info_code(&mut checkout, &token).await, Code::Ok);

    // Now the revocation: refused within about a second.
    admin.revoke_client(&Caller::cli(), CHECKOUT).await.unwrap();
    let revoked_at = Instant::now();
    loop {
        match info_code(&mut checkout, &token).await {
            Code::Ok => {}
            Code::Unauthenticated => break,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            revoked_at.elapsed() < Duration::from_millis(1_200),
            "revoked key still accepted after {:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everyone else is still served, from the keys the server has.
    let mut payments = srv.client(PAYMENTS).await;
    payments
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "after revoke".into(),
        })
        .await
        .unwrap();
    admin.close().await;
}

#[tokio::test]
async fn an_unreadable_client_list_refuses_every_request_unavailable() {
    let srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let token = tokenize(&mut checkout, &test_pan(22)).await;
    // The client list changes but cannot be read.
    let db = srv.db();
    db.execute_batch(
        "BEGIN IMMEDIATE; \
         UPDATE meta SET value = value + 1 WHERE key = 'generation'; \
         ALTER TABLE clients RENAME TO clients_hidden; COMMIT;",
    )
    .unwrap();
    let broke = Instant::now();
    loop {
        let code = info_code(&mut checkout, &token).await;
        if code == Code::Unavailable {
            break;
        }
        assert_eq!(code, Code::Ok);
        assert!(
            broke.elapsed() < Duration::from_secs(7),
            "still serving from a stale client list after {:?}",
            broke.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        broke.elapsed() >= Duration::from_secs(4),
        "{:?}",
        broke.elapsed()
    );
    let mut payments = srv.client(PAYMENTS).await;
    let status = payments
        .detokenize(pb::DetokenizeRequest {
            token: token.clone(),
            reason: "stale".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Readable again: served again.
    db.execute_batch("ALTER TABLE clients_hidden RENAME TO clients;")
        .unwrap();
    let fixed = Instant::now();
    while info_code(&mut checkout, &token).await != Code::Ok {
        assert!(fixed.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
