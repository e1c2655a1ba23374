//! Checks shared by the fuzz targets.
//!
//! The property behind "no error echoes its input" is checked as a closed vocabulary: every
//! error message, with its numbers replaced by `#`, must be one of the messages the code can
//! produce, and those are collected from the code itself ([`vocabulary`]) by provoking each
//! error once with a harmless input. A message that carried any part of the input would not
//! be in that set. The numbers it carries (positions, counts, limits) are bounded too.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use prost_types::Timestamp;
use tokenvault::card::{PanError, MAX_LEN, MIN_LEN};
use tokenvault::error::Error;
use tokenvault::grpc::{convert, pb};
use tokenvault::token::{TokenError, MAX_TOKEN_LEN};

/// A fixed clock for the conversions, so a run is reproducible: 2023-11-14T22:13:20Z.
pub const NOW_MICROS: i64 = 1_700_000_000_000_000;

/// Runs of ASCII digits of at least `min` characters.
pub fn digit_runs(text: &str, min: usize) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|r| r.len() >= min)
        .collect()
}

/// The message with every run of digits replaced by `#`.
pub fn normalise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_digits = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// Every message an inbound conversion can fail with, normalised.
pub fn vocabulary() -> &'static BTreeSet<String> {
    static SET: OnceLock<BTreeSet<String>> = OnceLock::new();
    SET.get_or_init(|| {
        let mut messages: Vec<String> = Vec::new();
        for e in [
            PanError::Empty,
            PanError::NotADigit(1),
            PanError::MisplacedSeparator(1),
            PanError::TooShort(1),
            PanError::TooLong(20),
            PanError::LuhnFailed,
        ] {
            messages.push(e.to_string());
            messages.push(Error::from(e).to_string());
        }
        for e in [
            TokenError::Empty,
            TokenError::Malformed,
            TokenError::TooLong(MAX_TOKEN_LEN),
            TokenError::LooksLikePan,
        ] {
            messages.push(e.to_string());
            messages.push(Error::from(e).to_string());
        }
        // The conversion's own checks, provoked once each.
        let valid_pan = "4111111111111111".to_owned();
        let provoked = [
            convert::token_format(i32::MAX).err(),
            convert::timestamp_to_micros(&Timestamp { seconds: 0, nanos: -1 }, "expires_at").err(),
            convert::tokenize_request(
                pb::TokenizeRequest {
                    pan: valid_pan,
                    expires_at: Some(Timestamp { seconds: 1, nanos: 0 }),
                    ..Default::default()
                },
                NOW_MICROS,
            )
            .err(),
            convert::detokenize_request(pb::DetokenizeRequest {
                token: "tok_AAAAAAAAAAAAAAAAAAAAAA".into(),
                reason: "r".repeat(convert::MAX_REASON_BYTES + 1),
            })
            .err(),
        ];
        for e in provoked {
            messages.push(e.expect("each provoked conversion fails").to_string());
        }
        messages.iter().map(|m| normalise(m)).collect()
    })
}

/// Asserts an error message is from the vocabulary, carries no number larger than
/// `max_number`, and contains no input digit run of card-number length.
pub fn check_message(message: &str, inputs: &[&str], max_number: usize) {
    assert!(
        vocabulary().contains(&normalise(message)),
        "error message outside the known vocabulary: {message:?}"
    );
    for run in digit_runs(message, 1) {
        // Numbers in messages are positions, counts and limits; a long one is suspicious.
        assert!(run.len() <= 20, "long number in an error message");
        let n: u128 = run.parse().unwrap();
        assert!(n <= max_number as u128, "number {n} in {message:?} exceeds {max_number}");
    }
    for input in inputs {
        for run in digit_runs(input, MIN_LEN) {
            assert!(!message.contains(run), "error message contains an input digit run");
        }
    }
}

/// The largest number an error about `inputs` may carry: the limits of the rules, and
/// positions and counts within the longest input.
pub fn max_number_for(inputs: &[&str]) -> usize {
    let longest = inputs.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    longest
        .max(MAX_LEN + 1)
        .max(MAX_TOKEN_LEN)
        .max(convert::MAX_REASON_BYTES)
}

/// A conversion error must be INVALID_ARGUMENT with a message from the vocabulary.
pub fn check_conversion_error(err: &Error, inputs: &[&str]) {
    match err {
        Error::InvalidArgument(m) => check_message(m, inputs, max_number_for(inputs)),
        other => panic!("conversion failed with {other:?}, not InvalidArgument"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_accepts_real_messages_and_rejects_echoes() {
        check_message("pan: card number has 11 digits, fewer than the minimum of 12", &[], 20);
        check_message("token: token is not well-formed", &["garbage"], 64);
        let echo = std::panic::catch_unwind(|| {
            check_message("pan: card number 4111111111111111 fails", &["4111111111111111"], 64)
        });
        assert!(echo.is_err(), "an echoing message must be refused");
        let big = std::panic::catch_unwind(|| {
            check_message("pan: card number has a misplaced separator at position 99", &[], 20)
        });
        assert!(big.is_err(), "a number beyond the input must be refused");
    }

    #[test]
    fn helpers() {
        assert_eq!(normalise("a 12 b 3"), "a # b #");
        assert_eq!(digit_runs("x 1234 56 7890123", 4), vec!["1234", "7890123"]);
    }
}
