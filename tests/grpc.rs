//! End-to-end tests of the gRPC service: a real server on a loopback port, the generated
//! client, and the vault underneath. Every RPC's success path, every error code a real
//! request can produce, batches, health, reflection, revocation and graceful shutdown.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::{Code, Request, Status};

use common::*;
use tokenvault::grpc::pb;
use tokenvault::grpc::pb::detokenize_batch_result::Outcome as DetokenizeOutcome;
use tokenvault::grpc::pb::tokenize_batch_result::Outcome as TokenizeOutcome;
use tokenvault::grpc::server::ServerConfig;
use tokenvault::grpc::SERVICE_NAME;
use tokenvault::token::Token;
use tokenvault::vault::{Caller, VaultConfig};

const VISA: &str = "4111 1111 1111 1111";
const VISA_DIGITS: &str = "4111111111111111";
const MASTERCARD: &str = "5555555555554444";
/// Well-formed (opaque syntax) but never issued.
const UNKNOWN_TOKEN: &str = "tok_AAAAAAAAAAAAAAAAAAAAAAAA";

fn tokenize_req(pan: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        pan: pan.into(),
        ..Default::default()
    }
}

fn detokenize_req(token: &str) -> pb::DetokenizeRequest {
    pb::DetokenizeRequest {
        token: token.into(),
        reason: "integration test".into(),
    }
}

fn timestamp_in(offset: Duration, past: bool) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let at = if past { now - offset } else { now + offset };
    prost_types::Timestamp {
        seconds: at.as_secs() as i64,
        nanos: at.subsec_nanos() as i32,
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>) -> Status {
    r.expect_err("expected an error status")
}

#[tokio::test]
async fn tokenize_info_detokenize_delete_round_trip() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;
    let mut deleter = srv.client(DELETER).await;
    let mut auditor = srv.client(AUDITOR).await;

    let resp = checkout
        .tokenize(tokenize_req(VISA))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.created);
    assert!(resp.token.starts_with("tok_"), "opaque by default");
    assert!(!resp.token.contains("4111"));
    let info = resp.info.clone().unwrap();
    assert_eq!(info.token, resp.token);
    assert_eq!(info.last4, "1111");
    assert_eq!(info.pan_length, 16);
    assert_eq!(info.brand(), pb::CardBrand::Visa);
    assert_eq!(info.format(), pb::TokenFormat::Opaque);
    assert!(!info.masked_pan.contains(VISA_DIGITS) && info.masked_pan.ends_with("1111"));
    assert!(info.created_at.is_some());
    assert!(info.expires_at.is_none());
    assert!(info.key_version >= 1);

    // Every role that may describe a token gets the same description.
    for client in [&mut checkout, &mut payments, &mut auditor] {
        let got = client
            .get_token_info(pb::GetTokenInfoRequest {
                token: resp.token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.info.as_ref(), Some(&info));
    }

    let revealed = payments
        .detokenize(detokenize_req(&resp.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.pan, VISA_DIGITS);
    assert_eq!(revealed.info.as_ref(), Some(&info));

    let del = deleter
        .delete_token(pb::DeleteTokenRequest {
            token: resp.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(del.deleted);
    // Idempotent.
    let again = deleter
        .delete_token(pb::DeleteTokenRequest {
            token: resp.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);
    let gone = code_of(payments.detokenize(detokenize_req(&resp.token)).await);
    assert_eq!(gone.code(), Code::NotFound);
    let gone = code_of(
        payments
            .get_token_info(pb::GetTokenInfoRequest {
                token: resp.token.clone(),
            })
            .await,
    );
    assert_eq!(gone.code(), Code::NotFound);
    srv.shutdown().await;
}

#[tokio::test]
async fn token_formats_and_reuse_existing() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;

    for format in [
        pb::TokenFormat::PanShaped,
        pb::TokenFormat::PanShapedKeepBin,
    ] {
        let req = pb::TokenizeRequest {
            pan: MASTERCARD.into(),
            format: format as i32,
            ..Default::default()
        };
        let resp = checkout.tokenize(req).await.unwrap().into_inner();
        assert_eq!(resp.token.len(), MASTERCARD.len());
        assert!(resp.token.bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(resp.token, MASTERCARD);
        assert!(resp.token.ends_with("4444"));
        if format == pb::TokenFormat::PanShapedKeepBin {
            assert!(resp.token.starts_with("555555"));
        }
        assert_eq!(resp.info.unwrap().format(), format);
        let pan = payments
            .detokenize(detokenize_req(&resp.token))
            .await
            .unwrap()
            .into_inner()
            .pan;
        assert_eq!(pan, MASTERCARD);
    }

    let reuse = pb::TokenizeRequest {
        pan: VISA.into(),
        reuse_existing: true,
        ..Default::default()
    };
    let first = checkout.tokenize(reuse.clone()).await.unwrap().into_inner();
    let second = checkout.tokenize(reuse.clone()).await.unwrap().into_inner();
    assert_eq!(first.token, second.token);
    assert!(!second.created);
    // Without reuse_existing a fresh token is issued.
    let fresh = checkout
        .tokenize(tokenize_req(VISA))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fresh.token, first.token);
    assert!(fresh.created);
    srv.shutdown().await;
}

#[tokio::test]
async fn invalid_card_numbers_are_invalid_argument_without_echo() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let bad = [
        "",
        "4111111111111112",        // Luhn fails
        "41111111111",             // too short
        "4111111111111111111111",  // too long
        "4111 1111 abcd 1111",     // not a digit
        "4111--1111-1111-1111",    // misplaced separator
        "4111111111111111\n",      // trailing control character
        "\u{0664}111111111111111", // a non-ASCII digit
    ];
    for pan in bad {
        let status = code_of(checkout.tokenize(tokenize_req(pan)).await);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{:?}",
            status.message()
        );
        assert!(
            !has_digit_run(status.message(), 6),
            "message echoes digits: {}",
            status.message()
        );
        if !pan.is_empty() {
            assert!(!status.message().contains(pan));
        }
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn invalid_format_expiry_and_tokens_are_invalid_argument() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;

    let req = pb::TokenizeRequest {
        pan: VISA.into(),
        format: 42,
        ..Default::default()
    };
    assert_eq!(
        code_of(checkout.tokenize(req).await).code(),
        Code::InvalidArgument
    );

    let req = pb::TokenizeRequest {
        pan: VISA.into(),
        expires_at: Some(timestamp_in(Duration::from_secs(10), true)),
        ..Default::default()
    };
    let status = code_of(checkout.tokenize(req).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "expires_at is in the past");

    let req = pb::TokenizeRequest {
        pan: VISA.into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: -5,
        }),
        ..Default::default()
    };
    assert_eq!(
        code_of(checkout.tokenize(req).await).code(),
        Code::InvalidArgument
    );

    // A card number sent where a token belongs is refused, and not echoed.
    for token in [
        "",
        "not a token",
        VISA_DIGITS,
        "tok_short",
        &"x".repeat(1000),
    ] {
        let status = code_of(payments.detokenize(detokenize_req(token)).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(!has_digit_run(status.message(), 6));
        let status = code_of(
            payments
                .get_token_info(pb::GetTokenInfoRequest {
                    token: token.into(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    let long_reason = pb::DetokenizeRequest {
        token: UNKNOWN_TOKEN.into(),
        reason: "r".repeat(513),
    };
    assert_eq!(
        code_of(payments.detokenize(long_reason).await).code(),
        Code::InvalidArgument
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn unknown_and_expired_tokens_are_not_found() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;

    let status = code_of(payments.detokenize(detokenize_req(UNKNOWN_TOKEN)).await);
    assert_eq!(status.code(), Code::NotFound);
    let status = code_of(
        checkout
            .get_token_info(pb::GetTokenInfoRequest {
                token: UNKNOWN_TOKEN.into(),
            })
            .await,
    );
    assert_eq!(status.code(), Code::NotFound);

    let req = pb::TokenizeRequest {
        pan: VISA.into(),
        expires_at: Some(timestamp_in(Duration::from_secs(1), false)),
        ..Default::default()
    };
    let resp = checkout.tokenize(req).await.unwrap().into_inner();
    assert!(resp.info.unwrap().expires_at.is_some());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match payments.detokenize(detokenize_req(&resp.token)).await {
            Ok(r) => assert_eq!(r.into_inner().pan, VISA_DIGITS),
            Err(s) => {
                assert_eq!(s.code(), Code::NotFound, "{}", s.message());
                break;
            }
        }
        assert!(Instant::now() < deadline, "token did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn tampered_ciphertext_is_data_loss() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;
    let token = checkout
        .tokenize(tokenize_req(VISA))
        .await
        .unwrap()
        .into_inner()
        .token;

    let db = srv.db();
    let mut ciphertext: Vec<u8> = db
        .query_row(
            "SELECT ciphertext FROM tokens WHERE token = ?1",
            [&token],
            |r| r.get(0),
        )
        .unwrap();
    ciphertext[0] ^= 0x01;
    db.execute(
        "UPDATE tokens SET ciphertext = ?1 WHERE token = ?2",
        rusqlite::params![ciphertext, token],
    )
    .unwrap();
    drop(db);

    let status = code_of(payments.detokenize(detokenize_req(&token)).await);
    assert_eq!(status.code(), Code::DataLoss, "{}", status.message());
    assert!(!has_digit_run(status.message(), 6));
    srv.shutdown().await;
}

#[tokio::test]
async fn missing_or_unknown_credentials_are_unauthenticated_and_audited() {
    let mut srv = TestServer::start().await;
    let mut anonymous = srv.client_with_key(None).await;
    let status = code_of(anonymous.tokenize(tokenize_req(VISA)).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!has_digit_run(status.message(), 6));

    for key in ["tvk_nope_nope", "garbage", "tvk_"] {
        let mut client = srv.client_with_key(Some(key)).await;
        let status = code_of(client.tokenize(tokenize_req(VISA)).await);
        assert_eq!(status.code(), Code::Unauthenticated, "{key}");
    }
    // A valid key of one principal with another principal's key id tampered.
    let mut tampered = srv.key(CHECKOUT).to_owned();
    // Replace the last character by a different one (a key ending in 'x' stays valid with 'x').
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'x' { 'y' } else { 'x' });
    let mut client = srv.client_with_key(Some(&tampered)).await;
    assert_eq!(
        code_of(client.tokenize(tokenize_req(VISA)).await).code(),
        Code::Unauthenticated
    );

    let mut req = Request::new(tokenize_req(VISA));
    req.metadata_mut()
        .insert("authorization", "Basic Y2hlY2tvdXQ6cHc=".parse().unwrap());
    assert_eq!(
        code_of(anonymous.tokenize(req).await).code(),
        Code::Unauthenticated
    );

    let refusals: i64 = srv
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'tokenize' AND outcome = 'UNAUTHENTICATED'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(refusals >= 6, "refusals audited: {refusals}");
    srv.shutdown().await;
}

#[tokio::test]
async fn wrong_role_is_permission_denied_and_audited() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;
    let mut deleter = srv.client(DELETER).await;
    let mut auditor = srv.client(AUDITOR).await;
    let token = checkout
        .tokenize(tokenize_req(VISA))
        .await
        .unwrap()
        .into_inner()
        .token;

    let denied = |r: Status| assert_eq!(r.code(), Code::PermissionDenied, "{}", r.message());
    denied(code_of(checkout.detokenize(detokenize_req(&token)).await));
    denied(code_of(
        checkout
            .detokenize_batch(pb::DetokenizeBatchRequest {
                requests: vec![detokenize_req(&token)],
            })
            .await,
    ));
    denied(code_of(payments.tokenize(tokenize_req(VISA)).await));
    denied(code_of(
        auditor
            .tokenize_batch(pb::TokenizeBatchRequest {
                requests: vec![tokenize_req(VISA)],
            })
            .await,
    ));
    denied(code_of(
        checkout
            .delete_token(pb::DeleteTokenRequest {
                token: token.clone(),
            })
            .await,
    ));
    denied(code_of(
        deleter
            .get_token_info(pb::GetTokenInfoRequest {
                token: token.clone(),
            })
            .await,
    ));

    // The refused reveal did not happen: the token still works for payments.
    assert_eq!(
        payments
            .detokenize(detokenize_req(&token))
            .await
            .unwrap()
            .into_inner()
            .pan,
        VISA_DIGITS
    );
    let audited: i64 = srv
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE principal = 'checkout' AND action = 'detokenize' \
             AND outcome = 'PERMISSION_DENIED'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn batches_mix_good_and_bad_items_in_order() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;

    let requests = vec![
        tokenize_req(VISA),
        tokenize_req("4111111111111112"),
        pb::TokenizeRequest {
            pan: MASTERCARD.into(),
            format: pb::TokenFormat::PanShaped as i32,
            ..Default::default()
        },
        pb::TokenizeRequest {
            pan: VISA.into(),
            expires_at: Some(timestamp_in(Duration::from_secs(60), true)),
            ..Default::default()
        },
        pb::TokenizeRequest {
            pan: VISA.into(),
            format: 9,
            ..Default::default()
        },
    ];
    let results = checkout
        .tokenize_batch(pb::TokenizeBatchRequest { requests })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(results.results.len(), 5);
    let outcome = |i: usize| results.results[i].outcome.clone().unwrap();
    let TokenizeOutcome::Success(visa) = outcome(0) else {
        panic!("item 0 failed")
    };
    let TokenizeOutcome::Success(mc) = outcome(2) else {
        panic!("item 2 failed")
    };
    for i in [1, 3, 4] {
        let TokenizeOutcome::Error(e) = outcome(i) else {
            panic!("item {i} succeeded")
        };
        assert_eq!(e.code, Code::InvalidArgument as i32);
        assert!(!has_digit_run(&e.message, 6));
    }

    let requests = vec![
        detokenize_req(&visa.token),
        detokenize_req(UNKNOWN_TOKEN),
        detokenize_req("garbage"),
        detokenize_req(&mc.token),
        pb::DetokenizeRequest {
            token: visa.token.clone(),
            reason: "r".repeat(600),
        },
    ];
    let results = payments
        .detokenize_batch(pb::DetokenizeBatchRequest { requests })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<DetokenizeOutcome> = results
        .results
        .into_iter()
        .map(|r| r.outcome.unwrap())
        .collect();
    assert_eq!(outcomes.len(), 5);
    assert!(matches!(&outcomes[0], DetokenizeOutcome::Success(r) if r.pan == VISA_DIGITS));
    assert!(matches!(&outcomes[1], DetokenizeOutcome::Error(e) if e.code == Code::NotFound as i32));
    assert!(
        matches!(&outcomes[2], DetokenizeOutcome::Error(e) if e.code == Code::InvalidArgument as i32)
    );
    assert!(matches!(&outcomes[3], DetokenizeOutcome::Success(r) if r.pan == MASTERCARD));
    assert!(
        matches!(&outcomes[4], DetokenizeOutcome::Error(e) if e.code == Code::InvalidArgument as i32)
    );

    // Empty batches are fine.
    let empty = checkout
        .tokenize_batch(pb::TokenizeBatchRequest { requests: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn oversized_batches_are_invalid_argument() {
    let cfg = ServerConfig {
        max_batch_items: 5,
        ..ServerConfig::default()
    };
    let mut srv = TestServer::start_with(cfg).await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;

    let five: Vec<_> = (0..5).map(|i| tokenize_req(&test_pan(i))).collect();
    let ok = checkout
        .tokenize_batch(pb::TokenizeBatchRequest {
            requests: five.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 5);

    let mut six = five;
    six.push(tokenize_req(&test_pan(5)));
    let status = code_of(
        checkout
            .tokenize_batch(pb::TokenizeBatchRequest { requests: six })
            .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("limit of 5"),
        "{}",
        status.message()
    );

    let six: Vec<_> = (0..6).map(|_| detokenize_req(UNKNOWN_TOKEN)).collect();
    let status = code_of(
        payments
            .detokenize_batch(pb::DetokenizeBatchRequest { requests: six })
            .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    srv.shutdown().await;
}

#[tokio::test]
async fn keep_bin_on_a_card_under_15_digits_is_invalid_argument() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    // Keeping six and four of 12 digits would show 10 of them; GetTokenInfo shows only four.
    for payload in ["41111111111", "4111111111111"] {
        let pan = format!(
            "{payload}{}",
            tokenvault::card::luhn_check_digit(payload.as_bytes()) as char
        );
        let req = pb::TokenizeRequest {
            pan: pan.clone(),
            format: pb::TokenFormat::PanShapedKeepBin as i32,
            ..Default::default()
        };
        let status = checkout.tokenize(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(!has_digit_run(status.message(), 6), "{}", status.message());
        // Per item in a batch too, next to a valid item.
        let ok = pb::TokenizeRequest {
            pan: pan.clone(),
            format: pb::TokenFormat::PanShaped as i32,
            ..Default::default()
        };
        let results = checkout
            .tokenize_batch(pb::TokenizeBatchRequest {
                requests: vec![req, ok],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(
            matches!(&results[0].outcome, Some(TokenizeOutcome::Error(e))
                if e.code == Code::InvalidArgument as i32)
        );
        assert!(matches!(
            &results[1].outcome,
            Some(TokenizeOutcome::Success(_))
        ));
    }
    // 15 digits and more keep the BIN.
    let amex = "378282246310005";
    let resp = checkout
        .tokenize(pb::TokenizeRequest {
            pan: amex.into(),
            format: pb::TokenFormat::PanShapedKeepBin as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.token.starts_with("378282") && resp.token.ends_with("0005"));
    srv.shutdown().await;
}

#[tokio::test]
async fn health_serves_and_reflection_lists_the_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mut srv = TestServer::start().await;
    let mut health = HealthClient::new(srv.channel().await);
    for service in ["", SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(srv.channel().await);
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(SERVICE_NAME.into())),
            },
        ];
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&SERVICE_NAME), "{names:?}");
        // Stock grpcurl resolves the health service through reflection.
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected file descriptors")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(srv.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list")
        };
        assert!(list.service.iter().any(|s| s.name == SERVICE_NAME));
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "grpc.health.v1.Health"));
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn revoked_client_is_unauthenticated_within_a_second() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let token = checkout
        .tokenize(tokenize_req(VISA))
        .await
        .unwrap()
        .into_inner()
        .token;

    // Revoke from a second vault handle, as `tokenvault clients revoke` in another process
    // would: the server learns of it through its change watcher.
    let admin = tokenvault::vault::Vault::open(VaultConfig::new(srv.data_dir()), &srv.master)
        .expect("open a second handle");
    assert!(admin.revoke_client(&Caller::cli(), CHECKOUT).await.unwrap());
    admin.close().await;

    let revoked_at = Instant::now();
    loop {
        match checkout
            .get_token_info(pb::GetTokenInfoRequest {
                token: token.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());
                break;
            }
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "revocation not seen in time"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Other principals are unaffected.
    let mut payments = srv.client(PAYMENTS).await;
    payments.detokenize(detokenize_req(&token)).await.unwrap();
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_acknowledged_token() {
    const N: u64 = 200;
    let mut srv = TestServer::start().await;
    let client = srv.client(CHECKOUT).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let quarter = Arc::new(tokio::sync::Notify::new());

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut client = client.clone();
        let (acked, quarter) = (acked.clone(), quarter.clone());
        tasks.spawn(async move {
            let pan = test_pan(i);
            let result = client.tokenize(tokenize_req(&pan)).await;
            if result.is_ok() && acked.fetch_add(1, Ordering::SeqCst) + 1 == (N / 4) as usize {
                quarter.notify_one();
            }
            (pan, result.map(|r| r.into_inner().token))
        });
    }
    // Shut down while the rest are in flight.
    quarter.notified().await;
    srv.shutdown().await;

    let mut acknowledged = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let (pan, Ok(token)) = joined.unwrap() {
            acknowledged.push((pan, token));
        }
    }
    assert!(acknowledged.len() >= (N / 4) as usize);
    // The server no longer accepts work.
    let mut late = client.clone();
    assert!(late.tokenize(tokenize_req(VISA)).await.is_err());

    let vault = srv.reopen();
    for (pan, token) in &acknowledged {
        let token = Token::parse(token).unwrap();
        let revealed = vault
            .detokenize(&Caller::cli(), token, "shutdown test".into())
            .await
            .expect("acknowledged token survives shutdown");
        assert_eq!(revealed.pan.expose_digits(), pan);
    }
    let stops: i64 = srv
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'server_stop'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stops, 1);
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_allowed_batches_fit_the_message_limits() {
    let mut srv = TestServer::start().await;
    let mut checkout = srv.client(CHECKOUT).await;
    let mut payments = srv.client(PAYMENTS).await;
    let n = ServerConfig::default().max_batch_items as u64;

    let requests: Vec<_> = (0..n).map(|i| tokenize_req(&test_pan(i))).collect();
    let results = checkout
        .tokenize_batch(pb::TokenizeBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len() as u64, n);
    let tokens: Vec<String> = results
        .into_iter()
        .map(|r| match r.outcome {
            Some(TokenizeOutcome::Success(t)) => t.token,
            other => panic!("item failed: {other:?}"),
        })
        .collect();

    // Longest reasons: above tonic's default 4 MiB limit, within the computed one.
    let requests: Vec<_> = tokens
        .iter()
        .map(|t| pb::DetokenizeRequest {
            token: t.clone(),
            reason: "r".repeat(512),
        })
        .collect();
    let results = payments
        .detokenize_batch(pb::DetokenizeBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len() as u64, n);
    for (i, r) in results.into_iter().enumerate() {
        match r.outcome {
            Some(DetokenizeOutcome::Success(d)) => assert_eq!(d.pan, test_pan(i as u64)),
            other => panic!("item {i} failed: {other:?}"),
        }
    }
    srv.shutdown().await;
}
