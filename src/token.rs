//! Token formats and generation. Tokens come from the OS CSPRNG and are never derived from the PAN.
//!
//! This module owns:
//! - the token formats ([`TokenFormat`]) and their stable storage codes;
//! - drawing fresh tokens ([`generate`]) from the OS CSPRNG only ([`crate::crypto::public_random`]);
//! - how many distinct tokens a format can produce ([`space_size`]), which the store uses to
//!   notice an exhausted space;
//! - syntax validation of tokens arriving from callers ([`Token::parse`]), including refusing
//!   something that is really a card number.
//!
//! Formats:
//! - `Opaque`: `tok_` + 7 characters of creation time (milliseconds, in an alphabet sorted like
//!   ASCII) + 24 URL-safe base64 characters = 144 random bits. The time prefix gives the
//!   token index locality: a commit's new tokens land in one or two B-tree pages instead of
//!   one random page each, which is what keeps inserts fast as the vault grows. It reveals
//!   only the creation time, which `TokenInfo` shows anyway.
//! - `PanShaped`: same length as the PAN, digits only, keeps the last four, random elsewhere,
//!   and always fails the Luhn check so a token can never be mistaken for (or equal) a PAN.
//! - `PanShapedKeepBin`: as `PanShaped`, also keeping the first six digits.
//!
//! Neither errors nor anything else here ever echo the input.

use crate::card::{luhn_valid, Pan, MAX_LEN, MIN_LEN};

/// Longest token accepted from a caller.
pub const MAX_TOKEN_LEN: usize = 64;
/// Prefix of opaque tokens, so they can never be confused with digit strings.
pub const OPAQUE_PREFIX: &str = "tok_";
/// Characters of creation time at the front of an opaque token's body (42 bits of
/// milliseconds since the Unix epoch: enough until the year 2109).
const OPAQUE_TIME_CHARS: usize = 7;
/// The URL-safe alphabet in ASCII order, so a time prefix sorts like the time it encodes.
const SORTED_URL_SAFE: &[u8; 64] =
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";
/// Random bytes in a generated opaque token (144 bits, a multiple of 3 so no padding).
const OPAQUE_RANDOM_BYTES: usize = 18;
/// Characters after the prefix in a generated opaque token.
const OPAQUE_BODY_LEN: usize = OPAQUE_RANDOM_BYTES / 3 * 4;
/// Accepted body lengths: 22 chars is the least that can carry 128 bits; the upper bound
/// leaves room for longer formats later without accepting arbitrary strings.
const OPAQUE_MIN_BODY: usize = 22;
const OPAQUE_MAX_BODY: usize = 43;
/// Digits kept from the front (`PanShapedKeepBin`) and the back (both shaped formats).
const KEPT_BIN: usize = 6;
const KEPT_LAST: usize = 4;

/// URL-safe base64 alphabet (RFC 4648 section 5).
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn is_url_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TokenFormat {
    #[default]
    Opaque,
    PanShaped,
    PanShapedKeepBin,
}

impl TokenFormat {
    /// Stable integer code used in storage and matching the proto enum numbers.
    pub fn code(self) -> i64 {
        match self {
            TokenFormat::Opaque => 1,
            TokenFormat::PanShaped => 2,
            TokenFormat::PanShapedKeepBin => 3,
        }
    }
    pub fn from_code(code: i64) -> Option<TokenFormat> {
        match code {
            1 => Some(TokenFormat::Opaque),
            2 => Some(TokenFormat::PanShaped),
            3 => Some(TokenFormat::PanShapedKeepBin),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TokenFormat::Opaque => "opaque",
            TokenFormat::PanShaped => "pan_shaped",
            TokenFormat::PanShapedKeepBin => "pan_shaped_keep_bin",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token is not well-formed")]
    Malformed,
    #[error("token is longer than {0} characters")]
    TooLong(usize),
    #[error("this looks like a card number, not a token")]
    LooksLikePan,
}

/// A syntactically valid token. Tokens are not secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// Validates the syntax of a token a caller sent us.
    ///
    /// Accepted: `tok_` + 22..=43 URL-safe base64 characters (opaque), or 12..=19 ASCII
    /// digits that fail Luhn (PAN-shaped). Digits that pass Luhn are refused as
    /// [`TokenError::LooksLikePan`]: a caller sent a card number where a token belongs, and
    /// the error must say so without echoing it.
    pub fn parse(input: &str) -> Result<Token, TokenError> {
        if input.is_empty() {
            return Err(TokenError::Empty);
        }
        // Bounded look-ahead: the check costs the same for a 65-char and a 1 MB input.
        if input.chars().nth(MAX_TOKEN_LEN).is_some() {
            return Err(TokenError::TooLong(MAX_TOKEN_LEN));
        }
        if let Some(body) = input.strip_prefix(OPAQUE_PREFIX) {
            if (OPAQUE_MIN_BODY..=OPAQUE_MAX_BODY).contains(&body.len())
                && body.bytes().all(is_url_safe)
            {
                return Ok(Token(input.to_string()));
            }
            return Err(TokenError::Malformed);
        }
        let bytes = input.as_bytes();
        if (MIN_LEN..=MAX_LEN).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_digit) {
            if luhn_valid(bytes) {
                return Err(TokenError::LooksLikePan);
            }
            return Ok(Token(input.to_string()));
        }
        Err(TokenError::Malformed)
    }
    /// A token read back from storage, which only ever holds generated tokens.
    pub(crate) fn from_stored(s: &str) -> Token {
        Token(s.to_owned())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Draws a fresh random token of `format` for `pan` from the OS CSPRNG.
pub fn generate(format: TokenFormat, pan: &Pan) -> Token {
    match format {
        TokenFormat::Opaque => generate_opaque(),
        TokenFormat::PanShaped => generate_shaped(pan, 0),
        TokenFormat::PanShapedKeepBin => generate_shaped(pan, KEPT_BIN),
    }
}

/// `tok_` + base64url of 18 random bytes. 18 bytes is exactly 24 characters with no padding
/// and every 6-bit group is uniform, so each character is unbiased.
fn generate_opaque() -> Token {
    let mut bytes = [0u8; OPAQUE_RANDOM_BYTES];
    crate::crypto::public_random(&mut bytes);
    let mut s = String::with_capacity(OPAQUE_PREFIX.len() + OPAQUE_TIME_CHARS + OPAQUE_BODY_LEN);
    s.push_str(OPAQUE_PREFIX);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for i in (0..OPAQUE_TIME_CHARS).rev() {
        s.push(char::from(
            SORTED_URL_SAFE[(millis >> (6 * i) & 0x3f) as usize],
        ));
    }
    for chunk in bytes.chunks_exact(3) {
        let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            s.push(char::from(URL_SAFE[(n >> shift & 0x3f) as usize]));
        }
    }
    Token(s)
}

/// A digit string the length of the PAN that keeps the first `keep_front` and the last four
/// digits, is uniformly random elsewhere, and fails Luhn.
///
/// Only the kept digits are copied out of the PAN, never the rest. Draw the free digits
/// uniformly; if the result happens to pass Luhn (1 in 10), replace one uniformly chosen
/// free digit by one of its 9 other values, uniformly. Changing a single digit always
/// changes the Luhn sum mod 10 (each position maps digits to sum contributions
/// bijectively), so the result fails. This is also uniform over Luhn-failing outputs: each
/// failing string `t` with `k` free digits is drawn directly with probability 10^-k, and has
/// exactly one Luhn-passing neighbour per free position, each leading to `t` with
/// probability 10^-k / (9k); total 10^-k * 10/9 for every `t`. Since the PAN passes Luhn,
/// the token can never equal it.
fn generate_shaped(pan: &Pan, keep_front: usize) -> Token {
    let digits = pan.expose_digits().as_bytes();
    let len = digits.len();
    let free = keep_front..len - KEPT_LAST;
    // A parsed Pan has >= 12 digits, so at least 2 stay free even when keeping six + four.
    debug_assert!(free.start < free.end);
    let mut out = vec![0u8; len];
    out[..keep_front].copy_from_slice(&digits[..keep_front]);
    out[free.end..].copy_from_slice(&digits[free.end..]);
    let mut rng = RandomBytes::new();
    for d in &mut out[free.clone()] {
        *d = b'0' + rng.below(10);
    }
    if luhn_valid(&out) {
        let pos = free.start + usize::from(rng.below((free.end - free.start) as u8));
        let delta = 1 + rng.below(9);
        out[pos] = b'0' + (out[pos] - b'0' + delta) % 10;
    }
    debug_assert!(!luhn_valid(&out));
    Token(String::from_utf8(out).expect("ASCII digits"))
}

/// Uniform small numbers from one OS CSPRNG read per token: a system call per digit made
/// shaped tokens ten times dearer than opaque ones.
struct RandomBytes {
    buf: [u8; 32],
    next: usize,
}

impl RandomBytes {
    fn new() -> RandomBytes {
        let mut buf = [0u8; 32];
        crate::crypto::public_random(&mut buf);
        RandomBytes { buf, next: 0 }
    }

    /// Uniform in `0..n` (`n` in 1..=255), by rejecting bytes beyond the last full multiple of `n`.
    fn below(&mut self, n: u8) -> u8 {
        let limit = 256 - 256 % u16::from(n);
        loop {
            if self.next == self.buf.len() {
                crate::crypto::public_random(&mut self.buf);
                self.next = 0;
            }
            let b = self.buf[self.next];
            self.next += 1;
            if u16::from(b) < limit {
                return b % n;
            }
        }
    }
}

/// Number of distinct tokens `format` can produce for a PAN of this length (saturating);
/// the store gives up drawing when collisions show the space is exhausted.
///
/// Opaque: 2^144, reported as `u128::MAX`. PAN-shaped with `k` free digits: of the 10^k
/// fillings exactly one in ten passes Luhn, so 9 * 10^(k-1) remain (0 when nothing is free).
pub fn space_size(format: TokenFormat, pan_len: usize) -> u128 {
    let kept = match format {
        TokenFormat::Opaque => return u128::MAX,
        TokenFormat::PanShaped => KEPT_LAST,
        TokenFormat::PanShapedKeepBin => KEPT_BIN + KEPT_LAST,
    };
    let free = pan_len.saturating_sub(kept);
    if free == 0 {
        return 0;
    }
    u32::try_from(free - 1)
        .ok()
        .and_then(|e| 10u128.checked_pow(e))
        .and_then(|p| p.checked_mul(9))
        .unwrap_or(u128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::luhn_check_digit;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn make_pan(prefix: &str, len: usize) -> Pan {
        let mut s = prefix.to_string();
        while s.len() < len - 1 {
            s.push('7');
        }
        let c = luhn_check_digit(s.as_bytes());
        s.push(c as char);
        Pan::parse(&s).unwrap()
    }

    #[test]
    fn format_codes_are_stable() {
        for f in [
            TokenFormat::Opaque,
            TokenFormat::PanShaped,
            TokenFormat::PanShapedKeepBin,
        ] {
            assert_eq!(TokenFormat::from_code(f.code()), Some(f));
        }
        assert_eq!(TokenFormat::from_code(0), None);
        assert_eq!(TokenFormat::default(), TokenFormat::Opaque);
    }

    #[test]
    fn opaque_tokens_sort_by_creation_time() {
        let pan = make_pan("411111", 16);
        let first = generate(TokenFormat::Opaque, &pan);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = generate(TokenFormat::Opaque, &pan);
        assert!(
            first.as_str()[..4 + 7] < second.as_str()[..4 + 7],
            "{first} then {second}"
        );
    }

    #[test]
    fn opaque_tokens() {
        let pan = make_pan("411111", 16);
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let t = generate(TokenFormat::Opaque, &pan);
            let s = t.as_str();
            assert_eq!(s.len(), 4 + 7 + 24);
            let body = s.strip_prefix("tok_").unwrap();
            assert!(body.bytes().all(|b| URL_SAFE.contains(&b)), "{s}");
            assert_eq!(Token::parse(s), Ok(t.clone()));
            assert!(seen.insert(t.into_string()), "duplicate opaque token");
        }
        // Every alphabet character shows up (the encoding uses the whole alphabet), and the
        // spread is roughly even: 240,000 chars / 64 = 3750 expected each.
        let mut counts = [0usize; 64];
        for t in &seen {
            for b in t[4 + 7..].bytes() {
                counts[URL_SAFE.iter().position(|&a| a == b).unwrap()] += 1;
            }
        }
        for (i, &c) in counts.iter().enumerate() {
            assert!((3000..4500).contains(&c), "char {i} seen {c} times");
        }
    }

    fn check_shaped(format: TokenFormat, pan: &Pan, t: &Token) {
        let p = pan.expose_digits();
        let s = t.as_str();
        assert_eq!(s.len(), p.len());
        assert!(s.bytes().all(|b| b.is_ascii_digit()));
        assert!(!luhn_valid(s.as_bytes()));
        assert_ne!(s, p);
        assert_eq!(&s[s.len() - 4..], &p[p.len() - 4..]);
        if format == TokenFormat::PanShapedKeepBin {
            assert_eq!(&s[..6], &p[..6]);
        }
        assert_eq!(Token::parse(s).as_ref(), Ok(t));
    }

    #[test]
    fn shaped_tokens_every_length() {
        for format in [TokenFormat::PanShaped, TokenFormat::PanShapedKeepBin] {
            for len in MIN_LEN..=MAX_LEN {
                let pan = make_pan("5555", len);
                let mut distinct = HashSet::new();
                for _ in 0..2_000 {
                    let t = generate(format, &pan);
                    check_shaped(format, &pan, &t);
                    distinct.insert(t.into_string());
                }
                // KEEP_BIN on 12 digits has only 90 possible tokens; expect to see nearly all.
                let expect = space_size(format, len).min(2_000) as usize;
                assert!(
                    distinct.len() * 10 >= expect * 8,
                    "{format:?} len {len}: {} distinct",
                    distinct.len()
                );
            }
        }
    }

    #[test]
    fn shaped_tokens_are_uniform_over_the_small_space() {
        // 12-digit PAN with BIN kept: 2 free digits, 90 Luhn-failing fillings, each equally
        // likely (see generate_shaped). 90,000 draws -> ~1000 each.
        let pan = make_pan("411111", 12);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..90_000 {
            *counts
                .entry(generate(TokenFormat::PanShapedKeepBin, &pan).into_string())
                .or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 90);
        for (t, c) in counts {
            assert!((800..1200).contains(&c), "{t}: {c}");
        }
    }

    #[test]
    fn space_sizes() {
        assert_eq!(space_size(TokenFormat::Opaque, 16), u128::MAX);
        assert_eq!(space_size(TokenFormat::PanShaped, 16), 9 * 10u128.pow(11));
        assert_eq!(space_size(TokenFormat::PanShaped, 12), 9 * 10u128.pow(7));
        assert_eq!(
            space_size(TokenFormat::PanShapedKeepBin, 16),
            9 * 10u128.pow(5)
        );
        assert_eq!(space_size(TokenFormat::PanShapedKeepBin, 12), 90);
        assert_eq!(space_size(TokenFormat::PanShapedKeepBin, 10), 0);
        assert_eq!(space_size(TokenFormat::PanShaped, 0), 0);
        assert_eq!(space_size(TokenFormat::PanShaped, 5), 9);
        assert_eq!(space_size(TokenFormat::PanShaped, 1000), u128::MAX);
        assert_eq!(space_size(TokenFormat::PanShaped, usize::MAX), u128::MAX);
    }

    #[test]
    fn parse_accepts_and_rejects() {
        let tok22 = format!("tok_{}", "A".repeat(22));
        let tok43 = format!("tok_{}", "a-_9".repeat(10) + "xyz");
        for ok in [
            tok22.as_str(),
            tok43.as_str(),
            "tok_abcdefghijklmnopqrstuvwx",
            "411111111112",
            "4111111111111112",
            "4111111111111111112",
        ] {
            assert_eq!(Token::parse(ok).unwrap().as_str(), ok);
        }
        use TokenError::*;
        let long = "a".repeat(65);
        let huge = "4".repeat(1 << 20);
        let long_unicode = "é".repeat(65);
        let cases: &[(&str, TokenError)] = &[
            ("", Empty),
            (&long, TooLong(64)),
            (&huge, TooLong(64)),
            (&long_unicode, TooLong(64)),
            ("4111111111111111", LooksLikePan),
            ("378282246310005", LooksLikePan),
            ("6759649826438453", LooksLikePan),
            ("411111111117", LooksLikePan),
            ("4111111111111111110", LooksLikePan),
            ("tok_", Malformed),
            ("tok_abc", Malformed),
            ("tok_AAAAAAAAAAAAAAAAAAAAA", Malformed), // 21
            (
                "tok_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                Malformed,
            ), // 44
            ("tok_AAAAAAAAAAAAAAAAAAAA+/AA", Malformed),
            ("tok_AAAAAAAAAAAAAAAAAAAAAA==", Malformed),
            ("tok_AAAAAAAAAAAA AAAAAAAAAA", Malformed),
            ("tok_AAAAAAAAAAAAAAAAAAAAAAé", Malformed),
            ("TOK_AAAAAAAAAAAAAAAAAAAAAA", Malformed),
            (" tok_AAAAAAAAAAAAAAAAAAAAAA", Malformed),
            ("tok_AAAAAAAAAAAAAAAAAAAAAA\n", Malformed),
            ("41111111111", Malformed),
            ("41111111111111111111", Malformed),
            ("4111 1111 1111 1111", Malformed),
            ("4111-1111-1111-1112", Malformed),
            ("٤١١١١١١١١١١١١١١٢", Malformed),
            ("hello", Malformed),
        ];
        for (input, want) in cases {
            assert_eq!(
                Token::parse(input).as_ref(),
                Err(want),
                "{:?}",
                &input[..input.len().min(40)]
            );
        }
    }

    #[test]
    fn errors_never_contain_input() {
        for input in [
            "4111111111111111",
            "41111111111111111111",
            "4111 1111 1111 1112",
            &"4".repeat(70),
            "tok_secretsecret",
        ] {
            let e = Token::parse(input).unwrap_err();
            let shown = format!("{e} {e:?}");
            for len in 5..=input.len().min(30) {
                for start in 0..=input.len() - len {
                    let sub = &input[start..start + len];
                    assert!(!shown.contains(sub), "{shown:?} leaks {sub:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_shaped_token_fails_luhn(
            payload in (MIN_LEN..=MAX_LEN)
                .prop_flat_map(|len| proptest::collection::vec(0u8..10, len - 1)),
            keep_bin in any::<bool>(),
        ) {
            let mut digits: Vec<u8> = payload.into_iter().map(|d| b'0' + d).collect();
            digits.push(luhn_check_digit(&digits));
            let pan = Pan::parse(std::str::from_utf8(&digits).unwrap()).unwrap();
            let format = if keep_bin {
                TokenFormat::PanShapedKeepBin
            } else {
                TokenFormat::PanShaped
            };
            let t = generate(format, &pan);
            prop_assert!(!luhn_valid(t.as_str().as_bytes()));
            prop_assert_ne!(t.as_str(), pan.expose_digits());
            prop_assert_eq!(&t.as_str()[digits.len() - 4..], &pan.expose_digits()[digits.len() - 4..]);
            prop_assert_eq!(Token::parse(t.as_str()), Ok(t.clone()));
        }

        #[test]
        fn parse_errors_never_echo_digits(s in "[0-9]{5,80}") {
            if let Err(e) = Token::parse(&s) {
                let shown = format!("{e} {e:?}");
                prop_assert!(!shown.contains(&s));
            }
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Token::parse(&s);
        }
    }
}
