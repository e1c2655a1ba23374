//! Decoding every request message of the service from arbitrary bytes, then the same
//! validation the server runs on it (`grpc::convert`): never panics; a failure is
//! INVALID_ARGUMENT with a message from the fixed vocabulary (so it cannot echo the card
//! number, token or reason); a success carries exactly what was sent. The first byte picks
//! the message type, the rest is the encoded message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokenvault::card::MIN_LEN;
use tokenvault::grpc::{convert, pb};
use tokenvault::token::TokenFormat;
use tokenvault::vault;
use tokenvault_fuzz::{check_conversion_error, digit_runs, NOW_MICROS};

fn tokenize_item(req: pb::TokenizeRequest) {
    // The generated Debug of a request would print the card number; ours redacts it.
    let debug = format!("{req:?}");
    for run in digit_runs(&req.pan, MIN_LEN) {
        assert!(!debug.contains(run), "Debug of TokenizeRequest shows the card number");
    }
    let pan = req.pan.clone();
    let (format, reuse, expires) = (req.format, req.reuse_existing, req.expires_at);
    // What the server's TryFrom runs for Tokenize, with a fixed clock (Batch uses this too).
    match convert::tokenize_request(req.clone(), NOW_MICROS) {
        Ok(ok) => {
            let digits: String = pan.chars().filter(char::is_ascii_digit).collect();
            assert!(ok.pan.expose_digits() == digits, "PAN changed in conversion");
            let want = match format {
                0 | 1 => TokenFormat::Opaque,
                2 => TokenFormat::PanShaped,
                3 => TokenFormat::PanShapedKeepBin,
                other => panic!("unknown format {other} accepted"),
            };
            assert_eq!(ok.format, want);
            assert_eq!(ok.reuse_existing, reuse);
            match (expires, ok.expires_at) {
                (None, None) => {}
                (Some(ts), Some(at)) => {
                    assert!(at > NOW_MICROS);
                    assert_eq!(at, ts.seconds * 1_000_000 + i64::from(ts.nanos / 1_000));
                }
                _ => panic!("expires_at lost or invented"),
            }
        }
        Err(e) => check_conversion_error(&e, &[&pan]),
    }
    // The TryFrom itself (real clock): only its error shape is checked.
    if let Err(e) = vault::TokenizeRequest::try_from(req) {
        check_conversion_error(&e, &[&pan]);
    }
}

fn detokenize_item(req: pb::DetokenizeRequest) {
    let (token, reason) = (req.token.clone(), req.reason.clone());
    match convert::detokenize_request(req) {
        Ok((t, r)) => {
            assert_eq!(t.as_str(), token);
            assert_eq!(r, reason);
            assert!(r.len() <= convert::MAX_REASON_BYTES);
        }
        Err(e) => check_conversion_error(&e, &[&token, &reason]),
    }
}

fn token_only(token: &str) {
    match convert::parse_token(token) {
        Ok(t) => assert_eq!(t.as_str(), token),
        Err(e) => check_conversion_error(&e, &[token]),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Ok(req) = pb::TokenizeRequest::decode(bytes) {
                tokenize_item(req);
            }
        }
        1 => {
            if let Ok(batch) = pb::TokenizeBatchRequest::decode(bytes) {
                let debug = format!("{batch:?}");
                for item in &batch.requests {
                    for run in digit_runs(&item.pan, MIN_LEN) {
                        assert!(!debug.contains(run), "Debug of a batch shows a card number");
                    }
                }
                batch.requests.into_iter().for_each(tokenize_item);
            }
        }
        2 => {
            if let Ok(req) = pb::DetokenizeRequest::decode(bytes) {
                detokenize_item(req);
            }
        }
        3 => {
            if let Ok(batch) = pb::DetokenizeBatchRequest::decode(bytes) {
                batch.requests.into_iter().for_each(detokenize_item);
            }
        }
        4 => {
            if let Ok(req) = pb::GetTokenInfoRequest::decode(bytes) {
                token_only(&req.token);
            }
        }
        _ => {
            if let Ok(req) = pb::DeleteTokenRequest::decode(bytes) {
                token_only(&req.token);
            }
        }
    }
});
