//! What the model server says when it refuses or fails: its error bodies
//! (vLLM's old and new shapes, llama.cpp's), summarised for the caller.

use futures::StreamExt;
use reqwest::Response;
use serde_json::Value;

use super::{MAX_ERROR_BODY, MAX_QUOTED};
use crate::error::InferenceError;

pub(super) async fn read_limited(response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = Box::pin(response.bytes_stream());
    while let Some(Ok(bytes)) = stream.next().await {
        body.extend_from_slice(&bytes);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    body
}

/// The human message inside an error body, whatever its shape: vLLM's new
/// `{"error":{"message":..}}`, its old flat `{"object":"error","message":..}`,
/// `{"error":"Unauthorized"}`, FastAPI's `{"detail":..}`, or plain text.
pub(super) fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some((message, _)) = error_in(&v) {
            return message;
        }
        if let Some(detail) = v.get("detail") {
            return match detail {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
    }
    String::from_utf8_lossy(body).trim().to_string()
}

/// A top-level error in a JSON value: its message and code, in either of
/// vLLM's shapes.
pub(super) fn error_in(v: &Value) -> Option<(String, Option<u16>)> {
    let code_of = |c: Option<&Value>| {
        c.and_then(|c| match c {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
    };
    match v.get("error") {
        Some(Value::Null) | None => {}
        Some(Value::String(s)) => return Some((s.clone(), None)),
        Some(e) => {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Some((message, code_of(e.get("code"))));
        }
    }
    if v.get("object").and_then(Value::as_str) == Some("error") {
        let message = v
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown error")
            .to_string();
        return Some((message, code_of(v.get("code"))));
    }
    None
}

/// Errors inside a stream: the same mapping as HTTP statuses, except that a
/// 404 cannot happen there.
pub(super) fn mid_stream_error(code: u16, message: &str) -> InferenceError {
    if let Some(e) = context_too_long(message) {
        return e;
    }
    let quoted = quote(message);
    if (400..500).contains(&code) {
        InferenceError::InvalidArgument(format!("the model server refused the request: {quoted}"))
    } else {
        InferenceError::Unavailable(format!(
            "the model server failed in the middle of a reply: {quoted}"
        ))
    }
}

/// The model server's refusal of a prompt over its context, wherever it
/// comes: the client's fault (a conversation too long), not the server's.
/// vLLM says "maximum context length"; llama.cpp's server "exceeds the
/// available context size" (or, for a prompt it cannot split, "larger than
/// the max context size").
pub(super) fn context_too_long(message: &str) -> Option<InferenceError> {
    let message = message.to_ascii_lowercase();
    [
        "maximum context length",
        "exceeds the available context size",
        "larger than the max context size",
    ]
    .iter()
    .any(|phrase| message.contains(phrase))
    .then(|| InferenceError::InvalidArgument("the conversation is too long for the model".into()))
}

/// A peer's message made fit for one line of ours: whitespace collapsed,
/// length bounded.
pub(super) fn quote(message: &str) -> String {
    // No control characters (terminal escapes) reach a caller.
    let printable: String = message
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .collect();
    let one_line = printable.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_QUOTED {
        return one_line;
    }
    let mut short: String = one_line.chars().take(MAX_QUOTED).collect();
    short.push('…');
    short
}
