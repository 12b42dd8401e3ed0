//! Topic names: what the gateway listens on, and the only places it may publish.
//!
//! Two dangers shape this module. First, the gateway publishes on behalf of
//! anonymous clients, so a client must never be able to steer a reply outside
//! its project's reply space ([`confined`]). Second, a broker closes the whole
//! connection when it receives a topic it considers malformed: mosquitto does
//! so for control characters and Unicode non-characters, not only for NUL. One
//! client's odd session id must not take every other client of the project
//! offline, so every topic built from client text goes through
//! [`sanitize_level`] or [`is_publishable`].

/// Longest topic the gateway publishes to, in bytes.
///
/// MQTT allows 65 535; nothing legitimate comes close to this, and a cap keeps
/// a client from making the gateway build huge packets.
pub const MAX_TOPIC_BYTES: usize = 4096;

/// The suffix of the request topic, after `<project>/`.
pub const USER_INPUT: &str = "user_input";

/// Where a client publishes chat requests for `project`.
pub fn user_input(project: &str) -> String {
    format!("{project}/{USER_INPUT}")
}

/// The control topic names, after `<project>/`; each also exists with one
/// more level carrying a session id.
pub const CONTROL_SUFFIXES: [&str; 3] = ["template", "clear_history", "delete_session"];

/// Every topic filter one project's connection subscribes to.
///
/// With a shared group, control topics are shared too: otherwise every
/// gateway of the group would apply the same `clear_history` and each send
/// its own acknowledgement.
pub fn subscriptions(
    project: &str,
    shared_group: Option<&str>,
    binding: crate::identity::IdentityBinding,
) -> Vec<String> {
    let mut plain = crate::identity::input_filters(project, binding);
    for suffix in CONTROL_SUFFIXES {
        plain.push(format!("{project}/{suffix}"));
        plain.push(format!("{project}/{suffix}/+"));
    }
    let mut subs: Vec<String> = match shared_group {
        None => plain,
        Some(group) => plain
            .into_iter()
            .map(|t| format!("$share/{group}/{t}"))
            .collect(),
    };
    // Never shared: a cancel must reach the gateway running its turn, and
    // is a no-op at every other.
    subs.push(crate::cancel::subscription(project));
    subs
}

/// The beginning every reply topic of `project` must have.
pub fn reply_prefix(project: &str) -> String {
    format!("{project}/assistant_response/")
}

/// A session's own reply topic, `<project>/assistant_response/<sessionId>`,
/// with the id made safe to publish to (see [`sanitize_level`]).
pub fn default_reply_topic(project: &str, session_id: &str) -> String {
    format!("{}{}", reply_prefix(project), sanitize_level(session_id))
}

/// Where control acknowledgements go: `<project>/hint/<sid>`, or
/// `<project>/hint/all` for project-wide actions.
pub fn hint_topic(project: &str, session_id: Option<&str>) -> String {
    format!(
        "{project}/hint/{}",
        sanitize_level(session_id.unwrap_or("all"))
    )
}

/// Where presence (online/offline/heartbeat) of the gateway is announced.
pub fn status_topic(project: &str) -> String {
    format!("{project}/status")
}

/// Whether a character may appear in a topic the gateway publishes to.
///
/// Refused: the wildcards (illegal in topic names), NUL (illegal in any MQTT
/// string), C0/C1 control characters, DEL and Unicode non-characters (which
/// mosquitto treats as malformed and answers by dropping the connection).
pub fn is_topic_char(c: char) -> bool {
    let cp = u32::from(c);
    let control = cp <= 0x1F || (0x7F..=0x9F).contains(&cp);
    let noncharacter = (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE;
    !(c == '+' || c == '#' || control || noncharacter)
}

/// Makes client text usable inside a topic: every character that
/// [`is_topic_char`] refuses becomes `_`.
///
/// `/` is kept on purpose: a session id `a/b` replies on
/// `<project>/assistant_response/a/b`, still inside the project's reply space
/// (MQTT has no `..`; it is an ordinary level), and a client can subscribe to
/// exactly that topic. A client whose id holds `+` or `#` could never
/// subscribe to its literal topic anyway, so replacing is the useful choice.
pub fn sanitize_level(text: &str) -> String {
    text.chars()
        .map(|c| if is_topic_char(c) { c } else { '_' })
        .collect()
}

/// Whether the broker will accept `topic` as the name of a publish.
pub fn is_publishable(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_BYTES && topic.chars().all(is_topic_char)
}

/// The three kinds of places the gateway publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `<project>/assistant_response/<something>`: replies and error replies.
    Reply,
    /// `<project>/hint/<something>`: control acknowledgements.
    Hint,
    /// Exactly `<project>/status`: presence.
    Status,
}

/// The confinement rule: may the gateway publish to `topic` for `project`?
///
/// This is the single check behind every publish (see `publish.rs`), so the
/// rule "never publish anywhere else on a client's behalf" holds even if a
/// parser upstream has a bug.
pub fn confined(project: &str, route: Route, topic: &str) -> bool {
    if !is_publishable(topic) {
        return false;
    }
    let below = |level: &str| {
        topic
            .strip_prefix(project)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.strip_prefix(level))
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|rest| !rest.is_empty())
    };
    match route {
        Route::Reply => below("assistant_response"),
        Route::Hint => below("hint"),
        Route::Status => topic == status_topic(project),
    }
}

/// `replyTopic` as the client sent it, if the protocol lets the gateway use it:
/// trimmed non-empty, no wildcards, inside `<project>/assistant_response/`
/// with something after that prefix, and publishable at all.
pub fn valid_reply_topic(project: &str, requested: &str) -> Option<String> {
    let topic = requested.trim();
    confined(project, Route::Reply, topic).then(|| topic.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityBinding;

    #[test]
    fn subscriptions_cover_input_and_controls_with_and_without_session_level() {
        let subs = subscriptions("p", None, IdentityBinding::Off);
        assert_eq!(
            subs,
            [
                "p/user_input",
                "p/template",
                "p/template/+",
                "p/clear_history",
                "p/clear_history/+",
                "p/delete_session",
                "p/delete_session/+",
                "p/cancel/+",
            ]
        );
        let shared = subscriptions("p", Some("g"), IdentityBinding::Off);
        assert_eq!(shared.len(), subs.len());
        let (cancel, rest) = shared.split_last().unwrap();
        assert!(rest.iter().all(|t| t.starts_with("$share/g/p/")));
        assert_eq!(cancel, "p/cancel/+");
        let bound = subscriptions("p", None, IdentityBinding::Only);
        assert_eq!(bound[0], "p/user_input/+");
        assert!(!bound.contains(&"p/user_input".to_owned()));
        assert_eq!(bound.len(), subs.len());
    }

    #[test]
    fn default_reply_topic_stays_inside_the_reply_space() {
        let cases = [
            ("s1", "p/assistant_response/s1"),
            ("../x", "p/assistant_response/../x"),
            ("a/+/b", "p/assistant_response/a/_/b"),
            ("#", "p/assistant_response/_"),
            ("a\0b", "p/assistant_response/a_b"),
            ("tab\there", "p/assistant_response/tab_here"),
            ("del\u{7f}", "p/assistant_response/del_"),
            ("c1\u{85}", "p/assistant_response/c1_"),
            ("nc\u{ffff}\u{fdd0}\u{1fffe}", "p/assistant_response/nc___"),
            ("héllo wörld 💬", "p/assistant_response/héllo wörld 💬"),
        ];
        for (sid, want) in cases {
            let topic = default_reply_topic("p", sid);
            assert_eq!(topic, want, "session id {sid:?}");
            assert!(confined("p", Route::Reply, &topic), "{topic:?} refused");
        }
    }

    #[test]
    fn confinement_table() {
        let cases: &[(Route, &str, bool)] = &[
            (Route::Reply, "p/assistant_response/s", true),
            (Route::Reply, "p/assistant_response/s/c/r", true),
            (Route::Reply, "p/assistant_response//", true),
            (Route::Reply, "p/assistant_response/", false),
            (Route::Reply, "p/assistant_response", false),
            (Route::Reply, "q/assistant_response/s", false),
            (Route::Reply, "pp/assistant_response/s", false),
            (Route::Reply, "p/assistant_responseX/s", false),
            (Route::Reply, "p/hint/s", false),
            (Route::Reply, "p/status", false),
            (Route::Reply, "p/assistant_response/+", false),
            (Route::Reply, "p/assistant_response/#", false),
            (Route::Reply, "p/assistant_response/a\0", false),
            (Route::Reply, "p/assistant_response/a\u{1}", false),
            (Route::Reply, "/p/assistant_response/s", false),
            (Route::Hint, "p/hint/all", true),
            (Route::Hint, "p/hint/", false),
            (Route::Hint, "p/assistant_response/s", false),
            (Route::Status, "p/status", true),
            (Route::Status, "p/status/x", false),
            (Route::Status, "q/status", false),
        ];
        for &(route, topic, want) in cases {
            assert_eq!(confined("p", route, topic), want, "{route:?} {topic:?}");
        }
        let long = format!("p/assistant_response/{}", "x".repeat(MAX_TOPIC_BYTES));
        assert!(!confined("p", Route::Reply, &long));
    }

    #[test]
    fn reply_topic_from_client() {
        let cases = [
            (
                "p/assistant_response/s/c/r",
                Some("p/assistant_response/s/c/r"),
            ),
            ("  p/assistant_response/s  ", Some("p/assistant_response/s")),
            ("p/assistant_response/", None),
            ("   ", None),
            ("", None),
            ("p/assistant_response/+/x", None),
            ("p/assistant_response/#", None),
            ("other/assistant_response/s", None),
            ("p/user_input", None),
            ("p/assistant_response/\u{0}", None),
        ];
        for (raw, want) in cases {
            assert_eq!(valid_reply_topic("p", raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn hint_and_status_topics() {
        assert_eq!(hint_topic("p", Some("s1")), "p/hint/s1");
        assert_eq!(hint_topic("p", None), "p/hint/all");
        assert_eq!(hint_topic("p", Some("a+b")), "p/hint/a_b");
        assert_eq!(status_topic("p"), "p/status");
        assert!(confined("p", Route::Hint, &hint_topic("p", Some("#"))));
    }
}
