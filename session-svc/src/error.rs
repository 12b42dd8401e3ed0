//! session-svc's errors, and their one mapping to gRPC status codes.

use palaver_core::{ERROR_KIND_HEADER, ERROR_KIND_RATE_LIMITED};
use tonic::{Code, Status};

use crate::store::StoreError;

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The caller sent something unusable; the text says what, in one sentence.
    #[error("{0}")]
    InvalidArgument(String),
    /// The session sent too many requests within its window.
    #[error("rate limit exceeded")]
    RateLimited,
    /// Another turn held the session's lock for longer than we wait.
    #[error("the session is busy; try again")]
    LockTimeout,
    /// Our lock expired before we wrote (a stall longer than the lock TTL).
    #[error("the session's lock expired during the update; try again")]
    LockLost,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// inference-svc refused or failed; its status is passed on unchanged.
    #[error("inference failed: {0}")]
    Inference(Status),
}

impl SessionError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::InvalidArgument(_) => "invalid_argument",
            SessionError::RateLimited => "rate_limited",
            SessionError::LockTimeout | SessionError::LockLost => "lock",
            SessionError::Store(_) => "store",
            SessionError::Inference(s) => match s.code() {
                Code::ResourceExhausted => "inference_overloaded",
                Code::DeadlineExceeded => "inference_timeout",
                Code::InvalidArgument => "inference_invalid",
                _ => "inference_unavailable",
            },
        }
    }
}

impl From<SessionError> for Status {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::InvalidArgument(m) => Status::invalid_argument(m),
            SessionError::RateLimited => {
                let mut s = Status::resource_exhausted("rate limit exceeded");
                s.metadata_mut().insert(
                    ERROR_KIND_HEADER,
                    tonic::metadata::MetadataValue::from_static(ERROR_KIND_RATE_LIMITED),
                );
                s
            }
            e @ (SessionError::LockTimeout | SessionError::LockLost) => {
                Status::aborted(e.to_string())
            }
            SessionError::Store(e @ StoreError::Unavailable(_)) => {
                Status::unavailable(e.to_string())
            }
            SessionError::Store(e @ StoreError::Corrupt(_)) => Status::internal(e.to_string()),
            SessionError::Inference(s) => {
                // Keep the code, the message and the error kind (the gateway
                // tells "overloaded" apart by it); drop transport headers.
                let mut out = Status::new(s.code(), s.message().to_owned());
                if let Some(kind) = s.metadata().get(ERROR_KIND_HEADER) {
                    out.metadata_mut().insert(ERROR_KIND_HEADER, kind.clone());
                }
                out
            }
        }
    }
}
