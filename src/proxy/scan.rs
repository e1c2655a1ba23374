//! Finds card numbers in an upstream response so they are tokenized before the worker sees
//! them: every run of 12 to 19 ASCII digits that passes the Luhn check, written in one
//! piece (`4111111111111111`) or in groups joined by single spaces or hyphens
//! (`4111 1111 1111 1111`, `4111-1111-...`). Within a longer run of groups every sequence
//! of consecutive whole groups is tried, longest first from each group, so a card written
//! next to another number (`4111 1111 1111 1111 12`) is still found. One contiguous run of
//! more than 19 digits is not a card number (as for the issue's definition).
//!
//! The proxy buffers the whole response (up to the route's `max_body`) before scanning, so
//! a number split across network chunks is seen whole.

use zeroize::Zeroizing;

/// A card number found at `start..end` of the text (separators included).
pub struct Found {
    pub start: usize,
    pub end: usize,
    /// The digits alone.
    pub digits: Zeroizing<String>,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("digits", &"<redacted>")
            .finish()
    }
}

const MIN: usize = 12;
const MAX: usize = 19;

/// Every card number in `text`, in order, not overlapping.
pub fn find_cards(text: &[u8]) -> Vec<Found> {
    let mut found = Vec::new();
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A run: digit groups joined by exactly one ' ' or '-'.
        groups.clear();
        loop {
            let start = i;
            while i < text.len() && text[i].is_ascii_digit() {
                i += 1;
            }
            groups.push((start, i));
            if i + 1 < text.len() && matches!(text[i], b' ' | b'-') && text[i + 1].is_ascii_digit()
            {
                i += 1;
                continue;
            }
            break;
        }
        cards_in_run(text, &groups, &mut found);
    }
    found
}

fn cards_in_run(text: &[u8], groups: &[(usize, usize)], out: &mut Vec<Found>) {
    let mut buf = Zeroizing::new([0u8; MAX]);
    let mut first = 0;
    while first < groups.len() {
        let mut n = 0;
        let mut best = None;
        for (k, &(a, b)) in groups.iter().enumerate().skip(first) {
            if n + (b - a) > MAX {
                break;
            }
            buf[n..n + (b - a)].copy_from_slice(&text[a..b]);
            n += b - a;
            if n >= MIN && crate::card::luhn_valid(&buf[..n]) {
                best = Some((k, n));
            }
        }
        match best {
            Some((last, n)) => {
                let mut digits = Zeroizing::new(String::with_capacity(MAX));
                digits.push_str(std::str::from_utf8(&buf[..n]).unwrap_or_default());
                out.push(Found {
                    start: groups[first].0,
                    end: groups[last].1,
                    digits,
                });
                first = last + 1;
            }
            None => first += 1,
        }
    }
}

/// `text` with each found card replaced by `tokens[i]`.
pub fn replace(text: &[u8], found: &[Found], tokens: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for (f, t) in found.iter().zip(tokens) {
        out.extend_from_slice(&text[at..f.start]);
        out.extend_from_slice(t.as_bytes());
        at = f.end;
    }
    out.extend_from_slice(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(text: &str) -> Vec<&str> {
        find_cards(text.as_bytes())
            .iter()
            .map(|f| &text[f.start..f.end])
            .collect()
    }

    #[test]
    fn finds_cards_in_all_their_spellings() {
        assert_eq!(spans(r#"{"pan":"4111111111111111"}"#), ["4111111111111111"]);
        assert_eq!(
            spans("card 4111 1111 1111 1111 ok"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(spans("4111-1111-1111-1111"), ["4111-1111-1111-1111"]);
        assert_eq!(spans("x4111111111111111y"), ["4111111111111111"]);
        // Beside another number, and two cards in one body.
        assert_eq!(
            spans("4111 1111 1111 1111 12 and 5555555555554444"),
            ["4111 1111 1111 1111", "5555555555554444"]
        );
        assert_eq!(spans("12 4111 1111 1111 1111"), ["4111 1111 1111 1111"]);
        // A 12-digit card (Maestro range) and a 19-digit one.
        assert_eq!(spans("500000000009"), ["500000000009"]);
    }

    #[test]
    fn leaves_other_numbers() {
        assert!(spans("4111111111111112").is_empty()); // Luhn fails
        assert!(spans("41111111111111110000000").is_empty()); // one run of 23 digits
        assert!(spans("amount 1000, id 12345").is_empty());
        assert!(spans("2026-11-27 12:00:00").is_empty());
    }

    #[test]
    fn replaces_in_place() {
        let text = b"a 4111 1111 1111 1111 b 5555555555554444 c";
        let found = find_cards(text);
        let out = replace(text, &found, &["T1".to_owned(), "T2".to_owned()]);
        assert_eq!(out, b"a T1 b T2 c");
        assert!(!format!("{found:?}").contains("4111"));
    }
}
