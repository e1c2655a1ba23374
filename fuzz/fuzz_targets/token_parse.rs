//! `Token::parse` on arbitrary UTF-8: never panics; an accepted token is the input unchanged
//! and is either `tok_` + 22..=43 URL-safe base64 characters or 12..=19 digits failing Luhn
//! (never a card number); a rejection's message is from the fixed vocabulary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::card::{luhn_valid, MAX_LEN, MIN_LEN};
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenError, MAX_TOKEN_LEN, OPAQUE_PREFIX};
use tokenvault_fuzz::{check_message, max_number_for};

fn url_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fuzz_target!(|input: &str| {
    match Token::parse(input) {
        Ok(token) => {
            assert_eq!(token.as_str(), input);
            if let Some(body) = input.strip_prefix(OPAQUE_PREFIX) {
                assert!((22..=43).contains(&body.len()), "opaque body length");
                assert!(body.bytes().all(url_safe), "opaque body alphabet");
            } else {
                let b = input.as_bytes();
                assert!((MIN_LEN..=MAX_LEN).contains(&b.len()));
                assert!(b.iter().all(u8::is_ascii_digit));
                assert!(!luhn_valid(b), "a Luhn-valid number was accepted as a token");
            }
        }
        Err(e) => {
            if e == TokenError::Empty {
                assert!(input.is_empty());
            }
            if let TokenError::TooLong(n) = e {
                assert_eq!(n, MAX_TOKEN_LEN);
                assert!(input.chars().count() > MAX_TOKEN_LEN);
            }
            let max = max_number_for(&[input]);
            check_message(&e.to_string(), &[input], max);
            check_message(&Error::from(e).to_string(), &[input], max);
        }
    }
});
