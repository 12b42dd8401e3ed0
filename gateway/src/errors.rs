//! The one mapping from a failed gRPC call to the text a client receives.
//!
//! Clients in the field compare two of these strings byte for byte
//! ([`RATE_LIMITED_TEXT`], [`OVERLOADED_TEXT`]); the rest start with `Error: `
//! and say what went wrong in one sentence.

use palaver_core::{
    ERROR_KIND_CANCELLED, ERROR_KIND_HEADER, ERROR_KIND_OVERLOADED, ERROR_KIND_RATE_LIMITED,
};
use tonic::{Code, Status};

/// Exact string old clients recognise as "rate limited".
pub const RATE_LIMITED_TEXT: &str = "Error: Rate limit exceeded. Please slow down your requests.";
/// Exact string old clients recognise as "try again soon"; also sent when the
/// gateway's own backlog is full.
pub const OVERLOADED_TEXT: &str = "Server is overloaded. Please try again in a moment.";
/// Reply to a request without a usable `message`.
pub const EMPTY_MESSAGE_TEXT: &str = "Error: Message is empty.";
/// Reply when the turn ran past its deadline.
pub const TIMEOUT_TEXT: &str = "Error: The request timed out. Please try again.";
/// Reply when session-svc, inference-svc or the model cannot be reached.
pub const UNAVAILABLE_TEXT: &str =
    "Error: The model is unavailable right now. Please try again later.";
/// Reply when the session's lock could not be taken in time.
pub const BUSY_TEXT: &str = "Error: The session is busy. Please try again.";
/// Reply for every failure the client cannot act on.
pub const INTERNAL_TEXT: &str = "Error: Something went wrong on the server.";
/// Reply to a turn its client cancelled (`<project>/cancel/<sid>`).
pub const CANCELLED_TEXT: &str = "Error: Cancelled.";
/// Reply when the model's answer does not fit in one MQTT packet.
pub const REPLY_TOO_LARGE_TEXT: &str = "Error: The reply is too long to send.";

/// Longest status message copied into an INVALID_ARGUMENT reply, in characters.
const MAX_DETAIL_CHARS: usize = 300;

/// Why a request failed; the label of `palaver_gateway_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// session-svc said the session exceeded its rate limit.
    RateLimited,
    /// session-svc or inference-svc had no room for the turn.
    Overloaded,
    /// The gateway's own backlog (`max-pending`) was full.
    BacklogFull,
    /// The gateway was draining for shutdown and took no new turns.
    ShuttingDown,
    /// The request was refused as invalid (by the gateway or session-svc).
    InvalidArgument,
    /// The deadline passed.
    Timeout,
    /// A service or the model is down.
    Unavailable,
    /// The session's lock was not acquired in time.
    Busy,
    /// The reply was too large to publish.
    ReplyTooLarge,
    /// The client cancelled the turn.
    Cancelled,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::BacklogFull => "backlog_full",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::ReplyTooLarge => "reply_too_large",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

/// What the client is told about a failed call, and how it is counted.
///
/// The `palaver-error-kind` metadata wins over the code: it is how
/// session-svc tells a rate limit from a full queue, both RESOURCE_EXHAUSTED.
pub fn classify(status: &Status) -> (ErrorKind, String) {
    let kind = status
        .metadata()
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match kind {
        Some(ERROR_KIND_RATE_LIMITED) => return (ErrorKind::RateLimited, RATE_LIMITED_TEXT.into()),
        Some(ERROR_KIND_OVERLOADED) => return (ErrorKind::Overloaded, OVERLOADED_TEXT.into()),
        Some(ERROR_KIND_CANCELLED) => return (ErrorKind::Cancelled, CANCELLED_TEXT.into()),
        _ => {}
    }
    match status.code() {
        Code::InvalidArgument => (
            ErrorKind::InvalidArgument,
            invalid_argument_text(status.message()),
        ),
        Code::DeadlineExceeded => (ErrorKind::Timeout, TIMEOUT_TEXT.into()),
        Code::Unavailable => (ErrorKind::Unavailable, UNAVAILABLE_TEXT.into()),
        Code::Aborted => (ErrorKind::Busy, BUSY_TEXT.into()),
        Code::ResourceExhausted => (ErrorKind::Overloaded, OVERLOADED_TEXT.into()),
        // A local transport failure (the connection to session-svc broke)
        // carries its cause; the service itself never sends one.
        _ if std::error::Error::source(status).is_some() => {
            (ErrorKind::Unavailable, UNAVAILABLE_TEXT.into())
        }
        _ => (ErrorKind::Internal, INTERNAL_TEXT.into()),
    }
}

/// `Error: <detail>.` from session-svc's explanation: one line, capitalised,
/// ending in a period, without a doubled `Error:` prefix.
fn invalid_argument_text(detail: &str) -> String {
    let one_line = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut detail = one_line.as_str();
    if detail
        .get(..6)
        .is_some_and(|head| head.eq_ignore_ascii_case("error:"))
    {
        detail = detail[6..].trim_start();
    }
    let detail = detail.trim_end_matches(['.', ' ']);
    if detail.is_empty() {
        return "Error: The request is invalid.".into();
    }
    let mut chars = detail.chars();
    let mut out = String::from("Error: ");
    if let Some(first) = chars.next() {
        out.extend(first.to_uppercase());
    }
    out.extend(chars.take(MAX_DETAIL_CHARS - 1));
    if !out.ends_with(['?', '!']) {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with_kind(code: Code, kind: &'static str) -> Status {
        let mut s = Status::new(code, "whatever");
        s.metadata_mut()
            .insert(ERROR_KIND_HEADER, MetadataValue::from_static(kind));
        s
    }

    #[test]
    fn error_kind_metadata_wins_over_the_code() {
        let cases = [
            (
                with_kind(Code::ResourceExhausted, "rate_limited"),
                ErrorKind::RateLimited,
                RATE_LIMITED_TEXT,
            ),
            (
                with_kind(Code::ResourceExhausted, "overloaded"),
                ErrorKind::Overloaded,
                OVERLOADED_TEXT,
            ),
            (
                with_kind(Code::Unavailable, "overloaded"),
                ErrorKind::Overloaded,
                OVERLOADED_TEXT,
            ),
            (
                with_kind(Code::Internal, "rate_limited"),
                ErrorKind::RateLimited,
                RATE_LIMITED_TEXT,
            ),
            // A turn stopped by Sessions/CancelTurn.
            (
                with_kind(Code::Cancelled, "cancelled"),
                ErrorKind::Cancelled,
                CANCELLED_TEXT,
            ),
            (
                with_kind(Code::ResourceExhausted, "something_new"),
                ErrorKind::Overloaded,
                OVERLOADED_TEXT,
            ),
            (
                with_kind(Code::Unknown, "something_new"),
                ErrorKind::Internal,
                INTERNAL_TEXT,
            ),
        ];
        for (status, kind, text) in cases {
            assert_eq!(classify(&status), (kind, text.to_owned()), "{status:?}");
        }
    }

    #[test]
    fn codes() {
        let cases = [
            (Code::DeadlineExceeded, ErrorKind::Timeout, TIMEOUT_TEXT),
            (Code::Unavailable, ErrorKind::Unavailable, UNAVAILABLE_TEXT),
            (Code::Aborted, ErrorKind::Busy, BUSY_TEXT),
            (
                Code::ResourceExhausted,
                ErrorKind::Overloaded,
                OVERLOADED_TEXT,
            ),
            (Code::Internal, ErrorKind::Internal, INTERNAL_TEXT),
            (Code::Unknown, ErrorKind::Internal, INTERNAL_TEXT),
            (Code::NotFound, ErrorKind::Internal, INTERNAL_TEXT),
            (Code::Cancelled, ErrorKind::Internal, INTERNAL_TEXT),
            (Code::Ok, ErrorKind::Internal, INTERNAL_TEXT),
        ];
        for (code, kind, text) in cases {
            let status = Status::new(code, "detail that must not leak");
            assert_eq!(classify(&status), (kind, text.to_owned()), "{code:?}");
        }
    }

    #[test]
    fn invalid_argument_says_what_was_wrong() {
        let cases = [
            ("message too long", "Error: Message too long."),
            (
                "message is too long (max 8000 characters).",
                "Error: Message is too long (max 8000 characters).",
            ),
            ("Error: message is empty", "Error: Message is empty."),
            ("error:   bad temperature...", "Error: Bad temperature."),
            ("is this ok?", "Error: Is this ok?"),
            ("two\nlines\there", "Error: Two lines here."),
            ("émoji first", "Error: Émoji first."),
            ("", "Error: The request is invalid."),
            ("  .  ", "Error: The request is invalid."),
            ("Error:", "Error: The request is invalid."),
        ];
        for (detail, want) in cases {
            let status = Status::invalid_argument(detail);
            assert_eq!(
                classify(&status),
                (ErrorKind::InvalidArgument, want.to_owned()),
                "{detail:?}"
            );
        }
        let long = classify(&Status::invalid_argument("x".repeat(10_000))).1;
        assert!(
            long.chars().count() <= MAX_DETAIL_CHARS + 8,
            "{}",
            long.len()
        );
        assert!(long.starts_with("Error: X") && long.ends_with('.'));
    }

    #[test]
    fn multibyte_detail_is_not_split_inside_a_character() {
        // "error:" check must not slice through a multi-byte character.
        let (_, text) = classify(&Status::invalid_argument("ééé bad"));
        assert_eq!(text, "Error: Ééé bad.");
        let (_, text) = classify(&Status::invalid_argument("aéé bad"));
        assert_eq!(text, "Error: Aéé bad.");
    }
}
