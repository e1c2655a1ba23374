//! The crate's one error type. Every variant maps to exactly one gRPC code in
//! `grpc::status` (an exhaustive `match`), and no message ever carries a PAN, a key or a
//! caller's raw input: only positions, counts and fixed texts.

use crate::card::PanError;
use crate::token::TokenError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says what is wrong without echoing input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown, expired and deleted tokens alike.
    #[error("token not found")]
    NotFound,
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    /// Rate limits, full storage, an exhausted token space or key-usage limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A ciphertext or wrapped key failed authentication: altered or moved data.
    #[error("{0}")]
    DataLoss(String),
    /// Storage cannot be written or read right now (read-only disk, locked file, I/O error).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The supplied master key does not open this vault.
    #[error("master key does not match this vault")]
    WrongMasterKey,
    /// A precondition of an admin operation does not hold (e.g. retiring a key still in use).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A request message larger than the server accepts (as the transport itself answers).
    #[error("{0}")]
    OutOfRange(String),
    /// The caller went away before its request was received in full.
    #[error("{0}")]
    Cancelled(&'static str),
    /// A bug or an unexpected condition; the detail goes to the log, callers see a generic text.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<PanError> for Error {
    fn from(e: PanError) -> Self {
        Error::InvalidArgument(format!("pan: {e}"))
    }
}

impl From<TokenError> for Error {
    fn from(e: TokenError) -> Self {
        Error::InvalidArgument(format!("token: {e}"))
    }
}

impl From<crate::crypto::KeyError> for Error {
    fn from(e: crate::crypto::KeyError) -> Self {
        match e {
            // The token holding the master key failed mid-operation: try again later.
            crate::crypto::KeyError::Pkcs11Device(_) => Error::Unavailable(e.to_string()),
            e => Error::FailedPrecondition(e.to_string()),
        }
    }
}

impl From<crate::crypto::DecryptError> for Error {
    fn from(_: crate::crypto::DecryptError) -> Self {
        Error::DataLoss("stored ciphertext failed authentication".into())
    }
}

/// gRPC status code names, so the domain can name outcomes (audit trail) without tonic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unavailable,
    DataLoss,
    Unauthenticated,
    OutOfRange,
    Cancelled,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Cancelled => "CANCELLED",
            Code::Internal => "INTERNAL",
        }
    }
}

impl Error {
    /// The one mapping from domain errors to status codes.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound => Code::NotFound,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Unavailable(_) => Code::Unavailable,
            Error::WrongMasterKey => Code::FailedPrecondition,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Internal(_) => Code::Internal,
        }
    }
}

/// Outcome name for the audit trail.
pub fn outcome_of<T>(r: &Result<T>) -> &'static str {
    match r {
        Ok(_) => Code::Ok.as_str(),
        Err(e) => e.code().as_str(),
    }
}
