//! Conversions between the protobuf messages and the domain types.
//!
//! Inbound conversions validate: card numbers through [`Pan::parse`], tokens through
//! [`Token::parse`], enums and timestamps here. Every failure is an
//! [`Error::InvalidArgument`] whose message names the field and the rule, never the value.

use prost_types::Timestamp;

use super::pb;
use crate::card::{Brand, Pan};
use crate::error::{Error, Result};
use crate::token::{Token, TokenFormat};
use crate::vault::{self, now_micros, Micros};

/// Longest accepted detokenize reason, in bytes. It is stored in every audit record, so it
/// is bounded well below the message size limit.
pub const MAX_REASON_BYTES: usize = 512;

/// Smallest and largest instants a `google.protobuf.Timestamp` may hold
/// (0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Validates a Tokenize item against the clock `now`.
pub fn tokenize_request(req: pb::TokenizeRequest, now: Micros) -> Result<vault::TokenizeRequest> {
    let pan = Pan::parse(&req.pan)?;
    let format = token_format(req.format)?;
    let expires_at = match req.expires_at {
        None => None,
        Some(ts) => {
            let at = timestamp_to_micros(&ts, "expires_at")?;
            if at <= now {
                return Err(Error::InvalidArgument("expires_at is in the past".into()));
            }
            Some(at)
        }
    };
    Ok(vault::TokenizeRequest {
        pan,
        format,
        reuse_existing: req.reuse_existing,
        expires_at,
    })
}

impl TryFrom<pb::TokenizeRequest> for vault::TokenizeRequest {
    type Error = Error;
    fn try_from(req: pb::TokenizeRequest) -> Result<Self> {
        tokenize_request(req, now_micros())
    }
}

/// A validated Detokenize item: the token and the audited reason.
pub fn detokenize_request(req: pb::DetokenizeRequest) -> Result<(Token, String)> {
    if req.reason.len() > MAX_REASON_BYTES {
        return Err(Error::InvalidArgument(format!(
            "reason is longer than {MAX_REASON_BYTES} bytes"
        )));
    }
    let token = parse_token(&req.token)?;
    Ok((token, req.reason))
}

pub fn parse_token(text: &str) -> Result<Token> {
    Ok(Token::parse(text)?)
}

/// Proto enum number to format; unset means opaque, unknown numbers are rejected.
pub fn token_format(value: i32) -> Result<TokenFormat> {
    match pb::TokenFormat::try_from(value) {
        Ok(pb::TokenFormat::Unspecified | pb::TokenFormat::Opaque) => Ok(TokenFormat::Opaque),
        Ok(pb::TokenFormat::PanShaped) => Ok(TokenFormat::PanShaped),
        Ok(pb::TokenFormat::PanShapedKeepBin) => Ok(TokenFormat::PanShapedKeepBin),
        Err(_) => Err(Error::InvalidArgument(
            "format: unknown token format".into(),
        )),
    }
}

pub fn pb_token_format(format: TokenFormat) -> pb::TokenFormat {
    match format {
        TokenFormat::Opaque => pb::TokenFormat::Opaque,
        TokenFormat::PanShaped => pb::TokenFormat::PanShaped,
        TokenFormat::PanShapedKeepBin => pb::TokenFormat::PanShapedKeepBin,
    }
}

pub fn pb_brand(brand: Brand) -> pb::CardBrand {
    match brand {
        Brand::Unknown => pb::CardBrand::Unknown,
        Brand::Visa => pb::CardBrand::Visa,
        Brand::Mastercard => pb::CardBrand::Mastercard,
        Brand::Amex => pb::CardBrand::Amex,
        Brand::Discover => pb::CardBrand::Discover,
        Brand::Jcb => pb::CardBrand::Jcb,
        Brand::DinersClub => pb::CardBrand::DinersClub,
        Brand::UnionPay => pb::CardBrand::Unionpay,
        Brand::Maestro => pb::CardBrand::Maestro,
        Brand::Mir => pb::CardBrand::Mir,
    }
}

/// Timestamp to microseconds, truncating sub-microsecond digits. Rejects values outside the
/// range the Timestamp type defines and nanos outside `0..1e9`.
pub fn timestamp_to_micros(ts: &Timestamp, field: &str) -> Result<Micros> {
    if !(0..1_000_000_000).contains(&ts.nanos)
        || !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds)
    {
        return Err(Error::InvalidArgument(format!(
            "{field} is not a valid timestamp"
        )));
    }
    // In range by the checks above: |seconds| < 2^38, so seconds * 10^6 < 2^58.
    Ok(ts.seconds * 1_000_000 + i64::from(ts.nanos / 1_000))
}

pub fn micros_to_timestamp(micros: Micros) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

impl From<vault::TokenInfo> for pb::TokenInfo {
    fn from(info: vault::TokenInfo) -> pb::TokenInfo {
        pb::TokenInfo {
            token: info.token.into_string(),
            masked_pan: info.masked_pan,
            last4: info.last4,
            bin: info.bin,
            brand: pb_brand(info.brand) as i32,
            pan_length: info.pan_length,
            format: pb_token_format(info.format) as i32,
            created_at: Some(micros_to_timestamp(info.created_at)),
            expires_at: info.expires_at.map(micros_to_timestamp),
            key_version: info.key_version,
        }
    }
}

impl From<vault::Tokenized> for pb::TokenizeResponse {
    fn from(t: vault::Tokenized) -> pb::TokenizeResponse {
        pb::TokenizeResponse {
            token: t.token.into_string(),
            created: t.created,
            info: Some(t.info.into()),
        }
    }
}

impl From<vault::Revealed> for pb::DetokenizeResponse {
    fn from(r: vault::Revealed) -> pb::DetokenizeResponse {
        // The response String cannot be zeroized; prost owns it until it is encoded.
        pb::DetokenizeResponse {
            pan: r.pan.expose_digits().to_owned(),
            info: Some(r.info.into()),
        }
    }
}

impl From<Result<vault::Tokenized>> for pb::TokenizeBatchResult {
    fn from(r: Result<vault::Tokenized>) -> pb::TokenizeBatchResult {
        use pb::tokenize_batch_result::Outcome;
        let outcome = match r {
            Ok(t) => Outcome::Success(t.into()),
            Err(e) => Outcome::Error(e.into()),
        };
        pb::TokenizeBatchResult {
            outcome: Some(outcome),
        }
    }
}

impl From<Result<vault::Revealed>> for pb::DetokenizeBatchResult {
    fn from(r: Result<vault::Revealed>) -> pb::DetokenizeBatchResult {
        use pb::detokenize_batch_result::Outcome;
        let outcome = match r {
            Ok(t) => Outcome::Success(t.into()),
            Err(e) => Outcome::Error(e.into()),
        };
        pb::DetokenizeBatchResult {
            outcome: Some(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for m in [0i64, 1, -1, 1_700_000_000_123_456, -62_135_596_800_000_000] {
            let ts = micros_to_timestamp(m);
            assert!((0..1_000_000_000).contains(&ts.nanos));
            assert_eq!(timestamp_to_micros(&ts, "t").unwrap(), m);
        }
    }

    #[test]
    fn invalid_timestamps_are_rejected() {
        for ts in [
            Timestamp {
                seconds: 0,
                nanos: -1,
            },
            Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            },
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            Timestamp {
                seconds: MIN_TIMESTAMP_SECONDS - 1,
                nanos: 0,
            },
        ] {
            let err = timestamp_to_micros(&ts, "expires_at").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(token_format(0).unwrap(), TokenFormat::Opaque);
        assert_eq!(token_format(1).unwrap(), TokenFormat::Opaque);
        assert_eq!(token_format(2).unwrap(), TokenFormat::PanShaped);
        assert_eq!(token_format(3).unwrap(), TokenFormat::PanShapedKeepBin);
        assert!(token_format(4).is_err());
        assert!(token_format(-1).is_err());
        for f in [
            TokenFormat::Opaque,
            TokenFormat::PanShaped,
            TokenFormat::PanShapedKeepBin,
        ] {
            assert_eq!(pb_token_format(f) as i64, f.code());
        }
    }

    #[test]
    fn brand_numbers_match_storage_codes() {
        for b in Brand::ALL {
            assert_eq!(pb_brand(b) as i64, b.code());
        }
    }

    #[test]
    fn long_reason_is_rejected_without_echo() {
        let req = pb::DetokenizeRequest {
            token: "t".into(),
            reason: "x".repeat(600),
        };
        let err = detokenize_request(req).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if !m.contains("xxx")),
            "{err:?}"
        );
    }
}
