//! `Pan::parse` on arbitrary UTF-8: never panics; an accepted number is exactly the input's
//! digits (12 to 19 of them, Luhn-valid) and never shows in `Debug` or the masked forms; a
//! rejection's message is from the fixed vocabulary, never contains the input's digit runs,
//! and the position or count it names lies within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::card::{luhn_valid, Pan, PanError, MAX_LEN, MIN_LEN};
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenError};
use tokenvault_fuzz::{check_message, max_number_for};

fuzz_target!(|input: &str| {
    let chars = input.chars().count();
    match Pan::parse(input) {
        Ok(pan) => {
            let digits: String = input.chars().filter(char::is_ascii_digit).collect();
            assert!(pan.expose_digits() == digits, "accepted PAN is not the input's digits");
            assert!((MIN_LEN..=MAX_LEN).contains(&pan.len()));
            assert!(luhn_valid(digits.as_bytes()));
            assert!(input
                .chars()
                .all(|c| c.is_ascii_digit() || c == ' ' || c == '-'));
            for shown in [format!("{pan:?}"), pan.masked(), pan.masked_last4()] {
                assert!(!shown.contains(&digits), "a display form shows the whole PAN");
            }
            assert_eq!(pan.last4(), digits[digits.len() - 4..]);
            // A card number is never accepted where a token belongs.
            assert_eq!(Token::parse(&digits), Err(TokenError::LooksLikePan));
        }
        Err(e) => {
            match &e {
                PanError::NotADigit(p) | PanError::MisplacedSeparator(p) => {
                    assert!((1..=chars).contains(p), "position outside the input")
                }
                PanError::TooShort(n) => assert!(*n < MIN_LEN && *n <= chars),
                PanError::TooLong(n) => assert!(*n > MAX_LEN && *n <= chars),
                PanError::Empty => assert!(input.is_empty()),
                PanError::LuhnFailed => {}
            }
            let max = max_number_for(&[input]);
            check_message(&e.to_string(), &[input], max);
            check_message(&Error::from(e.clone()).to_string(), &[input], max);
            // Debug is what a careless log line would print.
            let debug = format!("{e:?}");
            for run in tokenvault_fuzz::digit_runs(input, MIN_LEN) {
                assert!(!debug.contains(run), "Debug of the error shows an input digit run");
            }
        }
    }
});
