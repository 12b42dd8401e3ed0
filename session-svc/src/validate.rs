//! What a request must satisfy before it reaches a session: one place for
//! the limits every RPC shares, each refusal an INVALID_ARGUMENT that says
//! what is wrong in one sentence.

use palaver_proto::session::v1 as pb;

use crate::error::SessionError;

/// Longest accepted session id, request id and lease name, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest system prompt, in characters, wherever one is set.
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 32_000;

pub fn invalid(msg: impl Into<String>) -> SessionError {
    SessionError::InvalidArgument(msg.into())
}

pub fn validate_session_id(id: &str) -> Result<(), SessionError> {
    if id.trim().is_empty() {
        return Err(invalid("session id is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "session id is too long (at most {MAX_ID_BYTES} bytes)"
        )));
    }
    Ok(())
}

/// Checks a chat request against the project's limits.
pub fn validate_chat(req: &pb::ChatRequest, max_chars: usize) -> Result<(), SessionError> {
    validate_session_id(&req.session_id)?;
    if req.message.trim().is_empty() {
        return Err(invalid("message is empty"));
    }
    if req.message.chars().count() > max_chars {
        return Err(invalid(format!(
            "message is too long (at most {max_chars} characters)"
        )));
    }
    if req.request_id.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "request id is too long (at most {MAX_ID_BYTES} bytes)"
        )));
    }
    if let Some(p) = &req.system_prompt {
        if p.chars().count() > MAX_SYSTEM_PROMPT_CHARS {
            return Err(invalid(format!(
                "system prompt is too long (at most {MAX_SYSTEM_PROMPT_CHARS} characters)"
            )));
        }
    }
    if let Some(t) = req.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(invalid("temperature must be a number between 0 and 2"));
        }
    }
    if let Some(p) = req.top_p {
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p must be greater than 0 and at most 1"));
        }
    }
    if req.max_tokens == Some(0) {
        return Err(invalid("max_tokens must be at least 1"));
    }
    Ok(())
}

/// A turn's completion length: the client's, at most the project's.
///
/// The project's `max_tokens` is its default and its ceiling. A client may
/// ask for less, never for more: a longer reply holds one of the GPU's
/// generation slots longer, and past the model's context vLLM refuses the
/// request outright instead of shortening it.
pub fn max_tokens(asked: Option<u32>, project: u32) -> u32 {
    asked.map_or(project, |m| m.min(project))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::ChatRequest {
        pb::ChatRequest {
            project: "general".into(),
            session_id: "s".into(),
            message: "hi".into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_chat_requests_are_refused_with_a_reason() {
        type Mutation = fn(&mut pb::ChatRequest);
        let cases: Vec<(&str, Mutation)> = vec![
            ("message is empty", |r| r.message = "  \n".into()),
            ("message is too long", |r| r.message = "x".repeat(11)),
            ("session id is empty", |r| r.session_id = " ".into()),
            ("temperature", |r| r.temperature = Some(2.5)),
            ("temperature", |r| r.temperature = Some(f32::NAN)),
            ("top_p", |r| r.top_p = Some(0.0)),
            ("max_tokens", |r| r.max_tokens = Some(0)),
        ];
        for (want, mutate) in cases {
            let mut r = req();
            mutate(&mut r);
            match validate_chat(&r, 10) {
                Err(SessionError::InvalidArgument(m)) => assert!(m.contains(want), "{m} !~ {want}"),
                other => panic!("{want}: got {other:?}"),
            }
        }
        let mut ok = req();
        ok.temperature = Some(0.0);
        assert!(validate_chat(&ok, 10).is_ok(), "temperature 0 is valid");
        ok.max_tokens = Some(1_000_000);
        assert!(
            validate_chat(&ok, 10).is_ok(),
            "a long max_tokens is lowered, not refused"
        );
    }

    #[test]
    fn a_clients_max_tokens_is_at_most_the_projects() {
        assert_eq!(max_tokens(None, 512), 512, "the project's is the default");
        assert_eq!(max_tokens(Some(100), 512), 100, "less is taken");
        assert_eq!(max_tokens(Some(512), 512), 512);
        assert_eq!(max_tokens(Some(30_000), 512), 512, "more is lowered");
    }
}
