//! Why a generation failed, and the one mapping of that to a gRPC status.
//!
//! Every message is one lowercase sentence without an `Error:` prefix: the
//! gateway puts `Error: ` in front of it when it answers an MQTT client.

use std::time::Duration;

use palaver_core::{ERROR_KIND_HEADER, ERROR_KIND_OVERLOADED};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Everything that can go wrong between a gRPC call and the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferenceError {
    /// Every slot is busy and `max_queue` callers already wait: refusing at
    /// once is kinder than letting the queue (and latency) grow without end.
    #[error("all inference slots are busy and the queue is full")]
    QueueFull,
    /// The caller waited `queue_timeout` for a slot and none came free.
    #[error("no inference slot came free within {} ms", .0.as_millis())]
    QueueTimeout(Duration),
    /// The request itself is wrong (bad sampling, unknown role, prompt too
    /// long for the model); retrying the same request cannot help.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model server is over its own capacity: 429, or 503 (what recent
    /// vLLM answers past a configured queue size). Several inference-svc
    /// replicas sharing one vLLM each count only their own 8; the server's
    /// queue is where they meet.
    #[error("{0}")]
    BackendBusy(String),
    /// The model server cannot be reached or answered with a server error;
    /// retrying later may help.
    #[error("{0}")]
    Unavailable(String),
    /// The model server does not serve the configured (or discovered) model.
    #[error("the model server does not serve the model {0:?}")]
    ModelNotFound(String),
    /// The model took too long: no first token, a stall between tokens, or
    /// the whole reply over its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The model server answered something palaver cannot use.
    #[error("{0}")]
    Backend(String),
    /// The service is configured wrongly (only seen at startup).
    #[error("invalid inference configuration: {0}")]
    Config(String),
}

impl InferenceError {
    /// The gRPC code callers see for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::QueueFull | Self::QueueTimeout(_) | Self::BackendBusy(_) => {
                Code::ResourceExhausted
            }
            Self::InvalidArgument(_) => Code::InvalidArgument,
            // A model the server does not serve is, for the caller, a model
            // that is unavailable: the gateway then says so in its reply.
            Self::Unavailable(_) | Self::ModelNotFound(_) => Code::Unavailable,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Backend(_) | Self::Config(_) => Code::Internal,
        }
    }

    /// Too much work here or at the model server: the caller should try
    /// again in a moment ("Server is overloaded" at the gateway). All that
    /// inference-svc answers RESOURCE_EXHAUSTED.
    pub fn is_overload(&self) -> bool {
        self.code() == Code::ResourceExhausted
    }

    /// A short, stable label for metrics (`palaver_inference_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueTimeout(_) => "queue_timeout",
            Self::BackendBusy(_) => "backend_busy",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Unavailable(_) => "unavailable",
            Self::ModelNotFound(_) => "model_not_found",
            Self::Timeout(_) => "timeout",
            Self::Backend(_) => "backend",
            Self::Config(_) => "config",
        }
    }
}

impl From<InferenceError> for Status {
    fn from(e: InferenceError) -> Self {
        let code = e.code();
        let mut status = Status::new(code, e.to_string());
        if e.is_overload() {
            // RESOURCE_EXHAUSTED also means "rate limited" elsewhere in
            // palaver; the gateway needs this to pick the "overloaded" reply.
            status.metadata_mut().insert(
                ERROR_KIND_HEADER,
                MetadataValue::from_static(ERROR_KIND_OVERLOADED),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_is_resource_exhausted_with_kind() {
        for e in [
            InferenceError::QueueFull,
            InferenceError::QueueTimeout(Duration::from_millis(30)),
            InferenceError::BackendBusy("the model server is busy (503)".into()),
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert_eq!(
                s.metadata()
                    .get(ERROR_KIND_HEADER)
                    .and_then(|v| v.to_str().ok()),
                Some(ERROR_KIND_OVERLOADED)
            );
        }
    }

    #[test]
    fn codes_and_messages() {
        let cases = [
            (
                InferenceError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (InferenceError::Unavailable("x".into()), Code::Unavailable),
            (InferenceError::ModelNotFound("m".into()), Code::Unavailable),
            (InferenceError::Timeout("x".into()), Code::DeadlineExceeded),
            (InferenceError::Backend("x".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(s.metadata().get(ERROR_KIND_HEADER).is_none());
        }
        let msg = InferenceError::QueueTimeout(Duration::from_millis(250)).to_string();
        assert_eq!(msg, "no inference slot came free within 250 ms");
        assert!(!InferenceError::QueueFull.to_string().starts_with("Error"));
    }
}
