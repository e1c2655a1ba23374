//! The bad-input matrix: every RPC gets every class of bad input over real gRPC. Each gets
//! its documented code, no message contains the input, the server stays up, and the token
//! table is unchanged by a failed request.

mod common;

use common::*;
use tokenvault::grpc::pb;
use tokenvault::grpc::server::ServerConfig;
use tonic::{Code, Status};

const MAX_BATCH: usize = 8;

/// Bad card numbers: (class, input). None of these may come back in any message.
fn bad_pans() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("whitespace", "   \t ".into()),
        ("letters", "4111abcd11111111".into()),
        ("arabic-indic digits", "٤١١١١١١١١١١١١١١١".into()),
        (
            "fullwidth digits",
            "４１１１１１１１１１１１１１１１".into(),
        ),
        ("11 digits", "41111111113".into()),
        ("20 digits", "41111111111111111114".into()),
        ("luhn failure", "4111111111111112".into()),
        ("nul byte", "4111111111\u{0}111111".into()),
        ("leading space", " 4111111111111111".into()),
        ("double separator", "4111  1111 1111 1111".into()),
        ("very long", "4111111111111111".repeat(4096)),
        ("sql", "4111111111111111'; DROP TABLE tokens; --".into()),
        ("control characters", "\u{1b}[31m4111111111111111".into()),
    ]
}

/// Bad tokens and the code each must get.
fn bad_tokens() -> Vec<(&'static str, String, Code)> {
    vec![
        ("empty", String::new(), Code::InvalidArgument),
        ("whitespace", "   ".into(), Code::InvalidArgument),
        ("garbage", "!!not a token!!".into(), Code::InvalidArgument),
        (
            "overlong",
            format!("tok_{}", "A".repeat(10_000)),
            Code::InvalidArgument,
        ),
        ("sql", "tok_x' OR '1'='1".into(), Code::InvalidArgument),
        (
            "a card number",
            "4111111111111111".into(),
            Code::InvalidArgument,
        ),
        (
            "nul byte",
            "tok_AAAAAAAAAAA\u{0}AAAAAAAAAAAA".into(),
            Code::InvalidArgument,
        ),
        (
            "unknown opaque",
            "tok_AAAAAAAAAAAAAAAAAAAAAAAA".into(),
            Code::NotFound,
        ),
        ("unknown shaped", "4111111111111112".into(), Code::NotFound),
    ]
}

/// Everything a failed request could have changed in the card data, as one string.
fn token_table(server: &TestServer) -> String {
    let db = server.db();
    let mut stmt = db
        .prepare("SELECT token, hex(ciphertext), deleted_at, expires_at, key_version FROM tokens ORDER BY id")
        .unwrap();
    let rows: Vec<String> = stmt
        .query_map([], |r| {
            Ok(format!(
                "{}|{:?}|{:?}|{:?}|{}",
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows.join("\n")
}

fn assert_clean(case: &str, status: &Status, input: &str, want: Code) {
    assert_eq!(status.code(), want, "{case}: {}", status.message());
    let digits: String = input.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() >= 6 {
        assert!(
            !status
                .message()
                .contains(&digits[..6.max(digits.len().min(12))]),
            "{case}: message echoes input"
        );
    }
    if !input.trim().is_empty() && input.len() >= 4 {
        assert!(
            !status.message().contains(input),
            "{case}: message echoes input"
        );
    }
    assert!(
        !has_digit_run(status.message(), 12),
        "{case}: message holds a digit run"
    );
}

#[tokio::test]
async fn every_rpc_refuses_every_class_of_bad_input_and_changes_nothing() {
    let cfg = ServerConfig {
        max_batch_items: MAX_BATCH,
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_with(cfg).await;
    let mut checkout = server.client(CHECKOUT).await;
    let mut payments = server.client(PAYMENTS).await;
    let mut deleter = server.client(DELETER).await;
    let good = checkout
        .tokenize(pb::TokenizeRequest {
            pan: test_pan(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let before = token_table(&server);

    for (class, pan) in bad_pans() {
        let req = pb::TokenizeRequest {
            pan: pan.clone(),
            ..Default::default()
        };
        let st = checkout.tokenize(req.clone()).await.unwrap_err();
        assert_clean(
            &format!("Tokenize/{class}"),
            &st,
            &pan,
            Code::InvalidArgument,
        );
        // In a batch, the bad item fails alone and its error is as clean.
        let batch = pb::TokenizeBatchRequest {
            requests: vec![req],
        };
        let results = checkout
            .tokenize_batch(batch)
            .await
            .unwrap()
            .into_inner()
            .results;
        match results[0].outcome.as_ref().unwrap() {
            pb::tokenize_batch_result::Outcome::Error(e) => {
                let st = Status::new(Code::from_i32(e.code), e.message.clone());
                assert_clean(
                    &format!("TokenizeBatch/{class}"),
                    &st,
                    &pan,
                    Code::InvalidArgument,
                );
            }
            other => panic!("TokenizeBatch/{class}: accepted: {other:?}"),
        }
    }

    // Unknown enum values and bad timestamps.
    let unknown_format = pb::TokenizeRequest {
        pan: test_pan(2),
        format: 99,
        ..Default::default()
    };
    let past = pb::TokenizeRequest {
        pan: test_pan(3),
        expires_at: Some(prost_types::Timestamp {
            seconds: 1_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    let bad_nanos = pb::TokenizeRequest {
        pan: test_pan(4),
        expires_at: Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 2_000_000_000,
        }),
        ..Default::default()
    };
    for (class, req) in [
        ("unknown format", unknown_format),
        ("expiry in the past", past),
        ("invalid timestamp", bad_nanos),
    ] {
        let pan = req.pan.clone();
        let st = checkout.tokenize(req).await.unwrap_err();
        assert_clean(
            &format!("Tokenize/{class}"),
            &st,
            &pan,
            Code::InvalidArgument,
        );
    }

    for (class, token, want) in bad_tokens() {
        let st = payments
            .detokenize(pb::DetokenizeRequest {
                token: token.clone(),
                reason: "test".into(),
            })
            .await
            .unwrap_err();
        assert_clean(&format!("Detokenize/{class}"), &st, &token, want);
        let st = payments
            .get_token_info(pb::GetTokenInfoRequest {
                token: token.clone(),
            })
            .await
            .unwrap_err();
        assert_clean(&format!("GetTokenInfo/{class}"), &st, &token, want);
        let results = payments
            .detokenize_batch(pb::DetokenizeBatchRequest {
                requests: vec![pb::DetokenizeRequest {
                    token: token.clone(),
                    reason: String::new(),
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        match results[0].outcome.as_ref().unwrap() {
            pb::detokenize_batch_result::Outcome::Error(e) => {
                let st = Status::new(Code::from_i32(e.code), e.message.clone());
                assert_clean(&format!("DetokenizeBatch/{class}"), &st, &token, want);
            }
            other => panic!("DetokenizeBatch/{class}: revealed something: {other:?}"),
        }
        match deleter
            .delete_token(pb::DeleteTokenRequest {
                token: token.clone(),
            })
            .await
        {
            // Deleting an unknown well-formed token is idempotent: nothing to delete.
            Ok(resp) => assert!(
                want == Code::NotFound && !resp.into_inner().deleted,
                "DeleteToken/{class}"
            ),
            Err(st) => assert_clean(
                &format!("DeleteToken/{class}"),
                &st,
                &token,
                Code::InvalidArgument,
            ),
        }
    }

    // A reason that would bloat every audit record.
    let st = payments
        .detokenize(pb::DetokenizeRequest {
            token: good.clone(),
            reason: "r".repeat(10_000),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);

    // Batches over the limit, and an empty batch.
    let over = pb::TokenizeBatchRequest {
        requests: (0..MAX_BATCH as u64 + 1)
            .map(|i| pb::TokenizeRequest {
                pan: test_pan(10 + i),
                ..Default::default()
            })
            .collect(),
    };
    assert_eq!(
        checkout.tokenize_batch(over).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let over = pb::DetokenizeBatchRequest {
        requests: (0..=MAX_BATCH)
            .map(|_| pb::DetokenizeRequest {
                token: good.clone(),
                reason: String::new(),
            })
            .collect(),
    };
    assert_eq!(
        payments.detokenize_batch(over).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // A message over the server's size limit is refused by the transport before decoding
    // (tonic answers OUT_OF_RANGE, as documented in the README).
    let huge = pb::TokenizeRequest {
        pan: "4".repeat(32 * 1024 * 1024),
        ..Default::default()
    };
    let st = checkout.tokenize(huge).await.unwrap_err();
    assert_eq!(
        st.code(),
        Code::OutOfRange,
        "oversized message: {}",
        st.message()
    );
    assert!(!st.message().contains("4444444444"));

    // Nothing changed, and the server still serves.
    assert_eq!(
        token_table(&server),
        before,
        "a failed request changed the token table"
    );
    let pan = payments
        .detokenize(pb::DetokenizeRequest {
            token: good,
            reason: "still up".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pan;
    assert_eq!(pan, test_pan(1));
    server.shutdown().await;
}
