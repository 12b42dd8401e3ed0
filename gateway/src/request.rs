//! Reading a `<project>/user_input` payload: the wire protocol of clients in
//! the field, decided here and nowhere else.
//!
//! Pure: no I/O, no clock, no randomness (the fresh session id comes from the
//! caller), so every rule below is covered by the table tests at the end.
//!
//! Choices where DESIGN.md is silent:
//! - `sessionId` that is an array or object: refused with an error reply
//!   (silently starting a fresh session would answer on a topic the client
//!   is not listening to);
//! - `sessionId` longer than [`MAX_SESSION_ID_BYTES`]: refused on the
//!   client's `replyTopic` if it gave a usable one, otherwise dropped (no topic
//!   could carry it);
//! - wildcards and characters brokers refuse in the session id are replaced
//!   by `_` in the *default reply topic* only; session-svc still gets the id
//!   unchanged (see [`crate::topics::sanitize_level`]);
//! - a payload of only whitespace counts as empty (dropped);
//! - a leading byte-order mark is ignored before reading JSON;
//! - `systemPrompt` that is not a string, or is blank, is ignored: the old
//!   server ignored it too, and a cosmetic field should not cost a turn;
//! - `temperature`/`topP`/`maxTokens` that are `null` or a blank string count
//!   as absent (the project default applies);
//! - `clientId`/`requestId` that are not strings or numbers, or blank, count
//!   as absent;
//! - an MQTT 5 Response Topic is used when the payload names no usable
//!   `replyTopic`, under the same rule ([`topics::valid_reply_topic`]); one
//!   that breaks it is ignored like a bad `replyTopic`;
//! - Correlation Data over [`MAX_CORRELATION_BYTES`] is refused (an error
//!   reply without it): echoing it could make every answer too large to send.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::errors::EMPTY_MESSAGE_TEXT;
use crate::mqtt::RequestProperties;
use crate::topics;

/// Longest session id the gateway forwards, in bytes: session-svc's limit,
/// so a longer one is refused here with a reply rather than there.
pub const MAX_SESSION_ID_BYTES: usize = 256;

/// Longest MQTT 5 Correlation Data echoed on answers, in bytes: ample for
/// the ids and UUIDs clients put there, small beside a reply packet.
pub const MAX_CORRELATION_BYTES: usize = 4096;

/// Longest `traceparent` kept (the W3C form is 55 characters).
const MAX_TRACEPARENT_BYTES: usize = 256;

/// Refusal text for Correlation Data over [`MAX_CORRELATION_BYTES`].
pub const LONG_CORRELATION_TEXT: &str = "Error: Correlation Data is too long.";
/// Refusal text for an array or object `sessionId`.
pub const BAD_SESSION_ID_TEXT: &str = "Error: sessionId must be a string or a number.";
/// Refusal text for a session id over [`MAX_SESSION_ID_BYTES`].
pub const LONG_SESSION_ID_TEXT: &str = "Error: sessionId is too long.";
/// Refusal text for a bad `temperature`.
pub const BAD_TEMPERATURE_TEXT: &str = "Error: temperature must be a number between 0 and 2.";
/// Refusal text for a bad `topP`.
pub const BAD_TOP_P_TEXT: &str = "Error: topP must be a number above 0 and at most 1.";
/// Refusal text for a bad `maxTokens`.
pub const BAD_MAX_TOKENS_TEXT: &str = "Error: maxTokens must be a whole number of at least 1.";

/// One chat turn as the client asked for it, ready to send to session-svc.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    /// The session to continue (or the fresh `default-…` id); sent unchanged
    /// to session-svc, which owns the encoding of arbitrary ids.
    pub session_id: String,
    /// The user's text, not blank.
    pub message: String,
    /// Where the reply (or error reply) goes; always passes
    /// [`topics::confined`] for [`topics::Route::Reply`].
    pub reply_topic: String,
    /// The client's own id, for logs and tracing only.
    pub client_id: Option<String>,
    /// Makes a retried turn idempotent in session-svc, and ties logs together.
    pub request_id: Option<String>,
    /// A new system prompt for this session from this turn on.
    pub system_prompt: Option<String>,
    /// Sampling override within 0..=2; `None` means the project default.
    pub temperature: Option<f32>,
    /// Nucleus-sampling override within (0, 1]; `None` means the project default.
    pub top_p: Option<f32>,
    /// Completion-length override, at least 1; session-svc caps it per project.
    pub max_tokens: Option<u32>,
    /// `"stream": true`: the reply also goes out in pieces on
    /// `<reply_topic>/stream` (see [`crate::stream`]).
    pub stream: bool,
    /// The MQTT 5 request's Correlation Data, echoed on every answer.
    pub correlation_data: Option<Bytes>,
    /// The request's W3C trace context (`traceparent` user property), kept
    /// for tracing the turn.
    pub traceparent: Option<String>,
    /// `@<user>` for a request on a user's own topic (see [`crate::identity`]):
    /// session-svc's per-client limits count it instead of `client_id`.
    pub user: Option<String>,
}

impl ChatTurn {
    /// A turn of `project` with only its session and text, replying on the
    /// session's default topic: what a bare-text payload becomes.
    pub(crate) fn plain(project: &str, session_id: String, message: String) -> Self {
        ChatTurn {
            reply_topic: topics::default_reply_topic(project, &session_id),
            session_id,
            message,
            client_id: None,
            request_id: None,
            system_prompt: None,
            temperature: None,
            top_p: None,
            max_tokens: None,
            stream: false,
            correlation_data: None,
            traceparent: None,
            user: None,
        }
    }

    /// The request id session-svc deduplicates on: the client's `requestId`,
    /// prefixed with its `clientId` when it sent one.
    ///
    /// Request ids are chosen by each client (the reference client puts both
    /// in its reply topic and matches on both), so two clients of one
    /// session may well both send `"1"`; unscoped, the second would be
    /// answered with the first one's stored reply. A retry from the same
    /// client carries the same pair and is still recognised. The client id's
    /// length goes first, so that no two pairs make the same key (`a` +
    /// `b:c` against `a:b` + `c`).
    pub fn idempotency_key(&self) -> Option<String> {
        let request_id = self.request_id.as_deref()?;
        Some(match self.client_id.as_deref() {
            Some(client) => format!("{}:{client}:{request_id}", client.len()),
            None => request_id.to_owned(),
        })
    }
}

/// Why a payload was dropped without any reply; the label of
/// `palaver_gateway_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over `max-payload-bytes`: not worth parsing, not trusted.
    TooLarge,
    /// Nothing (or only whitespace) to answer.
    Empty,
    /// Not UTF-8: no way to read a reply topic out of it.
    InvalidUtf8,
    /// JSON, but an array, string, number, ...: no reply topic in it.
    NotAnObject,
    /// A session id no topic can carry, and no usable `replyTopic`.
    SessionIdTooLong,
}

impl DropReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::Empty => "empty",
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::NotAnObject => "not_an_object",
            DropReason::SessionIdTooLong => "session_id_too_long",
        }
    }
}

/// What to do with one `user_input` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A turn to run.
    Chat(ChatTurn),
    /// A reply topic is known but the request is unusable: publish
    /// `error_text` there.
    Reject {
        /// Where the error goes; confined like every reply topic.
        reply_topic: String,
        /// The request's Correlation Data, echoed on the error.
        correlation_data: Option<Bytes>,
        /// One `Error: ...` sentence.
        error_text: String,
    },
    /// Nothing to answer; count and log.
    Drop(DropReason),
}

/// A fresh session id, `default-<8 hex>`, for payloads without one.
pub fn fresh_session_id() -> String {
    format!("default-{:08x}", rand::random::<u32>())
}

/// Reads one payload published to `<project>/user_input`, with the MQTT 5
/// `properties` it came with (all empty under 3.1.1).
///
/// `fresh_id` is called at most once, when the request has no session id.
pub fn parse(
    project: &str,
    payload: &[u8],
    max_payload_bytes: usize,
    properties: &RequestProperties,
    fresh_id: impl FnOnce() -> String,
) -> Parsed {
    let response_topic = properties
        .response_topic
        .as_deref()
        .and_then(|t| topics::valid_reply_topic(project, t));
    let mut parsed = parse_payload(
        project,
        payload,
        max_payload_bytes,
        response_topic,
        fresh_id,
    );
    let correlation = properties.correlation_data.clone();
    let too_long = correlation
        .as_ref()
        .is_some_and(|c| c.len() > MAX_CORRELATION_BYTES);
    match &mut parsed {
        Parsed::Chat(turn) if too_long => {
            return reject(std::mem::take(&mut turn.reply_topic), LONG_CORRELATION_TEXT);
        }
        Parsed::Chat(turn) => {
            turn.correlation_data = correlation;
            turn.traceparent = properties
                .traceparent
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.len() <= MAX_TRACEPARENT_BYTES)
                .map(str::to_owned);
        }
        Parsed::Reject {
            correlation_data, ..
        } if !too_long => *correlation_data = correlation,
        Parsed::Reject { .. } | Parsed::Drop(_) => {}
    }
    parsed
}

/// The payload's rules; `response_topic` is the usable Response Topic.
fn parse_payload(
    project: &str,
    payload: &[u8],
    max_payload_bytes: usize,
    response_topic: Option<String>,
    fresh_id: impl FnOnce() -> String,
) -> Parsed {
    if payload.len() > max_payload_bytes {
        return Parsed::Drop(DropReason::TooLarge);
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return Parsed::Drop(DropReason::InvalidUtf8);
    };
    let text = text.trim_start_matches('\u{feff}').trim();
    if text.is_empty() {
        return Parsed::Drop(DropReason::Empty);
    }
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Parsed::Drop(DropReason::NotAnObject),
        // Not JSON at all: old clients publish bare text.
        Err(_) => {
            let mut turn = ChatTurn::plain(project, fresh_id(), text.to_owned());
            if let Some(topic) = response_topic {
                turn.reply_topic = topic;
            }
            return Parsed::Chat(turn);
        }
    };
    parse_object(project, &map, response_topic, fresh_id)
}

fn parse_object(
    project: &str,
    map: &Map<String, Value>,
    response_topic: Option<String>,
    fresh_id: impl FnOnce() -> String,
) -> Parsed {
    let explicit_topic = map
        .get("replyTopic")
        .and_then(Value::as_str)
        .and_then(|t| topics::valid_reply_topic(project, t))
        .or(response_topic);

    let session_id = match session_id(map.get("sessionId")) {
        SessionId::Given(id) if id.len() > MAX_SESSION_ID_BYTES => {
            return match explicit_topic {
                Some(reply_topic) => reject(reply_topic, LONG_SESSION_ID_TEXT),
                None => Parsed::Drop(DropReason::SessionIdTooLong),
            };
        }
        SessionId::Given(id) => id,
        SessionId::Absent => fresh_id(),
        SessionId::Invalid => {
            let reply_topic =
                explicit_topic.unwrap_or_else(|| topics::default_reply_topic(project, &fresh_id()));
            return reject(reply_topic, BAD_SESSION_ID_TEXT);
        }
    };
    let reply_topic =
        explicit_topic.unwrap_or_else(|| topics::default_reply_topic(project, &session_id));

    let message = match map.get("message") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return reject(reply_topic, EMPTY_MESSAGE_TEXT),
    };
    let temperature = match number(map.get("temperature")) {
        Ok(None) => None,
        Ok(Some(t)) if (0.0..=2.0).contains(&t) => Some(t as f32),
        _ => return reject(reply_topic, BAD_TEMPERATURE_TEXT),
    };
    let top_p = match number(map.get("topP")) {
        Ok(None) => None,
        Ok(Some(p)) if p > 0.0 && p <= 1.0 => Some(p as f32),
        _ => return reject(reply_topic, BAD_TOP_P_TEXT),
    };
    let max_tokens = match number(map.get("maxTokens")) {
        Ok(None) => None,
        Ok(Some(n)) if n >= 1.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => Some(n as u32),
        _ => return reject(reply_topic, BAD_MAX_TOKENS_TEXT),
    };
    let system_prompt = match map.get("systemPrompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => Some(p.clone()),
        _ => None,
    };

    Parsed::Chat(ChatTurn {
        session_id,
        message,
        reply_topic,
        client_id: scalar_text(map.get("clientId")),
        request_id: scalar_text(map.get("requestId")),
        system_prompt,
        temperature,
        top_p,
        max_tokens,
        // Only a JSON `true` opts in: anything else keeps today's behaviour.
        stream: map.get("stream") == Some(&Value::Bool(true)),
        correlation_data: None,
        traceparent: None,
        user: None,
    })
}

fn reject(reply_topic: String, text: &str) -> Parsed {
    Parsed::Reject {
        reply_topic,
        correlation_data: None,
        error_text: text.to_owned(),
    }
}

enum SessionId {
    Given(String),
    Absent,
    Invalid,
}

fn session_id(value: Option<&Value>) -> SessionId {
    match value {
        None | Some(Value::Null) => SessionId::Absent,
        Some(Value::String(s)) if s.trim().is_empty() => SessionId::Absent,
        Some(Value::String(s)) => SessionId::Given(s.trim().to_owned()),
        Some(Value::Number(n)) => SessionId::Given(n.to_string()),
        Some(Value::Bool(b)) => SessionId::Given(b.to_string()),
        Some(Value::Array(_) | Value::Object(_)) => SessionId::Invalid,
    }
}

/// A sampling number: a finite JSON number or a string holding one (old
/// Python clients sent `float(x)`-able strings). `Ok(None)` when absent,
/// null or blank; `Err` for anything else.
fn number(value: Option<&Value>) -> Result<Option<f64>, ()> {
    let n = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| ())?,
        Some(Value::Number(n)) => n.as_f64().ok_or(())?,
        Some(_) => return Err(()),
    };
    if n.is_finite() {
        Ok(Some(n))
    } else {
        Err(())
    }
}

/// A string (trimmed) or the text of a number; `None` for anything else or blank.
pub(crate) fn scalar_text(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;
    const FRESH: &str = "default-0badc0de";
    /// A 3.1.1 request, or a 5 one without properties.
    const NONE: RequestProperties = RequestProperties {
        response_topic: None,
        correlation_data: None,
        traceparent: None,
    };

    fn run(payload: &[u8]) -> Parsed {
        parse("p", payload, MAX, &NONE, || FRESH.to_owned())
    }

    fn chat(payload: &str) -> ChatTurn {
        match run(payload.as_bytes()) {
            Parsed::Chat(turn) => turn,
            other => panic!("{payload:?} gave {other:?}"),
        }
    }

    #[test]
    fn drops() {
        let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(MAX));
        let cases: &[(&[u8], DropReason)] = &[
            (b"", DropReason::Empty),
            (b"   \n\t ", DropReason::Empty),
            (b"\xef\xbb\xbf", DropReason::Empty),
            (b"\xff\xfe{}", DropReason::InvalidUtf8),
            (b"{\"message\":\"\xc3\x28\"}", DropReason::InvalidUtf8),
            (b"[1,2]", DropReason::NotAnObject),
            (b"\"hello\"", DropReason::NotAnObject),
            (b"42", DropReason::NotAnObject),
            (b"true", DropReason::NotAnObject),
            (b"null", DropReason::NotAnObject),
            (big.as_bytes(), DropReason::TooLarge),
        ];
        for &(payload, want) in cases {
            assert_eq!(run(payload), Parsed::Drop(want), "{payload:?}");
        }
        // Exactly at the limit is accepted.
        let fits = format!(r#"{{"message":"{}"}}"#, "x".repeat(MAX - 14));
        assert_eq!(fits.len(), MAX);
        assert!(matches!(run(fits.as_bytes()), Parsed::Chat(_)));
    }

    #[test]
    fn non_json_text_is_the_message_of_a_fresh_session() {
        for (payload, message) in [
            ("hello there", "hello there"),
            ("  padded  \n", "padded"),
            ("{not json", "{not json"),
            ("\u{feff}bom text", "bom text"),
        ] {
            let turn = chat(payload);
            assert_eq!(
                turn.reply_topic, "p/assistant_response/default-0badc0de",
                "{payload:?}"
            );
            assert_eq!(
                turn,
                ChatTurn::plain("p", FRESH.into(), message.into()),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn session_id_forms() {
        let cases = [
            (r#""s1""#, "s1"),
            (r#""  s1  ""#, "s1"),
            ("42", "42"),
            ("-7", "-7"),
            ("1.5", "1.5"),
            ("true", "true"),
            ("false", "false"),
            ("null", FRESH),
            (r#""""#, FRESH),
            (r#""   ""#, FRESH),
        ];
        for (json, want) in cases {
            let turn = chat(&format!(r#"{{"sessionId":{json},"message":"hi"}}"#));
            assert_eq!(turn.session_id, want, "{json}");
            assert_eq!(turn.reply_topic, format!("p/assistant_response/{want}"));
        }
        assert_eq!(
            chat(r#"{"message":"hi"}"#),
            ChatTurn::plain("p", FRESH.into(), "hi".into())
        );
    }

    #[test]
    fn only_a_json_true_asks_for_a_stream() {
        assert!(chat(r#"{"message":"hi","stream":true}"#).stream);
        for other in [r#""true""#, "1", "false", "null", "{}"] {
            let turn = chat(&format!(r#"{{"message":"hi","stream":{other}}}"#));
            assert!(!turn.stream, "{other}");
        }
        assert!(!chat(r#"{"message":"hi"}"#).stream);
    }

    #[test]
    fn session_ids_cannot_escape_the_reply_space() {
        let cases = [
            ("../x", "p/assistant_response/../x"),
            ("a/+/b", "p/assistant_response/a/_/b"),
            ("#", "p/assistant_response/_"),
            ("x\u{0}y", "p/assistant_response/x_y"),
            ("ctl\u{1b}[31m", "p/assistant_response/ctl_[31m"),
        ];
        for (sid, topic) in cases {
            let payload = serde_json::json!({"sessionId": sid, "message": "hi"}).to_string();
            let turn = chat(&payload);
            // session-svc still sees the client's id as sent.
            assert_eq!(turn.session_id, sid);
            assert_eq!(turn.reply_topic, topic);
            assert!(topics::confined(
                "p",
                topics::Route::Reply,
                &turn.reply_topic
            ));
        }
    }

    #[test]
    fn bad_session_ids() {
        for json in ["[1]", "{}", r#"{"a":1}"#] {
            let payload = format!(r#"{{"sessionId":{json},"message":"hi"}}"#);
            assert_eq!(
                run(payload.as_bytes()),
                reject(format!("p/assistant_response/{FRESH}"), BAD_SESSION_ID_TEXT),
            );
            let payload = format!(
                r#"{{"sessionId":{json},"message":"hi","replyTopic":"p/assistant_response/me"}}"#
            );
            assert_eq!(
                run(payload.as_bytes()),
                reject("p/assistant_response/me".into(), BAD_SESSION_ID_TEXT),
            );
        }
        let long = "s".repeat(MAX_SESSION_ID_BYTES + 1);
        let payload = serde_json::json!({"sessionId": long, "message": "hi"}).to_string();
        let parsed = parse("p", payload.as_bytes(), 4 * MAX, &NONE, || FRESH.into());
        assert_eq!(parsed, Parsed::Drop(DropReason::SessionIdTooLong));
        let payload = serde_json::json!({
            "sessionId": long, "message": "hi", "replyTopic": "p/assistant_response/me"
        })
        .to_string();
        let parsed = parse("p", payload.as_bytes(), 4 * MAX, &NONE, || FRESH.into());
        assert_eq!(
            parsed,
            reject("p/assistant_response/me".into(), LONG_SESSION_ID_TEXT)
        );
        // Exactly at the limit is fine.
        let edge = "s".repeat(MAX_SESSION_ID_BYTES);
        let payload = serde_json::json!({"sessionId": edge, "message": "hi"}).to_string();
        let parsed = parse("p", payload.as_bytes(), 4 * MAX, &NONE, || FRESH.into());
        assert!(matches!(parsed, Parsed::Chat(t) if t.session_id == edge));
    }

    #[test]
    fn reply_topic_rules() {
        let cases = [
            (
                r#""p/assistant_response/s1/c/r""#,
                "p/assistant_response/s1/c/r",
            ),
            (r#"" p/assistant_response/x ""#, "p/assistant_response/x"),
            (r#""p/assistant_response/""#, "p/assistant_response/s1"),
            (r#""p/assistant_response""#, "p/assistant_response/s1"),
            (r#""  ""#, "p/assistant_response/s1"),
            (r#""p/assistant_response/+""#, "p/assistant_response/s1"),
            (r#""p/assistant_response/a/#""#, "p/assistant_response/s1"),
            (
                r#""p/assistant_response/a\u0000""#,
                "p/assistant_response/s1",
            ),
            (r#""q/assistant_response/s1""#, "p/assistant_response/s1"),
            (r#""p/user_input""#, "p/assistant_response/s1"),
            (r#""p/status""#, "p/assistant_response/s1"),
            ("42", "p/assistant_response/s1"),
            ("null", "p/assistant_response/s1"),
            (
                r#"{"t":"p/assistant_response/x"}"#,
                "p/assistant_response/s1",
            ),
        ];
        for (json, want) in cases {
            let turn = chat(&format!(
                r#"{{"sessionId":"s1","message":"hi","replyTopic":{json}}}"#
            ));
            assert_eq!(turn.reply_topic, want, "{json}");
        }
    }

    fn v5(response_topic: &str, correlation: &'static [u8]) -> RequestProperties {
        RequestProperties {
            response_topic: Some(response_topic.into()),
            correlation_data: Some(Bytes::from_static(correlation)),
            traceparent: Some(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ".into()),
        }
    }

    #[test]
    fn a_v5_response_topic_stands_for_a_missing_reply_topic() {
        let props = v5("p/assistant_response/s1/me/7", b"\x01corr");
        let want = |t: &str| {
            let mut turn = ChatTurn::plain("p", "s1".into(), "hi".into());
            turn.reply_topic = t.into();
            turn.correlation_data = Some(Bytes::from_static(b"\x01corr"));
            turn.traceparent =
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
            Parsed::Chat(turn)
        };
        let run5 = |payload: &str, props: &RequestProperties| {
            parse("p", payload.as_bytes(), MAX, props, || "s1".into())
        };
        let with_field =
            r#"{"sessionId":"s1","message":"hi","replyTopic":"p/assistant_response/x"}"#;
        let with_bad_field = r#"{"sessionId":"s1","message":"hi","replyTopic":"q/x"}"#;
        let without = r#"{"sessionId":"s1","message":"hi"}"#;
        assert_eq!(run5(without, &props), want("p/assistant_response/s1/me/7"));
        assert_eq!(
            run5(with_bad_field, &props),
            want("p/assistant_response/s1/me/7")
        );
        assert_eq!(
            run5("hi", &props),
            want("p/assistant_response/s1/me/7"),
            "bare text"
        );
        assert_eq!(
            run5(with_field, &props),
            want("p/assistant_response/x"),
            "the payload's replyTopic wins"
        );
        // Outside the project's reply space: ignored like a bad replyTopic.
        for outside in [
            "q/assistant_response/s1",
            "p/status",
            "p/assistant_response/#",
            "p/hint/s1",
        ] {
            let props = v5(outside, b"\x01corr");
            assert_eq!(
                run5(without, &props),
                want("p/assistant_response/s1"),
                "{outside}"
            );
        }
        // Refusals echo the correlation data too.
        assert_eq!(
            run5(r#"{"sessionId":"s1"}"#, &props),
            Parsed::Reject {
                reply_topic: "p/assistant_response/s1/me/7".into(),
                correlation_data: Some(Bytes::from_static(b"\x01corr")),
                error_text: EMPTY_MESSAGE_TEXT.into(),
            }
        );
    }

    #[test]
    fn long_correlation_data_is_refused_without_echo() {
        let long: &'static [u8] =
            Box::leak(vec![7u8; MAX_CORRELATION_BYTES + 1].into_boxed_slice());
        let props = v5("p/assistant_response/me", long);
        let parsed = parse(
            "p",
            br#"{"sessionId":"s","message":"hi"}"#,
            MAX,
            &props,
            || FRESH.into(),
        );
        assert_eq!(
            parsed,
            reject("p/assistant_response/me".into(), LONG_CORRELATION_TEXT)
        );
        let edge: &'static [u8] = Box::leak(vec![7u8; MAX_CORRELATION_BYTES].into_boxed_slice());
        let props = v5("p/assistant_response/me", edge);
        let parsed = parse(
            "p",
            br#"{"sessionId":"s","message":"hi"}"#,
            MAX,
            &props,
            || FRESH.into(),
        );
        assert!(
            matches!(parsed, Parsed::Chat(t) if t.correlation_data.as_ref().map(Bytes::len) == Some(MAX_CORRELATION_BYTES))
        );
    }

    #[test]
    fn empty_message_is_rejected_on_the_known_topic() {
        for json in [
            r#"{"sessionId":"s1"}"#,
            r#"{"sessionId":"s1","message":""}"#,
            r#"{"sessionId":"s1","message":"  \n "}"#,
            r#"{"sessionId":"s1","message":null}"#,
            r#"{"sessionId":"s1","message":42}"#,
            r#"{"sessionId":"s1","message":["hi"]}"#,
            r#"{"sessionId":"s1","message":{"text":"hi"}}"#,
        ] {
            assert_eq!(
                run(json.as_bytes()),
                reject("p/assistant_response/s1".into(), EMPTY_MESSAGE_TEXT),
                "{json}"
            );
        }
        assert_eq!(
            run(br#"{}"#),
            reject(format!("p/assistant_response/{FRESH}"), EMPTY_MESSAGE_TEXT),
        );
        assert_eq!(
            run(br#"{"message":"","replyTopic":"p/assistant_response/me/c/r"}"#),
            reject("p/assistant_response/me/c/r".into(), EMPTY_MESSAGE_TEXT),
        );
    }

    #[test]
    fn message_is_kept_as_sent() {
        assert_eq!(
            chat(r#"{"sessionId":"s","message":"  hi\n"}"#).message,
            "  hi\n"
        );
    }

    #[test]
    fn sampling_parameters() {
        type Want = (Option<f32>, Option<f32>, Option<u32>);
        let ok: &[(&str, Want)] = &[
            (r#""temperature":0"#, (Some(0.0), None, None)),
            (r#""temperature":0.0"#, (Some(0.0), None, None)),
            (r#""temperature":2"#, (Some(2.0), None, None)),
            (r#""temperature":"0.7""#, (Some(0.7), None, None)),
            (r#""temperature":" 1 ""#, (Some(1.0), None, None)),
            (r#""temperature":null"#, (None, None, None)),
            (r#""temperature":"""#, (None, None, None)),
            (r#""topP":1"#, (None, Some(1.0), None)),
            (r#""topP":0.01"#, (None, Some(0.01), None)),
            (r#""topP":"0.9""#, (None, Some(0.9), None)),
            (r#""maxTokens":1"#, (None, None, Some(1))),
            (r#""maxTokens":512.0"#, (None, None, Some(512))),
            (r#""maxTokens":"256""#, (None, None, Some(256))),
            (r#""maxTokens":4294967295"#, (None, None, Some(u32::MAX))),
            (
                r#""temperature":0.3,"topP":0.5,"maxTokens":64"#,
                (Some(0.3), Some(0.5), Some(64)),
            ),
        ];
        for (fields, want) in ok {
            let turn = chat(&format!(r#"{{"sessionId":"s","message":"hi",{fields}}}"#));
            assert_eq!(
                (turn.temperature, turn.top_p, turn.max_tokens),
                *want,
                "{fields}"
            );
        }
        let bad: &[(&str, &str)] = &[
            (r#""temperature":-0.1"#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":2.01"#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":"hot""#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":"NaN""#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":"inf""#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":true"#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":[0.5]"#, BAD_TEMPERATURE_TEXT),
            (r#""temperature":"1e400""#, BAD_TEMPERATURE_TEXT),
            (r#""topP":0"#, BAD_TOP_P_TEXT),
            (r#""topP":1.5"#, BAD_TOP_P_TEXT),
            (r#""topP":-1"#, BAD_TOP_P_TEXT),
            (r#""topP":{}"#, BAD_TOP_P_TEXT),
            (r#""maxTokens":0"#, BAD_MAX_TOKENS_TEXT),
            (r#""maxTokens":-5"#, BAD_MAX_TOKENS_TEXT),
            (r#""maxTokens":1.5"#, BAD_MAX_TOKENS_TEXT),
            (r#""maxTokens":"lots""#, BAD_MAX_TOKENS_TEXT),
            (r#""maxTokens":4294967296"#, BAD_MAX_TOKENS_TEXT),
            (r#""maxTokens":false"#, BAD_MAX_TOKENS_TEXT),
        ];
        for (fields, text) in bad {
            let payload = format!(r#"{{"sessionId":"s","message":"hi",{fields}}}"#);
            assert_eq!(
                run(payload.as_bytes()),
                reject("p/assistant_response/s".into(), text),
                "{fields}"
            );
        }
    }

    #[test]
    fn optional_strings() {
        let turn = chat(
            r#"{"sessionId":"s","message":"hi","clientId":" c1 ","requestId":7,
                "systemPrompt":"Be brief.","images":["x"],"extra":{"a":1}}"#,
        );
        assert_eq!(turn.client_id.as_deref(), Some("c1"));
        assert_eq!(turn.request_id.as_deref(), Some("7"));
        assert_eq!(turn.system_prompt.as_deref(), Some("Be brief."));

        let turn = chat(
            r#"{"sessionId":"s","message":"hi","clientId":true,"requestId":"  ",
                "systemPrompt":42}"#,
        );
        assert_eq!(turn.client_id, None);
        assert_eq!(turn.request_id, None);
        assert_eq!(turn.system_prompt, None);
        assert_eq!(
            chat(r#"{"sessionId":"s","message":"hi","systemPrompt":"  "}"#).system_prompt,
            None
        );
    }

    #[test]
    fn idempotency_key_is_scoped_by_client() {
        let key = |json: &str| chat(json).idempotency_key();
        assert_eq!(
            key(r#"{"sessionId":"s","message":"m","clientId":"c1","requestId":"r1"}"#).as_deref(),
            Some("2:c1:r1")
        );
        assert_ne!(
            key(r#"{"sessionId":"s","message":"m","clientId":"a","requestId":"b:c"}"#),
            key(r#"{"sessionId":"s","message":"m","clientId":"a:b","requestId":"c"}"#),
            "no two pairs share a key"
        );
        assert_eq!(
            key(r#"{"sessionId":"s","message":"m","requestId":"r1"}"#).as_deref(),
            Some("r1")
        );
        assert_eq!(
            key(r#"{"sessionId":"s","message":"m","clientId":"c1"}"#),
            None
        );
        assert_ne!(
            key(r#"{"sessionId":"s","message":"m","clientId":"a","requestId":"1"}"#),
            key(r#"{"sessionId":"s","message":"m","clientId":"b","requestId":"1"}"#),
        );
    }

    #[test]
    fn fresh_ids_look_like_the_old_servers() {
        let id = fresh_session_id();
        let hex = id.strip_prefix("default-").expect("prefix");
        assert_eq!(hex.len(), 8);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn json_serde_cannot_read_counts_as_text() {
        // Beyond f64 or nested deeper than serde_json's limit of 128: taken as
        // bare text like any other unreadable payload (documented limitation).
        let payload = r#"{"sessionId":"s","message":"hi","temperature":1e400}"#;
        assert_eq!(
            chat(payload),
            ChatTurn::plain("p", FRESH.into(), payload.into())
        );
    }

    #[test]
    fn deep_or_odd_json_never_panics() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let _ = parse("p", deep.as_bytes(), usize::MAX, &NONE, || FRESH.into());
        let deep_obj = format!(
            r#"{{"message":"hi","x":{}1{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        let _ = parse("p", deep_obj.as_bytes(), usize::MAX, &NONE, || FRESH.into());
    }
}
