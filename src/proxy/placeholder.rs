//! Placeholders in a request: `{{tokenvault:TOKEN}}` (the card number),
//! `{{tokenvault:TOKEN|last4}}` and `{{tokenvault:TOKEN|bin}}`, also accepted
//! percent-encoded as a form encoder writes them (`%7B%7Btokenvault%3ATOKEN%7D%7D`, `%7C`
//! for the bar, hex digits of either case).
//!
//! Finding them works on bytes, whatever the content type: a card number, its last four
//! and its BIN are ASCII digits, which need no escaping in JSON, form encoding or text, so
//! the value is put where the placeholder was. Every opener (`{{tokenvault` or its encoded
//! form, any case) must start a well-formed placeholder, else the whole request is refused:
//! a typo must never send a half-substituted request.

use crate::token::Token;

/// Which part of the card a placeholder stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Pan,
    Last4,
    Bin,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Pan => "pan",
            Part::Last4 => "last4",
            Part::Bin => "bin",
        }
    }
}

/// One placeholder found at `start..end` of the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placeholder {
    pub start: usize,
    pub end: usize,
    pub token: Token,
    pub part: Part,
}

/// A malformed placeholder; the message gives its byte offset, never the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed tokenvault placeholder at byte {offset}: expected {{{{tokenvault:TOKEN}}}}, {{{{tokenvault:TOKEN|last4}}}} or {{{{tokenvault:TOKEN|bin}}}} ({why})")]
pub struct Malformed {
    pub offset: usize,
    pub why: &'static str,
}

struct Syntax {
    open: &'static [u8],
    bar: &'static [u8],
    close: &'static [u8],
}

const RAW: Syntax = Syntax {
    open: b"{{tokenvault:",
    bar: b"|",
    close: b"}}",
};
const ENCODED: Syntax = Syntax {
    open: b"%7b%7btokenvault%3a",
    bar: b"%7c",
    close: b"%7d%7d",
};
/// What starts a placeholder attempt, compared case-insensitively.
const OPENERS: [(&[u8], &Syntax); 2] = [(b"{{tokenvault", &RAW), (b"%7b%7btokenvault", &ENCODED)];
/// Longest token accepted inside a placeholder (opaque tokens are at most 47 characters).
const MAX_TOKEN: usize = 64;

fn starts_with_ci(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Every placeholder in `text`, in order.
pub fn find(text: &[u8]) -> Result<Vec<Placeholder>, Malformed> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if b != b'{' && b != b'%' {
            i += 1;
            continue;
        }
        let Some((_, syntax)) = OPENERS
            .iter()
            .find(|(opener, _)| starts_with_ci(&text[i..], opener))
        else {
            i += 1;
            continue;
        };
        let p = parse_one(text, i, syntax)?;
        i = p.end;
        found.push(p);
    }
    Ok(found)
}

fn parse_one(text: &[u8], start: usize, s: &Syntax) -> Result<Placeholder, Malformed> {
    let bad = |why| Malformed { offset: start, why };
    if !starts_with_ci(&text[start..], s.open) {
        return Err(bad("it must begin with {{tokenvault: in lower case"));
    }
    // The raw opener is exact (lower case); the encoded one only differs in hex case.
    if std::ptr::eq(s, &RAW) && !text[start..].starts_with(RAW.open) {
        return Err(bad("it must begin with {{tokenvault: in lower case"));
    }
    let token_start = start + s.open.len();
    let mut j = token_start;
    while j < text.len()
        && j - token_start <= MAX_TOKEN
        && (text[j].is_ascii_alphanumeric() || matches!(text[j], b'_' | b'-'))
    {
        j += 1;
    }
    if j - token_start > MAX_TOKEN {
        return Err(bad("the token is too long"));
    }
    let token_text =
        std::str::from_utf8(&text[token_start..j]).map_err(|_| bad("the token is not text"))?;
    let token = Token::parse(token_text).map_err(|_| bad("the token is not a valid token"))?;
    let mut part = Part::Pan;
    if starts_with_ci(&text[j..], s.bar) {
        j += s.bar.len();
        if text[j..].starts_with(b"last4") {
            part = Part::Last4;
            j += 5;
        } else if text[j..].starts_with(b"bin") {
            part = Part::Bin;
            j += 3;
        } else {
            return Err(bad("the only filters are |last4 and |bin"));
        }
    }
    if !starts_with_ci(&text[j..], s.close) {
        return Err(bad("it is not closed by }}"));
    }
    Ok(Placeholder {
        start,
        end: j + s.close.len(),
        token,
        part,
    })
}

/// `text` with each placeholder replaced by `values[i]` (same order as `found`).
pub fn substitute(text: &[u8], found: &[Placeholder], values: &[&str]) -> Vec<u8> {
    let extra: usize = values.iter().map(|v| v.len()).sum();
    let mut out = Vec::with_capacity(text.len() + extra);
    let mut at = 0;
    for (p, v) in found.iter().zip(values) {
        out.extend_from_slice(&text[at..p.start]);
        out.extend_from_slice(v.as_bytes());
        at = p.end;
    }
    out.extend_from_slice(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOK: &str = "tok_AAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn finds_all_three_forms_raw_and_encoded() {
        let body = format!(
            r#"{{"number":"{{{{tokenvault:{TOK}}}}}","l4":"{{{{tokenvault:{TOK}|last4}}}}"}} card=%7B%7Btokenvault%3A{TOK}%7cbin%7D%7D"#
        );
        let found = find(body.as_bytes()).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(
            found.iter().map(|p| p.part).collect::<Vec<_>>(),
            [Part::Pan, Part::Last4, Part::Bin]
        );
        let out = substitute(
            body.as_bytes(),
            &found,
            &["4111111111111111", "1111", "411111"],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"number":"4111111111111111","l4":"1111"} card=411111"#
        );
    }

    #[test]
    fn malformed_placeholders_are_refused_without_echo() {
        for bad in [
            "{{tokenvault:}}".to_owned(),
            format!("{{{{tokenvault:{TOK}"),
            format!("{{{{tokenvault:{TOK}|first6}}}}"),
            format!("{{{{TokenVault:{TOK}}}}}"),
            format!("{{{{tokenvault {TOK}}}}}"),
            "{{tokenvault:4111111111111111}}".to_owned(),
            format!("{{{{tokenvault:{}}}}}", "A".repeat(200)),
            format!("%7B%7Btokenvault%3A{TOK}}}}}"),
        ] {
            let err = find(bad.as_bytes()).unwrap_err().to_string();
            assert!(
                !err.contains("4111111111111111") && !err.contains(TOK),
                "{err}"
            );
        }
    }

    #[test]
    fn text_without_placeholders_is_untouched() {
        for ok in ["", "{}", "{{other}}", "tokenvault:x", "%7B%7D"] {
            assert!(find(ok.as_bytes()).unwrap().is_empty(), "{ok}");
        }
    }
}
