//! Identity binding (opt-in): sessions and replies that belong to a broker
//! user.
//!
//! MQTT does not tell a subscriber who published a message, so the user is
//! taken from the topic: `<project>/user_input/<user>`, which the broker's
//! ACL (`pattern write +/user_input/%u`) lets only `<user>` publish to. A
//! request read there
//! - lives in session `@<user>/<sessionId>`: no other user's request can
//!   name it, because every bound id gets its own user's prefix and a
//!   request on the shared topic may not start its ids with `@`;
//! - is answered inside `<project>/assistant_response/<user>/`, which the
//!   ACL (`pattern read +/assistant_response/%u/#`) lets only `<user>` read:
//!   a reply topic outside it is moved inside (`<project>/assistant_response/x`
//!   becomes `<project>/assistant_response/<user>/x`);
//! - counts as client `@<user>` for session-svc's per-client limits.
//!
//! With `on` the shared `<project>/user_input` is served as before (for
//! clients not yet moved); with `only` it is not consumed at all.

use crate::request::{ChatTurn, Parsed};
use crate::topics;

/// Reply to a request on the shared topic whose ids look bound.
pub const RESERVED_ID_TEXT: &str =
    "Error: sessionId and clientId must not start with @ (reserved for signed-in users).";

/// The first character of every bound session id and client identity.
pub const BOUND_MARK: char = '@';

/// Which request topics the gateway consumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityBinding {
    /// Only the shared `<project>/user_input` (no binding).
    #[default]
    Off,
    /// Both the shared topic and `<project>/user_input/<user>`.
    On,
    /// Only `<project>/user_input/<user>`.
    Only,
}

/// Where a message on a request topic came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// The shared `<project>/user_input`.
    Shared,
    /// `<project>/user_input/<user>`.
    Bound(&'a str),
}

/// Whether `topic` is a request topic this gateway consumes, and whose.
pub fn input<'a>(project: &str, topic: &'a str, binding: IdentityBinding) -> Option<Input<'a>> {
    let rest = topic
        .strip_prefix(project)?
        .strip_prefix('/')?
        .strip_prefix(topics::USER_INPUT)?;
    match (rest.strip_prefix('/'), binding) {
        (None, IdentityBinding::Off | IdentityBinding::On) if rest.is_empty() => {
            Some(Input::Shared)
        }
        (Some(user), IdentityBinding::On | IdentityBinding::Only)
            if !user.is_empty() && !user.contains('/') =>
        {
            Some(Input::Bound(&topic[topic.len() - user.len()..]))
        }
        _ => None,
    }
}

/// The request topic filters of `project` under `binding`.
pub fn input_filters(project: &str, binding: IdentityBinding) -> Vec<String> {
    let shared = topics::user_input(project);
    match binding {
        IdentityBinding::Off => vec![shared],
        IdentityBinding::On => vec![format!("{shared}/+"), shared],
        IdentityBinding::Only => vec![format!("{shared}/+")],
    }
}

/// Where `user`'s replies of `project` go: `<project>/assistant_response/<user>/`.
pub fn reply_namespace(project: &str, user: &str) -> String {
    format!("{}{}/", topics::reply_prefix(project), user)
}

/// `topic` (inside the project's reply space) moved into `user`'s namespace.
fn confine_reply(project: &str, user: &str, topic: String) -> String {
    let namespace = reply_namespace(project, user);
    if topic.starts_with(&namespace) {
        return topic;
    }
    let prefix = topics::reply_prefix(project);
    let rest = topic.strip_prefix(&prefix).unwrap_or(&topic);
    format!("{namespace}{rest}")
}

/// Applies the binding to a parsed request that came in on `input`.
pub fn apply(project: &str, binding: IdentityBinding, input: Input<'_>, parsed: Parsed) -> Parsed {
    match (input, parsed) {
        (Input::Bound(user), Parsed::Chat(turn)) => Parsed::Chat(bind(project, user, turn)),
        (
            Input::Bound(user),
            Parsed::Reject {
                reply_topic,
                correlation_data,
                error_text,
            },
        ) => Parsed::Reject {
            reply_topic: confine_reply(project, user, reply_topic),
            correlation_data,
            error_text,
        },
        (Input::Shared, Parsed::Chat(turn))
            if binding != IdentityBinding::Off && looks_bound(&turn) =>
        {
            Parsed::Reject {
                reply_topic: turn.reply_topic,
                correlation_data: turn.correlation_data,
                error_text: RESERVED_ID_TEXT.to_owned(),
            }
        }
        (_, parsed) => parsed,
    }
}

fn looks_bound(turn: &ChatTurn) -> bool {
    turn.session_id.starts_with(BOUND_MARK)
        || turn
            .client_id
            .as_deref()
            .is_some_and(|c| c.starts_with(BOUND_MARK))
}

fn bind(project: &str, user: &str, mut turn: ChatTurn) -> ChatTurn {
    turn.reply_topic = confine_reply(project, user, turn.reply_topic);
    turn.session_id = format!("{BOUND_MARK}{user}/{}", turn.session_id);
    turn.user = Some(format!("{BOUND_MARK}{user}"));
    turn
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request;
    use IdentityBinding::*;

    fn parse(payload: &str) -> Parsed {
        request::parse(
            "p",
            payload.as_bytes(),
            4096,
            &crate::mqtt::RequestProperties::default(),
            || "fresh".into(),
        )
    }

    fn chat(parsed: Parsed) -> ChatTurn {
        match parsed {
            Parsed::Chat(turn) => turn,
            other => panic!("not a chat: {other:?}"),
        }
    }

    #[test]
    fn request_topics_by_mode() {
        assert_eq!(input("p", "p/user_input", Off), Some(Input::Shared));
        assert_eq!(input("p", "p/user_input", On), Some(Input::Shared));
        assert_eq!(input("p", "p/user_input", Only), None);
        assert_eq!(input("p", "p/user_input/alice", Off), None);
        assert_eq!(
            input("p", "p/user_input/alice", On),
            Some(Input::Bound("alice"))
        );
        assert_eq!(
            input("p", "p/user_input/alice", Only),
            Some(Input::Bound("alice"))
        );
        for other in [
            "p/user_input/",
            "p/user_input/a/b",
            "p/user_inputs",
            "q/user_input",
            "p/template",
        ] {
            assert_eq!(input("p", other, On), None, "{other}");
        }
        assert_eq!(input_filters("p", Off), ["p/user_input"]);
        assert_eq!(input_filters("p", On), ["p/user_input/+", "p/user_input"]);
        assert_eq!(input_filters("p", Only), ["p/user_input/+"]);
    }

    #[test]
    fn a_bound_request_lives_in_its_users_session_and_replies_in_its_namespace() {
        let turn = chat(apply(
            "p",
            On,
            Input::Bound("alice"),
            parse(r#"{"sessionId":"s1","message":"hi"}"#),
        ));
        assert_eq!(turn.session_id, "@alice/s1");
        assert_eq!(turn.reply_topic, "p/assistant_response/alice/s1");
        assert_eq!(turn.user.as_deref(), Some("@alice"));
        // Naming another user's session or topic stays inside one's own.
        let turn = chat(apply(
            "p",
            Only,
            Input::Bound("mallory"),
            parse(
                r#"{"sessionId":"@alice/s1","message":"hi","replyTopic":"p/assistant_response/alice/s1"}"#,
            ),
        ));
        assert_eq!(turn.session_id, "@mallory/@alice/s1");
        assert_eq!(turn.reply_topic, "p/assistant_response/mallory/alice/s1");
        // A reply topic already in the namespace is kept.
        let turn = chat(apply(
            "p",
            On,
            Input::Bound("alice"),
            parse(
                r#"{"sessionId":"s1","message":"hi","replyTopic":"p/assistant_response/alice/app/7"}"#,
            ),
        ));
        assert_eq!(turn.reply_topic, "p/assistant_response/alice/app/7");
        // Refusals go to the namespace too.
        match apply(
            "p",
            On,
            Input::Bound("alice"),
            parse(r#"{"sessionId":"s1","message":""}"#),
        ) {
            Parsed::Reject { reply_topic, .. } => {
                assert_eq!(reply_topic, "p/assistant_response/alice/s1")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_requests_may_not_use_bound_ids_once_binding_is_on() {
        for payload in [
            r#"{"sessionId":"@alice/s1","message":"hi"}"#,
            r#"{"sessionId":"s1","clientId":"@alice","message":"hi"}"#,
        ] {
            match apply("p", On, Input::Shared, parse(payload)) {
                Parsed::Reject { error_text, .. } => assert_eq!(error_text, RESERVED_ID_TEXT),
                other => panic!("{payload}: {other:?}"),
            }
            // Without binding, ids are as free as they always were.
            assert_eq!(
                chat(apply("p", Off, Input::Shared, parse(payload))).user,
                None
            );
        }
        let turn = chat(apply(
            "p",
            On,
            Input::Shared,
            parse(r#"{"sessionId":"s1","message":"hi"}"#),
        ));
        assert_eq!(
            (turn.session_id.as_str(), turn.reply_topic.as_str()),
            ("s1", "p/assistant_response/s1")
        );
    }
}
