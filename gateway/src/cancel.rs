//! Cancel over MQTT: `{"requestId": "…", "clientId": "…"}` on
//! `<project>/cancel/<sessionId>` stops that turn if it is still running.
//!
//! A turn is registered when its request is read, on the connection's poll
//! loop, so a cancel that the broker delivers after its request always finds
//! it. Cancelling drops the turn's call to session-svc, which takes the turn
//! back and drops the model server's request (DESIGN.md, "Turn integrity");
//! the turn then answers `Error: Cancelled.` and is acknowledged as answered.
//!
//! A turn is found by project, session, client id and request id together:
//! a cancel naming another client finds nothing, and a request without a
//! `requestId` cannot be cancelled (nothing names it).

use serde_json::Value;

use crate::request::{scalar_text, ChatTurn};

/// The suffix of cancel topics, after `<project>/`.
pub const CANCEL: &str = "cancel";

/// The filter a project subscribes to for cancels.
pub fn subscription(project: &str) -> String {
    format!("{project}/{CANCEL}/+")
}

/// The session id of a cancel topic, `<project>/cancel/<sid>`; `None` for
/// any other topic.
pub fn match_topic<'t>(project: &str, topic: &'t str) -> Option<&'t str> {
    let sid = topic
        .strip_prefix(project)?
        .strip_prefix('/')?
        .strip_prefix(CANCEL)?
        .strip_prefix('/')?
        .trim();
    (!sid.is_empty() && !sid.contains('/')).then_some(sid)
}

/// What identifies a running turn to a cancel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TurnKey {
    project: String,
    session_id: String,
    client_id: Option<String>,
    request_id: String,
}

impl TurnKey {
    /// The key of `turn`, if it has a request id to be named by.
    pub fn of(project: &str, turn: &ChatTurn) -> Option<Self> {
        Some(Self {
            project: project.to_owned(),
            session_id: turn.session_id.clone(),
            client_id: turn.client_id.clone(),
            request_id: turn.request_id.clone()?,
        })
    }

    /// The key a cancel payload names, read with the request's own rules for
    /// the two ids; `None` when it names no request.
    pub fn parse(project: &str, session_id: &str, payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let Value::Object(map) = serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()?
        else {
            return None;
        };
        Some(Self {
            project: project.to_owned(),
            session_id: session_id.to_owned(),
            client_id: scalar_text(map.get("clientId")),
            request_id: scalar_text(map.get("requestId"))?,
        })
    }
}

/// The turns that can be cancelled now; shared by every project's link.
pub type InFlight = palaver_core::cancel::Registry<TurnKey>;

/// A turn's registration: its token, removed from the registry on drop.
pub type Registration = palaver_core::cancel::Registration<TurnKey>;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn turn(client: Option<&str>, request: Option<&str>) -> ChatTurn {
        let mut t = ChatTurn::plain("p", "s1".into(), "hi".into());
        t.client_id = client.map(Into::into);
        t.request_id = request.map(Into::into);
        t
    }

    #[test]
    fn cancel_topics() {
        assert_eq!(subscription("p"), "p/cancel/+");
        assert_eq!(match_topic("p", "p/cancel/s1"), Some("s1"));
        assert_eq!(match_topic("p", "p/cancel/"), None);
        assert_eq!(match_topic("p", "p/cancel"), None);
        assert_eq!(match_topic("p", "p/cancel/a/b"), None);
        assert_eq!(match_topic("p", "q/cancel/s1"), None);
        assert_eq!(match_topic("p", "p/cancelx/s1"), None);
        assert_eq!(match_topic("p", "p/user_input"), None);
    }

    #[test]
    fn only_the_same_client_and_request_cancel_a_turn() {
        let reg = Arc::new(InFlight::default());
        let key = TurnKey::of("p", &turn(Some("me"), Some("7"))).unwrap();
        let guard = reg.register(key);
        let named = |payload: &str| TurnKey::parse("p", "s1", payload.as_bytes()).unwrap();
        assert_eq!(
            reg.cancel(&named(r#"{"requestId":"7","clientId":"you"}"#)),
            0
        );
        assert_eq!(reg.cancel(&named(r#"{"requestId":"7"}"#)), 0);
        assert_eq!(
            reg.cancel(&named(r#"{"requestId":"8","clientId":"me"}"#)),
            0
        );
        assert_eq!(
            reg.cancel(
                &TurnKey::parse("p", "s2", br#"{"requestId":"7","clientId":"me"}"#).unwrap()
            ),
            0
        );
        assert!(!guard.token().is_cancelled());
        assert_eq!(reg.cancel(&named(r#"{"requestId":7,"clientId":"me"}"#)), 1);
        assert!(guard.token().is_cancelled());
        drop(guard);
        assert!(reg.is_empty());
        assert_eq!(
            reg.cancel(&named(r#"{"requestId":"7","clientId":"me"}"#)),
            0
        );
    }

    #[test]
    fn a_request_without_an_id_cannot_be_named() {
        assert!(TurnKey::of("p", &turn(Some("me"), None)).is_none());
        assert!(TurnKey::parse("p", "s1", br#"{"clientId":"me"}"#).is_none());
        assert!(TurnKey::parse("p", "s1", b"not json").is_none());
        assert!(TurnKey::parse("p", "s1", b"[1]").is_none());
    }

    #[test]
    fn a_resent_request_is_cancelled_with_its_first_delivery() {
        let reg = Arc::new(InFlight::default());
        let key = TurnKey::of("p", &turn(Some("me"), Some("7"))).unwrap();
        let (a, b) = (reg.register(key.clone()), reg.register(key.clone()));
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.cancel(&key), 1);
        assert!(b.token().is_cancelled());
    }
}
