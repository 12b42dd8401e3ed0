//! Reading the control topics `<project>/template[/<sid>]`,
//! `<project>/clear_history[/<sid>]` and `<project>/delete_session[/<sid>]`.
//!
//! Pure, like `request.rs`. Choices where DESIGN.md is silent:
//! - a session id may come from the payload keys in the order `session_id`,
//!   `sessionId`, then (clear/delete only) `target`; the first that holds a
//!   non-blank string or a number wins, else the topic's extra level;
//! - `"all"` means "every session" for clear/delete only; for a template it
//!   is an ordinary session id (the design reserves it for clear/delete);
//! - a template prompt is the first of `template`, `systemPrompt`,
//!   `system_prompt`, `prompt_template` that yields a non-blank string (a
//!   string value, or an object's `content`, else its `template`); a key
//!   whose value yields nothing is skipped rather than ending the search;
//! - a template payload that is a JSON string is that prompt; one that is not
//!   JSON is the prompt text itself (trimmed); other JSON (arrays, numbers,
//!   `null`, booleans) and templates without a prompt are dropped;
//! - `reset` accepts booleans, `0`/`1` and the strings `true`/`false`/`yes`/
//!   `no`/`1`/`0`; anything else keeps the default, true;
//! - clear/delete ignore payloads that are not JSON objects (an empty payload
//!   is the common case): the topic decides.

use serde_json::{Map, Value};

use crate::request::MAX_SESSION_ID_BYTES;
use crate::topics;

/// Acknowledgement payload of a template change.
pub const TEMPLATE_HINT: &str = r#"{"hint":"Template updated"}"#;
/// Acknowledgement payload of a history clear.
pub const CLEARED_HINT: &str = r#"{"hint":"History cleared"}"#;
/// Acknowledgement payload of a session deletion.
pub const DELETED_HINT: &str = r#"{"hint":"Session deleted"}"#;

/// Which control topic a message came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// `<project>/template[/<sid>]`: a new system prompt.
    Template,
    /// `<project>/clear_history[/<sid>]`: forget messages.
    ClearHistory,
    /// `<project>/delete_session[/<sid>]`: forget sessions entirely.
    DeleteSession,
}

impl ControlKind {
    fn from_suffix(suffix: &str) -> Option<Self> {
        match suffix {
            "template" => Some(ControlKind::Template),
            "clear_history" => Some(ControlKind::ClearHistory),
            "delete_session" => Some(ControlKind::DeleteSession),
            _ => None,
        }
    }
}

/// If `topic` is one of `project`'s control topics: its kind and the session
/// id carried by the topic's extra level (trimmed; `None` when absent/blank).
pub fn match_topic(project: &str, topic: &str) -> Option<(ControlKind, Option<String>)> {
    let rest = topic.strip_prefix(project)?.strip_prefix('/')?;
    let (suffix, sid) = match rest.split_once('/') {
        None => (rest, None),
        Some((suffix, sid)) if !sid.contains('/') => (suffix, Some(sid.trim())),
        Some(_) => return None,
    };
    let kind = ControlKind::from_suffix(suffix)?;
    Some((kind, sid.filter(|s| !s.is_empty()).map(str::to_owned)))
}

/// One control action, mapped onto the Sessions API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOp {
    /// A session's new system prompt; `keep_history` when `reset` was false.
    SetSessionPrompt {
        /// The session to change.
        session_id: String,
        /// The new system prompt.
        prompt: String,
        /// `reset: false`: change the prompt but keep the messages.
        keep_history: bool,
    },
    /// The project's default prompt (`UpdateProject`), kept in the store so
    /// every replica sees it.
    SetProjectPrompt {
        /// The new default system prompt.
        prompt: String,
        /// `reset` (default true): also clear every session's messages.
        clear_sessions: bool,
    },
    /// Forget one session's messages (`ResetSession` without a prompt).
    ClearSession {
        /// The session to clear.
        session_id: String,
    },
    /// Forget every session's messages (`UpdateProject`, CLEAR).
    ClearProject,
    /// Forget one session entirely (`DeleteSession`).
    DeleteSession {
        /// The session to delete.
        session_id: String,
    },
    /// Forget every session entirely (`UpdateProject`, DELETE).
    DeleteProject,
}

impl ControlOp {
    /// The one session this action changes; `None` for the project-wide ones.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Self::SetSessionPrompt { session_id, .. }
            | Self::ClearSession { session_id }
            | Self::DeleteSession { session_id } => Some(session_id),
            Self::SetProjectPrompt { .. } | Self::ClearProject | Self::DeleteProject => None,
        }
    }
}

/// A control action and where its acknowledgement goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRequest {
    /// What to do.
    pub op: ControlOp,
    /// `<project>/hint/<sid>` or `<project>/hint/all`.
    pub ack_topic: String,
    /// One of [`TEMPLATE_HINT`], [`CLEARED_HINT`], [`DELETED_HINT`].
    pub ack_payload: &'static str,
}

/// Why a control message was dropped; the label of
/// `palaver_gateway_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlDrop {
    /// Over `max-payload-bytes`.
    TooLarge,
    /// A template with no prompt in it.
    NoPrompt,
    /// A template payload that is JSON but neither an object nor a string.
    NotAnObject,
    /// A session id over [`MAX_SESSION_ID_BYTES`].
    SessionIdTooLong,
    /// A template prompt over [`MAX_PROMPT_CHARS`].
    PromptTooLong,
}

/// session-svc's limit on a system prompt: a longer template is dropped here
/// instead of costing a round trip to be refused.
pub const MAX_PROMPT_CHARS: usize = 32_000;

impl ControlDrop {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlDrop::TooLarge => "control_too_large",
            ControlDrop::NoPrompt => "template_without_prompt",
            ControlDrop::NotAnObject => "control_not_an_object",
            ControlDrop::SessionIdTooLong => "session_id_too_long",
            ControlDrop::PromptTooLong => "prompt_too_long",
        }
    }
}

/// Reads one control message of `kind`; `topic_sid` is what
/// [`match_topic`] found in the topic.
pub fn parse(
    project: &str,
    kind: ControlKind,
    topic_sid: Option<String>,
    payload: &[u8],
    max_payload_bytes: usize,
) -> Result<ControlRequest, ControlDrop> {
    if payload.len() > max_payload_bytes {
        return Err(ControlDrop::TooLarge);
    }
    let text = std::str::from_utf8(payload)
        .ok()
        .map(|t| t.trim_start_matches('\u{feff}').trim())
        .unwrap_or("");
    let json = serde_json::from_str::<Value>(text).ok();
    let object = match &json {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    };

    let mut id_keys = vec!["session_id", "sessionId"];
    if kind != ControlKind::Template {
        id_keys.push("target");
    }
    let session_id = object
        .and_then(|map| id_keys.iter().find_map(|k| scalar_text(map.get(*k))))
        .or(topic_sid);
    if session_id
        .as_ref()
        .is_some_and(|s| s.len() > MAX_SESSION_ID_BYTES)
    {
        return Err(ControlDrop::SessionIdTooLong);
    }

    match kind {
        ControlKind::Template => {
            let prompt = match (&json, object) {
                (_, Some(map)) => template_prompt(map),
                (Some(Value::String(s)), None) => non_blank(s),
                (Some(_), None) => return Err(ControlDrop::NotAnObject),
                (None, None) => non_blank(text),
            }
            .ok_or(ControlDrop::NoPrompt)?;
            if prompt.chars().count() > MAX_PROMPT_CHARS {
                return Err(ControlDrop::PromptTooLong);
            }
            let reset = object.is_none_or(|map| reset_flag(map.get("reset")));
            let ack_topic = topics::hint_topic(project, session_id.as_deref());
            let op = match session_id {
                Some(session_id) => ControlOp::SetSessionPrompt {
                    session_id,
                    prompt,
                    keep_history: !reset,
                },
                None => ControlOp::SetProjectPrompt {
                    prompt,
                    clear_sessions: reset,
                },
            };
            Ok(ControlRequest {
                op,
                ack_topic,
                ack_payload: TEMPLATE_HINT,
            })
        }
        ControlKind::ClearHistory | ControlKind::DeleteSession => {
            let session_id = session_id.filter(|s| s != "all");
            let ack_topic = topics::hint_topic(project, session_id.as_deref());
            let (op, ack_payload) = match (kind, session_id) {
                (ControlKind::ClearHistory, Some(session_id)) => {
                    (ControlOp::ClearSession { session_id }, CLEARED_HINT)
                }
                (ControlKind::ClearHistory, None) => (ControlOp::ClearProject, CLEARED_HINT),
                (_, Some(session_id)) => (ControlOp::DeleteSession { session_id }, DELETED_HINT),
                (_, None) => (ControlOp::DeleteProject, DELETED_HINT),
            };
            Ok(ControlRequest {
                op,
                ack_topic,
                ack_payload,
            })
        }
    }
}

fn template_prompt(map: &Map<String, Value>) -> Option<String> {
    [
        "template",
        "systemPrompt",
        "system_prompt",
        "prompt_template",
    ]
    .iter()
    .find_map(|key| match map.get(*key)? {
        Value::String(s) => non_blank(s),
        Value::Object(inner) => ["content", "template"]
            .iter()
            .find_map(|k| inner.get(*k).and_then(Value::as_str).and_then(non_blank)),
        _ => None,
    })
}

fn reset_flag(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => {
            !matches!(s.trim().to_ascii_lowercase().as_str(), "false" | "0" | "no")
        }
        _ => true,
    }
}

fn non_blank(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn scalar_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => non_blank(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    fn control(topic: &str, payload: &str) -> Result<ControlRequest, ControlDrop> {
        let (kind, sid) = match_topic("p", topic).expect("a control topic");
        parse("p", kind, sid, payload.as_bytes(), MAX)
    }

    fn ok(topic: &str, payload: &str) -> ControlRequest {
        control(topic, payload).unwrap_or_else(|e| panic!("{topic} {payload:?}: {e:?}"))
    }

    fn set_session(sid: &str, prompt: &str, keep_history: bool) -> ControlOp {
        ControlOp::SetSessionPrompt {
            session_id: sid.into(),
            prompt: prompt.into(),
            keep_history,
        }
    }

    #[test]
    fn a_template_over_the_prompt_limit_is_dropped() {
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        let got = parse(
            "p",
            ControlKind::Template,
            Some("s".into()),
            long.as_bytes(),
            1 << 20,
        );
        assert_eq!(got.unwrap_err(), ControlDrop::PromptTooLong);
        let ok = "x".repeat(MAX_PROMPT_CHARS);
        assert!(parse("p", ControlKind::Template, None, ok.as_bytes(), 1 << 20).is_ok());
    }

    #[test]
    fn topics() {
        use ControlKind::*;
        type Want = Option<(ControlKind, Option<&'static str>)>;
        let cases: &[(&str, Want)] = &[
            ("p/template", Some((Template, None))),
            ("p/template/s1", Some((Template, Some("s1")))),
            ("p/template/ s1 ", Some((Template, Some("s1")))),
            ("p/template/", Some((Template, None))),
            ("p/clear_history", Some((ClearHistory, None))),
            ("p/clear_history/all", Some((ClearHistory, Some("all")))),
            ("p/delete_session/x", Some((DeleteSession, Some("x")))),
            ("p/template/a/b", None),
            ("p/user_input", None),
            ("q/template", None),
            ("pp/template", None),
            ("p/templates", None),
            ("p", None),
        ];
        for (topic, want) in cases {
            let got = match_topic("p", topic);
            let want = want.map(|(k, s)| (k, s.map(str::to_owned)));
            assert_eq!(got, want, "{topic}");
        }
    }

    #[test]
    fn templates() {
        let cases: &[(&str, &str, ControlOp, &str)] = &[
            // The shape clients in the field send: `template` comes first.
            (
                "p/template",
                r#"{"sessionId":"s1","systemPrompt":"sys","template":{"content":"tpl"},"reset":true}"#,
                set_session("s1", "tpl", false),
                "p/hint/s1",
            ),
            (
                "p/template/s2",
                r#"{"template":"Be kind."}"#,
                set_session("s2", "Be kind.", false),
                "p/hint/s2",
            ),
            (
                "p/template/s2",
                r#"{"session_id":"s3","template":"x"}"#,
                set_session("s3", "x", false),
                "p/hint/s3",
            ),
            (
                "p/template",
                r#"{"session_id":" ","sessionId":"s4","template":"x"}"#,
                set_session("s4", "x", false),
                "p/hint/s4",
            ),
            (
                "p/template",
                r#"{"sessionId":7,"template":"x"}"#,
                set_session("7", "x", false),
                "p/hint/7",
            ),
            (
                "p/template/s1",
                r#"{"systemPrompt":"a","system_prompt":"b"}"#,
                set_session("s1", "a", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"system_prompt":"b","prompt_template":"c"}"#,
                set_session("s1", "b", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"prompt_template":"c"}"#,
                set_session("s1", "c", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":{"template":"inner"}}"#,
                set_session("s1", "inner", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":{"content":"c","template":"t"}}"#,
                set_session("s1", "c", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":{"content":""},"systemPrompt":"fallback"}"#,
                set_session("s1", "fallback", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":null,"systemPrompt":"y"}"#,
                set_session("s1", "y", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":"x","reset":false}"#,
                set_session("s1", "x", true),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":"x","reset":"false"}"#,
                set_session("s1", "x", true),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":"x","reset":0}"#,
                set_session("s1", "x", true),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":"x","reset":null}"#,
                set_session("s1", "x", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#"{"template":"x","reset":"yes"}"#,
                set_session("s1", "x", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                "Just be nice.",
                set_session("s1", "Just be nice.", false),
                "p/hint/s1",
            ),
            (
                "p/template/s1",
                r#""a JSON string""#,
                set_session("s1", "a JSON string", false),
                "p/hint/s1",
            ),
            // `target` is for clear/delete only.
            (
                "p/template/s1",
                r#"{"target":"other","template":"x"}"#,
                set_session("s1", "x", false),
                "p/hint/s1",
            ),
            // "all" is not special for templates.
            (
                "p/template/all",
                "x",
                set_session("all", "x", false),
                "p/hint/all",
            ),
            // Without a session: the project's default prompt.
            (
                "p/template",
                r#"{"template":"P"}"#,
                ControlOp::SetProjectPrompt {
                    prompt: "P".into(),
                    clear_sessions: true,
                },
                "p/hint/all",
            ),
            (
                "p/template",
                r#"{"template":"P","reset":false}"#,
                ControlOp::SetProjectPrompt {
                    prompt: "P".into(),
                    clear_sessions: false,
                },
                "p/hint/all",
            ),
            (
                "p/template",
                "  plain text prompt \n",
                ControlOp::SetProjectPrompt {
                    prompt: "plain text prompt".into(),
                    clear_sessions: true,
                },
                "p/hint/all",
            ),
            // A wildcard in the id reaches session-svc unchanged; only the ack topic is sanitised.
            (
                "p/template",
                r#"{"sessionId":"a+b","template":"x"}"#,
                set_session("a+b", "x", false),
                "p/hint/a_b",
            ),
        ];
        for (topic, payload, op, ack) in cases {
            let got = ok(topic, payload);
            assert_eq!(&got.op, op, "{topic} {payload}");
            assert_eq!(got.ack_topic, *ack, "{topic} {payload}");
            assert_eq!(got.ack_payload, TEMPLATE_HINT);
        }
    }

    #[test]
    fn templates_dropped() {
        let cases: &[(&str, &str, ControlDrop)] = &[
            ("p/template/s1", "", ControlDrop::NoPrompt),
            ("p/template/s1", "   ", ControlDrop::NoPrompt),
            ("p/template/s1", "{}", ControlDrop::NoPrompt),
            ("p/template/s1", r#"{"template":""}"#, ControlDrop::NoPrompt),
            (
                "p/template/s1",
                r#"{"template":{"content":5}}"#,
                ControlDrop::NoPrompt,
            ),
            ("p/template/s1", r#"{"template":42}"#, ControlDrop::NoPrompt),
            ("p/template/s1", r#""  ""#, ControlDrop::NoPrompt),
            ("p/template/s1", "[1]", ControlDrop::NotAnObject),
            ("p/template/s1", "42", ControlDrop::NotAnObject),
            ("p/template/s1", "null", ControlDrop::NotAnObject),
        ];
        for (topic, payload, want) in cases {
            assert_eq!(control(topic, payload), Err(*want), "{payload:?}");
        }
        let big = "x".repeat(MAX + 1);
        assert_eq!(control("p/template/s1", &big), Err(ControlDrop::TooLarge));
        let long =
            serde_json::json!({"sessionId": "s".repeat(MAX_SESSION_ID_BYTES + 1), "template": "x"});
        assert_eq!(
            control("p/template", &long.to_string()),
            Err(ControlDrop::SessionIdTooLong)
        );
        // Invalid UTF-8 has no prompt to read.
        assert_eq!(
            parse("p", ControlKind::Template, None, b"\xff\xfe", MAX),
            Err(ControlDrop::NoPrompt)
        );
    }

    #[test]
    fn clear_and_delete() {
        let clear = |s: &str| ControlOp::ClearSession {
            session_id: s.into(),
        };
        let delete = |s: &str| ControlOp::DeleteSession {
            session_id: s.into(),
        };
        let cases: Vec<(&str, &str, ControlOp, &str, &str)> = vec![
            (
                "p/clear_history/s1",
                "",
                clear("s1"),
                "p/hint/s1",
                CLEARED_HINT,
            ),
            (
                "p/clear_history",
                r#"{"session_id":"s1"}"#,
                clear("s1"),
                "p/hint/s1",
                CLEARED_HINT,
            ),
            (
                "p/clear_history",
                r#"{"sessionId":"s2"}"#,
                clear("s2"),
                "p/hint/s2",
                CLEARED_HINT,
            ),
            (
                "p/clear_history",
                r#"{"target":"s3"}"#,
                clear("s3"),
                "p/hint/s3",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/t",
                r#"{"sessionId":"s2","target":"s3"}"#,
                clear("s2"),
                "p/hint/s2",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/t",
                r#"{"other":1}"#,
                clear("t"),
                "p/hint/t",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/t",
                "not json",
                clear("t"),
                "p/hint/t",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/t",
                "[\"x\"]",
                clear("t"),
                "p/hint/t",
                CLEARED_HINT,
            ),
            (
                "p/clear_history",
                "",
                ControlOp::ClearProject,
                "p/hint/all",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/all",
                "",
                ControlOp::ClearProject,
                "p/hint/all",
                CLEARED_HINT,
            ),
            (
                "p/clear_history/s9",
                r#"{"target":"all"}"#,
                ControlOp::ClearProject,
                "p/hint/all",
                CLEARED_HINT,
            ),
            (
                "p/clear_history",
                r#"{"sessionId":""}"#,
                ControlOp::ClearProject,
                "p/hint/all",
                CLEARED_HINT,
            ),
            (
                "p/delete_session/s1",
                "",
                delete("s1"),
                "p/hint/s1",
                DELETED_HINT,
            ),
            (
                "p/delete_session",
                r#"{"target":"s5"}"#,
                delete("s5"),
                "p/hint/s5",
                DELETED_HINT,
            ),
            (
                "p/delete_session",
                r#"{"session_id":12}"#,
                delete("12"),
                "p/hint/12",
                DELETED_HINT,
            ),
            (
                "p/delete_session",
                "",
                ControlOp::DeleteProject,
                "p/hint/all",
                DELETED_HINT,
            ),
            (
                "p/delete_session/all",
                "",
                ControlOp::DeleteProject,
                "p/hint/all",
                DELETED_HINT,
            ),
        ];
        for (topic, payload, op, ack, hint) in cases {
            let got = ok(topic, payload);
            assert_eq!(got.op, op, "{topic} {payload}");
            assert_eq!(got.ack_topic, ack, "{topic} {payload}");
            assert_eq!(got.ack_payload, hint, "{topic} {payload}");
        }
        assert_eq!(
            control("p/clear_history/s1", &"x".repeat(MAX + 1)),
            Err(ControlDrop::TooLarge)
        );
    }

    #[test]
    fn hints_are_the_documented_json() {
        for (hint, text) in [
            (TEMPLATE_HINT, "Template updated"),
            (CLEARED_HINT, "History cleared"),
            (DELETED_HINT, "Session deleted"),
        ] {
            assert_eq!(hint, serde_json::json!({ "hint": text }).to_string());
        }
    }
}
