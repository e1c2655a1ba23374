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
        // Any punctuation between groups, and digits of other scripts (review of issue 11).
        "refund 4539/1462/5276/0189".to_string(),
        "card 4539_1462_5276_0189".to_string(),
        "card ４５３９１４６２５２７６０１８９".to_string(),
        "card ٤٥٣٩ ١٤٦٢ ٥٢٧٦ ٠١٨٩".to_string(),
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
        assert!(
            !text.contains("４５３９") && !text.contains("٤٥٣٩"),
            "{text}"
        );
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
    // The fields people and callers fill in. The hex hashes, ids and timestamps around them are
    // random digits that contain "4539" by chance in a few runs out of a hundred.
    for line in export.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for field in [
            &v["event"]["reason"],
            &v["user"]["name"],
            &v["source"]["address"],
            &v["tokenvault"]["subject"],
        ] {
            let text = field.as_str().unwrap_or_default();
            assert!(!text.contains("4539"), "{text}");
            assert!(!text.contains(&pan[..8]), "{text}");
            assert!(!text.contains("1462"), "{text}");
            assert!(!tokenvault::card::contains_card_number(text), "{text}");
        }
    }
    // Nowhere in the export, whatever the field: the card's first eight digits.
    assert!(!export.contains(&pan[..8]));
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
            Code::Unauthenticated => {
                eprintln!(
                    "revoked key refused {:?} after the revocation",
                    revoked_at.elapsed()
                );
                break;
            }
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
            eprintln!(
                "UNAVAILABLE {:?} after the client list became unreadable",
                broke.elapsed()
            );
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

// ---------------------------------------------------------------------------------------
// Item 1: `reuse_existing` is not a card-number oracle.

fn reuse_req(pan: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        pan: pan.into(),
        reuse_existing: true,
        ..Default::default()
    }
}

async fn reuse(c: &mut Client, pan: &str) -> (String, bool) {
    let r = c.tokenize(reuse_req(pan)).await.unwrap().into_inner();
    (r.token, r.created)
}

/// Every Luhn-valid 16-digit number with this BIN and last four (100,000 of them).
fn candidates(bin: &str, last4: &str) -> Vec<String> {
    (0..1_000_000u32)
        .map(|mid| format!("{bin}{mid:06}{last4}"))
        .filter(|c| tokenvault::card::luhn_valid(c.as_bytes()))
        .collect()
}

async fn add_client(
    srv: &TestServer,
    name: &str,
    limits: tokenvault::vault::ClientLimits,
) -> Client {
    use tokenvault::auth::Role;
    let key = srv
        .vault
        .add_client_with(
            &tokenvault::vault::Caller::cli(),
            name,
            &[Role::Tokenize, Role::Info],
            None,
            limits,
        )
        .await
        .unwrap();
    srv.client_with_key(Some(&key)).await
}

#[tokio::test]
async fn reuse_existing_never_finds_another_principals_card() {
    // The budget is lifted here so that the scope alone has to stop the attack.
    let srv = TestServer::start_with(ServerConfig {
        reuse_rate: Rate {
            per_second: 1_000_000.0,
        },
        ..ServerConfig::default()
    })
    .await;
    // Merchant A tokenizes a card with reuse_existing.
    let victim = "4539146252760189";
    let mut merchant_a = srv.client(CHECKOUT).await;
    let (token_a, created) = reuse(&mut merchant_a, victim).await;
    assert!(created);
    assert_eq!(
        reuse(&mut merchant_a, victim).await,
        (token_a.clone(), false)
    );

    // Merchant B, a tokenize-only client, reads BIN and last four of A's token...
    let mut merchant_b = add_client(&srv, "merchant-b", Default::default()).await;
    let info = merchant_b
        .get_token_info(pb::GetTokenInfoRequest {
            token: token_a.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    let all = candidates(&info.bin, &info.last4);
    assert_eq!(all.len(), 100_000);
    // ...and sends all of them with reuse_existing, in batches of 10,000.
    assert!(all.iter().any(|c| c == victim));
    let started = Instant::now();
    let mut found = 0;
    for chunk in all.chunks(10_000) {
        let results = merchant_b
            .tokenize_batch(pb::TokenizeBatchRequest {
                requests: chunk.iter().map(|c| reuse_req(c)).collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        for r in results {
            match r.outcome {
                Some(pb::tokenize_batch_result::Outcome::Success(t)) => {
                    assert_ne!(t.token, token_a, "B received A's token");
                    if !t.created {
                        found += 1;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    eprintln!(
        "oracle attack: {found} of {} candidates answered created=false ({:?})",
        all.len(),
        started.elapsed()
    );
    assert_eq!(found, 0, "a candidate answered created=false");
    // B converges on its own token for the card; A keeps its own.
    let (token_b, created) = reuse(&mut merchant_b, victim).await;
    assert!(!created, "B's own token from the batch");
    assert_ne!(token_b, token_a);
    assert_eq!(reuse(&mut merchant_a, victim).await, (token_a, false));
}

#[tokio::test]
async fn reuse_group_shares_tokens_only_within_the_group() {
    use tokenvault::vault::ClientLimits;
    let srv = TestServer::start().await;
    let group = || ClientLimits {
        reuse_group: Some("shop".into()),
        ..ClientLimits::default()
    };
    let mut g1 = add_client(&srv, "shop-web", group()).await;
    let mut g2 = add_client(&srv, "shop-app", group()).await;
    let mut outsider = srv.client(CHECKOUT).await;
    let pan = test_pan(31);
    let (t1, created) = reuse(&mut g1, &pan).await;
    assert!(created);
    assert_eq!(reuse(&mut g2, &pan).await, (t1.clone(), false));
    let (t3, created) = reuse(&mut outsider, &pan).await;
    assert!(created);
    assert_ne!(t3, t1);
    // A principal whose name is the group's name does not share its scope either.
    let mut named_shop = add_client(&srv, "shop", ClientLimits::default()).await;
    let (t4, created) = reuse(&mut named_shop, &pan).await;
    assert!(created && t4 != t1);
    // An invalid group name is refused.
    let err = srv
        .vault
        .add_client_with(
            &tokenvault::vault::Caller::cli(),
            "bad-group",
            &[tokenvault::auth::Role::Tokenize],
            None,
            ClientLimits {
                reuse_group: Some("no spaces allowed".into()),
                ..ClientLimits::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, tokenvault::error::Error::InvalidArgument(_)));
}

#[tokio::test]
async fn reuse_lookups_are_budgeted_before_they_happen() {
    let srv = TestServer::start().await;
    assert_eq!(ServerConfig::default().reuse_rate.per_second, 100.0);
    let mut checkout = srv.client(CHECKOUT).await;
    let pans: Vec<String> = (0..10_000).map(|i| test_pan(50_000 + i)).collect();
    let batch = |from: usize, n: usize| pb::TokenizeBatchRequest {
        requests: pans[from..from + n].iter().map(|p| reuse_req(p)).collect(),
    };
    // The oracle's batch of 10,000 candidates: refused whole, on a full budget.
    let status = checkout.tokenize_batch(batch(0, 10_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(!has_digit_run(status.message(), 6));
    // One second's worth passes; right after it, the next hundred do not.
    let started = Instant::now();
    checkout.tokenize_batch(batch(0, 100)).await.unwrap();
    let status = checkout.tokenize_batch(batch(100, 100)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Hits cost the same as misses: the hundred cards just stored are refused too.
    let status = checkout.tokenize_batch(batch(0, 100)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Plain tokenize is not affected, and nothing of the refused batches was stored.
    for p in &pans[..200] {
        checkout
            .tokenize(pb::TokenizeRequest {
                pan: p.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let rows: i64 = srv
        .db()
        .query_row(
            "SELECT COUNT(*) FROM tokens WHERE fingerprint IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 100);
    // Refusals are audited, for this principal.
    let records = srv.vault.audit_records(1, 100_000).await.unwrap();
    let refused = records
        .iter()
        .filter(|r| r.principal == CHECKOUT && r.outcome == "RESOURCE_EXHAUSTED")
        .count();
    assert!(refused >= 2, "{refused}");
    // A client with its own budget gets it.
    let mut bulk = add_client(
        &srv,
        "bulk-import",
        tokenvault::vault::ClientLimits {
            reuse_rate: Some(5_000.0),
            ..Default::default()
        },
    )
    .await;
    bulk.tokenize_batch(batch(1_000, 5_000)).await.unwrap();
}

#[tokio::test]
async fn upgrading_drops_unscoped_fingerprints_and_keeps_the_tokens() {
    use tokenvault::crypto::MasterKey;
    use tokenvault::vault::{Caller, Vault, VaultConfig};
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::generate();
    let cfg = VaultConfig::new(dir.path().join("data"));
    let vault = Vault::create(cfg.clone(), &master).unwrap();
    let c = Caller::new("merchant", "local");
    let pan = tokenvault::card::Pan::parse(&test_pan(41)).unwrap();
    let t = vault
        .tokenize(
            &c,
            tokenvault::vault::TokenizeRequest {
                pan: pan.clone(),
                format: tokenvault::token::TokenFormat::Opaque,
                reuse_existing: true,
                expires_at: None,
            },
        )
        .await
        .unwrap();
    vault.close().await;
    // Make the database look like one of the previous schema, with an unscoped fingerprint.
    {
        let conn =
            rusqlite::Connection::open(tokenvault::store::sqlite::db_path(&cfg.data_dir)).unwrap();
        // The version just before the reuse-scope migration; later migrations (appended
        // after it) are dropped too so they apply again.
        let version = tokenvault::store::migrations::version_of("ADD COLUMN reuse_group").unwrap();
        conn.execute_batch(&format!(
            "ALTER TABLE clients DROP COLUMN reuse_rate; \
             ALTER TABLE clients DROP COLUMN reuse_group; \
             UPDATE tokens SET fingerprint = randomblob(32); \
             DROP TABLE IF EXISTS admin_requests; \
             PRAGMA user_version = {};",
            version - 1
        ))
        .unwrap();
    }
    let vault = Vault::open(cfg.clone(), &master).unwrap();
    let conn =
        rusqlite::Connection::open(tokenvault::store::sqlite::db_path(&cfg.data_dir)).unwrap();
    let left: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM tokens WHERE fingerprint IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "no unscoped fingerprint survives the upgrade");
    // The old token still reveals; the next reuse call issues one in the caller's scope.
    let r = vault
        .detokenize(&c, t.token.clone(), "after upgrade".into())
        .await
        .unwrap();
    assert_eq!(r.pan.expose_digits(), pan.expose_digits());
    let again = vault
        .tokenize(
            &c,
            tokenvault::vault::TokenizeRequest {
                pan,
                format: tokenvault::token::TokenFormat::Opaque,
                reuse_existing: true,
                expires_at: None,
            },
        )
        .await
        .unwrap();
    assert!(again.created);
    assert_ne!(again.token, t.token);
    vault.close().await;
}
