//! Card numbers. [`Pan`] is the only way a primary account number (PAN) enters the system.
//!
//! This module owns:
//! - parsing and normalising user input into a [`Pan`] (digits only, held in a zeroizing
//!   buffer), with errors that carry positions and counts but never any part of the input;
//! - the Luhn check ([`luhn_valid`], [`luhn_check_digit`]);
//! - brand detection from IIN ranges ([`Brand`]);
//! - PCI DSS 3.4.1 masking ([`Pan::masked`], [`Pan::masked_last4`], [`mask_parts`]);
//! - finding card numbers in free text ([`contains_card_number`]), so none reaches the audit
//!   trail through a caller's `reason`.
//!
//! A `Pan` deliberately has no `Display` and a redacted `Debug`, so it cannot end up in a log
//! line or an error message by accident; the digits are only reachable via
//! [`Pan::expose_digits`].

use zeroize::Zeroizing;

/// Fewest digits a PAN may have (ISO/IEC 7812 allows 8, but no brand we handle issues < 12).
pub const MIN_LEN: usize = 12;
/// Most digits a PAN may have (ISO/IEC 7812).
pub const MAX_LEN: usize = 19;
/// PANs with at least this many digits may show their first six when masked: six shown plus
/// four shown still leaves at least five hidden.
pub const BIN_VISIBLE_MIN_LEN: usize = 15;

/// Card brand, detected from the issuer identification number (IIN) ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Brand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    DinersClub,
    UnionPay,
    Maestro,
    Mir,
    Unknown,
}

impl Brand {
    /// Stable integer code used in storage (never change a value).
    pub fn code(self) -> i64 {
        match self {
            Brand::Unknown => 1,
            Brand::Visa => 2,
            Brand::Mastercard => 3,
            Brand::Amex => 4,
            Brand::Discover => 5,
            Brand::Jcb => 6,
            Brand::DinersClub => 7,
            Brand::UnionPay => 8,
            Brand::Maestro => 9,
            Brand::Mir => 10,
        }
    }
    pub fn from_code(code: i64) -> Brand {
        Brand::ALL
            .iter()
            .copied()
            .find(|b| b.code() == code)
            .unwrap_or(Brand::Unknown)
    }
    pub const ALL: [Brand; 10] = [
        Brand::Visa,
        Brand::Mastercard,
        Brand::Amex,
        Brand::Discover,
        Brand::Jcb,
        Brand::DinersClub,
        Brand::UnionPay,
        Brand::Maestro,
        Brand::Mir,
        Brand::Unknown,
    ];
    /// Stable lowercase name (used in APIs and metrics labels; never change a value).
    pub fn name(self) -> &'static str {
        match self {
            Brand::Visa => "visa",
            Brand::Mastercard => "mastercard",
            Brand::Amex => "amex",
            Brand::Discover => "discover",
            Brand::Jcb => "jcb",
            Brand::DinersClub => "diners_club",
            Brand::UnionPay => "unionpay",
            Brand::Maestro => "maestro",
            Brand::Mir => "mir",
            Brand::Unknown => "unknown",
        }
    }

    /// Detects the brand from the leading digits of an ASCII digit string.
    ///
    /// Only the first six digits are looked at. Ranges are tried longest prefix first, so a
    /// specific range (e.g. Discover's 622126-622925) wins over the broader one that
    /// contains it (UnionPay's 62).
    pub fn detect(digits: &[u8]) -> Brand {
        for &(width, lo, hi, brand) in IIN_TABLE {
            if let Some(prefix) = leading_number(digits, width) {
                if (lo..=hi).contains(&prefix) {
                    return brand;
                }
            }
        }
        Brand::Unknown
    }
}

/// (prefix width in digits, first prefix, last prefix, brand), sorted by width, widest first,
/// which is what resolves overlaps in favour of the most specific range.
const IIN_TABLE: &[(usize, u32, u32, Brand)] = &[
    // 6 digits
    (6, 622126, 622925, Brand::Discover), // Discover / UnionPay co-brand inside 62
    (6, 676770, 676770, Brand::Maestro),
    (6, 676774, 676774, Brand::Maestro),
    // 4 digits
    (4, 2200, 2204, Brand::Mir),
    (4, 2221, 2720, Brand::Mastercard),
    (4, 3095, 3095, Brand::DinersClub),
    (4, 3528, 3589, Brand::Jcb),
    (4, 6011, 6011, Brand::Discover),
    (4, 6304, 6304, Brand::Maestro),
    (4, 6759, 6759, Brand::Maestro),
    (4, 6761, 6763, Brand::Maestro),
    // 3 digits
    (3, 300, 305, Brand::DinersClub),
    (3, 644, 649, Brand::Discover),
    // 2 digits
    (2, 34, 34, Brand::Amex),
    (2, 36, 36, Brand::DinersClub),
    (2, 37, 37, Brand::Amex),
    (2, 38, 39, Brand::DinersClub),
    (2, 50, 50, Brand::Maestro),
    (2, 51, 55, Brand::Mastercard),
    (2, 56, 58, Brand::Maestro),
    (2, 62, 62, Brand::UnionPay),
    (2, 65, 65, Brand::Discover),
    (2, 81, 81, Brand::UnionPay),
    // 1 digit
    (1, 4, 4, Brand::Visa),
];

/// The number formed by the first `width` digits, or `None` if there are fewer or a
/// non-digit is among them.
fn leading_number(digits: &[u8], width: usize) -> Option<u32> {
    let head = digits.get(..width)?;
    head.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// Why a card number was rejected. Never contains the input, only positions and lengths.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    #[error("card number is empty")]
    Empty,
    #[error("card number has a character that is not a digit at position {0}")]
    NotADigit(usize),
    #[error("card number has a misplaced separator at position {0}")]
    MisplacedSeparator(usize),
    #[error("card number has {0} digits, fewer than the minimum of 12")]
    TooShort(usize),
    #[error("card number has {0} digits, more than the maximum of 19")]
    TooLong(usize),
    #[error("card number fails the Luhn check")]
    LuhnFailed,
}

/// A validated, normalised card number. Digits live in a zeroizing buffer.
pub struct Pan {
    digits: Zeroizing<String>,
}

impl Pan {
    /// Parses a card number: ASCII digits, optionally grouped by single spaces or hyphens
    /// between digits (`4111 1111 1111 1111`, `4111-1111-1111-1111`).
    ///
    /// Checks run in a fixed order so the error is predictable: empty, then characters and
    /// separators (first offending position, 1-based, counted in characters), then the digit
    /// count (12..=19), then Luhn.
    pub fn parse(input: &str) -> Result<Pan, PanError> {
        if input.is_empty() {
            return Err(PanError::Empty);
        }
        // Capacity is fixed up front and never exceeded, so the String never reallocates:
        // a reallocation would leave a copy of the digits behind in freed memory that
        // Zeroizing cannot reach.
        let mut digits = Zeroizing::new(String::with_capacity(MAX_LEN));
        let mut count: usize = 0;
        let mut prev_was_digit = false;
        let mut last_pos = 0;
        for (i, c) in input.chars().enumerate() {
            let pos = i + 1;
            last_pos = pos;
            match c {
                // is_ascii_digit, not is_numeric: Unicode digits (Arabic-Indic, fullwidth…)
                // would otherwise slip through as look-alikes.
                '0'..='9' => {
                    count += 1;
                    // Past MAX_LEN we only keep counting (the input is rejected anyway), so a
                    // huge input costs time but no memory.
                    if count <= MAX_LEN {
                        digits.push(c);
                    }
                    prev_was_digit = true;
                }
                ' ' | '-' => {
                    // A separator must sit between two digits: this rejects leading and
                    // doubled separators here and trailing ones after the loop.
                    if !prev_was_digit {
                        return Err(PanError::MisplacedSeparator(pos));
                    }
                    prev_was_digit = false;
                }
                _ => return Err(PanError::NotADigit(pos)),
            }
        }
        if !prev_was_digit {
            return Err(PanError::MisplacedSeparator(last_pos));
        }
        if count < MIN_LEN {
            return Err(PanError::TooShort(count));
        }
        if count > MAX_LEN {
            return Err(PanError::TooLong(count));
        }
        if !luhn_valid(digits.as_bytes()) {
            return Err(PanError::LuhnFailed);
        }
        Ok(Pan { digits })
    }
    /// The normalised digits. The only way to read the number; callers must not log it.
    pub fn expose_digits(&self) -> &str {
        &self.digits
    }
    pub fn len(&self) -> usize {
        self.digits.len()
    }
    /// Always false: a parsed PAN has at least 12 digits (present for clippy's `len` lint).
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn brand(&self) -> Brand {
        Brand::detect(self.digits.as_bytes())
    }
    /// First six digits when PCI masking allows showing them (see `masked`), else empty.
    ///
    /// Shown only for PANs of at least 15 digits, so that six shown plus four shown still
    /// leaves at least five digits hidden.
    pub fn bin(&self) -> String {
        if self.len() >= BIN_VISIBLE_MIN_LEN {
            self.digits[..6].to_string()
        } else {
            String::new()
        }
    }
    pub fn last4(&self) -> String {
        self.digits[self.len() - 4..].to_string()
    }
    /// `411111******1111`
    pub fn masked(&self) -> String {
        mask_parts(&self.bin(), &self.last4(), self.len())
    }
    /// `************1111`
    pub fn masked_last4(&self) -> String {
        mask_parts("", &self.last4(), self.len())
    }
}

// Written out rather than derived so the copy is visibly another zeroizing buffer of exactly
// the PAN's size (no growth, so no stray unzeroized copies).
impl Clone for Pan {
    fn clone(&self) -> Self {
        let mut digits = Zeroizing::new(String::with_capacity(MAX_LEN));
        digits.push_str(&self.digits);
        Pan { digits }
    }
}

impl std::fmt::Debug for Pan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pan(<redacted>)")
    }
}

/// True when the ASCII digit string passes the Luhn check.
///
/// False for an empty slice or one containing anything but ASCII digits, so a caller can
/// never mistake garbage for a valid number.
pub fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    luhn_sum(digits, false) % 10 == 0
}

/// The check digit that makes `payload` + digit Luhn-valid, as an ASCII digit (`b'0'..=b'9'`),
/// so it can be pushed straight onto the payload bytes.
///
/// # Panics
/// If `payload` contains anything but ASCII digits.
pub fn luhn_check_digit(payload: &[u8]) -> u8 {
    assert!(
        payload.iter().all(u8::is_ascii_digit),
        "luhn_check_digit: payload must be ASCII digits"
    );
    // The check digit will sit to the right of the payload, so the payload's last digit is
    // the first one doubled.
    let sum = luhn_sum(payload, true);
    b'0' + ((10 - sum % 10) % 10) as u8
}

/// Luhn sum over ASCII digits, doubling every second digit counted from the right; when
/// `double_rightmost` the rightmost digit is the first doubled one.
fn luhn_sum(digits: &[u8], double_rightmost: bool) -> u32 {
    digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &b)| {
            let d = u32::from(b - b'0');
            if (i % 2 == 0) == double_rightmost {
                let dd = d * 2;
                if dd > 9 {
                    dd - 9
                } else {
                    dd
                }
            } else {
                d
            }
        })
        .sum()
}

/// Mask given bin and last four as TokenInfo shows them (used where only stored parts exist).
///
/// Produces exactly `len` characters: `bin`, then `*`, then `last4`, e.g. `411111******1111`.
/// Defensive about its inputs so it can never show more than PCI DSS 3.4.1 allows, even from
/// bad stored data: `bin` is shown only if it is at most six ASCII digits and `len >= 15`
/// (same rule as [`Pan::bin`]), and `last4` only if it is at most four ASCII digits.
pub fn mask_parts(bin: &str, last4: &str, len: usize) -> String {
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let bin = if len >= BIN_VISIBLE_MIN_LEN && bin.len() <= 6 && digits_only(bin) {
        bin
    } else {
        ""
    };
    let last4 = if last4.len() <= 4 && digits_only(last4) {
        // Never longer than the masked number itself.
        &last4[last4.len().saturating_sub(len)..]
    } else {
        ""
    };
    let stars = len.saturating_sub(bin.len() + last4.len());
    let mut out = String::with_capacity(bin.len() + stars + last4.len());
    out.push_str(bin);
    out.push_str(&"*".repeat(stars));
    out.push_str(last4);
    out
}

/// True when `text` holds something that looks like a card number: 12 to 19 decimal digits
/// that pass the Luhn check, written in one piece or in groups separated by runs of up to
/// three characters that are neither letters nor digits (spaces, `-`, `.`, `/`, `_`, `,`,
/// `+`, zero-width spaces, ...: `4539 1462-5276/0189`). Digits of any Unicode script count
/// ([`decimal_digit`]: fullwidth `４５３９`, Arabic-Indic `٤٥٣٩`, ...), so a card cannot slip
/// past in another script. Every run of whole groups is tried, so a card written next to
/// other numbers (`order 12 4539146252760189`) is found too; digits glued to a card without a
/// separator make a different, longer number and are not a card; a letter ends a run.
///
/// Used to keep card numbers out of stored free text (the audit `reason`): the caller
/// refuses such text with a message that does not repeat it.
pub fn contains_card_number(text: &str) -> bool {
    const MAX_SEPARATORS: usize = 3;
    // The current run's digits (as ASCII) and its groups as ranges of them. Sized once, so
    // no reallocation leaves an unzeroed copy behind.
    let mut digits = Zeroizing::new(Vec::with_capacity(text.len()));
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut in_group = false;
    let mut seps = 0usize;
    for c in text.chars().map(Some).chain(std::iter::once(None)) {
        if let Some(d) = c.and_then(decimal_digit) {
            if !in_group {
                if seps > MAX_SEPARATORS {
                    // Too far from the previous group: a new run.
                    if run_has_card(&digits, &groups) {
                        return true;
                    }
                    digits.clear();
                    groups.clear();
                }
                groups.push((digits.len(), digits.len()));
                in_group = true;
            }
            digits.push(b'0' + d);
            if let Some(g) = groups.last_mut() {
                g.1 = digits.len();
            }
            seps = 0;
            continue;
        }
        in_group = false;
        match c {
            Some(c) if !c.is_alphanumeric() => {
                if !groups.is_empty() {
                    seps += 1;
                }
            }
            // A letter (or the end) ends the run.
            _ => {
                if run_has_card(&digits, &groups) {
                    return true;
                }
                digits.clear();
                groups.clear();
                seps = 0;
            }
        }
    }
    false
}

/// Tries every sequence of consecutive whole groups of one run holding 12..=19 digits.
fn run_has_card(digits: &[u8], groups: &[(usize, usize)]) -> bool {
    let mut buf = Zeroizing::new([0u8; MAX_LEN]);
    for first in 0..groups.len() {
        let mut n = 0;
        for &(a, b) in &groups[first..] {
            if n + (b - a) > MAX_LEN {
                break;
            }
            buf[n..n + (b - a)].copy_from_slice(&digits[a..b]);
            n += b - a;
            if n >= MIN_LEN && luhn_valid(&buf[..n]) {
                return true;
            }
        }
    }
    false
}

/// The zero of every run of Unicode decimal digits (general category Nd; each run is ten
/// code points, 0 to 9): all of Unicode 14 (checked against its database), plus the runs
/// Unicode 15 and 16 added (Kawi, Nag Mundari, Garay, Sunuwar, Myanmar Extended-C, Gurung
/// Khema, Kirat Rai, Ol Onal, outlined digits). Sorted.
const DECIMAL_DIGIT_ZEROS: [u32; 76] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x10D40, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0,
    0x11650, 0x116C0, 0x116D0, 0x116DA, 0x11730, 0x118E0, 0x11950, 0x11BF0, 0x11C50, 0x11D50,
    0x11DA0, 0x11F50, 0x16130, 0x16A60, 0x16AC0, 0x16B50, 0x16D70, 0x1CCF0, 0x1D7CE, 0x1D7D8,
    0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E4F0, 0x1E5F1, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit of any script (`'7'`, `'７'`, `'٧'`, `'७'`, ...). Not
/// superscripts, circled or other numeric signs that Unicode does not call decimal digits.
pub fn decimal_digit(c: char) -> Option<u8> {
    let c = c as u32;
    let i = DECIMAL_DIGIT_ZEROS.partition_point(|&z| z <= c);
    let d = c - DECIMAL_DIGIT_ZEROS[i.checked_sub(1)?];
    (d < 10).then_some(d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Luhn-valid number of `len` digits starting with `prefix` (zero padded).
    fn make_pan(prefix: &str, len: usize) -> String {
        let mut s = prefix.to_string();
        while s.len() < len - 1 {
            s.push('0');
        }
        let c = luhn_check_digit(s.as_bytes());
        s.push(c as char);
        s
    }

    #[test]
    fn parses_plain_and_grouped() {
        for input in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "4111-1111 1111-1111",
            "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
            "411111 1111111111",
        ] {
            let pan = Pan::parse(input).unwrap();
            assert_eq!(pan.expose_digits(), "4111111111111111", "{input}");
            assert_eq!(pan.len(), 16);
            assert!(!pan.is_empty());
        }
        // Amex-style 4-6-5 grouping.
        let pan = Pan::parse("3782 822463 10005").unwrap();
        assert_eq!(pan.expose_digits(), "378282246310005");
    }

    #[test]
    fn rejects_bad_input_with_right_error() {
        use PanError::*;
        let cases: &[(&str, PanError)] = &[
            ("", Empty),
            ("4111a11111111111", NotADigit(5)),
            ("4111 1111 1111 111x", NotADigit(19)),
            ("٤١١١١١١١١١١١١١١١", NotADigit(1)),
            ("4111١١١١١١١١١١١١", NotADigit(5)),
            ("４１１１１１１１１１１１１１１１", NotADigit(1)),
            ("4111\u{0}111111111111", NotADigit(5)),
            ("4111111111111111\u{0}", NotADigit(17)),
            ("4111\t1111 1111 1111", NotADigit(5)),
            ("4111111111111111\n", NotADigit(17)),
            ("4111_1111_1111_1111", NotADigit(5)),
            ("4111.1111.1111.1111", NotADigit(5)),
            ("+4111111111111111", NotADigit(1)),
            ("4111\u{a0}1111 1111 1111", NotADigit(5)),
            (" 4111111111111111", MisplacedSeparator(1)),
            ("4111111111111111 ", MisplacedSeparator(17)),
            ("-4111111111111111", MisplacedSeparator(1)),
            ("4111111111111111-", MisplacedSeparator(17)),
            ("4111  1111 1111 1111", MisplacedSeparator(6)),
            ("4111--1111-1111-1111", MisplacedSeparator(6)),
            ("4111 -1111 1111 1111", MisplacedSeparator(6)),
            (" ", MisplacedSeparator(1)),
            ("-", MisplacedSeparator(1)),
            ("1", TooShort(1)),
            ("41111111111", TooShort(11)),
            ("4111 1111 111", TooShort(11)),
            ("41111111111111111111", TooLong(20)),
            ("4111111111111112", LuhnFailed),
            ("4111 1111 1111 1112", LuhnFailed),
        ];
        for (input, want) in cases {
            match Pan::parse(input) {
                Ok(_) => panic!("accepted bad input that should fail with {want:?}"),
                Err(got) => assert_eq!(&got, want, "input {:?}", input.escape_debug()),
            }
        }
    }

    #[test]
    fn length_bounds() {
        for len in 1..=25 {
            let s = if len == 1 {
                "4".to_string()
            } else {
                make_pan("4", len)
            };
            let r = Pan::parse(&s);
            match len {
                1..=11 => assert_eq!(r.unwrap_err(), PanError::TooShort(len)),
                12..=19 => assert_eq!(r.unwrap().len(), len),
                _ => assert_eq!(r.unwrap_err(), PanError::TooLong(len)),
            }
        }
    }

    #[test]
    fn huge_input_is_rejected_cheaply() {
        let big = "4".repeat(1 << 20);
        assert_eq!(Pan::parse(&big).unwrap_err(), PanError::TooLong(1 << 20));
        // Characters are still checked before length, even past 19 digits.
        let mut bad = big.clone();
        bad.push('x');
        assert_eq!(
            Pan::parse(&bad).unwrap_err(),
            PanError::NotADigit((1 << 20) + 1)
        );
        let grouped = "4111 ".repeat(200_000) + "4";
        assert_eq!(
            Pan::parse(&grouped).unwrap_err(),
            PanError::TooLong(800_001)
        );
    }

    #[test]
    fn luhn() {
        for good in [
            "4111111111111111",
            "5555555555554444",
            "378282246310005",
            "79927398713",
            "0",
            "00",
        ] {
            assert!(luhn_valid(good.as_bytes()), "{good}");
        }
        for bad in ["4111111111111112", "79927398710", "1", "", "4111a", "٤"] {
            assert!(!luhn_valid(bad.as_bytes()), "{bad}");
        }
        assert_eq!(luhn_check_digit(b"7992739871"), b'3');
        assert_eq!(luhn_check_digit(b"411111111111111"), b'1');
        assert_eq!(luhn_check_digit(b""), b'0');
        for p in ["", "1", "12", "123456789012345678"] {
            let mut v = p.as_bytes().to_vec();
            v.push(luhn_check_digit(p.as_bytes()));
            assert!(luhn_valid(&v));
        }
    }

    #[test]
    fn brands_of_real_test_numbers() {
        use Brand::*;
        let cases: &[(&str, Brand)] = &[
            ("4111111111111111", Visa),
            ("4012888888881881", Visa),
            ("4222222222222", Visa),
            ("5555555555554444", Mastercard),
            ("5105105105105100", Mastercard),
            ("2223003122003222", Mastercard),
            ("378282246310005", Amex),
            ("371449635398431", Amex),
            ("6011111111111117", Discover),
            ("6011000990139424", Discover),
            ("3530111333300000", Jcb),
            ("3566002020360505", Jcb),
            ("36227206271667", DinersClub),
            ("30569309025904", DinersClub),
            ("38520000023237", DinersClub),
            ("6200000000000005", UnionPay),
            ("6759649826438453", Maestro),
            ("2200000000000004", Mir),
        ];
        for (digits, brand) in cases {
            let pan = Pan::parse(digits).unwrap_or_else(|e| panic!("{digits}: {e}"));
            assert_eq!(pan.brand(), *brand, "{digits}");
        }
    }

    #[test]
    fn brand_ranges_and_overlaps() {
        use Brand::*;
        let cases: &[(&str, Brand)] = &[
            ("4", Visa),
            ("2221", Mastercard),
            ("2720", Mastercard),
            ("2220", Unknown),
            ("2721", Unknown),
            ("51", Mastercard),
            ("55", Mastercard),
            ("34", Amex),
            ("37", Amex),
            ("35", Unknown),
            ("3527", Unknown),
            ("3528", Jcb),
            ("3589", Jcb),
            ("3590", Unknown),
            ("300", DinersClub),
            ("305", DinersClub),
            ("306", Unknown),
            ("3095", DinersClub),
            ("3096", Unknown),
            ("36", DinersClub),
            ("38", DinersClub),
            ("39", DinersClub),
            ("6011", Discover),
            ("6012", Unknown),
            ("644", Discover),
            ("649", Discover),
            ("65", Discover),
            ("62", UnionPay),
            ("622125", UnionPay),
            ("622126", Discover),
            ("622925", Discover),
            ("622926", UnionPay),
            ("81", UnionPay),
            ("50", Maestro),
            ("56", Maestro),
            ("58", Maestro),
            ("6304", Maestro),
            ("6759", Maestro),
            ("6761", Maestro),
            ("6763", Maestro),
            ("6764", Unknown),
            ("676770", Maestro),
            ("676774", Maestro),
            ("676771", Unknown),
            ("2200", Mir),
            ("2204", Mir),
            ("2205", Unknown),
            ("1", Unknown),
            ("9", Unknown),
            ("7", Unknown),
        ];
        for (prefix, brand) in cases {
            let pan = Pan::parse(&make_pan(prefix, 16)).unwrap();
            assert_eq!(pan.brand(), *brand, "prefix {prefix}");
        }
        // Detection on short or non-digit slices never panics.
        assert_eq!(Brand::detect(b""), Unknown);
        assert_eq!(Brand::detect(b"4"), Visa);
        assert_eq!(Brand::detect(b"62212"), UnionPay);
        assert_eq!(Brand::detect(b"x4"), Unknown);
    }

    #[test]
    fn brand_names_and_codes_are_stable() {
        let names: Vec<_> = Brand::ALL.iter().map(|b| b.name()).collect();
        assert_eq!(
            names,
            [
                "visa",
                "mastercard",
                "amex",
                "discover",
                "jcb",
                "diners_club",
                "unionpay",
                "maestro",
                "mir",
                "unknown"
            ]
        );
        for b in Brand::ALL {
            assert_eq!(Brand::from_code(b.code()), b);
        }
        assert_eq!(Brand::from_code(0), Brand::Unknown);
        assert_eq!(Brand::from_code(99), Brand::Unknown);
    }

    #[test]
    fn masking() {
        // (pan, bin, masked, masked_last4)
        let p12 = make_pan("411111", 12);
        let p15 = "378282246310005".to_string();
        let p16 = "4111111111111111".to_string();
        let p19 = make_pan("6759649826", 19);
        let pan = Pan::parse(&p12).unwrap();
        assert_eq!(pan.bin(), "");
        assert_eq!(pan.last4(), &p12[8..]);
        assert_eq!(pan.masked(), format!("********{}", &p12[8..]));
        assert_eq!(pan.masked_last4(), pan.masked());

        let pan = Pan::parse(&p15).unwrap();
        assert_eq!(pan.bin(), "378282");
        assert_eq!(pan.last4(), "0005");
        assert_eq!(pan.masked(), "378282*****0005");
        assert_eq!(pan.masked_last4(), "***********0005");

        let pan = Pan::parse(&p16).unwrap();
        assert_eq!(pan.bin(), "411111");
        assert_eq!(pan.last4(), "1111");
        assert_eq!(pan.masked(), "411111******1111");
        assert_eq!(pan.masked_last4(), "************1111");

        let pan = Pan::parse(&p19).unwrap();
        assert_eq!(pan.bin(), "675964");
        assert_eq!(pan.masked(), format!("675964*********{}", &p19[15..]));
        assert_eq!(
            pan.masked_last4(),
            format!("{}{}", "*".repeat(15), &p19[15..])
        );

        // Every length: same length as the PAN, at most 6+4 visible, >= 5 hidden, and
        // mask_parts from the stored parts agrees.
        for len in MIN_LEN..=MAX_LEN {
            let pan = Pan::parse(&make_pan("4", len)).unwrap();
            for m in [pan.masked(), pan.masked_last4()] {
                assert_eq!(m.len(), len);
                assert!(m.bytes().filter(|&b| b == b'*').count() >= 5);
            }
            assert_eq!(mask_parts(&pan.bin(), &pan.last4(), len), pan.masked());
            assert_eq!(pan.bin().is_empty(), len < 15);
        }
    }

    #[test]
    fn mask_parts_is_defensive() {
        assert_eq!(mask_parts("411111", "1111", 16), "411111******1111");
        assert_eq!(mask_parts("", "1111", 16), "************1111");
        // BIN never shown below 15 digits, even if it was stored.
        assert_eq!(mask_parts("411111", "1111", 12), "********1111");
        // Oversized or non-digit parts are never shown.
        assert_eq!(mask_parts("4111111", "1111", 16), "************1111");
        assert_eq!(mask_parts("411111", "11111", 16), "411111**********");
        assert_eq!(mask_parts("41x111", "1111", 16), "************1111");
        // Always exactly `len` characters.
        assert_eq!(mask_parts("", "1111", 2), "11");
        assert_eq!(mask_parts("", "1111", 0), "");
    }

    #[test]
    fn errors_never_contain_input() {
        let bad_luhn = "4111111111111112";
        let inputs = [
            bad_luhn.to_string(),
            "4111 1111 1111 1112".to_string(),
            "4111111111111112x".to_string(),
            "x4111111111111112".to_string(),
            "41111111111111120000".to_string(),
            "41111111112".to_string(),
            " 4111111111111112".to_string(),
            "4111111111111112 ".to_string(),
            "4111  1111 1111 1112".to_string(),
            "53124\u{0}".to_string(),
        ];
        for input in &inputs {
            let err = Pan::parse(input).unwrap_err();
            let shown = format!("{err} {err:?}");
            let digits: String = input.chars().filter(char::is_ascii_digit).collect();
            for len in 5..=digits.len() {
                for start in 0..=digits.len() - len {
                    let sub = &digits[start..start + len];
                    assert!(!shown.contains(sub), "{shown:?} leaks {sub}");
                }
            }
        }
    }

    #[test]
    fn debug_is_redacted_and_clone_works() {
        let pan = Pan::parse("4111 1111 1111 1111").unwrap();
        let dbg = format!("{pan:?} {:?} {:#?}", Some(&pan), pan.clone());
        assert!(!dbg.contains("1111"), "{dbg}");
        assert!(!dbg.contains("4111"), "{dbg}");
        let copy = pan.clone();
        drop(pan);
        assert_eq!(copy.expose_digits(), "4111111111111111");
    }

    /// A Luhn-valid PAN of 12..=19 digits.
    fn valid_pan() -> impl Strategy<Value = String> {
        (MIN_LEN..=MAX_LEN)
            .prop_flat_map(|len| proptest::collection::vec(0u8..10, len - 1))
            .prop_map(|payload| {
                let mut v: Vec<u8> = payload.into_iter().map(|d| b'0' + d).collect();
                v.push(luhn_check_digit(&v));
                String::from_utf8(v).unwrap()
            })
    }

    proptest! {
        #[test]
        fn valid_pans_round_trip_with_grouping(
            digits in valid_pan(),
            seps in proptest::collection::vec(prop_oneof![
                4 => Just(""), 1 => Just(" "), 1 => Just("-")
            ], MAX_LEN),
        ) {
            let mut input = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 {
                    input.push_str(seps[i]);
                }
                input.push(c);
            }
            let pan = Pan::parse(&input).unwrap();
            prop_assert_eq!(pan.expose_digits(), digits.as_str());
            prop_assert_eq!(pan.masked().len(), digits.len());
            let dbg = format!("{:?}", pan);
            prop_assert!(!dbg.contains(&digits[..5]));
        }

        #[test]
        fn single_digit_change_fails_luhn(digits in valid_pan(), pos in 0usize..19, delta in 1u8..10) {
            let mut v = digits.into_bytes();
            let pos = pos % v.len();
            v[pos] = b'0' + (v[pos] - b'0' + delta) % 10;
            prop_assert!(!luhn_valid(&v));
            prop_assert_eq!(
                Pan::parse(std::str::from_utf8(&v).unwrap()).unwrap_err(),
                PanError::LuhnFailed
            );
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Pan::parse(&s);
        }

        #[test]
        fn parse_never_panics_near_valid(s in "[0-9 \\-a٤４\t\u{0}]{0,40}") {
            if let Err(e) = Pan::parse(&s) {
                let shown = e.to_string();
                let digits: String = s.chars().filter(char::is_ascii_digit).collect();
                if digits.len() >= 5 {
                    prop_assert!(!shown.contains(&digits));
                }
            }
        }
    }

    #[test]
    fn finds_card_numbers_in_text() {
        for text in [
            "refund to card 4539146252760189",
            "4539146252760189",
            "card 4539 1462 5276 0189 refund",
            "card 4539-1462-5276-0189.",
            "card 4539.1462.5276.0189",
            "card 4539 - 1462 - 5276 - 0189",
            "card\t4539\t1462 5276 0189",
            "order 12 4539146252760189",
            "order 12 4539 1462 5276 0189 done",
            "378282246310005",
            "x:378282246310005;y",
            "ref 2026-11-27 card 411111111117 ok",
            "6011111111111117 and 5555555555554444",
        ] {
            assert!(contains_card_number(text), "missed in {text:?}");
        }
    }

    #[test]
    fn leaves_other_numbers_alone() {
        for text in [
            "",
            "order 42",
            "refund order 2026-11-27 #1234",
            "4539146252760188",            // Luhn fails
            "45391462527601890000000",     // 23 glued digits: not a card
            "card 4539    1462 5276 0189", // four spaces: not one number
            "ticket 12345678901",          // 11 digits
            "a4539146252760189b",          // glued to letters, still found below
        ] {
            if text == "a4539146252760189b" {
                assert!(contains_card_number(text));
                continue;
            }
            assert!(!contains_card_number(text), "false alarm on {text:?}");
        }
        // Superscripts and circled digits are not decimal digits.
        assert!(!contains_card_number("⁴⁵³⁹¹⁴⁶²⁵²⁷⁶⁰¹⁸⁹"));
        assert!(!contains_card_number("card 4539 / 1462 / 5276  /  0189 x")); // 5 separators
    }

    #[test]
    fn finds_cards_behind_any_punctuation_and_in_any_script() {
        for text in [
            "card 4539/1462/5276/0189",
            "card 4539_1462_5276_0189",
            "card 4539,1462,5276,0189",
            "card 4539+1462+5276+0189",
            "card 4539 / 1462 / 5276 / 0189",
            "card (4539)1462|5276*0189",
            "card 4539\u{200b}1462\u{200b}5276\u{200b}0189",
            "card 4539\u{2014}1462\u{2014}5276\u{2014}0189",
            "４５３９１４６２５２７６０１８９",
            "card ４５３９－１４６２－５２７６－０１８９",
            "٤٥٣٩١٤٦٢٥٢٧٦٠١٨٩",
            "۴۵۳۹۱۴۶۲۵۲۷۶۰۱۸۹",
            "४५३९१४६२५२७६०१८९",
            "card 4539 ١٤٦٢ ５２７６ 0189",
            "\u{1d7d2}\u{1d7d3}\u{1d7d1}\u{1d7d7}1462 5276 0189",
        ] {
            assert!(contains_card_number(text), "missed in {text:?}");
        }
    }

    #[test]
    fn decimal_digit_table() {
        assert!(DECIMAL_DIGIT_ZEROS.windows(2).all(|w| w[0] + 10 <= w[1]));
        for c in (0..0x80u8).map(char::from) {
            assert_eq!(decimal_digit(c), c.to_digit(10).map(|d| d as u8), "{c:?}");
        }
        for &z in &DECIMAL_DIGIT_ZEROS {
            for k in 0..10 {
                let c = char::from_u32(z + k).unwrap();
                assert!(c.is_numeric(), "{:X}", z + k);
                assert_eq!(decimal_digit(c), Some(k as u8));
            }
        }
        for c in ['a', '٫', '²', '①', 'Ⅻ', ' ', '\u{10ffff}'] {
            assert_eq!(decimal_digit(c), None, "{c:?}");
        }
    }

    proptest! {
        #[test]
        fn any_grouped_card_in_any_text_is_found(
            digits in valid_pan(),
            before in "[a-z ,:#]{0,20}",
            after in "[a-z ,:#]{0,20}",
            seps in proptest::collection::vec(prop_oneof![
                6 => Just(""), 1 => Just(" "), 1 => Just("-"), 1 => Just(" - "), 1 => Just("."),
                1 => Just("/"), 1 => Just("_"), 1 => Just(", "), 1 => Just("+"), 1 => Just("\u{200b}")
            ], MAX_LEN),
            zeros in proptest::collection::vec(
                proptest::sample::select(&DECIMAL_DIGIT_ZEROS[..]), MAX_LEN),
            ascii in any::<bool>(),
        ) {
            let mut text = before.clone();
            text.push(' ');
            for (i, c) in digits.chars().enumerate() {
                if i > 0 {
                    text.push_str(seps[i]);
                }
                // Each digit in ASCII or in a script of its own.
                let d = c.to_digit(10).unwrap();
                text.push(if ascii { c } else { char::from_u32(zeros[i] + d).unwrap() });
            }
            text.push(' ');
            text.push_str(&after);
            prop_assert!(contains_card_number(&text));
        }

        #[test]
        fn card_between_other_numbers_is_found(
            digits in valid_pan(),
            left in proptest::collection::vec("[0-9]{1,6}", 0..4),
            right in proptest::collection::vec("[0-9]{1,6}", 0..4),
        ) {
            let mut parts = left.clone();
            parts.push(digits.clone());
            parts.extend(right.iter().cloned());
            prop_assert!(contains_card_number(&parts.join(" ")));
        }

        #[test]
        fn scanner_never_panics(s in any::<String>()) {
            let _ = contains_card_number(&s);
        }

        #[test]
        fn short_digit_runs_are_never_cards(s in "[a-z 0-9\\-.]{0,80}") {
            // Digits separated by letters never form 12 digits in a row.
            let longest_digit_span = s
                .split(|c: char| c.is_ascii_alphabetic())
                .map(|p| p.chars().filter(char::is_ascii_digit).count())
                .max()
                .unwrap_or(0);
            if longest_digit_span < MIN_LEN {
                prop_assert!(!contains_card_number(&s));
            }
        }
    }
}
