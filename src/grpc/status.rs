//! The single place where domain errors become gRPC statuses, for whole RPCs and for the
//! per-item errors of batches alike.
//!
//! Messages are the error's `Display`, which by construction never carries a PAN, a key or
//! request content. `INTERNAL` is the exception: its detail may describe server internals, so
//! it is logged and the caller sees a fixed text.

use tonic::Status;

use super::pb;
use crate::error::{Code, Error};

/// Text callers see for every internal error.
pub const INTERNAL_MESSAGE: &str = "internal error";

/// The tonic code for a domain code. Exhaustive on purpose: a new [`Code`] must be mapped here.
pub fn tonic_code(code: Code) -> tonic::Code {
    match code {
        Code::Ok => tonic::Code::Ok,
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::DataLoss => tonic::Code::DataLoss,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::OutOfRange => tonic::Code::OutOfRange,
        Code::Cancelled => tonic::Code::Cancelled,
        Code::Internal => tonic::Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = err.code();
        match code {
            Code::Internal => {
                tracing::error!(error = %err, "internal error");
                Status::new(tonic_code(code), INTERNAL_MESSAGE)
            }
            _ => Status::new(tonic_code(code), err.to_string()),
        }
    }
}

impl From<Error> for pb::BatchError {
    fn from(err: Error) -> pb::BatchError {
        let status = Status::from(err);
        // google.rpc.Code numbering is the gRPC wire numbering tonic uses.
        pb::BatchError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_is_not_sent() {
        let status = Status::from(Error::Internal("db path /secret/x".into()));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), INTERNAL_MESSAGE);
    }

    #[test]
    fn messages_pass_through() {
        let status = Status::from(Error::NotFound);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "token not found");
        let batch = pb::BatchError::from(Error::InvalidArgument("pan: bad".into()));
        assert_eq!(batch.code, 3);
        assert_eq!(batch.message, "pan: bad");
    }

    #[test]
    fn wrong_master_key_is_failed_precondition() {
        assert_eq!(
            Status::from(Error::WrongMasterKey).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
