//! The JSON vLLM's OpenAI-compatible API speaks: the request body, the
//! streamed chunks and the model list, parsed without building a value tree
//! on the common path.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::super::{GenerateParams, Usage};
use super::errors::{error_in, mid_stream_error};
use crate::error::InferenceError;

/// The body of `POST /v1/chat/completions`, borrowing the conversation from
/// the request instead of copying it into a `serde_json::Value` tree first
/// (a map and three strings per message, on every turn's path).
#[derive(Serialize)]
pub(super) struct ChatCompletionRequest<'a> {
    pub(super) model: &'a str,
    pub(super) messages: Vec<WireMessage<'a>>,
    pub(super) stream: bool,
    pub(super) stream_options: StreamOptions,
    pub(super) temperature: f32,
    pub(super) top_p: f32,
    pub(super) max_tokens: u32,
    /// The session: OpenAI's end-user field, which routers may hash on.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(super) user: &'a str,
}

#[derive(Serialize)]
pub(super) struct WireMessage<'a> {
    pub(super) role: &'static str,
    pub(super) content: &'a str,
}

#[derive(Serialize)]
pub(super) struct StreamOptions {
    /// vLLM sends token counts in a last chunk only when asked.
    pub(super) include_usage: bool,
}

impl<'a> ChatCompletionRequest<'a> {
    /// Always streamed, with usage, and every sampling field set: vLLM's
    /// own defaults differ from palaver's.
    pub(super) fn new(model: &'a str, req: &'a GenerateParams) -> Self {
        Self {
            model,
            messages: req
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: m.role.as_str(),
                    content: &m.content,
                })
                .collect(),
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_tokens,
            user: &req.affinity_key,
        }
    }
}

/// What one streamed event contributes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Event {
    pub(super) content: String,
    pub(super) finish_reason: Option<String>,
    pub(super) usage: Option<Usage>,
}

#[derive(Deserialize)]
pub(super) struct StreamChunk {
    #[serde(default)]
    pub(super) choices: Option<Vec<StreamChoice>>,
    #[serde(default)]
    pub(super) usage: Option<UsageJson>,
}

#[derive(Deserialize)]
pub(super) struct StreamChoice {
    #[serde(default)]
    pub(super) delta: Option<Delta>,
    #[serde(default)]
    pub(super) finish_reason: Option<String>,
}

/// Only `content` is read: `role`, `reasoning_content` / `reasoning` and
/// tool calls are ignored on purpose.
#[derive(Deserialize)]
pub(super) struct Delta {
    #[serde(default)]
    pub(super) content: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct UsageJson {
    #[serde(default)]
    pub(super) prompt_tokens: u32,
    #[serde(default)]
    pub(super) completion_tokens: u32,
}

#[derive(Deserialize)]
pub(super) struct ModelList {
    #[serde(default)]
    pub(super) data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
pub(super) struct ModelEntry {
    #[serde(default)]
    pub(super) id: String,
}

/// A chunk read straight into its typed shape, with just enough of the
/// error shapes to notice one.
#[derive(Deserialize)]
pub(super) struct FastChunk<'a> {
    #[serde(default)]
    pub(super) choices: Option<Vec<StreamChoice>>,
    #[serde(default)]
    pub(super) usage: Option<UsageJson>,
    /// vLLM's new error shape: any non-null `error`.
    #[serde(default)]
    pub(super) error: Option<serde::de::IgnoredAny>,
    /// vLLM's old error shape: `"object": "error"`.
    #[serde(default, borrow)]
    pub(super) object: Option<std::borrow::Cow<'a, str>>,
}

/// Parses one `data:` payload; an error object in it becomes the error.
///
/// Every token of every reply comes through here. Going through a
/// `serde_json::Value` first (a map allocation per object, then a second
/// pass) was the largest single cost of inference-svc under load, so a
/// chunk is read straight into its typed shape. Whatever that cannot take
/// as an ordinary chunk — an error in either shape, a duplicate key, a
/// field of an unexpected type, bad JSON — goes the general way below, so
/// the outcome is the same as before for every input.
pub(super) fn parse_event(data: &str) -> Result<Event, InferenceError> {
    match serde_json::from_str::<FastChunk<'_>>(data) {
        Ok(c) if c.error.is_none() && c.object.as_deref() != Some("error") => {
            Ok(event_of(c.choices, c.usage))
        }
        _ => parse_event_general(data),
    }
}

/// What a chunk without an error contributes.
pub(super) fn event_of(choices: Option<Vec<StreamChoice>>, usage: Option<UsageJson>) -> Event {
    let mut event = Event {
        usage: usage.map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }),
        ..Event::default()
    };
    for choice in choices.unwrap_or_default() {
        if let Some(text) = choice.delta.and_then(|d| d.content) {
            event.content.push_str(&text);
        }
        if choice.finish_reason.is_some() {
            event.finish_reason = choice.finish_reason;
        }
    }
    event
}

/// [`parse_event`] through a `Value`: finds errors in every shape and
/// explains unreadable chunks.
pub(super) fn parse_event_general(data: &str) -> Result<Event, InferenceError> {
    let value: Value = serde_json::from_str(data).map_err(|e| {
        InferenceError::Backend(format!("the model server sent an unreadable chunk: {e}"))
    })?;
    if let Some((message, code)) = error_in(&value) {
        tracing::warn!(message = ?message, ?code, "model server failed in the middle of a reply");
        let err = mid_stream_error(code.unwrap_or(500), &message);
        return Err(err);
    }
    let chunk: StreamChunk = serde_json::from_value(value).map_err(|e| {
        InferenceError::Backend(format!("the model server sent an unexpected chunk: {e}"))
    })?;
    Ok(event_of(chunk.choices, chunk.usage))
}
